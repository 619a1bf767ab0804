"""Residual patching on held-out text: the forward passes and loss accounting behind `ato causal_reference`
and `ato causal`.

On held-out TEST-split sequences (never val/train), the residual after block T = L+k is overwritten, at
a chosen set of positions, with the condition's value:

    clean       no patch
    ato         W x_L + b            (the fitted operator on this very forward's x_L)
    identity    x_L                  (pure carry-over, no transport map)
    zero        0                    (zero ablation)
    bias_only   b                    (the operator with its input removed)
    train_mean  ȳ_train              (mean ablation: the train-split mean of y, BOS excluded like every fit)

Every patched residual is `ato.splicing.patch_rows`, the implementation behind the public `ato.splice`
(one implementation: replayed from a traced forward below, or hooked into a full forward by
`ato.splicing.spliced`). BOS (position 0) and other special tokens are never patched. The loss is the
next-token NLL from the final hidden states through the chunked LM head (`ato.models.chunked_nll`, with
the model's final logit softcapping), so the 262k-vocab logits never exist all at once. Two token scopes: `all` (every
predicted token) and `after` (predictions at or after the first patched position — the only ones a
patch can change in a causal model; earlier rows are taken from the clean pass, which is exact, and
skip the LM head, which dominates the cost).

Shared work (issue 11):

- clean, zero and train_mean depend only on T, so `ato causal_reference` computes them once per target
  layer (`reference_conditions`, a `CausalReference` record); each pair's `ato causal` runs only ato,
  identity and bias_only (`pair_conditions`) and takes the rest from its target's record
  (`check_reference`, `merge_reference`).
- Everything up to block T is the clean forward. One traced clean forward per batch (`trace_body`)
  records the residuals and the call of every later block; each patched condition then replays only
  blocks T+1.. and the body's final norm (`BodyTrace.replay`). The replay is checked bit for bit against
  the traced forward's own final hidden states on every batch; where they differ (a body that does
  more between its blocks than hand each block's output to the next) that batch's conditions run as
  full forwards with a patching hook instead: the same numbers at the old cost, with a warning.

Per condition vs clean: Δ log-perplexity = Σ_j (patched NLL sum_j − clean NLL sum_j) / Σ_j tokens_j with
its interval over sequences, and the share of a reference condition's damage the ATO recovers,
1 − Δ(ato)/Δ(reference), against train_mean (the headline, `causal.headline_reference`), zero and
identity (`ato.math.intervals`, docs/statistics.md#intervals, docs/method.md#causal).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ato.artifacts import (
    CausalReference,
    CleanScores,
    ModelInfo,
    PatchedScores,
    PositionSetSummary,
    RecoveredShare,
    ReferenceSet,
    SequenceDetail,
)
from ato.artifacts.causal import CONDITIONS, PAIR_CONDITIONS, PATCHED, REFERENCE_CONDITIONS, REFERENCES, SCOPES
from ato.errors import AtoError
from ato.math.intervals import Interval, delta_interval, recovered_interval, unscorable_positions
from ato.models import base_model, chunked_nll, decoder_blocks, final_hidden
from ato.params import CausalParams
from ato.splicing import patch_rows, spliced
from ato.store import ActivationStore

log = logging.getLogger(__name__)

SPLIT = "test"  # the only split the causal check reads: never used for fitting or tuning
LEVEL = 0.95  # two-sided level of every causal interval
ValueFn = Callable[[torch.Tensor], torch.Tensor]  # x_L rows [m, d] → patch values [m, d]
PositionSpec = list[int] | str  # a list of positions, or "all"

__all__ = [
    "CONDITIONS",
    "LEVEL",
    "PATCHED",
    "SCOPES",
    "SPLIT",
    "BodyTrace",
    "CausalError",
    "Condition",
    "HeldOut",
    "PairPatch",
    "SetResult",
    "check_model",
    "check_position_sets",
    "check_reference",
    "condition_values",
    "flat_numbers",
    "load_sequences",
    "merge_reference",
    "pair_conditions",
    "patched_token_nll",
    "position_mask",
    "reference_conditions",
    "reference_record",
    "run_conditions",
    "run_pair",
    "summarise_set",
    "token_nll",
    "trace_body",
]


class CausalError(AtoError):
    """Bad causal-stage input (positions, sequences, operator, statistics); names what is at fault."""


# --------------------------------------------------------------------------------------------
# Held-out sequences


@dataclass
class HeldOut:
    """`n` test sequences of exactly `seq_len` tokens, each BOS-led (position 0)."""

    tokens: torch.Tensor  # int64 [n, T]
    special: torch.Tensor  # bool [n, T]
    offsets: list[int]  # row of each sequence's first token in the split (concatenated parts)
    doc_ids: list[int]


TOKEN_COLUMNS = ("token_id", "position", "special", "doc_id")


def load_sequences(store: ActivationStore, n_sequences: int, seq_len: int, split: str = SPLIT) -> HeldOut:
    """The first `n_sequences` sequences of `split` with at least `seq_len` tokens, cut to `seq_len`.

    Only the per-token arrays are read (no residuals), part by part, stopping as soon as enough
    sequences are complete. Sequences may cross part boundaries. Too few → `CausalError` naming the
    store, split and counts, before any model runs.
    """
    cols: dict[str, list[np.ndarray]] = {k: [] for k in TOKEN_COLUMNS}
    chosen: list[int] = []
    n_seen_seqs = n_read = 0
    parts = store.parts(split)
    for index in range(len(parts)):
        group = store.open_part(split, index)
        try:
            for k in TOKEN_COLUMNS:
                cols[k].append(np.asarray(group[k][:]))
        except Exception as exc:  # a corrupt chunk fails its crc32c check here
            raise CausalError(f"{parts[index]}: reading the token arrays failed: {exc}") from exc
        n_read += len(cols["token_id"][-1])
        starts = np.flatnonzero(np.concatenate(cols["position"]) == 0)
        chosen, n_seen_seqs = _qualifying(starts, n_read, seq_len, n_sequences)
        if len(chosen) >= n_sequences:
            break
    if len(chosen) < n_sequences:
        raise CausalError(
            f"{store.root}: the {split!r} split has only {len(chosen)} sequence(s) with at least "
            f"causal.seq_len={seq_len} tokens (of {n_seen_seqs} sequences, {n_read} tokens), but "
            f"causal.n_sequences={n_sequences} are needed; lower causal.seq_len / causal.n_sequences "
            "or collect longer/more test text (corpus.max_length, corpus.tokens.test)"
        )
    return _cut(store, split, {k: np.concatenate(v) for k, v in cols.items()}, chosen[:n_sequences], seq_len)


def _cut(store: ActivationStore, split: str, data: dict[str, np.ndarray], chosen: list[int], seq_len: int) -> HeldOut:
    rows = np.asarray(chosen)[:, None] + np.arange(seq_len)[None, :]
    positions = data["position"][rows]
    if not np.array_equal(positions, np.broadcast_to(np.arange(seq_len), positions.shape)):
        bad = int(np.flatnonzero((positions != np.arange(seq_len)).any(1))[0])
        raise CausalError(
            f"{store.root}/{split}: sequence starting at row {chosen[bad]} has non-contiguous positions "
            f"{positions[bad][:8].tolist()}…; the store is inconsistent (re-run `ato collect`)"
        )
    return HeldOut(
        tokens=torch.as_tensor(data["token_id"][rows].astype(np.int64)),
        special=torch.as_tensor(data["special"][rows].astype(bool)),
        offsets=[int(s) for s in chosen],
        doc_ids=[int(d) for d in data["doc_id"][rows[:, 0]]],
    )


def _qualifying(starts: np.ndarray, n_read: int, seq_len: int, wanted: int) -> tuple[list[int], int]:
    """Starts whose first `seq_len` tokens are read and belong to that one sequence."""
    chosen: list[int] = []
    nxt = np.append(starts[1:], np.iinfo(np.int64).max)
    for s, e in zip(starts.tolist(), nxt.tolist()):
        if s + seq_len <= min(e, n_read):
            chosen.append(s)
            if len(chosen) >= wanted:
                break
    return chosen, len(starts)


def check_model(store: ActivationStore, held: HeldOut, model: nn.Module, info: ModelInfo, model_dir: Path) -> None:
    """The store's token ids must come from this model's tokenizer and fit its vocabulary."""
    store_model = store.manifest.model.weights_digest
    if store_model is not None and store_model != info.weights_digest:
        raise CausalError(
            f"{store.root}: the store was collected with model weights {str(store_model)[:12]}…, but "
            f"{model_dir} has {info.weights_digest[:12]}…; its token ids may not fit this model"
        )
    config: Any = model.config  # an HF PretrainedConfig
    vocab = int(config.vocab_size)
    if int(held.tokens.max()) >= vocab:
        raise CausalError(f"{store.root}/{SPLIT}: token id {int(held.tokens.max())} ≥ the model's vocab {vocab}")


# --------------------------------------------------------------------------------------------
# Position sets


def position_mask(spec: PositionSpec, seq_len: int, name: str = "") -> torch.Tensor:
    """bool [seq_len]: positions a set patches. "all" = every position but 0 (BOS)."""
    mask = torch.zeros(seq_len, dtype=torch.bool)
    if spec == "all":
        mask[1:] = True
        return mask
    if isinstance(spec, str) or not spec:
        raise CausalError(f"causal.position_sets.{name}: expected `all` or a non-empty list of positions")
    bad = unscorable_positions(spec, seq_len)
    if bad:
        raise CausalError(
            f"causal.position_sets.{name}: position(s) {bad} cannot change any scored prediction "
            f"(patchable positions are 1..{seq_len - 2} for causal.seq_len={seq_len}; 0 is BOS)"
        )
    mask[torch.as_tensor([int(p) for p in spec])] = True
    return mask


def check_position_sets(position_sets: dict[str, Any], seq_len: int) -> dict[str, torch.Tensor]:
    if not position_sets:
        raise CausalError("causal.position_sets: empty; give at least one set (e.g. `all: all`)")
    return {name: position_mask(spec, seq_len, name) for name, spec in position_sets.items()}


# --------------------------------------------------------------------------------------------
# Forward passes


def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    chunk_rows: int,
    hidden: torch.Tensor | None = None,
    from_col: int = 0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL [B, T-1]: column j is −log p(token j+1 | tokens ≤ j).

    Columns < `from_col` are copied from `base` (the clean NLL) and skip the LM head: a patch at
    positions ≥ from_col cannot change them in a causal model.
    """
    if hidden is None:
        hidden = final_hidden(model, input_ids)
    B, T = input_ids.shape
    nll = torch.empty(B, T - 1, dtype=torch.float32, device=input_ids.device)
    if from_col > 0:
        if base is None:
            raise ValueError("from_col > 0 needs the clean NLL as `base`")
        nll[:, :from_col] = base[:, :from_col]
    if from_col < T - 1:
        h = hidden[:, from_col : T - 1].reshape(-1, hidden.shape[-1])
        y = input_ids[:, from_col + 1 :].reshape(-1)
        nll[:, from_col:] = chunked_nll(model, h, y, chunk_rows).view(B, T - 1 - from_col)
    return nll


