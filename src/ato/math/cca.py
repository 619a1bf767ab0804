"""Canonical correlations, the CCA ceiling, whitened R², transport efficiency and the size of the
linear-transport subspace, all from sufficient statistics (see docs/method.md#cca and
docs/method.md#efficiency).

Definitions (train split, centred on the train means x̄, ȳ; covariances divided by n):

    A = Σyy^{+1/2}  (pseudo-inverse square root: the one target whitening used everywhere)
    B = D⁻¹ R^{+1/2}, D = diag(Σxx)^{1/2}, R = D⁻¹ Σxx D⁻¹   (pseudo-inverse of the equilibrated Σxx)
    C = A Σyx B = U diag(ρ) Vᵀ                                        (ρ: canonical correlations)
    T = tr(A Σyy A)                                  (total whitened target variance on train)
    ceiling(r) = Σ_{i≤r} ρ_i² / T

**A true bound.** Eigenvalues at the rounding level (≤ d·eps·λ_max) are dropped, all others are used
exactly: no ridge shrinks ρ. Bᵀ Σxx B is then an orthogonal projector and B Bᵀ a generalised inverse of
Σxx, so ceiling(r) is the exact supremum of the in-sample whitened R² of rank-r affine maps, attained
by reduced-rank regression: η(train) ≤ 1 up to rounding (a relative ridge let it reach 1.0001).
Equilibration (unit variance per dimension first, which leaves CCA unchanged) keeps outlier dimensions
with 10⁴× the typical scale from costing accuracy. T equals rank(Σyy), i.e. d_out at full rank (the
"1/d" of docs/method.md#cca). Derivation: `ato.math.heldout` and docs/statistics.md#heldout.

**Whitened R² on any split.** For an affine map ŷ = W x + b and a split s:

    R²_w = 1 − Σ_s ‖A (y − ŷ)‖² / Σ_s ‖A (y − ȳ_s)‖²

The whitening A is always the TRAIN one (so train and test scores, the ceiling and every efficiency
share one metric). The denominator centres each split on its OWN mean ȳ_s (an R² of 0 is "as good as
knowing the split's mean"), while the numerator uses the map's actual predictions, intercept included
(a train→test mean shift counts as error). On the train split this is exactly the in-sample
quantity the ceiling bounds. Rank-truncated maps get the refitted intercept b_r = ȳ − W_r x̄ (train
means), which is the optimal intercept for their linear part in-sample.

**One decomposition per pair.** Every rank-r map we score has the form A W_r = Σ_{i<r} p_i q_iᵀ
(SVD truncation of W: p_i = A u_i, q_i = s_i v_i; reduced-rank regression: p_i = U_i, q_i = ρ_i B V_i).
With moments of the split about the train means (Mxx, Mxy, Myy), its whitened error is

    SSE_w(r)/n = tr(A Myy A) − 2 Σ_{i<r} q_iᵀ Mxy A p_i + Σ_{i,j<r} (p_iᵀ p_j)(q_iᵀ Mxx q_j),

so after a few d³ products per split, every rank costs O(1) from cumulative sums: no per-rank
re-estimation of covariances, whitening or SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import PairStats

# --------------------------------------------------------------------------------------------
# Helpers


def _sym(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def _cutoff(lam: np.ndarray, rcond: float | None) -> float:
    """Eigenvalues ≤ this are rounding noise (default rcond = d·eps)."""
    rcond = len(lam) * np.finfo(float).eps if rcond is None else rcond
    return float(max(lam.max(initial=0.0), 0.0) * rcond)


def pinv_sqrt(cov: np.ndarray, rcond: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Σ^{+1/2}, Σ^{1/2}, kept) for a symmetric PSD Σ: eigenvalues ≤ rcond·λ_max are dropped, no ridge.

    `kept` is 1 for kept eigenvalues and 0 for dropped ones (its sum is tr(Σ^{+1/2} Σ Σ^{+1/2}))."""
    lam, vec = np.linalg.eigh(_sym(cov))
    lam = np.clip(lam, 0.0, None)
    ok = lam > _cutoff(lam, rcond)
    safe = np.where(ok, lam, 1.0)
    inv_sqrt = np.where(ok, 1.0 / np.sqrt(safe), 0.0)
    sqrt = np.where(ok, np.sqrt(safe), 0.0)
    return (vec * inv_sqrt) @ vec.T, (vec * sqrt) @ vec.T, ok.astype(np.float64)


