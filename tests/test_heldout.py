"""Held-out CCA, its null, the true-bound ceiling, η's linear reference and η_RRR without the mean
shift (ato.math.heldout), against planted populations, brute-force simulation and theory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sstats
from threadpoolctl import threadpool_limits

from ato.math.cca import CCA, efficiency_table, pinv_sqrt, rank_grid, whitening
from ato.math.directions import DocumentProjectionSums, significant_directions, transport_directions
from ato.math.heldout import (
    brute_force_split,
    cca_null,
    cumulative_subspace_size,
    draw_scatter,
    heldout_cca,
    positive_participation_ratio,
    rank_zero_r2,
    shift_removed_efficiency,
    shift_removed_table,
    simulated_split,
    subspace_report,
    true_bound_cca,
)
from ato.math.linear_reference import (
    canonical_covariance,
    expected_linear_eta,
    linear_reference,
    population_rho,
    simulate_linear_eta,
)
from ato.math.ridge import ridge_fit
from ato.math.stats import PairStats


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices: one thread is 20–200× faster than several fighting over two busy cores."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # PairStats.from_data multiplies in torch
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(torch_threads)


def _orthonormal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


# --------------------------------------------------------------------------------------------
# The true-bound ceiling


def _design(kind: str, rng: np.random.Generator, n: int = 500, d: int = 20) -> np.ndarray:
    """Inputs from well-conditioned to (numerically) singular."""
    x = rng.normal(size=(n, d))
    if kind == "random":
        return x @ rng.normal(size=(d, d)) + 3
    if kind == "scaled":  # outlier dimensions: variances spanning 1e-6 … 1e8 (cond Σxx ~ 1e14)
        x[:, :3] *= 1e4
        x[:, 3:6] *= 1e-3
    elif kind == "collinear":  # correlation matrix with cond ~ 1e6
        x[:, 1] = x[:, 0] + 1e-3 * rng.normal(size=n)
    elif kind == "rank_deficient":  # exactly collinear columns
        x[:, 1] = 2 * x[:, 0]
        x[:, 5] = x[:, 2] + x[:, 3]
    elif kind == "fewer_rows":
        x = x[: d // 2]
    return x


KINDS = ("random", "scaled", "collinear", "rank_deficient", "fewer_rows")


def test_pinv_whitening_is_exact_on_range():
    """Bᵀ Σ B is a projector and B Bᵀ a (reflexive) generalised inverse of Σ, even with variances spanning
    14 decades: all the ceiling needs."""
    rng = np.random.default_rng(0)
    x = _design("scaled", rng)
    x[:, 7] = x[:, 8] - 3 * x[:, 9]  # and exactly singular
    cov = np.cov(x, rowvar=False, bias=True)
    B = whitening(cov)
    np.testing.assert_allclose(np.linalg.eigvalsh(B.T @ cov @ B), np.r_[0.0, np.ones(19)], atol=1e-9)
    ginv = B @ B.T
    np.testing.assert_allclose(ginv @ cov @ ginv, ginv, atol=1e-9 * np.abs(ginv).max())
    np.testing.assert_allclose(cov @ ginv @ cov, cov, atol=1e-9 * np.abs(cov).max())
    inv_sqrt, sqrt, kept = pinv_sqrt(np.cov(x[:, 7:], rowvar=False))
    assert kept.tolist() == [0.0] + [1.0] * 12  # the exact null direction is dropped, the rest kept
    np.testing.assert_allclose(sqrt @ sqrt, np.cov(x[:, 7:], rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.linalg.eigvalsh(inv_sqrt @ sqrt @ sqrt @ inv_sqrt), kept, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_true_bound_ceiling_is_never_exceeded_in_sample(kind):
    """η(train) ≤ 1 + 1e-9 for RRR at every rank (which attains it), SVD-truncated OLS and ridge."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        x = _design(kind, rng)
        d_out = 12
        y = x @ rng.normal(size=(x.shape[1], d_out)) + rng.normal(size=(len(x), d_out)) * 3 * x.std() + 7
        s = PairStats.from_data(x, y)
        cca = true_bound_cca(s)
        ranks = list(range(1, len(cca.rho) + 1))
        eta_rrr = cca.rrr_sweep().efficiency(s, ranks)
        valid = np.isfinite(eta_rrr)
        assert np.all(eta_rrr[valid] <= 1 + 1e-9)
        np.testing.assert_allclose(eta_rrr[valid], 1.0, atol=1e-9)  # RRR attains the ceiling
        for alpha in (0.0, 1e-6 * np.trace(s.centred()[0]), 1e-2 * np.trace(s.centred()[0])):
            W, b = ridge_fit(s, alpha)
            assert cca.whitened_r2(s, W, b) / cca.ceiling() <= 1 + 1e-9
            eta_svd = cca.svd_sweep(W).efficiency(s, ranks)
            assert np.all(eta_svd[np.isfinite(eta_svd)] <= 1 + 1e-9)


