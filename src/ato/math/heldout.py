"""Held-out canonical correlations, their null at the same n and d, a CCA ceiling that is a true
in-sample bound, and η_RRR(r) without the mean shift; η beside the η of an exactly linear map is in
`linear_reference`, the effective sample size in `design_effect`, the number of directions that carry
transport (a step-down test with a document bootstrap) in `directions`. Everything works from
sufficient statistics (`PairStats`): no stage holds all tokens. See docs/statistics.md#heldout.

**True-bound ceiling.** For a symmetric target whitening A and any x-side B with B Bᵀ a generalised
inverse of Σxx (Σxx B Bᵀ Σxx = Σxx; Bᵀ Σxx B is then an orthogonal projector), the best in-sample
whitened R² of a rank-r affine map is exactly Σ_{i≤r} σ_i(A Σyx B)² / tr(A Σyy A) (Σyx's columns lie
in range Σxx, so any generalised inverse gives the same value): the supremum, attained by reduced-rank
regression. A relative ridge on Σxx shrinks every σ_i and so lets a fitted map beat the "ceiling"
(η(train) > 1). `ato.math.cca` (`CCA.from_stats`, `pinv_sqrt`, `whitening`) gives Σxx a pseudo-inverse
instead: eigenvalues at the rounding level (≤ rcond·λ_max) are dropped, all others are used exactly.
x is first scaled to unit variance per dimension (equilibration, a diagonal change of basis that
leaves CCA unchanged), so that outlier dimensions with 10⁴× the typical scale cost no accuracy:
Bᵀ Σxx B is a projector to ~eps·cond(correlation matrix), not eps·cond(Σxx).

**Held-out CCA.** Directions from TRAIN (a_i = A u_i on y, b_i = B v_i on x, C = A Σyx B = U diag(ρ) Vᵀ);
correlations MEASURED on TEST, about the test means:

    ρ_i^test = a_iᵀ Σyx^test b_i / √(a_iᵀ Σyy^test a_i · b_iᵀ Σxx^test b_i)

kept in TRAIN order (sorting by the test values would select on test noise and bias them up). With
ρ⁺ = max(ρ^test, 0): held-out PR = (Σρ⁺)²/Σ(ρ⁺)², and the held-out subspace size is the smallest r
with Σ_{i≤r}(ρ_i⁺)² ≥ fraction · Σ_i(ρ_i⁺)². A direction that carries nothing has ρ^test ≈ N(0, 1/n_test),
so ρ⁺ never goes to zero: the noise floor shrinks (held-out, in-sample noise no longer adds up
coherently), but it does not vanish, hence the null.

**The null.** Sample canonical correlations are invariant to invertible linear maps of x and of y
separately, so for independent Gaussian x and y every statistic here depends only on n_train, n_test,
d_in and d_out. The null draws the centred joint scatter of each split from Wishart(n − 1, I_{d_in+d_out})
(Bartlett decomposition, O(d³), not O(n d²)) and runs the same held-out computation. Why this null is
the right one:

- *Random pairing across documents ≈ independence.* Pairing each x with the y of a token from another
  document keeps both marginals and destroys exactly the within-token dependence that transport would
  create; documents are (nearly) independent, so x and y become independent. That is the hypothesis
  "no linear transport"; the Wishart null is this experiment at the same n and d, without a data pass.
- *Gaussian suffices.* Under independence, the sample cross-covariance of whitened x and y has
  entries with E = 0 and Cov = (1/n)·I⊗I for ANY marginals with finite fourth moments, because
  E[(aᵀx)²(bᵀy)²] = E[(aᵀx)²]·E[(bᵀy)²]. The canonical correlations are smooth functions of it (and
  of the whitenings, which converge at rate 1/√n), so their null law is the Gaussian one up to
  higher-order terms (the universality of Wachter's law). tests/test_heldout.py checks this on
  anisotropic, heavy-tailed independent data.
- *Caveat: effective n.* Tokens of one sequence are serially correlated; the cross-covariance of
  independent x, y then has variance ≈ (1/n)·Σ_lag acf_x(lag)·acf_y(lag) per entry, i.e. an effective n
  below the token count, and the floor rises. Pass an effective n_train / n_test to be conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .cca import CCA, participation_ratio, subspace_size
from .stats import PairStats

# --------------------------------------------------------------------------------------------
# A ceiling that is a true bound: pseudo-inverse whitening (implemented by `CCA.from_stats`)


def true_bound_cca(s: PairStats, rcond: float | None = None) -> CCA:
    """A `CCA` whose ceiling(r) is the exact supremum of the in-sample whitened R² of rank-r affine maps.

    Σxx: pseudo-inverse of the equilibrated covariance (`whitening`); Σyy: pseudo-inverse square root
    (`pinv_sqrt`), and T = tr(A Σyy A) exactly as the train split's whitened R² denominator. The same
    as `CCA.from_stats(s, rcond)`, which has used this whitening since issue 11."""
    return CCA.from_stats(s, rcond)


# --------------------------------------------------------------------------------------------
# Held-out canonical correlations


def positive_participation_ratio(rho: np.ndarray) -> float:
    """(Σρ⁺)²/Σ(ρ⁺)² with ρ⁺ = max(ρ, 0); 0 when every ρ ≤ 0."""
    return participation_ratio(np.clip(np.asarray(rho, dtype=np.float64), 0.0, None))


def cumulative_subspace_size(rho: np.ndarray, fraction: float) -> int:
    """Smallest r with Σ_{i≤r}(ρ_i⁺)² ≥ fraction · Σ_i(ρ_i⁺)², ρ in the order given (train order)."""
    rho_pos = np.clip(np.asarray(rho, dtype=np.float64), 0.0, None)
    return subspace_size(np.concatenate([[0.0], np.cumsum(rho_pos**2)]), fraction)


@dataclass(frozen=True)
class HeldOutCCA:
    """Canonical directions of the train split and their correlations on both splits (train order)."""

    rho_train: np.ndarray  # [m] in-sample canonical correlations, descending
    rho_test: np.ndarray  # [m] correlation of the same direction pair on the test split (may be < 0)
    x_dirs: np.ndarray  # [d_in, m] b_i = B v_i
    y_dirs: np.ndarray  # [d_out, m] a_i = A u_i

    def participation_ratio(self) -> float:
        return positive_participation_ratio(self.rho_test)

    def subspace_size(self, fraction: float) -> int:
        return cumulative_subspace_size(self.rho_test, fraction)

    def insample_participation_ratio(self) -> float:
        return participation_ratio(self.rho_train)

    def insample_subspace_size(self, fraction: float) -> int:
        return cumulative_subspace_size(self.rho_train, fraction)


def heldout_cca(train: PairStats, test: PairStats, rcond: float | None = None) -> HeldOutCCA:
    """Train canonical directions (true-bound whitening), correlations measured on the test split."""
    return heldout_from_cca(true_bound_cca(train, rcond), test)


def heldout_from_cca(cca: CCA, test: PairStats) -> HeldOutCCA:
    """The same from an already computed train `CCA` (no second decomposition)."""
    x_dirs, y_dirs = cca.wx @ cca.v, cca.wy @ cca.u
    return HeldOutCCA(cca.rho.copy(), direction_correlations(test, x_dirs, y_dirs), x_dirs, y_dirs)


def direction_correlations(s: PairStats, x_dirs: np.ndarray, y_dirs: np.ndarray) -> np.ndarray:
    """corr(b_iᵀx, a_iᵀy) over the rows of `s` (about their own means), per column i; 0 where a side is flat."""
    cxx, cxy, cyy = s.centred()
    cov = np.sum(x_dirs * (cxy @ y_dirs), axis=0)
    var = np.sum(x_dirs * (cxx @ x_dirs), axis=0) * np.sum(y_dirs * (cyy @ y_dirs), axis=0)
    ok = var > 0
    return np.where(ok, cov / np.sqrt(np.where(ok, var, 1.0)), 0.0)


# --------------------------------------------------------------------------------------------
# Simulated splits: Wishart draws turned into sufficient statistics


def stats_from_scatter(n: int, scatter: np.ndarray, mean: np.ndarray, d_in: int) -> PairStats:
    """PairStats of n rows with the given joint mean and centred joint scatter Σ(z − z̄)(z − z̄)ᵀ, z = (x, y)."""
    raw = scatter + n * np.outer(mean, mean)
    x, y = slice(0, d_in), slice(d_in, None)
    return PairStats(float(n), n * mean[x], n * mean[y], raw[x, x], raw[x, y], raw[y, y])


def draw_scatter(rng: np.random.Generator, df: int, chol: np.ndarray | None, dim: int) -> np.ndarray:
    """A draw of Wishart(df, L Lᵀ) of size dim, given the Cholesky factor L (None: the identity): the
    scatter of df independent N(0, L Lᵀ) rows.

    Bartlett decomposition when df ≥ dim, in O(dim³): W = (L A)(L A)ᵀ with A lower triangular,
    A_ii = √χ²(df − i) (i = 0, 1, …), A_ij ~ N(0, 1) below the diagonal; explicit rows otherwise
    (then df < dim, so that costs less)."""
    if df >= dim:
        a = np.tril(rng.standard_normal((dim, dim)), -1)
        a[np.diag_indices(dim)] = np.sqrt(rng.chisquare(df - np.arange(dim)))
        la = a if chol is None else chol @ a
        return la @ la.T
    g = rng.standard_normal((df, dim))
    g = g if chol is None else g @ chol.T
    return g.T @ g


def simulated_split(rng: np.random.Generator, n: int, scale: np.ndarray, d_in: int) -> PairStats:
    """Sufficient statistics of n independent N(0, scale) rows, drawn in O(d³): the sample mean
    ~ N(0, scale/n) and, independently, the centred scatter ~ Wishart(n − 1, scale)."""
    return simulated_split_chol(rng, n, np.linalg.cholesky(scale), d_in, scale.shape[0])


def simulated_split_chol(rng: np.random.Generator, n: int, chol: np.ndarray | None, d_in: int, dim: int) -> PairStats:
    """`simulated_split` given the Cholesky factor of the scale (None: the identity of size dim)."""
    z = rng.standard_normal(dim) / math.sqrt(n)
    mean = z if chol is None else chol @ z
    return stats_from_scatter(n, draw_scatter(rng, n - 1, chol, dim), mean, d_in)


def brute_force_split(rng: np.random.Generator, n: int, scale: np.ndarray, d_in: int) -> PairStats:
    """The same from n explicit N(0, scale) rows, O(n d²): the reference for the Wishart shortcut."""
    z = rng.standard_normal((n, scale.shape[0])) @ np.linalg.cholesky(scale).T
    return PairStats.from_data(z[:, :d_in], z[:, d_in:])


# --------------------------------------------------------------------------------------------
# The null at the same n and d


@dataclass(frozen=True)
class CCANull:
    """Per-replicate statistics of independent Gaussian x and y at the given sizes (see module doc)."""

    n_train: int
    n_test: int
    d_in: int
    d_out: int
    fraction: float
    heldout_pr: np.ndarray  # [replicates] held-out participation ratio
    heldout_size: np.ndarray  # [replicates] held-out subspace size at `fraction`
    insample_pr: np.ndarray  # [replicates] in-sample participation ratio (train ρ)
    insample_size: np.ndarray  # [replicates] in-sample subspace size at `fraction`


def cca_null(
    n_train: int,
    n_test: int,
    d_in: int,
    d_out: int,
    fraction: float = 0.9,
    replicates: int = 8,
    seed: int = 0,
    rcond: float | None = None,
) -> CCANull:
    """Simulate the null (independent x and y) `replicates` times: Wishart train and test statistics,
    the same `heldout_cca` as the data get. Cost per replicate: two O((d_in + d_out)³) draws and one CCA."""
    if replicates < 1:
        raise ValueError("the null needs at least one replicate")
    rng = np.random.default_rng(seed)
    dim = d_in + d_out
    rows = []
    for _ in range(replicates):
        train, test = (simulated_split_chol(rng, n, None, d_in, dim) for n in (n_train, n_test))
        h = heldout_cca(train, test, rcond)
        rows.append(
            (
                h.participation_ratio(),
                h.subspace_size(fraction),
                h.insample_participation_ratio(),
                h.insample_subspace_size(fraction),
            )
        )
    cols = np.asarray(rows, dtype=np.float64).T
    return CCANull(n_train, n_test, d_in, d_out, fraction, *cols)


@dataclass(frozen=True)
class VersusNull:
    """An observed statistic beside its null: mean and spread over the null replicates, and the excess."""

    observed: float
    null: float  # mean over the null replicates
    null_std: float  # standard deviation over the null replicates (ddof = 1; 0 with one replicate)
    excess: float  # observed − null

    @classmethod
    def of(cls, observed: float, null_values: np.ndarray) -> VersusNull:
        values = np.asarray(null_values, dtype=np.float64)
        spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return cls(float(observed), float(values.mean()), spread, float(observed) - float(values.mean()))


@dataclass(frozen=True)
class SubspaceReport:
    """Participation ratio and subspace size, held out and in sample, each beside its null."""

    fraction: float
    replicates: int
    heldout_pr: VersusNull
    heldout_size: VersusNull
    insample_pr: VersusNull
    insample_size: VersusNull

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat {name: value}: `<stat>`, `<stat>_null`, `<stat>_null_std`, `<stat>_excess` per statistic."""
        out: dict[str, float] = {}
        for name in ("heldout_pr", "heldout_size", "insample_pr", "insample_size"):
            v: VersusNull = getattr(self, name)
            key = prefix + name
            out.update(
                {key: v.observed, f"{key}_null": v.null, f"{key}_null_std": v.null_std, f"{key}_excess": v.excess}
            )
        return out


