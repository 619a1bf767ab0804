"""Exact causal effect of single SAE features on the model's next-token loss (README "Feature
selection"; `ato select`).

Ablating feature f in a held-out sequence subtracts a_f·d_f from the layer-n residual at every
non-special position where the SAE's encoder says f is active (d_f = decode(e_f) − decode(0)) and
reruns the model from there. Its effect is the change of the summed next-token loss over the
predictions from f's first activation on, at most `horizon` of them, divided by the number of
activations ablated: nats per ablated activation. The ablation itself is exact — no first-order
(gradient × contribution) estimate, which was off by 50 % and had the wrong sign at one default
layer. Only the `select.exact_budget` best candidates by the other criteria are ablated, each in the
first `per_feature` pool sequences where it fires. What keeps it affordable, without changing the
result:

- the layer-n residual of each pool sequence comes from the activation store (same model: the stage
  checks the weights digest), so every run starts at block n + 1 (blocks 0..n are skipped), the
  clean reference included — clean and ablated runs take the same code path;
- a sequence is cut after the last prediction scored (causal attention: later tokens cannot change
  earlier predictions), and the 262k-row LM head runs only on the predictions scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FeatureScoreError

LOSS_CHUNK_TOKENS = 256  # LM-head rows per chunk: bounds the logits' memory (vocab 262k)
ABLATION_BATCH = 8  # runs (rows) per forward pass


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
    """One forward from block n + 1: sequence `seq` cut to `cut` tokens, feature `feature` (index
    into the features list; None for the clean reference) ablated, predictions start..cut-2 scored."""

    seq: int
    feature: int | None
    start: int
    cut: int


@dataclass
class ExactEffects:
    """Exact single-feature ablations, one entry per requested feature."""

    delta_loss: np.ndarray  # [F] Δ summed next-token loss over the scored predictions (nats)
    n_active: np.ndarray  # [F] activations ablated
    n_predictions: np.ndarray  # [F] predictions scored
    n_sequences: np.ndarray  # [F] sequences it was ablated in
    clean_loss: float  # mean clean next-token loss over every prediction scored
    n_loss_tokens: int  # clean predictions scored

    @property
    def per_activation(self) -> np.ndarray:
        """Δ loss per ablated activation (NaN where the feature never fires in the pool)."""
        return np.where(self.n_active > 0, self.delta_loss / np.maximum(self.n_active, 1), np.nan)


def plan_runs(
    active: list[np.ndarray], per_feature: int, horizon: int | None
) -> tuple[list[Run], dict[int, tuple[int, int]]]:
    """Ablated runs (per feature, its first `per_feature` pool sequences with an activation that has a
    next token) and, per sequence used, the span (start, cut) its clean reference must cover.
    `active[s]` is the [T, F] bool activity of sequence s."""
    runs: list[Run] = []
    for j in range(active[0].shape[1] if active else 0):
        used = 0
        for s, act in enumerate(active):
            where = np.flatnonzero(act[:-1, j])  # an activation at the last token predicts nothing
            if used == per_feature:
                break
            if len(where):
                p0, T = int(where[0]), len(act)
                runs.append(Run(s, j, p0, T if horizon is None else min(T, p0 + horizon + 1)))
                used += 1
    spans: dict[int, tuple[int, int]] = {}
    for r in runs:
        a, z = spans.get(r.seq, (r.start, r.cut))
        spans[r.seq] = (min(a, r.start), max(z, r.cut))
    return runs, spans


@torch.no_grad()
def run_batch(
    model: nn.Module,
    holder: dict[str, Any],
    pool: list[PoolSequence],
    acts: list[torch.Tensor],
    directions: torch.Tensor,
    batch: list[Run],
) -> list[np.ndarray]:
    """Forward one batch of runs from block n + 1; per run the NLL of predictions start..cut-2."""
    from ato.models import chunked_nll, final_hidden

    device = directions.device
    T = max(r.cut for r in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    h = torch.zeros(len(batch), T, directions.shape[1], dtype=directions.dtype, device=device)
    for b, r in enumerate(batch):
        seq = pool[r.seq]
        ids[b, : r.cut] = torch.as_tensor(seq.ids[: r.cut], dtype=torch.long)
        attn[b, : r.cut] = 1
        h[b, : r.cut] = torch.as_tensor(seq.h[: r.cut]).to(device, directions.dtype)
        if r.feature is not None:
            h[b, : r.cut] -= acts[r.seq][: r.cut, r.feature, None] * directions[r.feature]
    holder["h"] = h
    hidden = final_hidden(model, ids, attn)
    rows = torch.cat([hidden[b, r.start : r.cut - 1] for b, r in enumerate(batch)])
    targets = torch.cat([ids[b, r.start + 1 : r.cut] for b, r in enumerate(batch)])
    nll = chunked_nll(model, rows, targets, LOSS_CHUNK_TOKENS).double().cpu().numpy()
    return np.split(nll, np.cumsum([r.cut - 1 - r.start for r in batch])[:-1])


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
    """Exact Δ next-token loss of removing each feature's a_f·d_f wherever it fires (module doc)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    directions = decoder_directions(sae)[features].to(device, torch.float32)
    acts = []
    for seq in pool:
        a = sae.encode(torch.as_tensor(seq.h).to(device, sae.W_dec.dtype))[:, features].float()
        acts.append(a * torch.as_tensor(~seq.special, device=device)[:, None])
    active = [(a > 0).cpu().numpy() for a in acts]
    runs, spans = plan_runs(active, per_feature, horizon)
    clean = [Run(s, None, a, z) for s, (a, z) in sorted(spans.items())]
    everything = sorted(clean + runs, key=lambda r: r.cut)  # similar lengths share a batch: little padding
    nll: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(everything), desc=f"select layer {layer}: exact ablation", disable=not progress)
    with start_after(model, layer) as holder:
        for i in range(0, len(everything), batch_rows):
            batch = everything[i : i + batch_rows]
            for r, out in zip(batch, run_batch(model, holder, pool, acts, directions, batch)):
                nll[id(r)] = out
            bar.update(len(batch))
    bar.close()
    F = len(features)
    delta, n_active, n_pred, n_seq = np.zeros(F), np.zeros(F, int), np.zeros(F, int), np.zeros(F, int)
    ref = {r.seq: (r.start, nll[id(r)]) for r in clean}
    for r in runs:
        assert r.feature is not None
        start, base = ref[r.seq]
        j = r.feature
        delta[j] += float(nll[id(r)].sum() - base[r.start - start : r.cut - 1 - start].sum())
        n_active[j] += int(active[r.seq][: r.cut, j].sum())
        n_pred[j] += r.cut - 1 - r.start
        n_seq[j] += 1
    n_clean = sum(len(nll[id(r)]) for r in clean)
    clean_loss = float(sum(nll[id(r)].sum() for r in clean) / n_clean) if n_clean else float("nan")
    return ExactEffects(delta, n_active, n_pred, n_seq, clean_loss, n_clean)


def check_pool(pool: list[PoolSequence], layer: int) -> None:
    if not pool:
        raise FeatureScoreError(f"layer {layer}: no held-out sequences for the causal effect")