def _relative_ridge_cca(s: PairStats, ridge: float) -> CCA:
    """The CCA before issue 11: Σ + ε·mean(diag Σ)·I on both sides, symmetric inverse square roots."""
    cxx, cxy, cyy = (m / s.n for m in s.centred())

    def ridged(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lam, vec = np.linalg.eigh((c + c.T) / 2)
        lam = np.clip(lam, 0.0, None)
        lam_r = lam + ridge * np.trace(c) / len(c)
        return (vec / np.sqrt(lam_r)) @ vec.T, (vec * np.sqrt(lam_r)) @ vec.T, lam / lam_r

    wy, wy_inv, shrink = ridged(cyy)
    wx = ridged(cxx)[0]
    U, rho, Vt = np.linalg.svd(wy @ cxy.T @ wx, full_matrices=False)
    return CCA(s.mean_x.copy(), s.mean_y.copy(), wy, wy_inv, wx, rho, U, Vt.T, float(shrink.sum()))


def test_relative_ridge_is_not_a_bound_but_agrees_when_well_conditioned():
    """The old relative ridge lets OLS beat its ceiling on badly scaled x; on benign data both ceilings agree."""
    rng = np.random.default_rng(1)
    x = _design("scaled", rng)
    y = x @ rng.normal(size=(20, 8)) + rng.normal(size=(len(x), 8)) * 3e4
    s = PairStats.from_data(x, y)
    W, b = ridge_fit(s, 0.0)
    ridged = _relative_ridge_cca(s, 1e-6)
    assert ridged.whitened_r2(s, W, b) / ridged.ceiling() > 1 + 1e-3
    assert true_bound_cca(s).whitened_r2(s, W, b) / true_bound_cca(s).ceiling() <= 1 + 1e-9
    benign = PairStats.from_data(*(_design("random", rng), rng.normal(size=(500, 8))))
    np.testing.assert_allclose(
        true_bound_cca(benign).ceiling_curve(), _relative_ridge_cca(benign, 0.0).ceiling_curve(), atol=1e-10
    )
    np.testing.assert_allclose(true_bound_cca(benign).rho, CCA.from_stats(benign).rho, atol=0)  # one definition


# --------------------------------------------------------------------------------------------
# Held-out CCA on planted data


def planted_population(d: int = 64, k: int = 16, seed: int = 1):
    """Anisotropic x, a rank-k map and anisotropic noise; returns (population ρ, sampler)."""
    rng = np.random.default_rng(seed)
    Qx = _orthonormal(rng, d)
    cxx = (Qx * np.logspace(-1, 1, d)) @ Qx.T
    W = _orthonormal(rng, d)[:, :k] * np.linspace(3.0, 0.5, k) @ _orthonormal(rng, d)[:k] / np.sqrt(np.diag(cxx))
    Qe = _orthonormal(rng, d)
    cee = (Qe * np.logspace(-0.5, 0.5, d)) @ Qe.T
    cyy = W @ cxx @ W.T + cee

    def inv_sqrt(c):
        lam, vec = np.linalg.eigh(c)
        return (vec / np.sqrt(lam)) @ vec.T

    rho = np.linalg.svd(inv_sqrt(cyy) @ W @ cxx @ inv_sqrt(cxx), compute_uv=False)
    Lx, Le = np.linalg.cholesky(cxx), np.linalg.cholesky(cee)

    def sample(rng: np.random.Generator, n: int) -> PairStats:
        x = rng.normal(size=(n, d)) @ Lx.T + 5
        return PairStats.from_data(x, x @ W.T + rng.normal(size=(n, d)) @ Le.T - 2)

    return rho, sample


def test_heldout_correlations_equal_explicit_projections():
    rng = np.random.default_rng(4)
    x, xt = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)), rng.normal(size=(200, 6)) + 1
    y, yt = x[:, :5] + rng.normal(size=(300, 5)), xt[:, :5] * 0.5 + rng.normal(size=(200, 5))
    h = heldout_cca(PairStats.from_data(x, y), PairStats.from_data(xt, yt))
    direct = [np.corrcoef(xt @ h.x_dirs[:, i], yt @ h.y_dirs[:, i])[0, 1] for i in range(5)]
    np.testing.assert_allclose(h.rho_test, direct, atol=1e-10)
    # on the train split itself the same formula returns the canonical correlations
    np.testing.assert_allclose(
        heldout_cca(PairStats.from_data(x, y), PairStats.from_data(x, y)).rho_test, h.rho_train, atol=1e-10
    )


