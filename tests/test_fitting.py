"""`fit.method: lasso / elasticnet` (`ato.fitting.fit_map`): scikit-learn on the first
`fit.sklearn_subsample` TRAIN rows of the store, unscaled, with its intercept, W as [d_out, d_in]."""

from __future__ import annotations

import numpy as np
import pytest

from ato.fitting import fit_map
from ato.math.stats import PairStats
from ato.params import FitParams, Pair, StatsParams

PAIR = Pair(L=1, k=2)
N_ROWS, CHUNK, SUBSAMPLE = 500, 64, 200  # the subsample ends inside the fourth chunk


class PlantedStore:
    """A store of one pair whose TRAIN rows are y = x W_trueᵀ + b_true + noise, served in chunks; it
    records how it was read."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.W_true = np.zeros((3, 6))
        self.W_true[0, 1], self.W_true[1, 4], self.W_true[2, 0] = 2.0, -1.5, 1.0  # sparse
        self.b_true = np.array([5.0, -3.0, 0.5])  # far from zero: a missing intercept shows
        self.X = rng.normal(size=(N_ROWS, 6))
        self.Y = self.X @ self.W_true.T + self.b_true + 0.01 * rng.normal(size=(N_ROWS, 3))
        self.calls: list[tuple[str, list[int], bool]] = []
        self.chunks_read = 0

    def iter_chunks(self, split, layers, chunk_tokens, include_special=False):
        self.calls.append((split, list(layers), include_special))
        for start in range(0, N_ROWS, chunk_tokens):
            self.chunks_read += 1
            yield {PAIR.L: self.X[start : start + chunk_tokens], PAIR.target: self.Y[start : start + chunk_tokens]}


@pytest.mark.parametrize("method", ["lasso", "elasticnet"])
def test_sklearn_methods_fit_the_first_train_rows_with_an_intercept(method):
    from sklearn.linear_model import ElasticNet, Lasso

    store = PlantedStore()
    f = FitParams(method=method, sklearn_subsample=SUBSAMPLE, sklearn_alpha=0.01, l1_ratio=0.7)
    train = PairStats.from_data(store.X, store.Y)  # unused by these methods: they see the rows
    W, b, alpha = fit_map(
        f,
        train,
        tuned_alpha=None,
        standardize=True,
        store=store,
        pair=PAIR,
        stats=StatsParams(chunk_tokens=CHUNK, include_bos=True),
    )
    assert alpha == 0.01
    assert store.calls == [("train", [PAIR.L, PAIR.target], True)]  # TRAIN, the pair's layers, BOS as asked
    assert store.chunks_read == -(-SUBSAMPLE // CHUNK)  # read only as far as the subsample needs

    reference = Lasso(alpha=0.01) if method == "lasso" else ElasticNet(alpha=0.01, l1_ratio=0.7)
    reference.fit(store.X[:SUBSAMPLE], store.Y[:SUBSAMPLE])
    np.testing.assert_array_equal(W, reference.coef_)
    np.testing.assert_array_equal(b, reference.intercept_)
    # the operator's convention ŷ = x Wᵀ + b reproduces scikit-learn's prediction on unseen rows
    np.testing.assert_allclose(store.X[SUBSAMPLE:] @ W.T + b, reference.predict(store.X[SUBSAMPLE:]), atol=1e-10)
    # and recovers the planted map: orientation [d_out, d_in], the intercept, the zeros
    assert W.shape == (3, 6)
    np.testing.assert_allclose(W, store.W_true, atol=0.05)
    np.testing.assert_allclose(b, store.b_true, atol=0.05)
    # a subsample of other rows gives another fit: the first rows are the ones used
    other = Lasso(alpha=0.01) if method == "lasso" else ElasticNet(alpha=0.01, l1_ratio=0.7)
    other.fit(store.X[-SUBSAMPLE:], store.Y[-SUBSAMPLE:])
    assert not np.array_equal(W, other.coef_)
