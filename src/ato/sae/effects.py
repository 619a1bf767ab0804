"""Exact causal effect of single SAE features on the model's next-token predictions (README "Feature
selection"; `ato select`).

Ablating feature f in a held-out sequence subtracts a_f·d_f from the layer-n residual at every
non-special position where the SAE's encoder says f is active (d_f = decode(e_f) − decode(0)) and
reruns the model from there. Over the predictions from f's first activation on (at most `horizon` of
them) it records the KL divergence of the ablated from the clean next-token distribution and the
change of the next-token loss, both summed and then divided by the number of activations ablated.
The ablation is exact: no first-order (gradient × contribution) estimate, which was off by 50 % and
had the wrong sign at one default layer. Only the `select.exact_budget` best candidates by the other
criteria are ablated, each in the `per_feature` pool sequences where it first fires earliest (the
prefix before the activation is recomputed by every run, so early activations are the cheapest to
measure; every candidate is measured the same way). What keeps it affordable, without changing the
result:

- the layer-n residual of each pool sequence comes from the activation store (same model: the stage
  checks the weights digest), so every run starts at block n + 1 (blocks 0..n are skipped), the
  clean reference included: clean and ablated rows take the same code path, in the same batch;
- a sequence is cut after the last prediction scored (causal attention: later tokens cannot change
  earlier predictions), and the 262k-row LM head runs once per scored prediction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

KL_CHUNK_TOKENS = 64  # predictions per LM-head chunk: bounds the logits' memory (vocab 262k)
ABLATION_BATCH = 8  # rows per forward pass: the clean run and up to 7 ablations of one sequence


@dataclass
class PoolSequence:
    """One held-out sequence with its stored layer-n residual."""

    ids: np.ndarray  # [T] token ids, BOS included
    special: np.ndarray  # [T] bool: never ablated
    h: np.ndarray  # [T, d] float32 residual after block n


@torch.no_grad()
def decoder_directions(sae: Any) -> torch.Tensor:
    """[d_sae, d_in]: what one unit of each feature's activation adds to the reconstruction
    (decode(e_f) − decode(0), so any decoder-norm rescaling of the architecture is included)."""
    eye = torch.eye(sae.cfg.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    return sae.decode(eye) - sae.decode(torch.zeros_like(eye[:1]))


class _Skip(nn.Module):
    """Stands in for a decoder block: passes its input on, or (the last skipped block) returns the
    residual held in `holder`, in the output structure of the real block."""

    def __init__(self, holder: dict[str, Any], last: bool):
        super().__init__()
        self.holder, self.last = holder, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.holder["h"] if self.last else hidden_states
        return (out,) if self.holder["tuple"] else out


def _returns_tuple(model: nn.Module, layer: int) -> bool:
    """Whether block `layer` returns a tuple (older transformers, GPT-2) or the hidden state itself."""
    from ato.models import base_model, layer_block

    seen: dict[str, bool] = {}

    def note(_module: nn.Module, _inputs: Any, output: Any) -> None:
        seen["tuple"] = isinstance(output, tuple)

    handle = layer_block(model, layer).register_forward_hook(note)
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
        base_model(model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        handle.remove()
    return seen.get("tuple", False)


@contextmanager
def start_after(model: nn.Module, layer: int) -> Iterator[dict[str, Any]]:
    """Within the context, blocks 0..`layer` are skipped and block `layer` outputs `holder["h"]`
    (set it before each forward): the model runs from block `layer` + 1 on a given residual."""
    from ato.models import decoder_blocks

    holder: dict[str, Any] = {"h": None, "tuple": _returns_tuple(model, layer)}
    blocks = decoder_blocks(model)
    saved = [blocks[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            blocks[i] = _Skip(holder, last=i == layer)
        yield holder
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@dataclass
class Run:
    """Feature `feature` (index into the features list) ablated in pool sequence `seq`; predictions
    start..cut-2 scored (the sequence is cut after `cut` tokens)."""

    seq: int
    feature: int
    start: int
    cut: int


@dataclass
class ExactEffects:
    """Exact single-feature ablations, one entry per requested feature."""

    kl: np.ndarray  # [F] Σ over the scored predictions of KL(clean ‖ ablated) next-token distribution (nats)
    delta_loss: np.ndarray  # [F] Δ summed next-token loss over the scored predictions (nats)
    n_active: np.ndarray  # [F] activations ablated
    n_predictions: np.ndarray  # [F] predictions scored
    n_sequences: np.ndarray  # [F] sequences it was ablated in
    clean_loss: float  # mean clean next-token loss over every prediction scored
    n_loss_tokens: int  # clean predictions scored

    def per_activation(self, total: np.ndarray) -> np.ndarray:
        """`total` (kl or delta_loss) per ablated activation; NaN where the feature never fired."""
        return np.where(self.n_active > 0, total / np.maximum(self.n_active, 1), np.nan)


def plan_runs(
    active: list[np.ndarray], per_feature: int, horizon: int | None
) -> tuple[list[Run], dict[int, tuple[int, int]]]:
    """Ablated runs and, per sequence used, the span (start, cut) its clean reference covers.
    `active[s]` is the [T, F] bool activity of pool sequence s. Each feature is ablated in the
    `per_feature` sequences where it first fires earliest (ties → earlier sequence): every run
    recomputes the prefix before that activation, so an early one is the cheapest to measure."""
    runs: list[Run] = []
    for j in range(active[0].shape[1] if active else 0):
        firsts = []
        for s, act in enumerate(active):
            where = np.flatnonzero(act[:-1, j])  # an activation at the last token predicts nothing
            if len(where):
                firsts.append((int(where[0]), s))
        for p0, s in sorted(firsts)[:per_feature]:
            T = len(active[s])
            runs.append(Run(s, j, p0, T if horizon is None else min(T, p0 + horizon + 1)))
    spans: dict[int, tuple[int, int]] = {}
    for r in runs:
        a, z = spans.get(r.seq, (r.start, r.cut))
        spans[r.seq] = (min(a, r.start), max(z, r.cut))
    return runs, spans


@dataclass
class RunScores:
    """Per-prediction scores of one run."""

    nll: np.ndarray  # ablated next-token NLL, predictions start..cut-2
    clean_nll: np.ndarray  # clean NLL of the same predictions
    kl: np.ndarray  # KL(clean ‖ ablated) of the same predictions


def _log_probs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    from ato.lm_head import chunk_logits, lm_head_and_softcap

    head, cap = lm_head_and_softcap(model)
    return torch.log_softmax(chunk_logits(head, cap, hidden), dim=-1)


@torch.no_grad()
def run_sequence(
    model: nn.Module,
    holder: dict[str, Any],
    seq: PoolSequence,
    span: tuple[int, int],
    acts: torch.Tensor,
    directions: torch.Tensor,
    runs: list[Run],
) -> tuple[np.ndarray, list[RunScores]]:
    """One forward from block n + 1 of the clean sequence (row 0) and of each run's ablation (one row
    each), cut to `span`'s end; the LM head runs once per scored prediction, chunk by chunk. Returns
    the clean NLL of predictions span[0]..cut-2 and each run's scores."""
    from ato.models import final_hidden

    a, z = span
    ids = torch.as_tensor(seq.ids[:z], dtype=torch.long, device=directions.device)[None].repeat(len(runs) + 1, 1)
    h = torch.as_tensor(seq.h[:z]).to(directions.device, directions.dtype)[None].repeat(len(runs) + 1, 1, 1)
    for b, r in enumerate(runs, start=1):
        h[b] -= acts[:z, r.feature, None] * directions[r.feature]
    holder["h"] = h
    hidden = final_hidden(model, ids, torch.ones_like(ids))
    targets = ids[0, 1:]
    clean = np.zeros(z - 1 - a)
    scores = [RunScores(*(np.zeros(r.cut - 1 - r.start) for _ in range(3))) for r in runs]
    for c0 in range(a, z - 1, KL_CHUNK_TOKENS):
        c1 = min(z - 1, c0 + KL_CHUNK_TOKENS)
        lp_clean = _log_probs(model, hidden[0, c0:c1])
        t = targets[c0:c1]
        clean[c0 - a : c1 - a] = -lp_clean.gather(1, t[:, None])[:, 0].double().cpu().numpy()
        for b, (r, sc) in enumerate(zip(runs, scores), start=1):
            o0, o1 = max(c0, r.start), min(c1, r.cut - 1)
            if o0 >= o1:
                continue
            lp = _log_probs(model, hidden[b, o0:o1])
            ref = lp_clean[o0 - c0 : o1 - c0]
            sc.nll[o0 - r.start : o1 - r.start] = -lp.gather(1, t[o0 - c0 : o1 - c0, None])[:, 0].double().cpu().numpy()
            sc.kl[o0 - r.start : o1 - r.start] = (ref.exp() * (ref - lp)).sum(-1).clamp(min=0).double().cpu().numpy()
            sc.clean_nll[o0 - r.start : o1 - r.start] = clean[o0 - a : o1 - a]
    return clean, scores


