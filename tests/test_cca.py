"""CCA ceiling, whitened R², rank sweeps and subspace size against planted operators and theory."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ato.math.cca import CCA, efficiency_table, participation_ratio, rank_grid, subspace_size, truncate_svd
from ato.math.ridge import ridge_fit
from ato.math.stats import PairStats


def _orthonormal(rng: np.random.Generator, d: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, r)))
    return q


def planted(
    rng: np.random.Generator, n: int, d: int, s: np.ndarray, sigma: float, offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(offset, I); y = W x + 3 + N(0, σ²I) with W = Q_out diag(s) Q_inᵀ of rank len(s).

    Then Σyy = W Wᵀ + σ² I shares eigenvectors with W Wᵀ, so ρ_i² = s_i² / (s_i² + σ²) exactly."""
    r = len(s)
    W = _orthonormal(np.random.default_rng(123), d, r) * s @ _orthonormal(np.random.default_rng(456), d, r).T
    x = rng.normal(size=(n, d)) + offset
    y = x @ W.T + 3.0 + sigma * rng.normal(size=(n, d))
    return x, y


S_PLANTED = np.array([3.0, 2.0, 1.5, 1.0])
SIGMA = 1.0
RHO2 = S_PLANTED**2 / (S_PLANTED**2 + SIGMA**2)


@pytest.fixture(scope="module")
def planted_pair():
    rng = np.random.default_rng(7)
    d = 16
    x, y = planted(rng, 40000, d, S_PLANTED, SIGMA)
    xt, yt = planted(rng, 20000, d, S_PLANTED, SIGMA)
    return d, PairStats.from_data(x, y), PairStats.from_data(xt, yt)


def test_planted_ceiling_matches_theory(planted_pair):
    d, train, _ = planted_pair
    cca = CCA.from_stats(train)
    r = len(S_PLANTED)
    assert cca.total == pytest.approx(d, rel=1e-12)  # whitened variance = d (no ridge)
    np.testing.assert_allclose(cca.rho[:r] ** 2, RHO2, atol=0.01)
    assert cca.rho[r] < 0.06  # beyond the planted rank: sampling noise only
    theory = RHO2.sum() / d
    assert cca.ceiling() == pytest.approx(theory, abs=0.004)
    # rank-r truth: the ceiling saturates at r
    assert cca.ceiling(r) >= 0.995 * cca.ceiling()
    assert cca.ceiling(r - 1) < 0.9 * cca.ceiling()
    # subspace size at 90 % and 50 % of the full ceiling (cumulative ρ² = .9, 1.7, 2.39, 2.89)
    assert cca.subspace_size(0.9) == 4
    assert cca.subspace_size(0.5) == 2
    pr_theory = np.sqrt(RHO2).sum() ** 2 / RHO2.sum()
    assert cca.participation_ratio() == pytest.approx(pr_theory, rel=0.15)


def test_planted_efficiency_train_and_test(planted_pair):
    d, train, test = planted_pair
    cca = CCA.from_stats(train)
    W, b = ridge_fit(train, 0.0)
    ranks = rank_grid(d, 8)
    table = efficiency_table(cca, W, train, test, ranks)
    # RRR attains the ceiling in-sample at every rank: η_train = 1
    np.testing.assert_allclose(table["eta_rrr_train"], 1.0, atol=1e-6)
    # x white and isotropic noise: SVD truncation of OLS ≈ RRR here, so η ≈ 1 in-sample too
    np.testing.assert_allclose(table["eta_svd_train"], 1.0, atol=0.01)
    # out of sample, the full-rank OLS loses only O(d/n)
    full = cca.whitened_r2(test, W, b)
    assert full == pytest.approx(cca.ceiling(), abs=0.01)
    assert table["eta_rrr_test"][ranks.index(4)] == pytest.approx(1.0, abs=0.03)
    assert np.all(table["eta_rrr_test"] <= 1.02)


