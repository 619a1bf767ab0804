"""Tuning result (`ato tune` → fit, report): the chosen ridge α of one pair and the α → validation R²
curve behind it, with what that curve says about α: how flat it is, what the best α gains over the
least-regularised end, whether that gain clears the noise of the objective (`alpha_immaterial`) and
whether the best α sits at an edge of the searched range (`ato.math.ridge_diagnostics`).
File: reports/tuning/<pair>.json (docs/contracts.md); the objective is described in docs/method.md#ridge."""

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

    FORMAT: ClassVar[str] = "ato-tuning/2"  # /2: the α diagnostics (n_val … alpha_edge_warning) added
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
    n_val: int  # scored held-out tokens behind the objective: val split (PairStats.n), or all K folds
    alpha_flatness: float  # max − min of the curve's validation R² over the searched range
    alpha_gain: float  # best validation R² on the curve minus its R² at the smallest α (alpha_min)
    val_r2_noise: float  # standard error of the best validation R² at n_val: (1 − R²)·√(2/n_val)
    alpha_immaterial: bool  # alpha_gain < val_r2_noise: at this sample size the chosen α is noise
    alpha_edge_warning: str | None  # why the best α is suspect: within one grid step of alpha_min/alpha_max
