"""Residuals of token sequences: right-padded batches through the model with forward hooks on the
decoder blocks (`ato.models.capture_residuals`), per-layer float32 rows of the real tokens out.

Layer n is the output of decoder block n (TransformerLens `blocks.n.hook_resid_post`; see
docs/conventions.md#layers). The forward stops after the deepest requested block. Padding never leaves
`capture_batch`. Shared by `ato collect` (which writes the rows to the store) and `ato languages`
(which streams them into sufficient statistics and never writes them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .corpus import TokenSequence
from .models import base_model, capture_residuals, run_captured

__all__ = ["batch_order", "capture_batch", "collect_part", "iter_batches", "pad_id_of"]


def pad_id_of(tokenizer: Any) -> int:
    """The id padded batches are filled with (masked out; 0 where the tokenizer has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@torch.no_grad()
def capture_batch(
    model: Any, seqs: list[TokenSequence], layers: list[int], pad_id: int, device: torch.device
) -> dict[int, np.ndarray]:
    """Forward a right-padded batch; return each layer's residuals of the real tokens, row-major
    by sequence then position ([Σ len, d] float32). Padding never leaves this function."""
    lengths = [len(s.token_ids) for s in seqs]
    width = max(lengths)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : lengths[i]] = torch.tensor(s.token_ids)
        mask[i, : lengths[i]] = 1
    ids, mask = ids.to(device), mask.to(device)
    keep = mask.bool()
    body = base_model(model)
    with capture_residuals(model, layers) as captured:
        run_captured(body, input_ids=ids, attention_mask=mask, use_cache=False)
        return {layer: captured[layer][keep].float().cpu().numpy() for layer in layers}


def batch_order(seqs: list[TokenSequence], batch_size: int) -> Iterator[list[int]]:
    """Indices of `seqs` in batches of `batch_size`, formed from length-sorted sequences (less padding)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def iter_batches(
    model: Any, seqs: list[TokenSequence], layers: list[int], pad_id: int, device: torch.device, batch_size: int
) -> Iterator[tuple[list[int], dict[int, np.ndarray]]]:
    """(indices into `seqs`, their residuals) per batch: rows are those sequences' tokens, in index order."""
    for idx in batch_order(seqs, batch_size):
        yield idx, capture_batch(model, [seqs[i] for i in idx], layers, pad_id, device)


def collect_part(
    model: Any,
    seqs: list[TokenSequence],
    layers: list[int],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    bar: tqdm,
) -> dict[int, np.ndarray]:
    """Residuals of one store part, in stored order: the batches of `iter_batches`, with rows put
    back in the part's order."""
    offsets = np.cumsum([0] + [len(s.token_ids) for s in seqs])
    d = model.config.hidden_size
    out = {layer: np.empty((offsets[-1], d), dtype=np.float32) for layer in layers}
    for idx, acts in iter_batches(model, seqs, layers, pad_id, device, batch_size):
        row = 0
        for i in idx:
            n = len(seqs[i].token_ids)
            for layer in layers:
                out[layer][offsets[i] : offsets[i] + n] = acts[layer][row : row + n]
            row += n
        bar.update(row)
    return out