def test_planted_heldout_subspace_size_matches_population():
    """n/d = 50: held-out 90 % size within ±10 % of the population's; in-sample PR is far off, held-out is not."""
    d = 64
    rho, sample = planted_population(d)
    pop_size, pop_pr = cumulative_subspace_size(rho, 0.9), positive_participation_ratio(rho)
    assert pop_size == 13 and pop_pr == pytest.approx(15.43, abs=0.01)
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        h = heldout_cca(sample(rng, 50 * d), sample(rng, 50 * d))
        assert abs(h.subspace_size(0.9) - pop_size) <= 0.1 * pop_size
        assert abs(h.participation_ratio() - pop_pr) <= 0.1 * pop_pr
        assert h.insample_participation_ratio() > 1.5 * pop_pr  # the in-sample noise floor


# --------------------------------------------------------------------------------------------
# The null


def test_independent_data_show_no_excess():
    """Independent, anisotropic, heavy-tailed / skewed x and y: mean excess PR and size ≤ 2 % of d, and
    the realisations spread like the Gaussian null says."""
    d, n, reps = 32, 1600, 150
    null = cca_null(n, n, d, d, 0.9, replicates=300, seed=3)
    rng = np.random.default_rng(5)
    mx, my = _orthonormal(rng, d) * np.logspace(-1, 1, d), _orthonormal(rng, d) * np.logspace(0, 2, d)
    reports = []
    for _ in range(reps):
        x = rng.standard_t(5, size=(2 * n, d)) @ mx.T + 1
        y = rng.exponential(size=(2 * n, d)) @ my.T
        reports.append(subspace_report(PairStats.from_data(x[:n], y[:n]), PairStats.from_data(x[n:], y[n:]), null=null))
    for stat in ("heldout_pr", "heldout_size", "insample_pr", "insample_size"):
        excess = np.array([getattr(r, stat).excess for r in reports])
        observed = np.array([getattr(r, stat).observed for r in reports])
        assert abs(excess.mean()) <= 0.02 * d, stat
        spread = getattr(reports[0], stat).null_std
        assert 0.7 * spread <= observed.std(ddof=1) <= 1.4 * spread, stat


def test_wishart_null_matches_brute_force_simulation():
    """The O(d³) Wishart shortcut and explicit Gaussian rows give the same null (means and laws)."""
    d_in, d_out, n_train, n_test, reps = 12, 20, 400, 300, 300
    null = cca_null(n_train, n_test, d_in, d_out, 0.9, replicates=reps, seed=7)
    rng, scale = np.random.default_rng(8), np.eye(d_in + d_out)
    rows = []
    for _ in range(reps):
        h = heldout_cca(brute_force_split(rng, n_train, scale, d_in), brute_force_split(rng, n_test, scale, d_in))
        rows.append((h.participation_ratio(), h.subspace_size(0.9), h.insample_participation_ratio()))
    brute = np.array(rows).T
    for wishart, direct in zip((null.heldout_pr, null.heldout_size, null.insample_pr), brute):
        se = np.sqrt(wishart.var(ddof=1) / reps + direct.var(ddof=1) / reps)
        assert abs(wishart.mean() - direct.mean()) <= 3.5 * se
    assert sstats.ks_2samp(null.heldout_pr, brute[0]).pvalue > 0.01
    assert sstats.ks_2samp(null.insample_pr, brute[2]).pvalue > 0.01
    # fewer rows than dimensions: explicit rows (df < dim), same sufficient statistics shape
    small = simulated_split(rng, 10, scale, d_in)
    assert small.n == 10 and np.linalg.matrix_rank(small.centred()[0]) <= 9


