"""The causal library: residual patching on held-out text, the forward passes and loss accounting behind
`ato causal_reference` and `ato causal`.

On held-out TEST-split sequences (never val/train), the residual after block T = L+k is overwritten, at
a chosen set of positions, with the condition's value:

    clean       no patch
    ato         W x_L + b            (the fitted operator on this very forward's x_L)
    identity    x_L                  (pure carry-over, no transport map)
    zero        0                    (zero ablation)
    bias_only   b                    (the operator with its input removed)
    train_mean  ȳ_train              (mean ablation: the train-split mean of y, BOS excluded like every fit)
    mean_update x_L + ȳ_train − x̄_train (the residual carried, the computation replaced by its average)

Every patched residual is `ato.splicing.patch_rows`, the implementation behind the public `ato.splice`
(one implementation: replayed from a traced forward below, or hooked into a full forward by
`ato.splicing.spliced`). BOS (position 0) and other special tokens are never patched. The loss is the
next-token NLL from the final hidden states through the chunked LM head (`ato.lm_head.chunked_nll`, with
the model's final logit softcapping), so the 262k-vocab logits never exist all at once. Two token
scopes: `all` (every prediction but the one made at BOS, which no patch can change) and `after`
(predictions at or after the first patched position — the only ones a patch can change in a causal
model; earlier rows are taken from the clean pass, which is exact, and skip the LM head, which
dominates the cost).

Shared work (issue 11):

- clean, zero and train_mean depend only on T, so `ato causal_reference` computes them once per target
  layer (`reference_conditions`, a `CausalReference` record); each pair's `ato causal` runs only ato,
  identity, bias_only and mean_update (`pair_conditions`) and takes the rest from its target's record
  (`check_reference`, `merge_reference`).
- Everything up to block T is the clean forward. One traced clean forward per batch (`trace_body`)
  records the residuals and the call of every later block; each patched condition then replays only
  blocks T+1.. and the body's final norm (`BodyTrace.replay`). The replay is checked bit for bit against
  the traced forward's own final hidden states; where they differ (a body that does more between its
  blocks than hand each block's output to the next) that batch's conditions run as full forwards with
  a patching hook instead: the same numbers at the old cost, with a warning. Given the clean NLL (the
  reference's), a batch after the first exact one traces only blocks ≤ T and replays with that batch's
  calls of the later blocks when every block ≤ T got the same arguments (masks, position embeddings;
  `trace_prefix`), else it is traced and checked in full: the blocks after T run once per batch and
  condition, not twice more for the clean forward and its check (issue 23).

Per condition vs clean: Δ log-perplexity = Σ_j (patched NLL sum_j − clean NLL sum_j) / Σ_j tokens_j with
its interval over sequences, and the share of a reference condition's damage the ATO recovers,
1 − Δ(ato)/Δ(reference), against mean_update (the headline, `causal.headline_reference`), train_mean,
zero and identity (`ato.math.intervals`, docs/statistics.md#intervals, docs/method.md#causal).

Modules: `inputs` (held-out sequences, position sets), `forward` (the NLL, patched and traced forwards),
`conditions` (the patched conditions, `run_conditions`), `reference` (the target layer's record and its
use by a pair), `summary` (Δ and recovered shares with intervals).
"""

from ato.artifacts.causal import SCOPES, all_conditions, patched_conditions
from ato.causal.conditions import (
    Condition,
    PairPatch,
    SetResult,
    pair_conditions,
    reference_conditions,
    run_conditions,
    run_pair,
)
from ato.causal.forward import BodyTrace, patched_token_nll, token_nll, trace_body, trace_prefix
from ato.causal.inputs import (
    SPLIT,
    CausalError,
    HeldOut,
    check_model,
    check_position_sets,
    load_sequences,
    position_mask,
)
from ato.causal.reference import check_reference, merge_reference, reference_record
from ato.causal.summary import LEVEL, flat_numbers, summarise_set

__all__ = [
    "LEVEL",
    "SCOPES",
    "SPLIT",
    "BodyTrace",
    "CausalError",
    "Condition",
    "HeldOut",
    "PairPatch",
    "SetResult",
    "all_conditions",
    "check_model",
    "check_position_sets",
    "check_reference",
    "flat_numbers",
    "load_sequences",
    "merge_reference",
    "pair_conditions",
    "patched_conditions",
    "patched_token_nll",
    "position_mask",
    "reference_conditions",
    "reference_record",
    "run_conditions",
    "run_pair",
    "summarise_set",
    "token_nll",
    "trace_body",
    "trace_prefix",
]