def test_svd_truncation_is_not_optimal_under_whitening():
    """Anisotropic noise on y: plain SVD truncation of W loses to RRR in the whitened metric."""
    rng = np.random.default_rng(3)
    n, d = 8000, 10
    x = rng.normal(size=(n, d))
    W_true = rng.normal(size=(d, d))
    noise_scale = np.logspace(-1, 1.5, d)
    y = x @ W_true.T + rng.normal(size=(n, d)) * noise_scale
    s = PairStats.from_data(x, y)
    cca = CCA.from_stats(s)
    W, _ = ridge_fit(s, 0.0)
    svd_curve = cca.svd_sweep(W).whitened_r2_curve(s)
    rrr_curve = cca.rrr_sweep().whitened_r2_curve(s)
    ceiling = cca.ceiling_curve()
    np.testing.assert_allclose(rrr_curve, ceiling, atol=1e-10)
    assert np.all(svd_curve <= ceiling + 1e-10)
    assert (ceiling[1:d] - svd_curve[1:d]).max() > 0.02  # strictly worse at some intermediate rank
    assert svd_curve[d] == pytest.approx(ceiling[d], abs=1e-10)  # full rank: both are OLS


def _two_splits(seed: int, n: int = 600, d_in: int = 7, d_out: int = 6):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d_in, d_in)) * np.logspace(0, 2, d_in)
    W = rng.normal(size=(d_out, d_in))

    def draw(shift):
        x = rng.normal(size=(n, d_in)) @ mix + 50 + shift
        y = x @ W.T * 0.1 + rng.normal(size=(n, d_out)) * rng.uniform(0.5, 30, size=d_out) - 20
        return x, y

    return draw(0.0), draw(1.0)


def test_sweep_equals_direct_per_rank_computation():
    """The O(1)-per-rank curves equal scoring each explicitly built rank-r map, on train and test."""
    (x, y), (xt, yt) = _two_splits(11)
    train, test = PairStats.from_data(x, y), PairStats.from_data(xt, yt)
    cca = CCA.from_stats(train)
    W, _ = ridge_fit(train, 10.0)
    for sweep in (cca.svd_sweep(W), cca.rrr_sweep()):
        for split in (train, test):
            curve = sweep.whitened_r2_curve(split)
            direct = [cca.whitened_r2(split, *sweep.map(r)) for r in range(sweep.max_rank + 1)]
            np.testing.assert_allclose(curve, direct, atol=1e-9)
    # SVD-sweep maps are plain SVD truncations of W with the intercept refitted at the train means
    Wr, br = cca.svd_sweep(W).map(3)
    np.testing.assert_allclose(Wr, truncate_svd(W, 3), atol=1e-9)
    np.testing.assert_allclose(br, train.mean_y - Wr @ train.mean_x, atol=1e-9)
    assert np.linalg.matrix_rank(cca.rrr_map(2)[0]) == 2