def subspace_report(
    train: PairStats,
    test: PairStats,
    fraction: float = 0.9,
    replicates: int = 8,
    seed: int = 0,
    rcond: float | None = None,
    null: CCANull | None = None,
    heldout: HeldOutCCA | None = None,
) -> SubspaceReport:
    """Held-out and in-sample PR and subspace size of a pair, each beside the null at its n and d.

    `null` may be passed to share one simulation between pairs of the same sizes (same d and fraction,
    drawn at n or at an effective n below it);
    `heldout` to reuse the pair's `heldout_cca(train, test)`."""
    h = heldout_cca(train, test, rcond) if heldout is None else heldout
    d_in, d_out = train.xtx.shape[0], train.yty.shape[0]
    if null is None:
        null = cca_null(int(train.n), int(test.n), d_in, d_out, fraction, replicates, seed, rcond)
    elif (
        (null.d_in, null.d_out, null.fraction) != (d_in, d_out, fraction)
        or not 2 <= null.n_train <= int(train.n)
        or not 2 <= null.n_test <= int(test.n)
    ):  # sizes may be effective ones (n / deff ≤ n): `effective_n`
        raise ValueError("the null was simulated for other dimensions, another fraction or more tokens than the data")
    return SubspaceReport(
        fraction,
        len(null.heldout_pr),
        VersusNull.of(h.participation_ratio(), null.heldout_pr),
        VersusNull.of(h.subspace_size(fraction), null.heldout_size),
        VersusNull.of(h.insample_participation_ratio(), null.insample_pr),
        VersusNull.of(h.insample_subspace_size(fraction), null.insample_size),
    )


