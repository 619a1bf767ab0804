"""Residual- and feature-space metrics (streaming = one-shot, known answers)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import r2_score

from ato.math.metrics import (
    NO_VERDICT,
    SYNTHESISED,
    TRANSPORTED,
    FeatureR2Accumulator,
    ResidualAccumulator,
    feature_verdicts,
    unit_directions,
)
from ato.math.ridge import r2_from_stats
from ato.math.stats import PairStats


def _data(seed: int = 0, n: int = 1000, d: int = 8):
    rng = np.random.default_rng(seed)
    scale = np.logspace(0, 3, d)  # residual-like: dims differ by orders of magnitude, large offsets
    y = rng.normal(size=(n, d)) * scale + 2e4
    x = y + rng.normal(size=(n, d)) * scale * 0.5 - 3.0
    y_hat = y + rng.normal(size=(n, d)) * scale * np.linspace(0.1, 2, d)
    return x, y, y_hat


def test_residual_streaming_equals_one_shot_and_sklearn():
    _, y, y_hat = _data()
    acc = ResidualAccumulator(8)
    for start in range(0, len(y), 97):  # uneven chunks
        acc.update(y[start : start + 97], y_hat[start : start + 97])
    one = ResidualAccumulator(8)
    one.update(y, y_hat)
    res, ref = acc.result(), one.result()
    for key in ref:
        assert res[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert res["r2"] == pytest.approx(r2_score(y, y_hat, multioutput="uniform_average"), rel=1e-9)
    assert res["r2_weighted"] == pytest.approx(r2_score(y, y_hat, multioutput="variance_weighted"), rel=1e-9)
    per_dim = r2_score(y, y_hat, multioutput="raw_values")
    np.testing.assert_allclose(acc.r2_per_dim(), per_dim, rtol=1e-8)
    assert res["r2_dim_q50"] == pytest.approx(np.quantile(per_dim, 0.5), rel=1e-8)
    assert res["r2_dim_q10"] <= res["r2_dim_q50"] <= res["r2_dim_q90"]
    assert res["mse"] == pytest.approx(np.mean((y - y_hat) ** 2), rel=1e-12)
    cos = (y * y_hat).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(y_hat, axis=1)
    assert res["cosine"] == pytest.approx(cos.mean(), rel=1e-12)
    # merge of accumulators over disjoint halves (different shifts) = one-shot
    a, b = ResidualAccumulator(8), ResidualAccumulator(8)
    a.update(y[:300], y_hat[:300])
    b.update(y[300:], y_hat[300:])
    merged = a.merge(b).result()
    for key in ref:
        assert merged[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_identity_baseline_is_r2_of_y_against_x():
    x, y, _ = _data(1)
    acc = ResidualAccumulator(8)
    acc.update(y, x)  # ŷ = x
    out = acc.result()
    assert out["r2"] == pytest.approx(r2_score(y, x), rel=1e-9)
    # the same from sufficient statistics (uncentred moments: offset 2e4 on a unit-variance dimension
    # costs them ~1e-6 relative accuracy, hence the looser tolerance)
    exact = r2_from_stats(PairStats.from_data(x, y), np.eye(8), np.zeros(8))
    assert out["r2"] == pytest.approx(exact["r2"], rel=1e-5)
    assert out["r2_weighted"] == pytest.approx(exact["r2_weighted"], rel=1e-5)


def test_cosine_and_mse_known_values():
    acc = ResidualAccumulator(2)
    acc.update(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [0.0, -3.0]]))
    out = acc.result()
    assert out["cosine"] == pytest.approx((1 / np.sqrt(2) - 1) / 2)
    assert out["mse"] == pytest.approx((0 + 1 + 0 + 25) / 4)


def test_feature_r2_known_answers():
    """d = 3; feature 0 along e1 (decoder row scaled by 2), feature 1 along (e2+e3)/√2."""
    W_dec = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    U = unit_directions(W_dec, [0, 1])
    np.testing.assert_allclose(U, [[1, 0], [0, 1 / np.sqrt(2)], [0, 1 / np.sqrt(2)]])
    a_true = np.array([1.0, 2.0, 3.0, 4.0, 99.0])  # last token inactive: its values must not count
    a_pred = np.array([1.0, 2.0, 3.0, 5.0, -99.0])
    y = np.zeros((5, 3))
    y_hat = np.zeros((5, 3))
    y[:, 0], y_hat[:, 0] = a_true, a_pred
    y[:, 1] = y[:, 2] = 7.0 / np.sqrt(2)  # feature 1: a = 7 everywhere (zero variance) …
    y_hat[:, 1] = y_hat[:, 2] = 7.0 / np.sqrt(2)
    active = np.array([[1, 1], [1, 1], [1, 1], [1, 0], [0, 0]], dtype=bool)
    acc = FeatureR2Accumulator(2)
    acc.update(y, y_hat, U, active)
    res = acc.result()
    assert res["active"].tolist() == [4, 3]
    assert res["r2"][0] == pytest.approx(1 - 1 / 5)  # SSE 1, Σ(a − 2.5)² = 5
    assert res["pearson"][0] == pytest.approx(np.corrcoef(a_true[:4], a_pred[:4])[0, 1])
    assert res["rms_ratio"][0] == pytest.approx(np.sqrt(39 / 30))
    assert np.isnan(res["r2"][1]) and np.isnan(res["pearson"][1])  # … so R² is undefined
    assert res["rms_ratio"][1] == pytest.approx(1.0)


def test_feature_r2_reference_cases_and_streaming():
    rng = np.random.default_rng(2)
    n, d, F = 500, 6, 4
    U = unit_directions(rng.normal(size=(10, d)), [1, 3, 5, 7])
    y = rng.normal(size=(n, d)) * 10 + 100
    active = rng.random((n, F)) < 0.4
    a = y @ U
    acc = FeatureR2Accumulator(F)
    acc.update(y, y, U, active)  # perfect prediction
    np.testing.assert_allclose(acc.result()["r2"], 1.0)
    # predicting each feature's active-token mean exactly: R² = 0
    means = np.array([a[active[:, f], f].mean() for f in range(F)])
    acc = FeatureR2Accumulator(F)
    acc.update_projected(a, np.broadcast_to(means, a.shape), active)
    np.testing.assert_allclose(acc.result()["r2"], 0.0, atol=1e-9)
    # streaming (uneven chunks) = one-shot reference formulas for a noisy prediction
    y_hat = y + rng.normal(size=(n, d)) * 5
    stream = FeatureR2Accumulator(F)
    for s in range(0, n, 77):
        stream.update(y[s : s + 77], y_hat[s : s + 77], U, active[s : s + 77])
    res = stream.result()
    h = y_hat @ U
    for f in range(F):
        m = active[:, f]
        af, hf = a[m, f], h[m, f]
        assert res["active"][f] == m.sum()
        assert res["r2"][f] == pytest.approx(1 - ((af - hf) ** 2).sum() / ((af - af.mean()) ** 2).sum(), rel=1e-9)
        assert res["pearson"][f] == pytest.approx(np.corrcoef(af, hf)[0, 1], rel=1e-9)
        assert res["rms_ratio"][f] == pytest.approx(np.sqrt((hf**2).mean() / (af**2).mean()), rel=1e-9)
    half1, half2 = FeatureR2Accumulator(F), FeatureR2Accumulator(F)
    half1.update(y[:200], y_hat[:200], U, active[:200])
    half2.update(y[200:], y_hat[200:], U, active[200:])
    np.testing.assert_allclose(half1.merge(half2).result()["r2"], res["r2"], rtol=1e-9)


def test_feature_verdicts():
    r2 = np.array([0.9, 0.5, 0.49, 0.95, np.nan, -2.0])
    active = np.array([50, 20, 100, 19, 30, 40])
    v = feature_verdicts(r2, active, threshold=0.5, min_active=20)
    assert v.tolist() == [TRANSPORTED, TRANSPORTED, SYNTHESISED, NO_VERDICT, SYNTHESISED, SYNTHESISED]
