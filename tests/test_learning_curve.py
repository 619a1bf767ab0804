"""The learning curve of η and R²_w (ato.math.learning_curve) and the sandwich pieces of the design
effects, on planted data: exactly linear with heteroscedastic noise, a non-linearity of known size, and
test documents from another map (a persistent shortfall)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from ato.math.cca import CCA
from ato.math.design_effect import DesignEffectAccumulator
from ato.math.learning_curve import (
    FRACTIONS,
    LearningCurve,
    extrapolate,
    insample_ceiling,
    learning_curve,
    ridge_solve,
    subset_sum,
    whitened_y,
)
from ato.math.stats import PairStats

D = 6
BLOCKS, BLOCK_ROWS = 16, 200  # train: 3,200 rows, the 1/8 subset 400 (n/d ≈ 67)
TEST_ROWS, DOC_ROWS = 3000, 30
ALPHA = 1e-3

Law = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _weights(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((D, D)) / np.sqrt(D)


def heteroscedastic_linear(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """y = W x + ε with heavy-tailed x (Student t, 5 df) and noise whose size grows with ‖x‖."""
    x = rng.standard_t(5, size=(n, D))
    noise = 0.5 * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(D) * rng.standard_normal((n, D))
    return x, x @ _weights().T + noise


NONLINEAR_GAIN, NOISE_SD = 0.8, 0.3
DIRECTION = np.ones(D) / np.sqrt(D)


def nonlinear(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """y = W x + γ (x₀² − 1) u + σ ε, x standard Gaussian: x₀² − 1 is uncorrelated with x, so the best
    linear map is W and its population R²_w is known (`nonlinear_best_linear_r2w`)."""
    x = rng.standard_normal((n, D))
    bend = NONLINEAR_GAIN * (x[:, :1] ** 2 - 1) * DIRECTION
    return x, x @ _weights().T + bend + NOISE_SD * rng.standard_normal((n, D))


def nonlinear_best_linear_r2w() -> float:
    explained = float(np.sum(_weights() ** 2))  # tr(W Wᵀ) for unit-variance x
    return explained / (explained + 2 * NONLINEAR_GAIN**2 + NOISE_SD**2 * D)


def curve_of(train_law: Law, test_law: Law, seed: int, resamples: int = 32) -> LearningCurve:
    """Train blocks and a test split drawn from the laws; the test sd from its documents (as `ato evaluate`)."""
    rng = np.random.default_rng(seed)
    blocks = [PairStats.from_data(*train_law(rng, BLOCK_ROWS)) for _ in range(BLOCKS)]
    x_test, y_test = test_law(rng, TEST_ROWS)
    test = PairStats.from_data(x_test, y_test)
    train = subset_sum(blocks)
    cca = CCA.from_stats(train)
    W, b = ridge_solve(train, ALPHA)
    design = DesignEffectAccumulator(W, b, cca.wy, cca.wx, test.mean_x, test.mean_y)
    design.add(x_test, y_test, np.arange(TEST_ROWS) // DOC_ROWS)
    effects = design.result()
    sd_test = (effects.r2w_sd, effects.r2_sd / float(cca.ceiling()))
    return learning_curve(blocks, test, cca, ALPHA, sd_test, resamples, seed)


def test_exactly_linear_heteroscedastic_data_show_no_shortfall():
    """Heavy-tailed x, noise ∝ ‖x‖: η rises with n (finite-sample loss), and the extrapolated shortfall's
    interval contains 0 in at least 4 of 5 independent draws (nominal 95 %)."""
    curves = [curve_of(heteroscedastic_linear, heteroscedastic_linear, seed) for seed in range(5)]
    assert np.mean([c.points[0].eta_test for c in curves]) < np.mean([c.points[-1].eta_test for c in curves]) - 0.02
    covered = [c.shortfall.lo <= 0 <= c.shortfall.hi for c in curves]
    assert sum(covered) >= 4, [(c.shortfall.lo, c.shortfall.hi) for c in curves]


def test_a_planted_nonlinearity_is_recovered_in_r2w_and_is_no_shortfall_of_eta():
    """A non-linearity of known size: R²_w∞ recovers the best linear map's population R²_w within its
    interval, above what the 1/8 subset scores; η∞'s shortfall still covers 0 (η is relative to the best
    linear map, which the non-linearity lowers for every map alike)."""
    truth = nonlinear_best_linear_r2w()
    c = curve_of(nonlinear, nonlinear, seed=0)
    assert c.r2w_inf.lo <= truth <= c.r2w_inf.hi, (c.r2w_inf, truth)
    assert c.r2w_inf.hi - c.r2w_inf.lo < 0.1  # informative, not just wide
    assert c.points[0].r2w_test < truth
    assert c.shortfall.lo <= 0 <= c.shortfall.hi


def test_test_documents_from_another_map_give_a_shortfall_that_excludes_zero():
    """A persistent shortfall (the test split's map differs from train's) is not extrapolated away."""

    def shifted(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = heteroscedastic_linear(rng, n)
        return x, y + 0.4 * x[:, ::-1]

    c = curve_of(heteroscedastic_linear, shifted, seed=0)
    assert c.shortfall.lo > 0, c.shortfall


def test_the_full_point_is_evaluates_eta_and_the_subsets_are_nested():
    rng = np.random.default_rng(3)
    blocks = [PairStats.from_data(*heteroscedastic_linear(rng, BLOCK_ROWS)) for _ in range(BLOCKS)]
    test = PairStats.from_data(*heteroscedastic_linear(rng, TEST_ROWS))
    train = subset_sum(blocks)
    cca = CCA.from_stats(train)
    c = learning_curve(blocks, test, cca, ALPHA, (0.0, 0.0), resamples=2)
    W, b = ridge_solve(train, ALPHA)
    assert c.points[-1].eta_test == pytest.approx(float(cca.whitened_r2(test, W, b)) / float(cca.ceiling()), rel=1e-9)
    assert insample_ceiling(whitened_y(train, cca.wy)) == pytest.approx(float(cca.ceiling()), rel=1e-9)
    assert [p.n_train for p in c.points] == pytest.approx([f * BLOCKS * BLOCK_ROWS for f in FRACTIONS])


def test_extrapolation_is_exact_for_a_curve_linear_in_one_over_n():
    n = np.array([500.0, 1000.0, 2000.0, 4000.0])
    assert extrapolate(n, 0.9 - 30.0 / n) == pytest.approx(0.9, abs=1e-12)


def test_heteroscedasticity_is_one_for_independent_noise_and_above_for_noise_growing_with_x():
    rng = np.random.default_rng(0)
    x = rng.standard_t(5, size=(20000, D))
    groups = np.arange(len(x)) // 20
    kappa = {}
    for name, scale in {"flat": np.ones((len(x), 1)), "grows": np.linalg.norm(x, axis=1, keepdims=True)}.items():
        y = x @ _weights().T + scale * rng.standard_normal(x.shape)
        s = PairStats.from_data(x, y)
        cca = CCA.from_stats(s)
        W, b = ridge_solve(s, ALPHA)
        acc = DesignEffectAccumulator(W, b, cca.wy, cca.wx, s.mean_x, s.mean_y)
        acc.add(x, y, groups)
        kappa[name] = acc.result().heteroscedasticity
    assert kappa["flat"] == pytest.approx(1.0, abs=0.05)
    assert kappa["grows"] > 1.5


def test_the_sandwich_reference_matches_exactly_linear_heteroscedastic_data_where_the_gaussian_one_does_not():
    """Noise ∝ ‖x‖, heavy-tailed x, d = 20, n = 1,500: over 20 draws the mean η(test) sits far below the
    Gaussian reference and on the sandwich one (the same analytic reference at n / κ)."""
    from ato.math.linear_reference import linear_reference

    d, n, n_test = 20, 1500, 3000
    W = np.random.default_rng(1).standard_normal((d, d)) / np.sqrt(d)

    def draw(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_t(5, size=(rows, d))
        return x, x @ W.T + np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(d) * rng.standard_normal((rows, d))

    observed, gaussian, sandwich = [], [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        (x, y), (x_test, y_test) = draw(rng, n), draw(rng, n_test)
        train, test = PairStats.from_data(x, y), PairStats.from_data(x_test, y_test)
        cca = CCA.from_stats(train)
        W_fit, b_fit = ridge_solve(train, ALPHA)
        eta = float(cca.whitened_r2(test, W_fit, b_fit)) / float(cca.ceiling())
        acc = DesignEffectAccumulator(W_fit, b_fit, cca.wy, cca.wx, test.mean_x, test.mean_y)
        acc.add(x_test, y_test, np.arange(n_test))  # independent tokens: only heteroscedasticity matters
        kappa = acc.result().heteroscedasticity
        observed.append(eta)
        gaussian.append(linear_reference(eta, cca.rho, n, n_test, d, d).eta_expected)
        sandwich.append(linear_reference(eta, cca.rho, round(n / kappa), n_test, d, d).eta_expected)
    gap_gaussian = np.mean(gaussian) - np.mean(observed)
    assert gap_gaussian > 0.01
    assert abs(np.mean(sandwich) - np.mean(observed)) < 0.2 * gap_gaussian