def whitening(cov: np.ndarray, rcond: float | None = None) -> np.ndarray:
    """B with Σ B Bᵀ Σ = Σ and Bᵀ Σ B an orthogonal projector of rank (Σ), computed on the correlation matrix.

    B = D⁻¹ R^{+1/2} with D = diag(Σ)^{1/2} and R = D⁻¹ Σ D⁻¹ (zero-variance dimensions get a zero row).
    Not symmetric; use it as the right-hand whitening of C = A Σyx B (as `CCA.wx` is used)."""
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    live = sd > 0
    inv_sd = np.where(live, 1.0 / np.where(live, sd, 1.0), 0.0)
    corr = cov * np.outer(inv_sd, inv_sd)
    return inv_sd[:, None] * pinv_sqrt(corr, rcond)[0]


def rank_grid(d: int, n: int) -> list[int]:
    """At least min(n, d) distinct ranks in 1..d, log-spaced, always including 1 and d."""
    n = max(1, min(int(n), int(d)))
    if d == 1:
        return [1]
    points = n
    while True:
        grid = np.unique(np.round(np.logspace(0, np.log10(d), points)).astype(int))
        grid = np.unique(np.concatenate([[1, d], np.clip(grid, 1, d)]))
        if len(grid) >= n or points > 8 * d:
            return [int(r) for r in grid]
        points += 1


def participation_ratio(rho: np.ndarray) -> float:
    """(Σρ)²/Σρ²: the effective number of canonical directions (1 … len(ρ))."""
    rho = np.asarray(rho, dtype=np.float64)
    s2 = float((rho**2).sum())
    return float(rho.sum() ** 2 / s2) if s2 > 0 else 0.0


def subspace_size(ceiling_curve: np.ndarray, fraction: float) -> int:
    """Smallest r with ceiling(r) ≥ fraction · ceiling(full); `ceiling_curve[r]` is ceiling(r), r=0…m."""
    curve = np.asarray(ceiling_curve, dtype=np.float64)
    target = fraction * curve[-1]
    # tiny tolerance so fraction = 1 returns the saturating rank rather than tripping on rounding
    hits = np.nonzero(curve >= target - 1e-12 * max(abs(curve[-1]), 1.0))[0]
    return int(hits[0]) if len(hits) else len(curve) - 1


def truncate_svd(W: np.ndarray, r: int) -> np.ndarray:
    """Best rank-r approximation of W in Frobenius norm (plain SVD truncation)."""
    U, s, Vt = np.linalg.svd(np.asarray(W, dtype=np.float64), full_matrices=False)
    r = max(0, min(int(r), len(s)))
    return (U[:, :r] * s[:r]) @ Vt[:r]


# --------------------------------------------------------------------------------------------
# Moments of a split about a reference point


@dataclass
class SplitMoments:
    """A split's moments about a reference point (the train means), all divided by n.

    `mxx = E[(x−x̄)(x−x̄)ᵀ]`, `mxy`, `myy` likewise; `cyy` is the split's own-mean covariance of y
    (the R² denominator); `dx`, `dy` are the split's mean minus the reference."""

    n: float
    dx: np.ndarray
    dy: np.ndarray
    mxx: np.ndarray
    mxy: np.ndarray
    myy: np.ndarray
    cyy: np.ndarray

    @classmethod
    def from_stats(cls, s: PairStats, ref_x: np.ndarray, ref_y: np.ndarray) -> SplitMoments:
        cxx, cxy, cyy = (m / s.n for m in s.centred())
        dx, dy = s.mean_x - ref_x, s.mean_y - ref_y
        return cls(
            s.n, dx, dy, _sym(cxx) + np.outer(dx, dx), cxy + np.outer(dx, dy), _sym(cyy) + np.outer(dy, dy), _sym(cyy)
        )


# --------------------------------------------------------------------------------------------
# CCA