@pytest.mark.parametrize("df", [3, 40])
def test_wishart_draws_have_the_wishart_moments(df):
    """Bartlett (df ≥ dim) and explicit rows (df < dim): E[W] = df·Σ, Var(W_ij) = df·(Σ_ij² + Σ_ii·Σ_jj)."""
    dim, reps = 5, 20000
    rng = np.random.default_rng(12)
    m = rng.normal(size=(dim, dim))
    scale = m @ m.T + np.eye(dim)
    chol = np.linalg.cholesky(scale)
    draws = np.array([draw_scatter(rng, df, chol, dim) for _ in range(reps)])
    var = df * (scale**2 + np.outer(np.diag(scale), np.diag(scale)))
    np.testing.assert_allclose(draws.mean(0), df * scale, atol=4 * np.sqrt(var.max() / reps))
    np.testing.assert_allclose(draws.var(0), var, rtol=0.1)
    plain = np.array([draw_scatter(rng, df, None, dim) for _ in range(reps)])  # None: the identity
    np.testing.assert_allclose(plain.mean(0), df * np.eye(dim), atol=4 * np.sqrt(2 * df / reps))


def test_insample_null_pr_is_the_quoted_floor():
    """Independent x, y at d/n = 0.01: in-sample PR ≈ 0.72·d (issue 11), held-out PR ≈ d/π (half-normal ρ⁺)."""
    null = cca_null(6400, 6400, 64, 64, replicates=4, seed=0)
    assert null.insample_pr.mean() / 64 == pytest.approx(0.72, abs=0.01)
    assert null.heldout_pr.mean() / 64 == pytest.approx(1 / np.pi, abs=0.03)


def test_subspace_report_metrics_and_shared_null():
    rho, sample = planted_population(16, 4, seed=2)
    rng = np.random.default_rng(0)
    train, test = sample(rng, 800), sample(rng, 600)
    rep = subspace_report(train, test, replicates=3, seed=1)
    m = rep.metrics("cca_")
    assert m["cca_heldout_size_excess"] == m["cca_heldout_size"] - m["cca_heldout_size_null"]
    assert len(m) == 16 and rep.replicates == 3
    with pytest.raises(ValueError, match="more tokens than the data"):
        subspace_report(train, test, null=cca_null(800, 800, 16, 16, replicates=1))
    with pytest.raises(ValueError, match="other dimensions"):
        subspace_report(train, test, null=cca_null(800, 600, 16, 8, replicates=1))
    effective = subspace_report(train, test, null=cca_null(400, 300, 16, 16, replicates=1))  # n / deff: accepted
    assert effective.replicates == 1 and effective.heldout_pr.observed == rep.heldout_pr.observed


# --------------------------------------------------------------------------------------------
# η beside the η of an exactly linear map


@pytest.mark.parametrize(
    ("rho", "d_in", "d_out", "n_train", "n_test"),
    [
        (np.linspace(0.9, 0.2, 24), 24, 24, 1200, 600),
        (np.r_[np.linspace(0.95, 0.5, 6), np.zeros(10)], 16, 24, 800, 800),
        (np.linspace(0.99, 0.8, 24), 24, 24, 1200, 1200),  # high R²: the naive 2(p/n)(1 − c)/c is 2× off
    ],
)
def test_analytic_linear_eta_matches_simulation(rho, d_in, d_out, n_train, n_test):
    sim = simulate_linear_eta(rho, n_train, n_test, d_in, d_out, replicates=60, seed=2)
    expected = expected_linear_eta(rho, n_train, n_test, d_in, d_out)
    assert expected < 0.995  # a loss worth predicting
    assert expected == pytest.approx(sim.mean(), abs=0.003 + 3 * sim.std(ddof=1) / np.sqrt(len(sim)))
    cov = canonical_covariance(rho, d_in, d_out)
    assert np.linalg.eigvalsh(cov).min() > 0 and cov[0, d_in] == pytest.approx(rho[0])