def _first_patched_col(patch: torch.Tensor) -> int:
    """The first column any row of `patch` [B, T] patches (T − 1: none, so no LM-head row is needed)."""
    return int(patch.any(0).nonzero()[0]) if patch.any() else patch.shape[1] - 1


def patched_token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    layer_in: int,
    layer_out: int,
    patch: torch.Tensor,
    value_fn: ValueFn,
    chunk_rows: int,
    clean_nll: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL [B, T-1] of one full forward where residual `layer_out` at `patch` [B, T] (bool) is
    replaced by `value_fn(x_layer_in[patch])`, x captured from the same forward (the reference
    implementation that `run_conditions` shares the prefix of)."""
    if layer_out <= layer_in:
        raise ValueError(f"layer_out {layer_out} must come after layer_in {layer_in}")
    with spliced(model, layer_out, value_fn, patch.nonzero(as_tuple=True), layer_in):
        hidden = final_hidden(model, input_ids)
    from_col = _first_patched_col(patch) if clean_nll is not None else 0
    return token_nll(model, input_ids, chunk_rows, hidden=hidden, from_col=from_col, base=clean_nll)


def _block_output(output: object) -> torch.Tensor:
    # as ato.models: recent transformers return the hidden state itself; older versions and GPT-2 a tuple
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


@dataclass
class BodyTrace:
    """One clean forward of the body: residuals, and what every block from `replay_from` on and every
    module after the last block was called with, so the rest of the body can be re-run from a changed
    residual (`replay`)."""

    residuals: dict[int, torch.Tensor]  # layer → block output [B, T, d]
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]]  # block index → (args, kwargs) of its call
    tail: list[nn.Module]  # the body's modules called after its last block, in order (the final norm)
    final: torch.Tensor  # final hidden states [B, T, d] of the clean forward

    def replay(self, model: nn.Module, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states when the residual after block `layer` is `hidden`: blocks layer+1.. and
        the tail run again with the arguments of the traced call; nothing before them does."""
        blocks = decoder_blocks(model)
        for j in range(layer + 1, len(blocks)):
            args, kwargs = self.calls[j]
            out = blocks[j](hidden, *args[1:], **kwargs) if args else blocks[j](**{**kwargs, "hidden_states": hidden})
            hidden = _block_output(out)
        for module in self.tail:
            hidden = module(hidden)
        return hidden


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_body(model: nn.Module, input_ids: torch.Tensor, layers: list[int], replay_from: int) -> BodyTrace:
    """The clean forward of `input_ids` with the residuals of `layers` and the calls of blocks
    ≥ `replay_from` recorded (`BodyTrace`)."""
    blocks, body = decoder_blocks(model), base_model(model)
    residuals: dict[int, torch.Tensor] = {}
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    finished: list[tuple[str, Any]] = []  # ("block", index) / ("child", module) in the order they return

    def on_block(j: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if j in layers:
                residuals[j] = _block_output(output).detach()
            finished.append(("block", j))

        return hook

    def on_call(j: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[j] = (args, dict(kwargs))

        return hook

    def on_child(module: nn.Module) -> Callable[..., None]:
        return lambda *_: finished.append(("child", module))

    handles = [b.register_forward_hook(on_block(j)) for j, b in enumerate(blocks)]
    handles += [
        blocks[j].register_forward_pre_hook(on_call(j), with_kwargs=True) for j in range(replay_from, len(blocks))
    ]
    handles += [m.register_forward_hook(on_child(m)) for m in body.children() if m is not blocks]
    with _hooks(handles):
        final = final_hidden(model, input_ids)
    last = max(i for i, (kind, _) in enumerate(finished) if kind == "block")
    tail = [m for kind, m in finished[last + 1 :] if kind == "child"]
    return BodyTrace(residuals, calls, tail, final)


# --------------------------------------------------------------------------------------------
# Conditions


def condition_values(W: torch.Tensor, b: torch.Tensor, mean_y: torch.Tensor) -> dict[str, ValueFn]:
    """The patch value of every patched condition, as a function of x_L at the patched rows."""
    return {
        "ato": lambda x: nn.functional.linear(x, W, b),
        "identity": lambda x: x,
        "zero": lambda x: torch.zeros_like(x),
        "bias_only": lambda x: b.expand(x.shape[0], -1),
        "train_mean": lambda x: mean_y.expand(x.shape[0], -1),
    }


@dataclass
class Condition:
    """One patched condition: its name, the residual its value is computed from, and the value."""

    name: str
    layer_in: int | None  # the layer whose residual `value` reads (None: a constant, given y rows for shape)
    value: ValueFn  # residual rows at the patched positions [m, d] → patch values [m, d]


@dataclass
class PairPatch:
    """What one pair patches with: layers and the operator the conditions need."""

    name: str  # pair name
    layer_in: int  # L
    layer_out: int  # L + k
    W: torch.Tensor  # [d, d] float32
    b: torch.Tensor  # [d]


def pair_conditions(pair: PairPatch, device: torch.device | str = "cpu") -> list[Condition]:
    """ato, identity and bias_only of one pair (`PAIR_CONDITIONS`)."""
    W, b = pair.W.to(device), pair.b.to(device)
    values = condition_values(W, b, b)
    return [Condition(c, pair.layer_in, values[c]) for c in PAIR_CONDITIONS]


def reference_conditions(mean_y: torch.Tensor, device: torch.device | str = "cpu") -> list[Condition]:
    """zero and train_mean of one target layer (`REFERENCE_CONDITIONS`); `mean_y` [d] is ȳ_train."""
    mean = mean_y.to(device)
    values = condition_values(mean, mean, mean)
    return [Condition(c, None, values[c]) for c in REFERENCE_CONDITIONS]


# --------------------------------------------------------------------------------------------
# Every batch × position set × condition of one target layer


@dataclass
class SetResult:
    """Per-sequence NLL sums of one position set: nll_sum[condition][scope] and token counts."""

    name: str
    spec: PositionSpec
    mask: torch.Tensor  # [T] positions of the set
    conditions: list[str]  # "clean" and the conditions run
    nll_sum: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    count: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SCOPES})
    n_patched: list[int] = field(default_factory=list)
    first_patched: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for c in self.conditions:
            self.nll_sum.setdefault(c, {s: [] for s in SCOPES})


