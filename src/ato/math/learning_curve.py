"""η and R²_w of the ridge map as functions of the train size, extrapolated to n → ∞: the part of η's
shortfall that more data would remove, and the part it would not. See docs/statistics.md#learning-curve.

The train split is cut into K blocks of whole documents (their `PairStats`); the subset of a fraction f
adds up the first f·K blocks, so the subsets are nested and cost no second pass over the tokens (which
blocks come first matters: the observed curve is the mean over a few random orders). Each
subset gets the ridge map of the pair's α and two numbers on the fixed test split:

* R²_w(test), the variance-weighted R² (`r2_from_stats`);
* η(test) = whitened R²(test) / ceiling, with the ceiling the subset's own in-sample best linear fit
  (OLS, pseudo-inverse of the equilibrated Σxx), both in the full train split's y-whitening A. At f = 1
  that is the evaluate stage's η(test) (the CCA ceiling is OLS's in-sample whitened R²).

Each is regressed on 1/n (least squares over the fractions); the intercept is its value at n → ∞. For
data whose train and test documents share one law, the ceiling and the fitted map's test R² converge to
the same number, the best linear map's whitened R² — for ANY law, linear or not, homo- or
heteroscedastic — so η∞ = 1 and the shortfall 1 − η∞ = 0. A shortfall whose interval excludes 0 says
that the train-fitted map does not carry over to the test documents (or that the curve is not linear in
1/n); non-linearity itself lives in 1 − ceiling and only steepens the curve (a finite-sample cost).

Interval: a bootstrap over train blocks (blocks drawn with replacement, the nested subsets rebuilt from
the drawn list) gives the train-side sd; the test split's own sampling sd (clustered by document, from
`design_effect`) is added in quadrature, and the interval is the estimate ± z·sd.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.stats import norm

from .cca import CCA
from .ridge import r2_from_stats
from .stats import FIELDS, PairStats

FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)  # of the train blocks, nested
ORDERS = 4  # random block orders the observed curve averages over: on L05_k1 one order's η∞ ranged 0.957–0.997


@dataclass(frozen=True)
class CurvePoint:
    """One train subset scored on test."""

    n_train: float  # tokens of the subset
    r2w_test: float  # variance-weighted R² of its ridge map on test
    eta_test: float  # whitened R²(test) / the subset's in-sample ceiling


def subset_sum(blocks: list[PairStats]) -> PairStats:
    """The statistics of the rows of all `blocks` together."""
    return PairStats(*(sum(getattr(b, f) for b in blocks) for f in FIELDS))


def whitened_y(s: PairStats, A: np.ndarray) -> PairStats:
    """The statistics of (x, A y) for a symmetric A, with the y-Gram reduced to its diagonal (all an R²
    needs). Ridge is equivariant in y (it fits A y with A W, A b), and the variance-weighted R² of A y is the
    whitened R², so every η below is plain R²_w in these coordinates."""
    return PairStats(s.n, s.sum_x, A @ s.sum_y, s.xtx, s.xty @ A, np.diag(np.einsum("ij,ji->i", A @ s.yty, A)))


def insample_ceiling(s: PairStats) -> float:
    """In-sample R²_w of OLS on the rows of `s`: the most any affine map explains there (for statistics of
    whitened y, the CCA ceiling). Σxx is equilibrated (unit diagonal) and inverted by Cholesky, by its
    pseudo-inverse where that fails (as `CCA.from_stats` whitens it)."""
    cxx, cxy, cyy = s.centred()
    sd = np.sqrt(np.clip(np.diag(cxx), 0.0, None))
    live = sd > 0
    inv_sd = np.where(live, 1.0 / np.where(live, sd, 1.0), 0.0)
    corr = cxx * np.outer(inv_sd, inv_sd) + np.diag(~live * 1.0)
    G = inv_sd[:, None] * cxy  # equilibrated x side
    try:  # Gᵀ R⁻¹ G = ‖L⁻¹ G‖² with R = L Lᵀ: one triangular solve
        explained = float(np.sum(scipy.linalg.solve_triangular(np.linalg.cholesky(corr), G, lower=True) ** 2))
    except np.linalg.LinAlgError:
        explained = float(np.sum(G * (np.linalg.pinv(corr, rcond=len(sd) * np.finfo(float).eps, hermitian=True) @ G)))
    total = float(np.trace(cyy))
    return explained / total if total > 0 else float("nan")


def ridge_solve(s: PairStats, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of ridge with intercept, (XcᵀXc + αI) Wᵀ = XcᵀYc (as `ato.math.ridge`), by Cholesky: one α
    needs no eigendecomposition."""
    cxx, cxy, _ = s.centred()
    lhs = cxx + alpha * np.eye(len(cxx))
    W = scipy.linalg.cho_solve(scipy.linalg.cho_factor(lhs), cxy).T
    return W, s.mean_y - W @ s.mean_x


@dataclass(frozen=True)
class TestSplit:
    """The test statistics in both coordinates, and the map back from whitened y (`CCA.wy_inv`)."""

    raw: PairStats
    whitened: PairStats
    unwhiten: np.ndarray

    @classmethod
    def of(cls, test: PairStats, cca: CCA) -> TestSplit:
        return cls(test, whitened_y(test, cca.wy), cca.wy_inv)


