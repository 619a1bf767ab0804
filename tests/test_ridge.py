"""Closed-form ridge from streamed statistics matches scikit-learn; R² from statistics is exact."""

from __future__ import annotations

import numpy as np
import pytest

from ato.math.ridge import RidgePath, r2_from_stats, ridge_fit
from ato.math.stats import PairStats


def data(n=600, d_in=12, d_out=9, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    scales = scale * np.exp(rng.normal(0, 1.5, d_in))  # very different per-dimension scales
    X = rng.normal(size=(n, d_in)) * scales + rng.normal(size=d_in) * 3
    W = rng.normal(size=(d_out, d_in)) / scales
    Y = X @ W.T + rng.normal(size=d_out) + 0.3 * rng.normal(size=(n, d_out))
    return X.astype(np.float32), Y.astype(np.float32)


def streamed(X, Y, chunk=97) -> PairStats:
    s = PairStats.zeros(X.shape[1], Y.shape[1])
    for i in range(0, len(X), chunk):
        s.update(X[i : i + chunk], Y[i : i + chunk])
    return s


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_streamed_statistics_equal_one_shot_and_merge():
    X, Y = data()
    a, b = streamed(X, Y), PairStats.from_data(X, Y)
    for f in ("sum_x", "xtx", "xty", "yty"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-10)
    half = streamed(X[:300], Y[:300]).merge(streamed(X[300:], Y[300:]))
    np.testing.assert_allclose(half.xty, b.xty, rtol=1e-10)
    assert half.n == 600


@pytest.mark.parametrize("alpha", [1e-3, 1.0, 30.0, 1e4])
def test_ridge_matches_sklearn(alpha):
    from sklearn.linear_model import Ridge

    X, Y = data(scale=30.0)
    W, b = ridge_fit(streamed(X, Y), alpha)
    ref = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(X.astype(np.float64), Y.astype(np.float64))
    assert rel(W, ref.coef_) < 1e-5
    assert rel(b, ref.intercept_) < 1e-5


def test_one_decomposition_prices_every_alpha():
    X, Y = data()
    path = RidgePath.from_stats(streamed(X, Y))
    for alpha in (0.1, 10.0):
        W1, _ = path.solve(alpha)
        W2, _ = ridge_fit(streamed(X, Y), alpha)
        np.testing.assert_allclose(W1, W2, rtol=1e-10)


def test_standardised_ridge_matches_sklearn_on_scaled_inputs():
    from sklearn.linear_model import Ridge

    X, Y = data()
    X64 = X.astype(np.float64)
    sd = X64.std(0)
    ref = Ridge(alpha=5.0).fit((X64 - X64.mean(0)) / sd, Y.astype(np.float64))
    W, b = ridge_fit(streamed(X, Y), 5.0, standardize=True)
    assert rel(W, ref.coef_ / sd) < 1e-5
    pred_ref = ref.predict((X64 - X64.mean(0)) / sd)
    assert rel(X64 @ W.T + b, pred_ref) < 1e-5


def test_ols_is_least_squares():
    X, Y = data()
    W, b = ridge_fit(streamed(X, Y), 0.0)
    A = np.hstack([X, np.ones((len(X), 1))]).astype(np.float64)
    coef = np.linalg.lstsq(A, Y.astype(np.float64), rcond=None)[0]
    assert rel(W, coef[:-1].T) < 1e-6 and rel(b, coef[-1]) < 1e-6


def test_r2_from_statistics_is_exact_on_held_out_rows():
    from sklearn.metrics import r2_score

    X, Y = data(n=900)
    W, b = ridge_fit(streamed(X[:600], Y[:600]), 2.0)
    Xv, Yv = X[600:].astype(np.float64), Y[600:].astype(np.float64)
    pred = Xv @ W.T + b
    got = r2_from_stats(streamed(X[600:], Y[600:]), W, b)
    assert got["r2"] == pytest.approx(r2_score(Yv, pred), abs=1e-9)
    assert got["r2_weighted"] == pytest.approx(r2_score(Yv, pred, multioutput="variance_weighted"), abs=1e-9)
    assert got["mse"] == pytest.approx(((Yv - pred) ** 2).mean(), rel=1e-9)