@dataclass
class _Batch:
    """One batch's tokens, traced clean forward, clean NLL and whether the replay reproduces it."""

    ids: torch.Tensor
    special: torch.Tensor
    trace: BodyTrace
    clean: torch.Tensor  # [B, T-1]
    replay_exact: bool


def run_conditions(
    model: nn.Module,
    held: HeldOut,
    layer_out: int,
    conditions: list[Condition],
    masks: dict[str, torch.Tensor],
    specs: Mapping[str, PositionSpec],
    batch_size: int,
    chunk_rows: int,
    clean_nll: torch.Tensor | None = None,
    share_prefix: bool = True,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, SetResult], torch.Tensor]:
    """Per-sequence NLL sums of "clean" and every condition, patching residual `layer_out`, for every
    position set; and the clean NLL [n, T-1] (float32, CPU).

    `clean_nll`: the clean NLL from an earlier run on the same sequences and batches (a
    `CausalReference`); None computes it here. `share_prefix=False` runs every condition as a full
    forward (the design before issue 11; for comparison). `timings` accumulates seconds per
    condition ("clean": the traced forward, its replay check and the clean LM head).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    names = ["clean", *(c.name for c in conditions)]
    results = {n: SetResult(n, specs[n], m, names) for n, m in masks.items()}
    layers = sorted({layer_out, *(c.layer_in for c in conditions if c.layer_in is not None)})
    clock = _Clock(device, timings)
    cleans: list[torch.Tensor] = []
    starts = list(range(0, held.tokens.shape[0], batch_size))
    bar = tqdm(total=len(starts) * len(masks) * len(conditions), desc=f"causal T={layer_out}", disable=not progress)
    with torch.inference_mode():
        for start in starts:
            with clock("clean"):
                stop = start + batch_size
                base = None if clean_nll is None else clean_nll[start:stop].to(device)
                batch = _trace_batch(model, held, start, stop, layers, layer_out, chunk_rows, base, share_prefix)
            cleans.append(batch.clean.cpu())
            for res in results.values():
                _run_set(model, batch, layer_out, conditions, res, chunk_rows, clock, bar.update)
    bar.close()
    return results, torch.cat(cleans)


def _trace_batch(
    model: nn.Module,
    held: HeldOut,
    start: int,
    stop: int,
    layers: list[int],
    layer_out: int,
    chunk_rows: int,
    clean: torch.Tensor | None,
    share_prefix: bool,
) -> _Batch:
    device = next(model.parameters()).device
    ids, special = held.tokens[start:stop].to(device), held.special[start:stop].to(device)
    trace = trace_body(model, ids, layers, replay_from=layer_out + 1)
    exact = share_prefix and torch.equal(trace.replay(model, layer_out, trace.residuals[layer_out]), trace.final)
    if share_prefix and not exact:
        log.warning(
            "sequences %d–%d: re-running blocks %d.. from the traced calls does not reproduce the model's own "
            "forward bit for bit; these batches patch with full forwards (same numbers, more time)",
            start,
            stop - 1,
            layer_out + 1,
        )
    if clean is None:
        clean = token_nll(model, ids, chunk_rows, hidden=trace.final)
    return _Batch(ids, special, trace, clean, exact)


def _run_set(
    model: nn.Module,
    batch: _Batch,
    layer_out: int,
    conditions: list[Condition],
    res: SetResult,
    chunk_rows: int,
    clock: _Clock,
    tick: Callable[[int], Any],
) -> None:
    """One batch of one position set: every condition's patched pass, sums appended to `res`."""
    ids, trace = batch.ids, batch.trace
    B, T = ids.shape
    patch = res.mask.to(ids.device)[None, :] & ~batch.special
    patch[:, 0] = False  # BOS is never patched, whatever the set says
    has = patch.any(1)
    first = torch.where(has, patch.int().argmax(1), torch.full_like(has, T, dtype=torch.long))
    after = torch.arange(T - 1, device=ids.device)[None, :] >= first[:, None]  # predictions a patch can change
    res.n_patched += patch.sum(1).tolist()
    res.first_patched += [int(f) for f, h in zip(first.tolist(), has.tolist()) if h]
    res.count["all"] += [T - 1] * B
    res.count["after"] += after.sum(1).tolist()
    rows, from_col = patch.nonzero(as_tuple=True), _first_patched_col(patch)
    y = trace.residuals[layer_out]
    per_cond = {"clean": batch.clean}
    for cond in conditions:
        with clock(cond.name):
            if batch.replay_exact:
                x = None if cond.layer_in is None else trace.residuals[cond.layer_in]
                hidden = trace.replay(model, layer_out, patch_rows(y, x, rows, cond.value))
            else:  # the same patch by hooks in a full forward (`ato.splicing`, what `ato.splice` runs)
                with spliced(model, layer_out, cond.value, rows, cond.layer_in):
                    hidden = final_hidden(model, ids)
            per_cond[cond.name] = token_nll(model, ids, chunk_rows, hidden=hidden, from_col=from_col, base=batch.clean)
        tick(1)
    for name, nll in per_cond.items():
        nll64 = nll.double()
        res.nll_sum[name]["all"] += nll64.sum(1).tolist()
        res.nll_sum[name]["after"] += (nll64 * after).sum(1).tolist()


