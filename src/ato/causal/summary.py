"""From per-sequence sums to the summary: Δ log-perplexity and the recovered share, each with its interval."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ato.artifacts import (
    CleanScores,
    PatchedScores,
    PositionSetSummary,
    RecoveredShare,
    SequenceDetail,
)
from ato.artifacts.causal import SCOPES, TYPED_CONDITIONS, all_conditions, patched_conditions, recovered_references
from ato.causal.conditions import SetResult
from ato.causal.inputs import CausalError
from ato.math.intervals import Interval, delta_interval, recovered_interval
from ato.params import CausalParams

LEVEL = 0.95  # two-sided level of every causal interval
CONTEXT = "context"  # the union context map's condition (`ato.causal.context`): its recovered share too


def summarise_set(res: SetResult, cp: CausalParams) -> tuple[PositionSetSummary, SequenceDetail]:
    """Token-weighted log-perplexities, Δ vs clean and the recovered share against each reference of
    one position set, every one with its interval (`cp.interval` over sequences); and its detail."""
    conditions = all_conditions()
    missing = [c for c in conditions if c not in res.nll_sum]
    if missing:
        raise CausalError(f"position set {res.name}: no sums for condition(s) {missing}")
    sums = {c: {s: np.asarray(res.nll_sum[c][s], dtype=np.float64) for s in SCOPES} for c in conditions}
    counts = {s: np.asarray(res.count[s], dtype=np.float64) for s in SCOPES}
    kw: dict[str, Any] = {"level": LEVEL, "method": cp.interval, "n_resamples": cp.bootstrap_resamples, "seed": cp.seed}
    patched = {c: _patched_scores(sums[c], sums["clean"], counts, kw) for c in patched_conditions()}
    head = cp.headline_reference
    shares = {r: _recovered(sums["ato"], sums[r], sums["clean"], counts, r, kw) for r in recovered_references()}
    typed: dict[str, PatchedScores | RecoveredShare] = {c: s for c, s in patched.items() if c in TYPED_CONDITIONS}
    typed |= {f"recovered_vs_{r}": share for r, share in shares.items()}  # one field per reference
    summary = PositionSetSummary(
        n_patched_tokens=int(sum(res.n_patched)),
        first_patched_position=int(min(res.first_patched)) if res.first_patched else -1,
        n_tokens_all=int(counts["all"].sum()),
        n_tokens_after=int(counts["after"].sum()),
        clean=CleanScores(**{f"logppl_{s}": _ratio(sums["clean"][s], counts[s]) for s in SCOPES}),
        recovered=shares[head],
        registered={c: scores for c, scores in patched.items() if c not in TYPED_CONDITIONS},
        recovered_context=(
            _recovered(sums[CONTEXT], sums[head], sums["clean"], counts, head, kw) if CONTEXT in sums else None
        ),
        **typed,  # type: ignore[arg-type]  # each key is the field of its type
    )
    detail = SequenceDetail(
        positions=res.spec,
        n_patched=[int(v) for v in res.n_patched],
        first_patched_position=[int(v) for v in res.first_patched],
        n_tokens={s: [int(v) for v in res.count[s]] for s in SCOPES},
        nll_sum={c: {s: sums[c][s].tolist() for s in SCOPES} for c in conditions},
        mean_nll={c: {s: _safe_div(sums[c][s], counts[s]).tolist() for s in SCOPES} for c in conditions},
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
    counts: dict[str, np.ndarray],
    reference: str,
    kw: dict[str, Any],
) -> RecoveredShare:
    """1 − Δ(ato)/Δ(reference) per scope (`ato`: the sums of the map whose share it is); NaN where the
    reference does no damage at all (Σ Δ = 0).
    Degenerate where the interval of Δ(reference) − Δ(ato) reaches 0: the reference does not measurably
    damage more than the ATO, so a share of its damage says nothing about what the ATO carries."""
    row: dict[str, Any] = {"reference": reference}
    for s in SCOPES:
        damage = float((ref[s] - clean[s]).sum())
        n = len(ref[s])
        iv = recovered_interval(ato[s], ref[s], clean[s], **kw) if damage != 0 else _nan_interval(kw, n)
        excess = delta_interval(ref[s], ato[s], counts[s], **kw) if counts[s].sum() > 0 else _nan_interval(kw, n)
        row |= {
            f"{s}_mean": iv.estimate,
            f"{s}_lo": iv.low,
            f"{s}_hi": iv.high,
            f"{s}_half_width": iv.half_width,
            f"{s}_bounded": not (math.isinf(iv.low) or math.isinf(iv.high)),
            f"{s}_degenerate": damage == 0 or not excess.low > 0,  # NaN (no tokens) is degenerate too
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