def test_population_rho_is_unbiased_where_heldout_rho_is_not():
    """Σρ̂² from the inverted in-sample ceiling is unbiased for Σρ²; the held-out ρ² sum is biased down."""
    rho, d_in, d_out, n = np.linspace(0.7, 0.1, 16), 16, 24, 600
    scale, rng = canonical_covariance(rho, d_in, d_out), np.random.default_rng(9)
    debiased, heldout = [], []
    for _ in range(60):
        train, test = simulated_split(rng, n, scale, d_in), simulated_split(rng, n, scale, d_in)
        h = heldout_cca(train, test)
        debiased.append(np.sum(population_rho(h.rho_train, n, d_in, d_out) ** 2))
        heldout.append(np.sum(np.clip(h.rho_test, 0, None) ** 2))
    truth = np.sum(rho**2)
    assert np.mean(debiased) == pytest.approx(truth, abs=3 * np.std(debiased) / np.sqrt(60))
    assert np.mean(heldout) < truth - 0.1
    assert np.all(population_rho(np.full(16, 0.05), n, d_in, d_out) == 0)  # below the noise floor


def test_exactly_linear_data_reach_their_reference():
    """Anisotropic x and noise, OLS at n/d = 50: η(test)/η_expected within 0.01 of 1 (mean of seeds),
    while η(test) itself sits well below 1."""
    d, n = 32, 1600
    rng0 = np.random.default_rng(11)
    mx = _orthonormal(rng0, d) * np.logspace(-1, 1, d)
    W = rng0.normal(size=(d, d)) / np.sqrt(d) @ np.linalg.inv(mx.T)
    me = _orthonormal(rng0, d) * np.logspace(-0.3, 0.3, d) * 1.5
    ratios, etas = [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        xs = [rng.normal(size=(n, d)) @ mx.T + 3 for _ in range(2)]
        train, test = (PairStats.from_data(x, x @ W.T + rng.normal(size=(n, d)) @ me.T + 1) for x in xs)
        Wf, bf = ridge_fit(train, 0.0)
        cca = true_bound_cca(train)
        eta = cca.whitened_r2(test, Wf, bf) / cca.ceiling()
        ref = linear_reference(eta, cca.rho, n, n, d, d)
        ratios.append(ref.ratio)
        etas.append(eta)
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.01)
    assert np.mean(etas) < 0.96
    assert np.std(ratios) > 0.005  # one realisation: compare with LinearReference.eta_simulated_std


# --------------------------------------------------------------------------------------------
# η_RRR(r) without the mean shift


def _shift_y(s: PairStats, c: float) -> PairStats:
    """The statistics of the same rows with c added to every y coordinate."""
    ones = np.ones(len(s.sum_y))
    return PairStats(
        s.n,
        s.sum_x,
        s.sum_y + s.n * c,
        s.xtx,
        s.xty + c * np.outer(s.sum_x, ones),
        s.yty + c * np.add.outer(s.sum_y, s.sum_y) + s.n * c * c,
    )


