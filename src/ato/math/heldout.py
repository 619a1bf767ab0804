"""Held-out canonical correlations, their null at the same n and d, a CCA ceiling that is a true
in-sample bound, η beside the η of an exactly linear map, and η_RRR(r) without the mean shift.
Everything works from sufficient statistics (`PairStats`): no stage holds all tokens.
See docs/statistics.md#heldout.

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

**η's linear reference.** For an exactly linear map y = W x + b + ε (Gaussian, population canonical
correlations ρ), OLS with intercept fitted on n train rows, p = d_in, q = d_out, m = min(p, q),
a = Σ_{i≤m}(1 − ρ_i²), b₂ = Σ_{i≤m}(1 − ρ_i²)², c = Σρ_i²/q, u = 1 − c:

    E[ceiling] ≈ c + [(p − m)(q − m) + a(p + q − 2m − 1) + b₂ + a²] / (n q)       (in sample, Pillai)
    E[R²_w(test)] ≈ 1 − u · (1 + p/(n − p − 2)) · (1 + 1/n) · n_test/(n_test − 1)
    η_expected = E[R²_w(test)] / E[ceiling]   ≈ 1 − (1 − c)(p + q(1 − c)) / (n c)   to first order

(for p = q that is (p/n)(1 − c)(2 − c)/c: half the naive 2(p/n)(1 − c)/c when c → 1, equal as c → 0).
The in-sample term is a second-order expansion of Pillai's trace tr(S_yy⁻¹ S_yx S_xx⁻¹ S_xy) in the
canonical basis (to this order it reproduces the null mean pq/(n − 1) and Olkin–Pratt's E[R²] for
q = 1); the test term is the Gaussian random-design OLS prediction error, whose sample-whitening factor
E[S_yy⁻¹] cancels between numerator and denominator. Both agree with `simulate_linear_eta` (Wishart,
same n, d, ρ) to ≤ 0.003 in η for c from 0.1 to 0.9. The population ρ come from the in-sample ones by
inverting the first formula (`population_rho`): the held-out ρ, though free of the in-sample floor,
are biased DOWN by the error of the train directions, which biased the ratio η(test)/η_expected up by
1 % at n/d = 50 (6 % at 25) in simulation; the inverted estimate leaves it unbiased to ≤ 0.3 %. The
reference is for OLS: the fitted ridge equals it when α is immaterial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

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
    return _simulated_split(rng, n, np.linalg.cholesky(scale), d_in, scale.shape[0])


def _simulated_split(rng: np.random.Generator, n: int, chol: np.ndarray | None, d_in: int, dim: int) -> PairStats:
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
        train, test = (_simulated_split(rng, n, None, d_in, dim) for n in (n_train, n_test))
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
# η beside the η of an exactly linear map


def _padded_rho2(rho: np.ndarray, d_in: int, d_out: int) -> np.ndarray:
    """ρ² clipped to [0, 1), padded with zeros (or cut) to m = min(d_in, d_out) canonical pairs."""
    m = min(d_in, d_out)
    r = np.clip(np.asarray(rho, dtype=np.float64)[:m], 0.0, None)
    out = np.zeros(m)
    out[: len(r)] = np.minimum(r**2, 1.0 - 1e-12)
    return out


def expected_ceiling(rho: np.ndarray, n_train: int, d_in: int, d_out: int) -> float:
    """E[in-sample ceiling(d)] for population canonical correlations ρ (see the module docstring)."""
    p, q, m = d_in, d_out, min(d_in, d_out)
    rho2 = _padded_rho2(rho, d_in, d_out)
    a, b2 = float(np.sum(1 - rho2)), float(np.sum((1 - rho2) ** 2))
    return float(rho2.sum() / q + ((p - m) * (q - m) + a * (p + q - 2 * m - 1) + b2 + a * a) / (n_train * q))


def expected_heldout_r2(rho: np.ndarray, n_train: int, n_test: int, d_in: int, d_out: int) -> float:
    """E[whitened R² on test] of OLS with intercept fitted on n_train rows (train whitening)."""
    p, n = d_in, n_train
    if n - p - 2 <= 0 or n_test <= 1:
        return float("nan")
    u = 1.0 - float(_padded_rho2(rho, d_in, d_out).sum()) / d_out
    return 1.0 - u * (1 + p / (n - p - 2)) * (1 + 1 / n) * n_test / (n_test - 1)


def expected_linear_eta(rho: np.ndarray, n_train: int, n_test: int, d_in: int, d_out: int) -> float:
    """η(test) an exactly linear map reaches in expectation at these sizes and population ρ (analytic)."""
    ceiling = expected_ceiling(rho, n_train, d_in, d_out)
    return expected_heldout_r2(rho, n_train, n_test, d_in, d_out) / ceiling if ceiling > 0 else float("nan")


def population_rho(rho_train: np.ndarray, n_train: int, d_in: int, d_out: int) -> np.ndarray:
    """Population canonical correlations estimated from the in-sample ones: ρ̂² = s·r² with the scale s ∈ [0, 1]
    chosen so that `expected_ceiling(ρ̂)` equals the observed ceiling Σr²/q (inverting the Pillai bias).

    Nearly unbiased for Σρ² (what η_expected mostly depends on); the held-out ρ are not — their train
    directions are estimated, which biases them down by O(d/n), and η_expected with them by up to +1 %
    at n/d = 50 (and 6 % at n/d = 25) in the ratio."""
    r2 = _padded_rho2(rho_train, d_in, d_out)
    observed = float(r2.sum()) / d_out
    if observed <= 0 or expected_ceiling(np.zeros_like(r2), n_train, d_in, d_out) >= observed:
        return np.zeros_like(r2)  # at or below the noise floor
    if expected_ceiling(np.sqrt(r2), n_train, d_in, d_out) <= observed:
        return np.sqrt(r2)
    gap = lambda s: expected_ceiling(np.sqrt(s * r2), n_train, d_in, d_out) - observed
    return np.sqrt(brentq(gap, 0.0, 1.0, xtol=1e-12) * r2)


def canonical_covariance(rho: np.ndarray, d_in: int, d_out: int) -> np.ndarray:
    """Joint covariance of (x, y) in canonical form: Σxx = I, Σyy = I, Σxy = diag(ρ) (padded with zeros)."""
    rho = np.sqrt(_padded_rho2(rho, d_in, d_out))
    m = len(rho)
    cov = np.eye(d_in + d_out)
    cov[np.arange(m), d_in + np.arange(m)] = rho
    cov[d_in + np.arange(m), np.arange(m)] = rho
    return cov


def simulate_linear_eta(
    rho: np.ndarray,
    n_train: int,
    n_test: int,
    d_in: int,
    d_out: int,
    replicates: int = 8,
    seed: int = 0,
    rcond: float | None = None,
) -> np.ndarray:
    """η(test) of OLS on exactly linear Gaussian data with population ρ, per replicate (Wishart draws).

    η is invariant to invertible linear maps of x and y for OLS, so the canonical form is general.
    OLS is the full-rank reduced-rank-regression map of the true-bound CCA."""
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(canonical_covariance(rho, d_in, d_out))
    out = np.empty(replicates)
    for i in range(replicates):
        train, test = (_simulated_split(rng, n, chol, d_in, d_in + d_out) for n in (n_train, n_test))
        cca = true_bound_cca(train, rcond)
        out[i] = cca.rrr_sweep().efficiency(test, [min(d_in, d_out)])[0]
    return out


@dataclass(frozen=True)
class LinearReference:
    """η(test) beside what an exactly linear map reaches at the same n, d and population ρ."""

    eta_test: float  # the observed η(test)
    eta_expected: float  # analytic expectation for an exactly linear map (`expected_linear_eta`)
    ratio: float  # eta_test / eta_expected: ≈ 1 is "indistinguishable from linear transport"
    eta_simulated: float  # mean over Wishart replicates (nan when replicates = 0)
    eta_simulated_std: float  # spread of one realisation of η(test) under linearity (nan when replicates < 2)


def linear_reference(
    eta_test: float,
    rho_train: np.ndarray,
    n_train: int,
    n_test: int,
    d_in: int,
    d_out: int,
    replicates: int = 0,
    seed: int = 0,
) -> LinearReference:
    """η(test) beside η_expected for an exactly linear map; `rho_train` are the in-sample canonical
    correlations (`CCA.rho`), turned into a population estimate by `population_rho`.

    With replicates > 0 the Wishart simulation runs too; its std is the sampling spread of η(test) itself."""
    rho = population_rho(rho_train, n_train, d_in, d_out)
    expected = expected_linear_eta(rho, n_train, n_test, d_in, d_out)
    sim = simulate_linear_eta(rho, n_train, n_test, d_in, d_out, replicates, seed) if replicates else np.array([])
    return LinearReference(
        float(eta_test),
        expected,
        float(eta_test) / expected if expected else float("nan"),
        float(sim.mean()) if len(sim) else float("nan"),
        float(sim.std(ddof=1)) if len(sim) > 1 else float("nan"),
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


# --------------------------------------------------------------------------------------------
# Effective sample size: tokens of one document are not independent


@dataclass(frozen=True)
class DesignEffects:
    """Kish design effects of test statistics under clustering by document, clipped at 1 from below
    (so n_eff ≤ n; the raw values are kept). With Z_g the sum of a per-token quantity z_t over
    document g and z̄ its mean, deff = Σ_g ‖Z_g − n_g z̄‖² / Σ_t ‖z_t − z̄‖².

    - `score`: z_t = x̃_t ε̃_tᵀ, the whitened source times the whitened operator error. OLS's
      estimation error is a linear function of its mean, so this sets the effective n of the fit:
      the in-sample optimism of the ceiling and the out-of-sample loss, i.e. η's linear reference.
    - `r2`: z_t = e_t − (SSE/SST)·d_t, e_t = ‖ε̃_t‖², d_t = ‖ỹ_t − ȳ̃‖², the linearised whitened test R²:
      the effective n of the test split's own sampling noise in η(test).
    - `null`: z_t = x̃_t ỹ_tᵀ, the whitened cross-covariance from which the sample canonical
      correlations (and their Wishart null) are computed. Transport between x and y adds to it, so
      it is at least the independence value (conservative for the null)."""

    score: float
    r2: float
    null: float
    n_groups: int  # documents seen
    raw: tuple[float, float, float]  # score, r2, null before clipping


class _ClusteredSum:
    """Σ_g ‖Z_g − n_g z̄‖² and Σ_t ‖z_t − z̄‖² of a per-token array quantity, streamed group by group."""

    def __init__(self, shape: tuple[int, ...]):
        self.total = np.zeros(shape)  # Σ_t z_t
        self.weighted = np.zeros(shape)  # Σ_g n_g Z_g
        self.group_sq = 0.0  # Σ_g ‖Z_g‖²
        self.token_sq = 0.0  # Σ_t ‖z_t‖²

    def add_tokens(self, token_sq: float) -> None:
        self.token_sq += token_sq

    def add_group(self, n_g: int, Z_g: np.ndarray) -> None:
        self.total += Z_g
        self.weighted += n_g * Z_g
        self.group_sq += float(np.sum(Z_g**2))

    def design_effect(self, n: float, sum_n_sq: float) -> float:
        mean = self.total / n
        m2 = float(np.sum(mean**2))
        group = self.group_sq - 2 * float(np.sum(self.weighted * mean)) + m2 * sum_n_sq
        token = self.token_sq - n * m2
        return group / token if token > 0 else math.nan


class DesignEffectAccumulator:
    """Streams (x, y, document id) chunks in store order (a document's tokens contiguous, possibly
    across chunks) into `DesignEffects`. x, y are raw residuals; B (x side, `CCA.wx`) and A (y side,
    `CCA.wy`) whiten them about the given means; the operator predicts ŷ = x Wᵀ + b."""

    def __init__(
        self, W: np.ndarray, b: np.ndarray, A: np.ndarray, B: np.ndarray, mean_x: np.ndarray, mean_y: np.ndarray
    ):
        self.W, self.b, self.A, self.B, self.mean_x, self.mean_y = W, b, A, B, mean_x, mean_y
        d_x, d_y = B.shape[1], A.shape[1]
        self.sums = {"score": _ClusteredSum((d_x, d_y)), "null": _ClusteredSum((d_x, d_y))}
        self.sizes: list[int] = []
        self.open: dict[str, np.ndarray] | None = None
        self.open_id: int | None = None
        # the r2 quantity e − (SSE/SST)·d needs the final SSE/SST: keep its parts' second moments
        self.r2_tokens = np.zeros(3)  # Σ_t e², e·d, d²
        self.r2_groups = np.zeros(3)  # Σ_g E_g², E_g·D_g, D_g²
        self.r2_totals = np.zeros(2)  # SSE, SST

    def add(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err = (y - x @ self.W.T - self.b) @ self.A
        dev = (y - self.mean_y) @ self.A
        xw = (x - self.mean_x) @ self.B
        e, d, xx = (np.einsum("ij,ij->i", v, v) for v in (err, dev, xw))
        self.r2_tokens += [e @ e, e @ d, d @ d]
        self.r2_totals += [e.sum(), d.sum()]
        self.sums["score"].add_tokens(float(xx @ e))  # ‖x̃ ε̃ᵀ‖_F² = ‖x̃‖²‖ε̃‖²
        self.sums["null"].add_tokens(float(xx @ d))
        bounds = np.flatnonzero(np.diff(groups)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(groups)]):
            run = {
                "score": xw[lo:hi].T @ err[lo:hi],
                "r2": np.array([e[lo:hi].sum(), d[lo:hi].sum()]),
                "null": xw[lo:hi].T @ dev[lo:hi],
            }
            self._add_run(int(groups[lo]), hi - lo, run)

    def _add_run(self, gid: int, n: int, run: dict[str, np.ndarray]) -> None:
        if gid == self.open_id and self.open is not None:
            self.sizes[-1] += n
            for key, value in run.items():
                self.open[key] += value
            return
        self._close()
        self.open_id, self.open = gid, run
        self.sizes.append(n)

    def _close(self) -> None:
        if self.open is not None:
            E, D = self.open.pop("r2")
            self.r2_groups += [E * E, E * D, D * D]
            for key, value in self.open.items():
                self.sums[key].add_group(self.sizes[-1], value)
        self.open = None

    def result(self) -> DesignEffects:
        self._close()
        n, sum_n_sq = float(np.sum(self.sizes)), float(np.sum(np.square(self.sizes)))
        sse, sst = self.r2_totals
        ratio = sse / sst if sst > 0 else 0.0
        weights = np.array([1.0, -2 * ratio, ratio**2])  # Σ(a − ratio·b)² from the second moments
        token = float(weights @ self.r2_tokens)
        raw_r2 = float(weights @ self.r2_groups) / token if token > 0 else math.nan
        raw = (self.sums["score"].design_effect(n, sum_n_sq), raw_r2, self.sums["null"].design_effect(n, sum_n_sq))
        clipped = [max(1.0, v) if math.isfinite(v) else 1.0 for v in raw]
        return DesignEffects(clipped[0], clipped[1], clipped[2], len(self.sizes), raw)


def effective_n(n: float, design_effect: float) -> int:
    """n / deff, at least 2 (what the Wishart references are drawn at)."""
    return max(2, int(round(n / design_effect)))