def curve_point(train_whitened: PairStats, test: TestSplit, alpha: float) -> CurvePoint:
    """Ridge (α) on a subset's statistics of whitened y, scored on test in both coordinates."""
    Ww, bw = ridge_solve(train_whitened, alpha)
    ceiling = insample_ceiling(train_whitened)
    eta = float(r2_from_stats(test.whitened, Ww, bw)["r2_weighted"]) / ceiling if ceiling > 0 else float("nan")
    r2w = float(r2_from_stats(test.raw, test.unwhiten @ Ww, test.unwhiten @ bw)["r2_weighted"])
    return CurvePoint(float(train_whitened.n), r2w, eta)


def nested_curve(blocks_whitened: list[PairStats], test: TestSplit, alpha: float) -> list[CurvePoint]:
    """One `CurvePoint` per fraction of `FRACTIONS`, the subsets being the first f·K of the blocks."""
    k, points, used = len(blocks_whitened), [], 0
    subset = PairStats.zeros(blocks_whitened[0].xtx.shape[0], blocks_whitened[0].yty.shape[0])
    for m in (max(1, round(f * k)) for f in FRACTIONS):
        subset = subset.merge(subset_sum(blocks_whitened[used:m])) if m > used else subset
        used = m
        points.append(curve_point(subset, test, alpha))
    return points


def extrapolate(n: np.ndarray, values: np.ndarray) -> float:
    """Intercept of the least-squares line of `values` on 1/n: the value at n → ∞."""
    design = np.column_stack([np.ones(len(n)), 1.0 / np.asarray(n, dtype=np.float64)])
    coef, *_ = np.linalg.lstsq(design, np.asarray(values, dtype=np.float64), rcond=None)
    return float(coef[0])


@dataclass(frozen=True)
class Extrapolated:
    """A value at n → ∞ with its sd (train bootstrap and test sampling in quadrature) and interval."""

    value: float
    sd_train: float  # sd over the block bootstrap
    sd_test: float  # the test split's own sampling sd (clustered by document)
    lo: float
    hi: float

    @classmethod
    def of(cls, value: float, boot: np.ndarray, sd_test: float, level: float) -> Extrapolated:
        sd_train = float(np.std(boot, ddof=1)) if len(boot) > 1 else float("nan")
        half = float(norm.ppf(0.5 + level / 2)) * float(np.hypot(sd_train, sd_test))
        return cls(value, sd_train, sd_test, value - half, value + half)


@dataclass(frozen=True)
class LearningCurve:
    """Observed points, both values at n → ∞, and η's shortfall 1 − η∞ (an exactly linear map's η∞ is 1)."""

    points: list[CurvePoint]
    r2w_inf: Extrapolated
    eta_inf: Extrapolated
    resamples: int

    @property
    def shortfall(self) -> Extrapolated:
        e = self.eta_inf
        return Extrapolated(1.0 - e.value, e.sd_train, e.sd_test, 1.0 - e.hi, 1.0 - e.lo)


def learning_curve(
    blocks: list[PairStats],
    test: PairStats,
    cca: CCA,
    alpha: float,
    sd_test: tuple[float, float],
    resamples: int,
    seed: int = 0,
    level: float = 0.95,
) -> LearningCurve:
    """The nested curve of `blocks` (train), averaged over `ORDERS` seeded random orders of the blocks, and
    its bootstrap over blocks (one order per resample: the interval is conservative for the average).

    `sd_test` = (sd of R²_w(test), sd of η(test)) from the test split's documents; `cca` is the full train
    split's (`CCA.from_stats` of the sum of the blocks)."""
    blocks = [block for block in blocks if block.n > 0]  # fewer documents than blocks leave some empty
    if len(blocks) < 8:
        raise ValueError(
            f"the learning curve needs at least 8 non-empty train blocks for its 1/8 subset, got {len(blocks)}"
        )
    split = TestSplit.of(test, cca)
    rng = np.random.default_rng(seed)
    blocks = [whitened_y(block, cca.wy) for block in blocks]
    points = mean_curve([nested_curve([blocks[j] for j in rng.permutation(len(blocks))], split, alpha)
                         for _ in range(ORDERS)])  # fmt: skip
    boot = np.empty((resamples, 2))
    for i in range(resamples):
        drawn = [blocks[j] for j in rng.integers(0, len(blocks), len(blocks))]
        boot[i] = _intercepts(nested_curve(drawn, split, alpha))
    r2w, eta = _intercepts(points)
    return LearningCurve(
        points,
        Extrapolated.of(r2w, boot[:, 0], sd_test[0], level),
        Extrapolated.of(eta, boot[:, 1], sd_test[1], level),
        resamples,
    )


def mean_curve(curves: list[list[CurvePoint]]) -> list[CurvePoint]:
    """Point by point mean of nested curves (random orders of the same blocks); n is the harmonic mean, the
    curve being read in 1/n."""
    out = []
    for same in zip(*curves):
        n = 1.0 / float(np.mean([1.0 / p.n_train for p in same]))
        out.append(
            CurvePoint(n, float(np.mean([p.r2w_test for p in same])), float(np.mean([p.eta_test for p in same])))
        )
    return out


def _intercepts(points: list[CurvePoint]) -> tuple[float, float]:
    """(R²_w∞, η∞) of one nested curve."""
    n = np.array([p.n_train for p in points])
    r2w, eta = (np.array([getattr(p, name) for p in points]) for name in ("r2w_test", "eta_test"))
    return extrapolate(n, r2w), extrapolate(n, eta)
