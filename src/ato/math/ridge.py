"""Closed-form ridge with intercept from sufficient statistics, priced for every α by one
eigendecomposition, and exact R² of any affine map from another split's statistics.

Centre X and Y; Wᵀ solves (XcᵀXc + αI) Wᵀ = XcᵀYc and b = ȳ − W x̄ (scikit-learn's
`Ridge(fit_intercept=True)`). With XcᵀXc = Q diag(λ) Qᵀ, Wᵀ(α) = Q diag(1/(λ+α)) Qᵀ XcᵀYc, so after
one O(d³) decomposition each α costs two d×d products.

With `standardize`, the penalty applies to X scaled to unit variance per dimension:
Xs = Xc / σ, and the map is returned in the original coordinates (W = Ws / σ).
See docs/method.md#ridge and docs/method.md#r2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import PairStats, sse_from_stats, sst_from_stats


@dataclass
class RidgePath:
    """One eigendecomposition of the (optionally standardised) centred Gram, reusable for any α."""

    eigvals: np.ndarray  # λ, ascending, clipped at 0
    eigvecs: np.ndarray  # Q
    qt_xty: np.ndarray  # Qᵀ XsᵀYc
    scale: np.ndarray  # σ per input dimension (ones without standardisation)
    mean_x: np.ndarray
    mean_y: np.ndarray

    @classmethod
    def from_stats(cls, s: PairStats, standardize: bool = False) -> RidgePath:
        xtx, xty, _ = s.centred()
        if standardize:
            scale = np.sqrt(np.clip(np.diag(xtx) / s.n, 1e-12, None))
            xtx = xtx / np.outer(scale, scale)
            xty = xty / scale[:, None]
        else:
            scale = np.ones(xtx.shape[0])
        xtx = (xtx + xtx.T) / 2
        lam, Q = np.linalg.eigh(xtx)
        return cls(np.clip(lam, 0, None), Q, Q.T @ xty, scale, s.mean_x, s.mean_y)

    def shrinkage(self, alpha: float) -> np.ndarray:
        """1/(λ + α) per eigenvalue (α = 0: the pseudo-inverse's 1/λ, 0 below the rank cutoff)."""
        lam = self.eigvals
        if alpha > 0:
            return 1.0 / (lam + alpha)
        cutoff = lam.max() * len(lam) * np.finfo(float).eps
        return np.where(lam > cutoff, 1.0 / np.where(lam > cutoff, lam, 1.0), 0.0)

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(W [d_out, d_in], b [d_out]) in original coordinates for penalty α (α = 0: OLS via pinv)."""
        wt = self.eigvecs @ (self.shrinkage(alpha)[:, None] * self.qt_xty)  # [d_in, d_out], standardised
        W = (wt / self.scale[:, None]).T
        b = self.mean_y - W @ self.mean_x
        return W, b


def ridge_fit(s: PairStats, alpha: float, standardize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    return RidgePath.from_stats(s, standardize).solve(alpha)


def r2_from_stats(s: PairStats, W: np.ndarray, b: np.ndarray) -> dict[str, float | np.ndarray]:
    """Exact R² of ŷ = W x + b on the rows summarised by `s` (about their own mean).

    Returns the uniform average over dimensions (`r2`), the variance-weighted R² (`r2_weighted`),
    per-dimension R² (`r2_per_dim`) and the MSE per element (`mse`).
    """
    sse = sse_from_stats(s, W, b)
    sst = sst_from_stats(s)
    valid = sst > 0
    per_dim = np.where(valid, 1 - sse / np.where(valid, sst, 1.0), np.nan)
    return {
        "r2": float(np.nanmean(per_dim)),
        "r2_weighted": float(1 - sse.sum() / sst.sum()),
        "r2_per_dim": per_dim,
        "mse": float(sse.sum() / (s.n * len(sse))),
    }


@dataclass
class HeldOutR2:
    """Held-out R² (uniform average over output dimensions) as a function of α, averaged over one or
    more folds of (ridge path of the fitting rows, statistics of the held-out rows)."""

    folds: list[tuple[RidgePath, PairStats]]

    def __call__(self, alpha: float) -> float:
        return float(np.mean([r2_from_stats(held, *path.solve(alpha))["r2"] for path, held in self.folds]))


@dataclass
class HeldOutR2Weighted:
    """Exact held-out R²_w (as `r2_from_stats`' `r2_weighted`) of the ridge path for any α in O(d_in²).

    With u = x − x̄, v = y − ȳ (train means), R = Qᵀ diag(1/σ) and Wᵀ = diag(1/σ) Q D C (C = `qt_xty`,
    D = diag(1/(λ+α))), the held-out SSE summed over dimensions is
    Σ‖v‖² − 2 Σᵢ Dᵢ aᵢ + Σᵢⱼ Dᵢ Dⱼ Mᵢⱼ, with a = rowsums(C ∘ R Suv) and M = (R Suu Rᵀ) ∘ (C Cᵀ):
    one O(d_in³) rotation of the held-out Gram, then each α is a quadratic form. Only the total over
    dimensions is this cheap (a per-dimension R² needs O(d_in² d_out) per α)."""

    path: RidgePath
    vv: float  # Σ‖v‖²
    linear: np.ndarray  # a
    quadratic: np.ndarray  # M
    sst: float  # Σ over dimensions of the held-out rows' scatter about their own mean

    @classmethod
    def of(cls, path: RidgePath, held: PairStats) -> HeldOutR2Weighted:
        mx, my, n = path.mean_x, path.mean_y, held.n
        suu = held.xtx - np.outer(mx, held.sum_x) - np.outer(held.sum_x, mx) + n * np.outer(mx, mx)
        suv = held.xty - np.outer(mx, held.sum_y) - np.outer(held.sum_x, my) + n * np.outer(mx, my)
        vv = float(np.trace(held.yty) - 2 * my @ held.sum_y + n * my @ my)
        rotate = path.eigvecs.T / path.scale[None, :]
        C = path.qt_xty
        quadratic = (rotate @ suu @ rotate.T) * (C @ C.T)
        return cls(path, vv, np.sum(C * (rotate @ suv), axis=1), quadratic, float(sst_from_stats(held).sum()))

    def __call__(self, alpha: float) -> float:
        shrink = self.path.shrinkage(alpha)
        sse = self.vv - 2 * shrink @ self.linear + shrink @ self.quadratic @ shrink
        return float(1 - sse / self.sst)


def alpha_trial(objective: Callable[[float], float], alpha_min: float, alpha_max: float) -> Callable[[Any], float]:
    """The α search space of every Optuna study of the project: α log-uniform on [min, max], named
    "alpha" (the name `ato tune`'s trials record)."""
    return lambda trial: objective(trial.suggest_float("alpha", alpha_min, alpha_max, log=True))


def search_alpha(
    objective: Callable[[float], float], alpha_min: float, alpha_max: float, n_trials: int, seed: int
) -> tuple[float, float]:
    """(best α, its objective) of an in-memory Optuna study with `ato tune`'s sampler (TPE, seeded) and
    search space (`alpha_trial`): the same search, without the stage's storage and workers."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(alpha_trial(objective, alpha_min, alpha_max), n_trials=n_trials, show_progress_bar=False)
    return float(study.best_params["alpha"]), float(study.best_value)