def test_shift_removed_efficiency():
    rho, sample = planted_population(16, 4, seed=3)
    rng = np.random.default_rng(1)
    train, test = sample(rng, 3000), sample(rng, 3000)
    shifted = _shift_y(test, 0.8)
    cca = true_bound_cca(train)
    W, _ = ridge_fit(train, 0.0)
    ranks = rank_grid(16, 16)
    table = efficiency_table(cca, W, train, shifted, ranks)
    zero_train, zero_test = rank_zero_r2(cca, train), rank_zero_r2(cca, shifted)
    assert zero_train == pytest.approx(0.0, abs=1e-12) and zero_test < -0.1  # the mean shift
    assert table["eta_rrr_test"][0] < 0  # rank 1 raw: dominated by the shift
    fixed = shift_removed_table(table, zero_train, zero_test)
    np.testing.assert_allclose(fixed["eta_rrr_train_shift_removed"], table["eta_rrr_train"], atol=1e-12)
    direct = [(cca.whitened_r2(shifted, *cca.rrr_map(r)) - zero_test) / cca.ceiling(r) for r in ranks]
    np.testing.assert_allclose(fixed["eta_rrr_test_shift_removed"], direct, atol=1e-10)
    assert fixed["eta_rrr_test_shift_removed"][0] > 0.8  # rank 1 recovers most of its ceiling
    # on an unshifted split R²_w(0) is only the sampling shift of the means, ≈ −(1/n + 1/n_test)
    plain = efficiency_table(cca, W, train, test, ranks)
    zero_plain = rank_zero_r2(cca, test)
    assert -0.003 < zero_plain < 0
    np.testing.assert_allclose(
        shift_removed_efficiency(plain["r2w_rrr_test"], zero_plain, plain["ceiling"]) - plain["eta_rrr_test"],
        -zero_plain / plain["ceiling"],
        atol=1e-12,
    )
    assert np.isnan(shift_removed_efficiency(np.array([0.1]), 0.0, np.array([0.0])))[0]


# --------------------------------------------------------------------------------------------
# Effective n: Kish design effects over documents


def _clustered(rng: np.random.Generator, n_groups: int, m: int, d: int, rho: float) -> np.ndarray:
    """Rows with a per-group component of share `rho` of the variance (intra-class correlation rho)."""
    shared = np.repeat(rng.standard_normal((n_groups, d)), m, axis=0)
    return math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.standard_normal((n_groups * m, d))


@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_design_effects_match_the_intra_class_correlation(rho: float):
    """Equal clusters of m: the mean of a variable with intra-class correlation ρ has deff 1 + (m − 1)ρ;
    a product of two independent such variables has deff 1 + (m − 1)ρ². Chunk boundaries that cut
    a group do not change the result."""
    from ato.math.design_effect import DesignEffectAccumulator

    rng = np.random.default_rng(5)
    n_groups, m, d = 400, 16, 4
    x, noise = _clustered(rng, n_groups, m, d, rho), _clustered(rng, n_groups, m, d, rho)
    W = np.eye(d) * 0.5
    y = x @ W.T + noise  # the operator's error is `noise`: its squared norm has ICC ≈ ρ² (a quadratic)
    groups = np.repeat(np.arange(n_groups), m)
    acc = DesignEffectAccumulator(W, np.zeros(d), np.eye(d), np.eye(d), x.mean(0), y.mean(0))
    for lo in range(0, len(x), 1000):  # 1000 is not a multiple of 16: groups straddle chunks
        acc.add(x[lo : lo + 1000], y[lo : lo + 1000], groups[lo : lo + 1000])
    de = acc.result()
    assert de.n_groups == n_groups
    # products and squares of Gaussians with ICC ρ have ICC ρ²: deff ≈ 1 + (m − 1)ρ² (2.35 at ρ = 0.3)
    expected = 1 + (m - 1) * rho**2
    for name, raw in zip(("score", "r2", "null"), de.raw):
        assert raw == pytest.approx(expected, rel=0.15), name
    assert min(de.score, de.r2, de.null) >= 1.0


def test_effective_n_is_at_least_two():
    from ato.math.design_effect import effective_n

    assert effective_n(1000, 4.0) == 250
    assert effective_n(3, 100.0) == 2


# --------------------------------------------------------------------------------------------
# How many directions carry transport


def _canonical_scale(rho: np.ndarray) -> np.ndarray:
    """Joint covariance of (x, y) in canonical coordinates: unit variances, corr(x_i, y_i) = ρ_i.
    CCA is invariant to invertible maps of x and of y, so this is every population with these ρ."""
    d = len(rho)
    return np.block([[np.eye(d), np.diag(rho)], [np.diag(rho), np.eye(d)]])


