"""What the per-pair stages wrote, read through their records; a missing file is noted, not fatal."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ato.artifacts import CausalSummary, EfficiencyTable, Layout, PairMetrics, PositionSetSummary, TuningResult
from ato.artifacts.causal import Triplet
from ato.params import Pair

NAN_TRIPLET: Triplet = (math.nan, math.nan, math.nan)


@dataclass
class MissingInput:
    """A per-pair input file that does not exist yet."""

    what: str  # metrics | efficiency | causal | tuning
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

    def recovered(self, scope: str) -> Triplet:
        h = self.headline
        return NAN_TRIPLET if h is None else h.recovered.triplet(scope)

    def clean_logppl(self, scope: str) -> float:
        h = self.headline
        return math.nan if h is None else h.clean.logppl(scope)


def load_pair(layout: Layout, name: str, pair: Pair) -> PairResults:
    """Read one pair's outputs; an unreadable file is an ArtifactError naming it."""
    res = PairResults(name, pair)
    readers = (
        ("metrics", layout.metrics(name), PairMetrics.read, "evaluate"),
        ("efficiency", layout.efficiency(name), EfficiencyTable.read, "evaluate"),
        ("causal", layout.causal(name), CausalSummary.read, "causal"),
        ("tuning", layout.tuning(name), TuningResult.read, "tune"),
    )
    for what, path, read, stage in readers:
        if path.exists():
            setattr(res, what, read(path))
        else:
            res.missing.append(MissingInput(what, path, f"dvc repro {stage}@{name}"))
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
