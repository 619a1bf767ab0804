"""η beside the η of an exactly linear map: what an OLS map of exactly linear data reaches at the same
n, d and canonical correlations, analytic and by Wishart simulation. See docs/statistics.md#heldout.

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

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from .heldout import simulated_split_chol, true_bound_cca


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
        train, test = (simulated_split_chol(rng, n, chol, d_in, d_in + d_out) for n in (n_train, n_test))
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