@pytest.mark.parametrize("rank", [8, 200, 640])
def test_planted_transport_rank_is_recovered_within_its_interval(rank: int):
    """The real d = 640 (a rank-200 transport at the real d is what PR and the 90 % size cannot see):
    ρ from 0.95 down to 0.3 on `rank` directions, 0 on the rest; train n/d = 50 (Wishart statistics),
    6,400 explicit test rows in 64 documents. The count, its bootstrap interval and the ceiling share
    recover the rank; PR and the 90 % size do not track it."""
    d, n_train, n_docs, doc_len = 640, 32_000, 64, 100
    rho = np.r_[np.linspace(0.95, 0.3, rank), np.zeros(d - rank)]
    rng = np.random.default_rng(rank)
    train = simulated_split(rng, n_train, _canonical_scale(rho), d)
    x = rng.standard_normal((n_docs * doc_len, d))
    y = x * rho + rng.standard_normal(x.shape) * np.sqrt(1 - rho**2)
    held = heldout_cca(train, PairStats.from_data(x, y))
    docs = DocumentProjectionSums(held, train.mean_x, train.mean_y)
    groups = np.repeat(np.arange(n_docs), doc_len)
    for lo in range(0, len(x), 1500):  # chunks cut documents
        docs.add(x[lo : lo + 1500], y[lo : lo + 1500], groups[lo : lo + 1500])
    np.testing.assert_allclose(docs.correlations(np.ones((1, n_docs)))[0], held.rho_test, atol=1e-9)
    found = transport_directions(held, n_eff=len(x), documents=docs, seed=1)
    assert found.m == d and found.replicates > 0
    assert found.count_low <= found.count <= found.count_high
    # the count is the test's own 95 % lower bound; the bootstrap re-adds test noise, so its upper end
    # passes a few noise directions more (≤ 2 % of d here)
    assert found.count <= rank <= found.count_high <= rank + 0.02 * d
    # the counted directions carry the planted Σρ² of the ceiling, up to in-sample optimism
    assert found.share * np.sum(held.rho_train**2) == pytest.approx(np.sum(rho**2), rel=0.08)
    assert found.share_low - 1e-12 <= found.share <= found.share_high + 1e-12


def test_step_down_count_keeps_its_error_rate_on_independent_data():
    """Independent x and y (the Wishart null at n and d): the count is 0 in ≥ 1 − α of the replicates
    (binomial margin over 300), so the analytic threshold is the null's quantile."""
    d, n, reps = 32, 1600, 300
    rng = np.random.default_rng(9)
    counts = []
    for _ in range(reps):
        train, test = (simulated_split(rng, n, np.eye(2 * d), d) for _ in range(2))
        counts.append(significant_directions(heldout_cca(train, test).rho_test, n_eff=n).sum())
    assert np.mean(np.asarray(counts) > 0) <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / reps)


def test_clustered_tokens_need_the_effective_n():
    """Documents of 40 tokens with intra-class correlation 0.3 in x and y and no transport: counted at
    the token n the test passes noise directions in most replicates; at n / deff in about α of them."""
    from ato.math.design_effect import DesignEffectAccumulator, effective_n

    d, n_groups, m, reps = 16, 100, 40, 40
    rng = np.random.default_rng(11)
    at_n, at_neff = [], []
    for _ in range(reps):
        x, y = (_clustered(rng, 2 * n_groups, m, d, 0.3) for _ in range(2))
        half = n_groups * m
        train, test = PairStats.from_data(x[:half], y[:half]), PairStats.from_data(x[half:], y[half:])
        held = heldout_cca(train, test)
        acc = DesignEffectAccumulator(np.zeros((d, d)), np.zeros(d), np.eye(d), np.eye(d), test.mean_x, test.mean_y)
        acc.add(x[half:], y[half:], np.repeat(np.arange(n_groups), m))
        at_n.append(significant_directions(held.rho_test, n_eff=half).any())
        at_neff.append(significant_directions(held.rho_test, effective_n(half, acc.result().null)).any())
    assert np.mean(at_n) >= 0.5  # 0.725 with this seed (deff ≈ 4.4)
    assert np.mean(at_neff) <= 0.15  # 0.05
