"""What the per-pair stages wrote, read through their records; a missing file is noted, not fatal."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ato.artifacts import (
    CausalSummary,
    ContextBudget,
    EfficiencyTable,
    Layout,
    PairMetrics,
    PositionSetSummary,
    TuningResult,
)
from ato.artifacts.causal import RecoveredShare, Triplet, patched_conditions, recovered_references
from ato.artifacts.context import BUDGET_SHARES
from ato.params import Pair

NAN_TRIPLET: Triplet = (math.nan, math.nan, math.nan)


@dataclass
class MissingInput:
    """A per-pair input file that does not exist yet."""

    what: str  # metrics | efficiency | causal | tuning | context
    path: Path  # the file
    command: str  # the command that makes it


@dataclass
class PairResults:
    """Everything the per-pair stages wrote for one pair; None where the file does not exist."""

    name: str
    pair: Pair
    metrics: PairMetrics | None = None  # evaluate
    efficiency: EfficiencyTable | None = None  # evaluate
    causal: CausalSummary | None = None  # causal
    tuning: TuningResult | None = None  # tune
    context: ContextBudget | None = None  # context: carried / moved / computed
    missing: list[MissingInput] = field(default_factory=list)

    @property
    def m(self) -> PairMetrics:
        """The metrics, all NaN when the file is missing."""
        return self.metrics if self.metrics is not None else PairMetrics.missing()

    @property
    def headline(self) -> PositionSetSummary | None:
        """The causal headline position set, None without causal output."""
        if self.causal is None or not self.causal.position_sets:
            return None
        return self.causal.headline

    def causal_delta(self, condition: str, scope: str) -> Triplet:
        """(Δ, lo, hi) of a patched condition vs clean on the headline position set."""
        h = self.headline
        return NAN_TRIPLET if h is None else h.patched(condition).delta(scope)

    def causal_half_width(self, condition: str, scope: str) -> float:
        """95 % half-width of Δ(condition) on the headline position set."""
        h = self.headline
        return math.nan if h is None else h.patched(condition).half_width(scope)

    def recovered(self, scope: str, reference: str | None = None) -> Triplet:
        """(share, lo, hi) of 1 − Δ(ato)/Δ(reference) on the headline set; the run's headline reference
        (`causal.headline_reference`) when `reference` is None. lo/hi are NaN where the interval is unbounded;
        all three NaN where the share is degenerate (not reported: `RecoveredShare.degenerate`)."""
        share = self.recovered_share(reference)
        return NAN_TRIPLET if share is None or share.degenerate(scope) else share.triplet(scope)

    def recovered_share(self, reference: str | None = None) -> RecoveredShare | None:
        h = self.headline
        if h is None:
            return None
        return h.recovered if reference is None else h.recovered_vs(reference)

    @property
    def headline_reference(self) -> str | None:
        return None if self.causal is None else self.causal.headline_reference

    def clean_logppl(self, scope: str) -> float:
        h = self.headline
        return math.nan if h is None else h.clean.logppl(scope)


# PairMetrics values logged to the report's parent run besides its HEADLINE keys
EXTRA_METRICS = ("alpha", "val_r2", "eta_train", "eta_expected_std", "subspace_size", "subspace_size_null")
TUNING_METRICS = ("alpha_flatness", "alpha_gain", "val_r2_noise", "alpha_immaterial")


def headline_metrics(res: PairResults, scope: str) -> dict[str, float]:
    """One pair's headline numbers beside their references and nulls, for the parent MLflow run: the
    metrics file's HEADLINE keys (+ EXTRA_METRICS), the α diagnostics, and the causal headline set's Δ of
    every condition and recovered share against every reference (each with lo, hi, half-width) in `scope`,
    and the context budget's shares (each with lo, hi and its n → ∞ value). Missing inputs give NaN (not
    logged)."""
    flat = res.m.flat()
    out = {key: flat[key] for key in (*PairMetrics.HEADLINE, *EXTRA_METRICS)}
    for key in TUNING_METRICS:
        out[key] = float(getattr(res.tuning, key)) if res.tuning is not None else math.nan
    if res.causal is not None and res.causal.position_sets:
        causal = res.causal.headline_metrics()
        wanted = [f"clean_logppl_{scope}"]
        deltas = (f"{c}_delta" for c in patched_conditions())
        for prefix in (*deltas, "recovered", *(f"recovered_vs_{r}" for r in recovered_references())):
            wanted += [f"{prefix}_{scope}{s}" for s in ("", "_lo", "_hi", "_half_width")]
        out |= {f"causal_{key}": causal[key] for key in wanted}
        out["causal_n_sequences"] = float(res.causal.interval_n_units)
    if res.context is not None:
        for share in BUDGET_SHARES:
            e = getattr(res.context, share)
            out |= {f"context_{share}": e.value, f"context_{share}_lo": e.low, f"context_{share}_hi": e.high}
            out[f"context_{share}_inf"] = e.extrapolated
    return out


def load_pair(layout: Layout, name: str, pair: Pair) -> PairResults:
    """Read one pair's outputs; an unreadable file is an ArtifactError naming it."""
    res = PairResults(name, pair)
    readers = (
        ("metrics", layout.metrics(name), PairMetrics.read, "evaluate@" + name),
        ("efficiency", layout.efficiency(name), EfficiencyTable.read, "evaluate@" + name),
        ("causal", layout.causal(name), CausalSummary.read, "causal@" + name),
        ("tuning", layout.tuning(name), TuningResult.read, "tune@" + name),
        ("context", layout.context(name), ContextBudget.read, "context"),  # one stage for every pair
    )
    for what, path, read, stage in readers:
        if path.exists():
            setattr(res, what, read(path))
        else:
            res.missing.append(MissingInput(what, path, f"dvc repro {stage}"))
    return res


def rank_value(eff: EfficiencyTable | None, column: str, r: int) -> tuple[float, int | None]:
    """(value, rank used): the largest swept rank ≤ r (the smallest one when r is below all)."""
    if eff is None or len(eff.rank) == 0:
        return math.nan, None
    ranks = eff.rank.astype(int)
    below = np.flatnonzero(ranks <= r)
    i = int(below[np.argmax(ranks[below])]) if below.size else int(np.argmin(ranks))
    return float(eff.column(column)[i]), int(ranks[i])


def headline_sets(results: list[PairResults]) -> list[str]:
    """The position sets the headline numbers summarise, over every pair with causal output."""
    return sorted({res.causal.headline_set for res in results if res.causal is not None and res.causal.position_sets})
