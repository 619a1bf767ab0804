"""The one streaming pass over the test split: every predictor's residual- and feature-space sums."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ato.evaluate.features import SaeFeatures, sae_active
from ato.kinds import keys_for, kinds_for
from ato.math.metrics import (
    DocumentFeatureSums,
    FeatureR2Accumulator,
    ResidualAccumulator,
)
from ato.math.ridge import ridge_fit
from ato.math.stats import PairStats


def predictor_keys() -> tuple[str, ...]:
    """The ATO and its baselines (`ato.kinds` evaluate role, asked at each use): ato, identity, mean, ols,
    then registered ones."""
    return keys_for("evaluate")


@dataclass
class Predictors:
    """The affine maps scored: the ATO, OLS on the train statistics, and the train mean."""

    W: np.ndarray  # [d_out, d_in] float64, the ATO
    b: np.ndarray  # [d_out]
    W_ols: np.ndarray  # ridge with α = 0 on the train statistics
    b_ols: np.ndarray
    mean_y: np.ndarray  # ȳ over the train split
    extra: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # registered kinds' (W, b)

    @classmethod
    def build(cls, W: np.ndarray, b: np.ndarray, train: PairStats) -> Predictors:
        W_ols, b_ols = ridge_fit(train, 0.0)
        extra = {k.key("evaluate"): k.build(train) for k in kinds_for("evaluate") if k.build is not None}
        return cls(W, b, W_ols, b_ols, train.mean_y, extra)

    def predict(self, x: np.ndarray, y_shape: tuple[int, ...]) -> Iterator[tuple[str, np.ndarray]]:
        """(name, ŷ) for every predictor: the built-in ones, then the registered ones."""
        yield "ato", x @ self.W.T + self.b
        yield "identity", x
        yield "mean", np.broadcast_to(self.mean_y, y_shape)
        yield "ols", x @ self.W_ols.T + self.b_ols
        for key, (W, b) in self.extra.items():
            yield key, x @ W.T + b


@dataclass
class TestAccumulators:
    """Streaming residual- and feature-space sums per predictor (kept features), and the ATO's
    feature sums per document over every live feature (for the verdicts' intervals)."""

    residual: dict[str, ResidualAccumulator]
    features: dict[str, FeatureR2Accumulator]
    live: DocumentFeatureSums

    @classmethod
    def empty(cls, d: int, n_features: int, n_live: int) -> TestAccumulators:
        return cls(
            {k: ResidualAccumulator(d) for k in predictor_keys()},
            {k: FeatureR2Accumulator(n_features) for k in predictor_keys()},
            DocumentFeatureSums(n_live),
        )

    @property
    def n_tokens(self) -> float:
        return self.residual["ato"].n


def score_test_split(
    chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    predictors: Predictors,
    features: SaeFeatures,
    total: int,
    desc: str,
) -> TestAccumulators:
    """One pass over (x_L, y_T, document id) chunks: every predictor's residual and kept-feature sums,
    and the ATO's per-document sums over the live features."""
    from tqdm import tqdm

    acc = TestAccumulators.empty(len(predictors.b), len(features.kept), len(features.live))
    U, kept_columns = features.directions, features.kept_in_live
    # ~1000 live directions: float32 products halve the stage's added time; the sums stay float64 and
    # the rounding (~1e-7 of a projection) is far below the intervals' width
    U_live = features.live_directions.astype(np.float32)
    with tqdm(total=total, desc=desc, unit="tok", leave=False) as bar:
        for x_raw, y_raw, documents in chunks:
            x, y = x_raw.astype(np.float64), y_raw.astype(np.float64)
            active_live = sae_active(features.sae, y_raw, features.live)
            active = active_live[:, kept_columns]
            a = y @ U
            for name, y_hat in predictors.predict(x, y.shape):
                acc.residual[name].update(y, y_hat)
                acc.features[name].update_projected(a, y_hat @ U, active)
                if name == "ato":
                    a_live, a_hat_live = y_raw.astype(np.float32) @ U_live, y_hat.astype(np.float32) @ U_live
                    acc.live.update(a_live, a_hat_live, active_live, documents)
            bar.update(len(x))
    return acc