@dataclass
class CCA:
    """Canonical correlations of a pair's TRAIN statistics plus everything derived from them."""

    mean_x: np.ndarray  # train means: reference point and intercept anchor
    mean_y: np.ndarray
    wy: np.ndarray  # A = Σyy^{+1/2}: the target whitening (train, centred; symmetric)
    wy_inv: np.ndarray  # Σyy^{1/2}
    wx: np.ndarray  # B = D⁻¹ R^{+1/2}: the source whitening (B Bᵀ a generalised inverse of Σxx; not symmetric)
    rho: np.ndarray  # canonical correlations, descending, length min(d_in, d_out)
    u: np.ndarray  # [d_out, m] left singular vectors of C (whitened target space)
    v: np.ndarray  # [d_in, m] right singular vectors of C (whitened source space)
    total: float  # T = tr(A Σyy A): whitened target variance on train (= rank Σyy, d_out at full rank)

    @classmethod
    def from_stats(cls, s: PairStats, rcond: float | None = None) -> CCA:
        """One eigendecomposition each of Σxx and Σyy and one SVD of C: all ranks derive from these.

        Pseudo-inverse whitening on both sides (eigenvalues ≤ rcond·λ_max dropped; default d·eps), so
        ceiling(r) is a true in-sample bound (module docstring)."""
        if s.n <= 1:
            raise ValueError("CCA needs at least two rows of statistics")
        cxx, cxy, cyy = (m / s.n for m in s.centred())
        wy, wy_inv, _ = pinv_sqrt(cyy, rcond)
        wx = whitening(cxx, rcond)
        C = wy @ cxy.T @ wx  # [d_out, d_in]
        U, rho, Vt = np.linalg.svd(C, full_matrices=False)
        total = float(np.sum((wy @ cyy) * wy))
        return cls(s.mean_x.copy(), s.mean_y.copy(), wy, wy_inv, wx, rho, U, Vt.T, total)

    @property
    def d_out(self) -> int:
        return self.wy.shape[0]

    @property
    def d_in(self) -> int:
        return self.wx.shape[0]

    def ceiling_curve(self) -> np.ndarray:
        """[m + 1] array: ceiling(r) for r = 0 … m (m = number of canonical correlations)."""
        if self.total <= 0:
            return np.zeros(len(self.rho) + 1)
        return np.concatenate([[0.0], np.cumsum(self.rho**2)]) / self.total

    def ceiling(self, r: int | np.ndarray | None = None) -> float | np.ndarray:
        """ceiling(r) = Σ_{i≤r} ρ_i² / T; None → ceiling of the full rank. Ranks beyond m saturate."""
        curve = self.ceiling_curve()
        if r is None:
            return float(curve[-1])
        idx = np.clip(np.asarray(r), 0, len(curve) - 1)
        out = curve[idx]
        return float(out) if np.ndim(out) == 0 else out

    def participation_ratio(self) -> float:
        return participation_ratio(self.rho)

    def subspace_size(self, fraction: float) -> int:
        return subspace_size(self.ceiling_curve(), fraction)

    def moments(self, s: PairStats) -> SplitMoments:
        return SplitMoments.from_stats(s, self.mean_x, self.mean_y)

    def whitened_r2(self, s: PairStats | SplitMoments, W: np.ndarray, b: np.ndarray) -> float:
        """Whitened R² of ŷ = W x + b on the rows summarised by `s` (see module docstring)."""
        m = s if isinstance(s, SplitMoments) else self.moments(s)
        A = self.wy
        W = np.asarray(W, dtype=np.float64)
        c = np.asarray(b, dtype=np.float64) - self.mean_y + W @ self.mean_x  # intercept offset
        AW = A @ W
        t_yy = float(np.sum((A @ m.myy) * A))
        t_xy = float(np.sum(AW * (m.mxy @ A).T))
        t_xx = float(np.sum((AW @ m.mxx) * AW))
        Ac = A @ c
        Ae = A @ (m.dy - W @ m.dx)
        sse = t_yy - 2 * t_xy + t_xx - 2 * float(Ae @ Ac) + float(Ac @ Ac)
        sst = float(np.sum((A @ m.cyy) * A))
        return 1.0 - sse / sst if sst > 0 else float("nan")

    # ---- rank sweeps ------------------------------------------------------------------------

    def rrr_sweep(self) -> RankSweep:
        """Reduced-rank regression: truncate in whitened coordinates; attains ceiling(r) in-sample."""
        return RankSweep(self, p=self.u, q=self.wx @ (self.v * self.rho), kind="rrr")

    def svd_sweep(self, W: np.ndarray) -> RankSweep:
        """Plain SVD truncation of a fitted map W (intercepts refitted at the train means)."""
        U, s, Vt = np.linalg.svd(np.asarray(W, dtype=np.float64), full_matrices=False)
        return RankSweep(self, p=self.wy @ U, q=Vt.T * s, kind="svd")

    def rrr_map(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rrr_sweep().map(r)


@dataclass
class RankSweep:
    """A family of maps A W_r = Σ_{i<r} p_i q_iᵀ, b_r = ȳ − W_r x̄, scored for every rank at once."""

    cca: CCA
    p: np.ndarray  # [d_out, m] whitened left factors
    q: np.ndarray  # [d_in, m] right factors
    kind: str

    @property
    def max_rank(self) -> int:
        return self.p.shape[1]

    def map(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(W_r [d_out, d_in], b_r [d_out]) in original coordinates."""
        r = max(0, min(int(r), self.max_rank))
        W = self.cca.wy_inv @ (self.p[:, :r] @ self.q[:, :r].T)
        return W, self.cca.mean_y - W @ self.cca.mean_x

    def whitened_r2_curve(self, s: PairStats | SplitMoments) -> np.ndarray:
        """[m + 1] array: whitened R² of the rank-r map on split `s`, r = 0 … m (O(d³) once, O(1) per rank)."""
        m = s if isinstance(s, SplitMoments) else self.cca.moments(s)
        A = self.cca.wy
        P, Q = self.p, self.q
        lin = np.sum(Q * (m.mxy @ (A @ P)), axis=0)  # q_iᵀ Mxy A p_i
        H = (P.T @ P) * (Q.T @ m.mxx @ Q)  # (p_iᵀp_j)(q_iᵀ Mxx q_j)
        quad = np.diagonal(np.cumsum(np.cumsum(H, axis=0), axis=1))  # leading-block sums
        t_yy = float(np.sum((A @ m.myy) * A))
        sse = t_yy - 2 * np.concatenate([[0.0], np.cumsum(lin)]) + np.concatenate([[0.0], quad])
        sst = float(np.sum((A @ m.cyy) * A))
        return 1.0 - sse / sst if sst > 0 else np.full(len(sse), np.nan)

    def whitened_r2(self, s: PairStats | SplitMoments, ranks: list[int] | np.ndarray) -> np.ndarray:
        curve = self.whitened_r2_curve(s)
        return curve[np.clip(np.asarray(ranks, dtype=int), 0, self.max_rank)]

    def efficiency(self, s: PairStats | SplitMoments, ranks: list[int] | np.ndarray) -> np.ndarray:
        """η(r) = R²_w(r) / ceiling(r), with the ceiling from the train statistics (nan where 0)."""
        r2 = self.whitened_r2(s, ranks)
        ceil = np.asarray(self.cca.ceiling(np.asarray(ranks, dtype=int)), dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ceil > 0, r2 / np.where(ceil > 0, ceil, 1.0), np.nan)


def efficiency_table(
    cca: CCA, W: np.ndarray, train: PairStats, test: PairStats, ranks: list[int]
) -> dict[str, np.ndarray]:
    """The whole rank sweep for one pair: ceiling and η for SVD truncation and RRR on train and test.

    One CCA (passed in), one SVD of W, and one set of moments per split serve every rank."""
    svd, rrr = cca.svd_sweep(W), cca.rrr_sweep()
    m_train, m_test = cca.moments(train), cca.moments(test)
    ranks_arr = np.asarray(ranks, dtype=int)
    return {
        "rank": ranks_arr,
        "ceiling": np.asarray(cca.ceiling(ranks_arr), dtype=np.float64),
        "r2w_svd_train": svd.whitened_r2(m_train, ranks_arr),
        "r2w_svd_test": svd.whitened_r2(m_test, ranks_arr),
        "r2w_rrr_train": rrr.whitened_r2(m_train, ranks_arr),
        "r2w_rrr_test": rrr.whitened_r2(m_test, ranks_arr),
        "eta_svd_train": svd.efficiency(m_train, ranks_arr),
        "eta_svd_test": svd.efficiency(m_test, ranks_arr),
        "eta_rrr_train": rrr.efficiency(m_train, ranks_arr),
        "eta_rrr_test": rrr.efficiency(m_test, ranks_arr),
    }