def test_whitened_r2_matches_explicit_whitening_of_data():
    (x, y), (xt, yt) = _two_splits(5)
    train, test = PairStats.from_data(x, y), PairStats.from_data(xt, yt)
    cca = CCA.from_stats(train)
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(6, 7)) * 0.1, rng.normal(size=6)
    A = cca.wy
    for xs, ys, s in ((x, y, train), (xt, yt, test)):
        err = (ys - xs @ W.T - b) @ A
        dev = (ys - ys.mean(0)) @ A  # each split centred on its own mean
        expected = 1 - (err**2).sum() / (dev**2).sum()
        assert cca.whitened_r2(s, W, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # the whitening is the TRAIN one on both splits, so train-in-sample total = T
    assert np.sum(((y - y.mean(0)) @ A) ** 2) / len(y) == pytest.approx(cca.total, rel=1e-9)


def test_ceiling_is_one_over_d_sum_rho2():
    (x, y), _ = _two_splits(2)
    cca = CCA.from_stats(PairStats.from_data(x, y))
    assert cca.total == pytest.approx(6, rel=1e-9)
    assert cca.ceiling() == pytest.approx((cca.rho**2).sum() / 6, rel=1e-9)
    assert np.all(np.diff(cca.rho) <= 1e-12) and cca.rho.max() <= 1 + 1e-9


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    d_in=st.integers(2, 7),
    d_out=st.integers(2, 7),
    r=st.integers(1, 7),
    alpha=st.floats(1e-3, 1e3),
    eps=st.floats(0.0, 0.3),
)
def test_ceiling_bounds_every_rank_r_map_in_sample(seed, d_in, d_out, r, alpha, eps):
    """ceiling(r) ≥ in-sample whitened R² of any rank-≤r affine map: random maps, maps near the
    optimum (perturbed RRR factors), SVD-truncated ridge; RRR attains it."""
    rng = np.random.default_rng(seed)
    n = 200
    r = min(r, d_in, d_out)
    x = rng.normal(size=(n, d_in)) @ rng.normal(size=(d_in, d_in)) * rng.uniform(0.1, 100) + rng.normal(size=d_in)
    y = x @ rng.normal(size=(d_in, d_out)) + rng.normal(size=(n, d_out)) * rng.uniform(0.1, 10, size=d_out)
    s = PairStats.from_data(x, y)
    cca = CCA.from_stats(s)
    ceiling_r = cca.ceiling(r)
    tol = 1e-8
    # RRR attains the ceiling
    W_rrr, b_rrr = cca.rrr_map(r)
    assert np.linalg.matrix_rank(W_rrr, tol=1e-8 * max(1.0, np.abs(W_rrr).max())) <= r
    assert cca.whitened_r2(s, W_rrr, b_rrr) == pytest.approx(ceiling_r, abs=1e-8)
    # random rank-r maps with random intercepts
    W = rng.normal(size=(d_out, r)) @ rng.normal(size=(r, d_in))
    assert cca.whitened_r2(s, W, rng.normal(size=d_out)) <= ceiling_r + tol
    # near-optimal rank-r maps: perturbed RRR factors and intercept
    left, right = cca.wy_inv @ cca.u[:, :r], cca.rrr_sweep().q[:, :r].T  # W_rrr = left @ right
    np.testing.assert_allclose(left @ right, W_rrr, atol=1e-8 * max(1.0, np.abs(W_rrr).max()))
    W_near = (left + eps * rng.normal(size=left.shape) * np.abs(left).mean()) @ (
        right + eps * rng.normal(size=right.shape) * np.abs(right).mean()
    )
    b_near = s.mean_y - W_near @ s.mean_x + eps * rng.normal(size=d_out) * y.std(0)
    assert cca.whitened_r2(s, W_near, b_near) <= ceiling_r + tol
    # SVD-truncated ridge, with its own intercept and with the refitted one
    W_ridge, b_ridge = ridge_fit(s, alpha)
    W_t = truncate_svd(W_ridge, r)
    assert cca.whitened_r2(s, W_t, b_ridge) <= ceiling_r + tol
    assert cca.whitened_r2(s, W_t, s.mean_y - W_t @ s.mean_x) <= ceiling_r + tol
    assert np.all(cca.svd_sweep(W_ridge).whitened_r2_curve(s) <= cca.ceiling_curve() + tol)


def test_ceiling_is_the_plain_inverse_at_full_rank_and_drops_exact_null_directions():
    """Full-rank Σxx, Σyy: ρ are the singular values of Σyy^{-1/2} Σyx Σxx^{-1/2} (no ridge, no shrinkage).
    An exactly duplicated x column changes nothing: its null direction is dropped, not regularised."""
    (x, y), _ = _two_splits(9)
    s = PairStats.from_data(x, y)
    cxx, cxy, cyy = (m / s.n for m in s.centred())

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        lam, vec = np.linalg.eigh(c)
        return (vec / np.sqrt(lam)) @ vec.T

    rho = np.linalg.svd(inv_sqrt(cyy) @ cxy.T @ inv_sqrt(cxx), compute_uv=False)
    cca = CCA.from_stats(s)
    np.testing.assert_allclose(cca.rho, rho, atol=1e-10)
    assert cca.total == pytest.approx(y.shape[1], rel=1e-12)
    dup = CCA.from_stats(PairStats.from_data(np.c_[x, 3 * x[:, :1]], y))
    np.testing.assert_allclose(dup.rho[: len(rho)], rho, atol=1e-8)
    np.testing.assert_allclose(dup.ceiling_curve(), cca.ceiling_curve(), atol=1e-8)


def test_rank_grid_and_helpers():
    grid = rank_grid(640, 24)
    assert grid[0] == 1 and grid[-1] == 640 and len(grid) >= 24
    assert grid == sorted(set(grid))
    assert rank_grid(5, 24) == [1, 2, 3, 4, 5]
    assert rank_grid(1, 3) == [1]
    assert participation_ratio(np.array([1.0, 1.0, 1.0])) == pytest.approx(3.0)
    assert participation_ratio(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    curve = np.array([0.0, 0.5, 0.8, 0.9, 1.0])
    assert subspace_size(curve, 0.9) == 3
    assert subspace_size(curve, 1.0) == 4
    assert subspace_size(curve, 0.0) == 0
