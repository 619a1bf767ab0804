"""Exact causal effect of single SAE features on the model's next-token loss (README "Feature
selection"; `ato select`).

Ablating feature f subtracts a_f·d_f from the layer-n residual at every non-special position where
the SAE's encoder says f is active (d_f = decode(e_f) − decode(0)) and reruns the model. The effect
is the change of the summed next-token loss, reported per ablated activation (nats per activation)
and per loss token. It is computed EXACTLY, not to first order (a gradient × contribution estimate
was off by 50 % and had the wrong sign at one default layer), but only for the best candidates by
the other criteria (`select.exact_budget`). Three things make it affordable without changing the
result:

- one clean forward pass per batch of sequences gives the layer-n residual and the clean per-position
  loss; an ablated run starts at block n + 1 from the edited residual (blocks 0..n are skipped:
  their output does not depend on the ablation);
- a sequence where f never fires is unchanged and is not rerun;
- with causal attention, positions before f's first activation are unchanged, so only the
  predictions from that position on go through the 262k-row LM head.
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
CLEAN_BATCH = 8  # sequences per clean forward pass
ABLATION_BATCH = 8  # (feature, sequence) rows per ablated forward pass

Sequence = tuple[np.ndarray, np.ndarray]  # (token ids, special flags) of one stored sequence


@torch.no_grad()
def decoder_directions(sae: Any) -> torch.Tensor:
    """[d_sae, d_in]: what one unit of each feature's activation adds to the reconstruction
    (decode(e_f) − decode(0), so any decoder-norm rescaling of the architecture is included)."""
    eye = torch.eye(sae.cfg.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    return sae.decode(eye) - sae.decode(torch.zeros_like(eye[:1]))


def pad_sequences(seqs: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and the mask of positions that may be ablated."""
    T = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    ablate = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (tok, special) in enumerate(seqs):
        ids[b, : len(tok)] = torch.as_tensor(tok, dtype=torch.long)
        attn[b, : len(tok)] = 1
        ablate[b, : len(tok)] = ~torch.as_tensor(special, dtype=torch.bool)
    return ids.to(device), attn.to(device), ablate.to(device)


def position_nll(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, rows: list[tuple[int, int, int]]) -> list:
    """Next-token NLL of row b at positions start..stop-1 (predicting tokens start+1..stop), for each
    (b, start, stop) in `rows`: one float64 array per row; the LM head runs on those positions only."""
    from ato.models import chunked_nll

    h = torch.cat([hidden[b, a:z] for b, a, z in rows]) if rows else hidden.new_zeros(0, hidden.shape[-1])
    t = torch.cat([ids[b, a + 1 : z + 1] for b, a, z in rows]) if rows else ids.new_zeros(0)
    nll = chunked_nll(model, h, t, LOSS_CHUNK_TOKENS).double().cpu().numpy()
    return list(np.split(nll, np.cumsum([z - a for _, a, z in rows])[:-1])) if rows else []


class _Skip(nn.Module):
    """Stands in for a decoder block: passes its input on, or (the last skipped block) returns the
    residual held in `holder`, in the output structure of the real block."""

    def __init__(self, holder: dict[str, Any], last: bool):
        super().__init__()
        self.holder, self.last = holder, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.holder["h"] if self.last else hidden_states
        return (out,) if self.holder["tuple"] else out


@contextmanager
def start_after(model: nn.Module, layer: int, as_tuple: bool) -> Iterator[dict[str, Any]]:
    """Within the context, blocks 0..`layer` are skipped and block `layer` outputs `holder["h"]`
    (set it before each forward): the model runs from block `layer` + 1 on a given residual."""
    from ato.models import decoder_blocks

    blocks = decoder_blocks(model)
    saved = [blocks[i] for i in range(layer + 1)]
    holder: dict[str, Any] = {"h": None, "tuple": as_tuple}
    try:
        for i in range(layer + 1):
            blocks[i] = _Skip(holder, last=i == layer)
        yield holder
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@dataclass
class CleanSequence:
    """One sequence's clean pass: what the ablated runs start from and compare with."""

    ids: torch.Tensor  # [T] token ids
    h: torch.Tensor  # [T, d] layer-n residual
    nll: np.ndarray  # [T-1] clean next-token NLL, position t predicts token t+1
    acts: torch.Tensor  # [T, F] activations of the requested features, 0 at special positions