@torch.no_grad()
def exact_effects(
    model: nn.Module,
    sae: Any,
    layer: int,
    pool: list[PoolSequence],
    features: list[int],
    per_feature: int = 1,
    horizon: int | None = None,
    batch_rows: int = ABLATION_BATCH,
    progress: bool = True,
) -> ExactEffects:
    """Exact effect of removing each feature's a_f·d_f wherever it fires (module doc): KL and Δ loss."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    directions = decoder_directions(sae)[features].to(device, torch.float32)
    acts = []
    for seq in pool:
        x = sae.encode(torch.as_tensor(seq.h).to(device, sae.W_dec.dtype))[:, features].float()
        acts.append(x * torch.as_tensor(~seq.special, device=device)[:, None])
    active = [(x > 0).cpu().numpy() for x in acts]
    runs, spans = plan_runs(active, per_feature, horizon)
    F = len(features)
    kl, delta = np.zeros(F), np.zeros(F)
    n_active, n_pred, n_seq = np.zeros(F, int), np.zeros(F, int), np.zeros(F, int)
    clean_sum, n_clean = 0.0, 0
    bar = tqdm(total=len(runs), desc=f"select layer {layer}: exact ablation", disable=not progress)
    with start_after(model, layer) as holder:
        for s in sorted(spans):
            mine = sorted((r for r in runs if r.seq == s), key=lambda r: r.cut)
            for i in range(0, len(mine), batch_rows - 1):  # row 0 of every batch is the clean run
                batch = mine[i : i + batch_rows - 1]
                span = (min(r.start for r in batch), max(r.cut for r in batch))
                clean, scores = run_sequence(model, holder, pool[s], span, acts[s], directions, batch)
                for r, sc in zip(batch, scores):
                    kl[r.feature] += sc.kl.sum()
                    delta[r.feature] += sc.nll.sum() - sc.clean_nll.sum()
                    n_active[r.feature] += int(active[s][: r.cut, r.feature].sum())
                    n_pred[r.feature] += len(sc.nll)
                    n_seq[r.feature] += 1
                bar.update(len(batch))
            clean_sum, n_clean = clean_sum + float(clean.sum()), n_clean + len(clean)
    bar.close()
    clean_loss = clean_sum / n_clean if n_clean else float("nan")
    return ExactEffects(kl, delta, n_active, n_pred, n_seq, clean_loss, n_clean)