# --------------------------------------------------------------------------------------------
# η_RRR(r) without the train→test mean shift


def rank_zero_r2(cca: CCA, s: PairStats) -> float:
    """R²_w(0): whitened R² of the rank-0 map ŷ = ȳ_train on split s (0 on train; on test, minus the
    whitened train→test mean shift over the test variance)."""
    return float(cca.rrr_sweep().whitened_r2(s, [0])[0])


def shift_removed_efficiency(r2w: np.ndarray, r2w_zero: float, ceiling: np.ndarray) -> np.ndarray:
    """(R²_w(r) − R²_w(0)) / ceiling(r), nan where the ceiling is 0: the gain of the rank-r map over
    predicting the train mean, per unit of ceiling. `r2w` and `ceiling` are columns of
    `ato.math.cca.efficiency_table` (e.g. "r2w_rrr_test" and "ceiling")."""
    r2w = np.asarray(r2w, dtype=np.float64)
    ceiling = np.asarray(ceiling, dtype=np.float64)
    ok = ceiling > 0
    return np.where(ok, (r2w - r2w_zero) / np.where(ok, ceiling, 1.0), np.nan)


def shift_removed_table(
    table: dict[str, np.ndarray], r2w_zero_train: float, r2w_zero_test: float
) -> dict[str, np.ndarray]:
    """`eta_{svd,rrr}_{train,test}_shift_removed` columns for an `efficiency_table` result."""
    zero = {"train": r2w_zero_train, "test": r2w_zero_test}
    return {
        f"eta_{kind}_{split}_shift_removed": shift_removed_efficiency(
            table[f"r2w_{kind}_{split}"], zero[split], table["ceiling"]
        )
        for kind in ("svd", "rrr")
        for split in ("train", "test")
    }
