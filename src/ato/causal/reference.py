"""The reference record of a target layer (clean, zero, train_mean), and its use by a pair."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ato.artifacts import (
    CausalReference,
    ReferenceSet,
)
from ato.artifacts.causal import SCOPES
from ato.causal.conditions import SetResult
from ato.causal.inputs import SPLIT, CausalError, HeldOut, PositionSpec
from ato.kinds import causal_keys


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
                nll_sum={c: {s: list(res.nll_sum[c][s]) for s in SCOPES} for c in ("clean", *causal_keys("target"))},
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
        target = causal_keys("target")  # asked now: a kind registered since the record was written is absent
        absent = [c for c in target if c not in rs.nll_sum]
        if absent:
            raise CausalError(f"{path}: no sums for condition {absent[0]!r}; rerun `ato causal_reference`")
        res.conditions += [c for c in target if c not in res.conditions]
        for c in target:
            res.nll_sum[c] = {s: list(rs.nll_sum[c][s]) for s in SCOPES}
    return results