class _Clock:
    """Seconds per condition into `timings` (None: not timed); synchronises CUDA around each span."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.sync = device.type == "cuda"
        self.timings = timings

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def run_pair(
    model: nn.Module,
    held: HeldOut,
    pair: PairPatch,
    mean_y: torch.Tensor,
    masks: dict[str, torch.Tensor],
    specs: Mapping[str, PositionSpec],
    batch_size: int,
    chunk_rows: int,
    share_prefix: bool = False,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> dict[str, SetResult]:
    """Every condition of one pair in one run, clean included: the per-pair design before issue 11
    (with `share_prefix=False`, its cost too). What `ato causal_reference` + `ato causal` must equal."""
    device = next(model.parameters()).device
    conditions = pair_conditions(pair, device) + reference_conditions(mean_y, device)
    conditions.sort(key=lambda c: PATCHED.index(c.name))
    results, _ = run_conditions(
        model,
        held,
        pair.layer_out,
        conditions,
        masks,
        specs,
        batch_size,
        chunk_rows,
        None,
        share_prefix,
        progress,
        timings,
    )
    return results


# --------------------------------------------------------------------------------------------
# The reference record of a target layer, and its use by a pair


def reference_record(
    layer: int,
    held: HeldOut,
    results: dict[str, SetResult],
    clean_nll: torch.Tensor,
    *,
    model_digest: str,
    store_digest: str | None,
    batch_size: int,
    mean_source: str,
    seconds: float,
) -> CausalReference:
    """The `CausalReference` of target layer `layer` from its `run_conditions` results."""
    return CausalReference(
        layer=layer,
        split=SPLIT,
        seq_len=int(held.tokens.shape[1]),
        batch_size=batch_size,
        sequence_offsets=held.offsets,
        doc_ids=held.doc_ids,
        model_digest=model_digest,
        store_digest=store_digest,
        mean_source=mean_source,
        clean_nll=clean_nll.double().tolist(),
        position_sets={
            name: ReferenceSet(
                positions=res.spec,
                n_patched=[int(v) for v in res.n_patched],
                first_patched_position=[int(v) for v in res.first_patched],
                n_tokens={s: [int(v) for v in res.count[s]] for s in SCOPES},
                nll_sum={c: {s: list(res.nll_sum[c][s]) for s in SCOPES} for c in ("clean", *REFERENCE_CONDITIONS)},
            )
            for name, res in results.items()
        },
        seconds=seconds,
    )


def check_reference(
    ref: CausalReference,
    path: Path,
    held: HeldOut,
    *,
    layer: int,
    model_digest: str,
    store_digest: str | None,
    specs: Mapping[str, PositionSpec],
    batch_size: int,
) -> None:
    """The reference record was computed for these sequences, this model, store, position sets and
    batches (the batch size fixes which sequences share a forward, hence the last bits of its loss)."""
    n, seq_len = held.tokens.shape
    checks = [
        ("target layer", ref.layer, layer),
        ("split", ref.split, SPLIT),
        ("causal.seq_len", ref.seq_len, int(seq_len)),
        ("causal.batch_size", ref.batch_size, batch_size),
        ("held-out sequences (offsets in the test split)", ref.sequence_offsets, held.offsets),
        ("held-out documents", ref.doc_ids, held.doc_ids),
        ("model weights digest", ref.model_digest, model_digest),
        ("store digest", ref.store_digest, store_digest),
        ("causal.position_sets", {k: v.positions for k, v in ref.position_sets.items()}, dict(specs)),
    ]
    for what, found, expected in checks:
        if found != expected:
            raise CausalError(
                f"{path}: computed for other {what} ({_short(found)}; now {_short(expected)}); "
                "rerun `ato causal_reference`"
            )
    if np.shape(ref.clean_nll) != (n, seq_len - 1):
        raise CausalError(f"{path}: clean NLL of shape {np.shape(ref.clean_nll)}, expected {(n, seq_len - 1)}")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "…"


def merge_reference(results: dict[str, SetResult], ref: CausalReference, path: Path) -> dict[str, SetResult]:
    """`results` (a pair's conditions) with the reference's zero and train_mean sums added, after
    checking that both saw the same clean loss, patched positions and token counts."""
    for name, res in results.items():
        rs = ref.position_sets[name]
        same = (
            rs.n_patched == res.n_patched
            and rs.first_patched_position == res.first_patched
            and rs.n_tokens == res.count
            and rs.nll_sum["clean"] == res.nll_sum["clean"]
        )
        if not same:
            raise CausalError(
                f"{path}: position set {name!r} patched other positions or scored another clean loss than "
                "this run on the same sequences; rerun `ato causal_reference`"
            )
        res.conditions += [c for c in REFERENCE_CONDITIONS if c not in res.conditions]
        for c in REFERENCE_CONDITIONS:
            res.nll_sum[c] = {s: list(rs.nll_sum[c][s]) for s in SCOPES}
    return results


# --------------------------------------------------------------------------------------------
# From per-sequence sums to the summary


def summarise_set(res: SetResult, cp: CausalParams) -> tuple[PositionSetSummary, SequenceDetail]:
    """Token-weighted log-perplexities, Δ vs clean and the recovered share against each reference of
    one position set, every one with its interval (`cp.interval` over sequences); and its detail."""
    missing = [c for c in CONDITIONS if c not in res.nll_sum]
    if missing:
        raise CausalError(f"position set {res.name}: no sums for condition(s) {missing}")
    sums = {c: {s: np.asarray(res.nll_sum[c][s], dtype=np.float64) for s in SCOPES} for c in CONDITIONS}
    counts = {s: np.asarray(res.count[s], dtype=np.float64) for s in SCOPES}
    kw: dict[str, Any] = {"level": LEVEL, "method": cp.interval, "n_resamples": cp.bootstrap_resamples, "seed": cp.seed}
    patched = {c: _patched_scores(sums[c], sums["clean"], counts, kw) for c in PATCHED}
    shares = {r: _recovered(sums["ato"], sums[r], sums["clean"], r, kw) for r in REFERENCES}
    summary = PositionSetSummary(
        n_patched_tokens=int(sum(res.n_patched)),
        first_patched_position=int(min(res.first_patched)) if res.first_patched else -1,
        n_tokens_all=int(counts["all"].sum()),
        n_tokens_after=int(counts["after"].sum()),
        clean=CleanScores(**{f"logppl_{s}": _ratio(sums["clean"][s], counts[s]) for s in SCOPES}),
        **patched,
        recovered=shares[cp.headline_reference],
        recovered_vs_train_mean=shares["train_mean"],
        recovered_vs_zero=shares["zero"],
        recovered_vs_identity=shares["identity"],
    )
    detail = SequenceDetail(
        positions=res.spec,
        n_patched=[int(v) for v in res.n_patched],
        first_patched_position=[int(v) for v in res.first_patched],
        n_tokens={s: [int(v) for v in res.count[s]] for s in SCOPES},
        nll_sum={c: {s: sums[c][s].tolist() for s in SCOPES} for c in CONDITIONS},
        mean_nll={c: {s: _safe_div(sums[c][s], counts[s]).tolist() for s in SCOPES} for c in CONDITIONS},
    )
    return summary, detail


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    total = float(den.sum())
    return float(num.sum() / total) if total > 0 else math.nan


def _nan_interval(kw: dict[str, Any], n: int) -> Interval:
    return Interval(math.nan, math.nan, math.nan, kw["level"], kw["method"], n)


def _patched_scores(
    sums: dict[str, np.ndarray], clean: dict[str, np.ndarray], counts: dict[str, np.ndarray], kw: dict[str, Any]
) -> PatchedScores:
    row: dict[str, float] = {}
    for s in SCOPES:
        n = len(counts[s])
        iv = delta_interval(sums[s], clean[s], counts[s], **kw) if counts[s].sum() > 0 else _nan_interval(kw, n)
        row |= {
            f"logppl_{s}": _ratio(sums[s], counts[s]),
            f"delta_{s}_mean": iv.estimate,
            f"delta_{s}_lo": iv.low,
            f"delta_{s}_hi": iv.high,
            f"delta_{s}_half_width": iv.half_width,
        }
    return PatchedScores(**row)


def _recovered(
    ato: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    clean: dict[str, np.ndarray],
    reference: str,
    kw: dict[str, Any],
) -> RecoveredShare:
    """1 − Δ(ato)/Δ(reference) per scope; NaN where the reference does no damage at all (Σ Δ = 0)."""
    row: dict[str, Any] = {"reference": reference}
    for s in SCOPES:
        damage = float((ref[s] - clean[s]).sum())
        n = len(ref[s])
        iv = recovered_interval(ato[s], ref[s], clean[s], **kw) if damage != 0 else _nan_interval(kw, n)
        row |= {
            f"{s}_mean": iv.estimate,
            f"{s}_lo": iv.low,
            f"{s}_hi": iv.high,
            f"{s}_half_width": iv.half_width,
            f"{s}_bounded": not (math.isinf(iv.low) or math.isinf(iv.high)),
        }
    return RecoveredShare(**row)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def flat_numbers(summary: PositionSetSummary, prefix: str) -> dict[str, float]:
    """Every number of a position-set summary as `<prefix><field>[_<subfield>]` (MLflow names)."""
    return _flatten(dataclasses.asdict(summary), prefix)


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out
