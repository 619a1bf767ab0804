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

from dataclasses import dataclass

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

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(W [d_out, d_in], b [d_out]) in original coordinates for penalty α (α = 0: OLS via pinv)."""
        lam = self.eigvals
        if alpha > 0:
            inv = 1.0 / (lam + alpha)
        else:
            cutoff = lam.max() * len(lam) * np.finfo(float).eps
            inv = np.where(lam > cutoff, 1.0 / np.where(lam > cutoff, lam, 1.0), 0.0)
        wt = self.eigvecs @ (inv[:, None] * self.qt_xty)  # [d_in, d_out], standardised coordinates
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
