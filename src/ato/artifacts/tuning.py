"""Tuning result (`ato tune` → fit, report): the chosen ridge α of one pair and the α → validation R²
curve behind it. File: reports/tuning/<pair>.json (docs/contracts.md); the objective is described in
docs/method.md#ridge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ._io import Record


@dataclass
class AlphaPoint:
    """One point of the α → objective curve."""

    alpha: float  # ridge penalty
    val_r2: float  # objective at this α: validation R² (uniform average over output dimensions)


@dataclass
class TuningResult(Record):
    """One pair's Optuna study over the ridge α, summarised."""

    FORMAT: ClassVar[str] = "ato-tuning/1"
    PRODUCER: ClassVar[str] = "tune"

    pair: str  # pair name, e.g. L05_k1
    study: str  # Optuna study name (same data and search settings → same, resumed study)
    objective: str  # tune.objective: "val" (exact val-split R²) or "kfold" (blocked K-fold on train)
    alpha: float  # chosen α: the study's best trial
    val_r2: float  # objective at the chosen α
    n_trials: int  # completed trials in the study
    tune_seconds: float  # wall time of the optimisation in this run
    curve: list[AlphaPoint]  # exact objective on tune.curve_points log-spaced α (alpha_min … alpha_max)
    trials: list[AlphaPoint]  # every completed trial, sorted by α
