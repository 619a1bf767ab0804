"""Residual- and feature-space metrics (streaming = one-shot, known answers)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import r2_score

from ato.math.metrics import (
    NO_VERDICT,
    SYNTHESISED,
    TRANSPORTED,
    UNDETERMINED,
    DocumentFeatureSums,
    FeatureR2Accumulator,
    ResidualAccumulator,
    bootstrap_feature_scores,
    interval_verdicts,
    percentile_interval,
    set_statistics,
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


def _clustered(rng: np.random.Generator, n_docs: int, per_doc: int, F: int, noise_share: np.ndarray):
    """Feature values a with a document effect (tokens of a document are dependent), and predictions
    â = a + e with a document-level and a token-level error: population R² = 1 − noise_share."""
    documents = np.repeat(np.arange(n_docs), per_doc)
    a = rng.normal(size=(n_docs, F))[documents] + rng.normal(size=(len(documents), F))  # Var(a) = 2
    e_var = 2.0 * noise_share
    e = np.sqrt(e_var / 2) * (rng.normal(size=(n_docs, F))[documents] + rng.normal(size=(len(documents), F)))
    return a, a + e, documents


def test_per_document_sums_add_up_to_the_split_sums_whatever_the_chunking():
    rng = np.random.default_rng(0)
    a, a_hat, documents = _clustered(rng, 30, 12, 5, np.full(5, 0.3))
    documents = np.roll(documents, 5)  # a document split across the ends: runs of one document recur
    active = rng.random(a.shape) < 0.6
    whole, per_doc = FeatureR2Accumulator(5), DocumentFeatureSums(5)
    whole.update_projected(a, a_hat, active)
    for start in range(0, len(a), 41):  # chunks cut documents
        sl = slice(start, start + 41)
        per_doc.update(a[sl], a_hat[sl], active[sl], documents[sl])
    sums = per_doc.per_document()
    assert sums.shape == (30, 7, 5)
    in_order = documents[np.sort(np.unique(documents, return_index=True)[1])]  # order of first appearance
    assert sums[:, 0].sum(axis=1).tolist() == [active[documents == d].sum() for d in in_order]
    one_resample = bootstrap_feature_scores(sums, resamples=1, seed=0).point  # the point uses every document
    np.testing.assert_allclose(one_resample["r2"], whole.result()["r2"], rtol=1e-10)


def test_planted_features_get_the_right_verdict_and_one_at_the_threshold_is_undetermined():
    """Planted R² 0.9 and 0.1 → transported and synthesised; a feature whose R² is exactly the threshold
    → undetermined; too few active tokens → no verdict."""
    rng = np.random.default_rng(1)
    a, a_hat, documents = _clustered(rng, 80, 25, 4, np.array([0.1, 0.9, 0.5, 0.1]))
    e = a_hat[:, 2] - a[:, 2]  # feature 2: rescale the error so that its R² is exactly 0.5
    a_hat[:, 2] = a[:, 2] + e * np.sqrt(0.5 * ((a[:, 2] - a[:, 2].mean()) ** 2).sum() / (e**2).sum())
    active = np.ones(a.shape, dtype=bool)
    active[10:, 3] = False  # feature 3: 10 active tokens
    sums = DocumentFeatureSums(4)
    sums.update(a, a_hat, active, documents)
    boot = bootstrap_feature_scores(sums.per_document(), resamples=1000, seed=0)
    assert boot.point["r2"][2] == pytest.approx(0.5)
    low, high = percentile_interval(boot.resampled["r2"], 0.95)
    assert low[2] < 0.5 < high[2]
    verdicts = interval_verdicts(low, high, boot.point["active"] >= 20, threshold=0.5)
    assert verdicts.tolist() == [TRANSPORTED, SYNTHESISED, UNDETERMINED, NO_VERDICT]
    # the verdict follows the interval alone: the same point R² with a narrow interval is decided
    assert interval_verdicts(np.array([0.51, 0.2]), np.array([0.6, 0.49]), np.ones(2, bool), 0.5).tolist() == [
        TRANSPORTED,
        SYNTHESISED,
    ]
    assert interval_verdicts(np.array([np.nan]), np.array([np.nan]), np.ones(1, bool), 0.5).tolist() == [UNDETERMINED]


def test_document_bootstrap_interval_covers_the_population_feature_r2():
    """Coverage simulation: 400 independent features with document-clustered errors and known
    population R² (0.2 … 0.95), 60 documents of 20 tokens; the 95 % intervals cover the truth in
    0.90–0.99 of them (a token bootstrap, blind to the clustering, covers far less: checked too)."""
    rng = np.random.default_rng(2)
    F = 400
    truth = np.linspace(0.2, 0.95, F)
    a, a_hat, documents = _clustered(rng, 60, 20, F, 1.0 - truth)
    sums = DocumentFeatureSums(F)
    sums.update(a, a_hat, np.ones(a.shape, dtype=bool), documents)
    boot = bootstrap_feature_scores(sums.per_document(), resamples=1000, seed=0)
    low, high = percentile_interval(boot.resampled["r2"], 0.95)
    coverage = np.mean((low <= truth) & (truth <= high))
    assert 0.90 <= coverage <= 0.99, coverage
    tokens = DocumentFeatureSums(F)
    tokens.update(a, a_hat, np.ones(a.shape, dtype=bool), np.arange(len(a)))  # every token its own document
    t_low, t_high = percentile_interval(bootstrap_feature_scores(tokens.per_document(), 1000, 0).resampled["r2"], 0.95)
    assert np.mean((t_low <= truth) & (truth <= t_high)) < coverage - 0.1


def test_set_statistics_and_an_interval_undefined_in_too_many_resamples():
    r2 = np.array([[0.9, 0.4, np.nan, 0.6], [0.2, 0.7, 0.8, np.nan]])
    stats = set_statistics({"r2": r2, "pearson": r2, "rms_ratio": r2}, threshold=0.5)
    np.testing.assert_allclose(stats["transported_fraction"], [0.5, 0.5])  # an undefined R² counts as below
    np.testing.assert_allclose(stats["feature_r2_median"], [0.6, 0.7])
    samples = np.r_[np.full(96, 0.5), np.full(4, np.nan)][:, None] * np.ones((1, 2))
    samples[:2, 1] = 0.4
    low, high = percentile_interval(samples, 0.95)
    assert np.isnan(low).all() and np.isnan(high).all()  # 4 % undefined > the 2.5 % tail
    low, high = percentile_interval(samples[3:], 0.9)  # 1 undefined of 97: within the 5 % tail
    assert low.tolist() == [0.5, 0.5] and high.tolist() == [0.5, 0.5]