@dataclass
class ExactEffects:
    """Exact single-feature ablation on the causal sequences."""

    delta_loss: np.ndarray  # [F] Δ summed next-token loss (nats)
    n_active: np.ndarray  # [F] ablated activations (non-special positions where f fires)
    clean_loss: float  # mean clean next-token loss
    n_loss_tokens: int  # next-token pairs in the sequences

    @property
    def per_activation(self) -> np.ndarray:
        """Δ loss per ablated activation (NaN where the feature never fires in the sequences)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_active > 0, self.delta_loss / np.maximum(self.n_active, 1), np.nan)

    @property
    def per_token(self) -> np.ndarray:
        """Δ mean next-token loss over the sequences."""
        return self.delta_loss / max(self.n_loss_tokens, 1)


@torch.no_grad()
def clean_pass(
    model: nn.Module, sae: Any, layer: int, sequences: list[Sequence], features: list[int]
) -> tuple[list[CleanSequence], bool]:
    """Clean forward passes: per sequence the layer-n residual, clean NLL and the features'
    activations; and whether block n returns a tuple (the skipped blocks must do the same)."""
    from ato.models import capture_residuals, final_hidden, layer_block

    device = next(model.parameters()).device
    out: list[CleanSequence] = []
    seen: dict[str, bool] = {}

    def note_structure(_module: nn.Module, _inputs: Any, output: Any) -> None:
        seen["tuple"] = isinstance(output, tuple)

    handle = layer_block(model, layer).register_forward_hook(note_structure)
    try:
        for i in range(0, len(sequences), CLEAN_BATCH):
            batch = sequences[i : i + CLEAN_BATCH]
            ids, attn, ablate = pad_sequences(batch, device)
            with capture_residuals(model, [layer], stop_early=False) as cap:
                hidden = final_hidden(model, ids, attn)
            lengths = [len(s[0]) for s in batch]
            nlls = position_nll(model, hidden, ids, [(b, 0, n - 1) for b, n in enumerate(lengths)])
            h = cap[layer]
            acts = sae.encode(h.reshape(-1, h.shape[-1]))[:, features].reshape(*h.shape[:2], len(features))
            acts = acts * ablate[..., None]
            for b, n in enumerate(lengths):
                out.append(CleanSequence(ids[b, :n], h[b, :n], nlls[b], acts[b, :n]))
    finally:
        handle.remove()
    return out, seen.get("tuple", False)


@torch.no_grad()
def exact_effects(
    model: nn.Module,
    sae: Any,
    layer: int,
    sequences: list[Sequence],
    features: list[int],
    batch_rows: int = ABLATION_BATCH,
    progress: bool = True,
) -> ExactEffects:
    """Exact Δ next-token loss when each feature's a_f·d_f is removed wherever it fires (module doc)."""
    from tqdm import tqdm

    from ato.models import final_hidden

    clean, as_tuple = clean_pass(model, sae, layer, sequences, features)
    n_loss = sum(len(c.nll) for c in clean)
    if n_loss == 0:
        raise FeatureScoreError(f"layer {layer}: the held-out sequences have no next-token pairs")
    directions = decoder_directions(sae)[features].to(clean[0].h.device, clean[0].h.dtype) if features else None
    # (feature index, sequence index, first active position) of every run that can change the loss
    rows = [
        (j, s, int(torch.nonzero(c.acts[:, j] > 0)[0, 0]))
        for j in range(len(features))
        for s, c in enumerate(clean)
        if bool((c.acts[:, j] > 0).any())
    ]
    rows.sort(key=lambda r: len(clean[r[1]].ids))  # similar lengths share a batch: little padding
    delta = np.zeros(len(features))
    n_active = np.array([sum(int((c.acts[:, j] > 0).sum()) for c in clean) for j in range(len(features))])
    bar = tqdm(total=len(rows), desc=f"select layer {layer}: exact ablation", disable=not progress, mininterval=1.0)
    with start_after(model, layer, as_tuple) as holder:
        for i in range(0, len(rows), batch_rows):
            batch = rows[i : i + batch_rows]
            seqs = [clean[s] for _, s, _ in batch]
            T = max(len(c.ids) for c in seqs)
            ids = torch.zeros(len(batch), T, dtype=torch.long, device=seqs[0].ids.device)
            attn = torch.zeros_like(ids)
            h = seqs[0].h.new_zeros(len(batch), T, seqs[0].h.shape[-1])
            for r, ((j, _, _), c) in enumerate(zip(batch, seqs)):
                n = len(c.ids)
                ids[r, :n], attn[r, :n] = c.ids, 1
                assert directions is not None
                h[r, :n] = c.h - c.acts[:, j, None] * directions[j]
            holder["h"] = h
            hidden = final_hidden(model, ids, attn)
            spans = [(r, p0, len(c.ids) - 1) for r, ((_, _, p0), c) in enumerate(zip(batch, seqs))]
            for (j, s, p0), nll in zip(batch, position_nll(model, hidden, ids, spans)):
                delta[j] += float(nll.sum() - clean[s].nll[p0:].sum())
            bar.update(len(batch))
    bar.close()
    clean_loss = float(sum(c.nll.sum() for c in clean) / n_loss)
    return ExactEffects(delta, n_active, clean_loss, n_loss)
