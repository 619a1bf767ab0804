"""What the causal check patches: held-out TEST sequences from the store, checked against the model,
and the position sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ato.artifacts import (
    ModelInfo,
)
from ato.errors import AtoError
from ato.math.intervals import unscorable_positions
from ato.store import ActivationStore

SPLIT = "test"  # the only split the causal check reads: never used for fitting or tuning


PositionSpec = list[int] | str  # a list of positions, or "all"


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
