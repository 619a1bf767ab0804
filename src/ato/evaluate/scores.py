"""From the streamed sums and the statistics to one pair's `PairMetrics`, feature rows and verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ato.artifacts import BaselineScores, PairMetrics, PredictorScores, TransportVerdicts, json_clean
from ato.evaluate.references import TestChunks, Transport, transport, transport_metrics
from ato.evaluate.streaming import Predictors, TestAccumulators, predictor_keys
from ato.math.metrics import (
    NO_VERDICT,
    SYNTHESISED,
    TRANSPORTED,
    ResidualAccumulator,
    feature_verdicts,
)
from ato.math.ridge import r2_from_stats
from ato.math.stats import PairStats
from ato.params import EvaluateParams


@dataclass
class Evaluation:
    """Everything `ato evaluate` writes for one pair."""

    metrics: PairMetrics
    transport: Transport  # ceiling, rank sweep, held-out CCA, null and linear reference
    kept: list[int]  # feature ids
    verdicts: np.ndarray  # per kept feature: TRANSPORTED / SYNTHESISED / NO_VERDICT
    feature_scores: dict[str, dict[str, np.ndarray]]  # predictor → FeatureR2Accumulator.result()
    per_dim: dict[str, np.ndarray]  # predictor → per-dimension R²

    @property
    def table(self) -> dict[str, np.ndarray]:
        return self.transport.table


def evaluate(
    acc: TestAccumulators,
    splits: dict[str, PairStats],
    predictors: Predictors,
    kept: list[int],
    alpha: float,
    ev: EvaluateParams,
    test_chunks: TestChunks,
    train_blocks: list[PairStats],
) -> Evaluation:
    """Scores of the streamed test sums plus the statistics-based ones (val R², CCA, η, null);
    `test_chunks` streams the test tokens again with their documents, for the effective n;
    `train_blocks` are the train split's statistics by document block (they add up to `splits["train"]`),
    for the learning curve."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    feature_scores = {k: acc.features[k].result() for k in predictor_keys()}
    ato = feature_scores["ato"]
    verdicts = feature_verdicts(ato["r2"], ato["active"], ev.transported_r2, ev.min_active_tokens)
    judged = verdicts != NO_VERDICT
    scores: dict[str, Any] = {
        k: predictor_scores(k, acc.residual[k], feature_scores[k]["r2"], judged) for k in predictor_keys()
    }
    t = transport(train, test, predictors.W, predictors.b, ev, test_chunks, train_blocks, alpha)
    n_transported = float((verdicts == TRANSPORTED).sum())
    metrics = PairMetrics(
        n_test_tokens=float(test.n),
        n_train_tokens=float(train.n),
        n_val_tokens=float(val.n),
        alpha=float(alpha),
        val_r2=float(r2_from_stats(val, predictors.W, predictors.b)["r2"]),
        n_features=float(len(kept)),
        n_transported=n_transported,
        n_synthesised=float((verdicts == SYNTHESISED).sum()),
        n_no_verdict=float((verdicts == NO_VERDICT).sum()),
        transported_fraction=float(n_transported / judged.sum()) if judged.any() else float("nan"),
        feature_pearson_median=_median(ato["pearson"][judged]),
        feature_rms_ratio_median=_median(ato["rms_ratio"][judged]),
        **PairMetrics.predictor_fields(scores),
        **transport_metrics(t, train, predictors.W, predictors.b),
    )
    per_dim = {k: acc.residual[k].r2_per_dim() for k in predictor_keys()}
    return Evaluation(metrics, t, kept, verdicts, feature_scores, per_dim)


def predictor_scores(
    name: str, residual: ResidualAccumulator, feature_r2: np.ndarray, judged: np.ndarray
) -> BaselineScores:
    """Residual scores of one predictor and its median feature-space R² over the judged features
    (`PredictorScores` for the ATO, `BaselineScores` for the others)."""
    out = residual.result()
    r2 = feature_r2[judged]
    r2 = r2[np.isfinite(r2)]
    median = float(np.median(r2)) if r2.size else float("nan")
    if name != "ato":
        return BaselineScores(r2=out["r2"], r2_weighted=out["r2_weighted"], feature_r2_median=median)
    return PredictorScores(
        r2=out["r2"], r2_weighted=out["r2_weighted"], feature_r2_median=median, mse=out["mse"], cosine=out["cosine"]
    )


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


# --------------------------------------------------------------------------------------------
# Tables


FEATURE_COLUMNS = [
    "feature",
    "kept_index",
    "active_tokens",
    "r2",
    "pearson",
    "rms_ratio",
    "verdict",
    "identity_r2",
    "mean_r2",
    "ols_r2",
]


def feature_rows(result: Evaluation) -> list[list[Any]]:
    """One row of FEATURE_COLUMNS per kept feature (reports/evaluate/<pair>/features.csv)."""
    fr, other = result.feature_scores["ato"], result.feature_scores
    return [
        [
            f,
            i,
            int(fr["active"][i]),
            fr["r2"][i],
            fr["pearson"][i],
            fr["rms_ratio"][i],
            result.verdicts[i],
            other["identity"]["r2"][i],
            other["mean"]["r2"][i],
            other["ols"]["r2"][i],
        ]
        for i, f in enumerate(result.kept)
    ]


def transport_verdicts(
    result: Evaluation,
    pair: str,
    layer_in: int,
    layer_out: int,
    ev: EvaluateParams,
    sae_reliable: bool,
    sae_gate_failures: list[str],
) -> TransportVerdicts:
    """Every field of reports/evaluate/<pair>/transport.json, from the pair's evaluation and its SAE's gate."""

    def ids(verdict: str) -> list[int]:
        return [f for f, v in zip(result.kept, result.verdicts) if v == verdict]

    ato_scores, identity_scores = result.feature_scores["ato"], result.feature_scores["identity"]
    return TransportVerdicts(
        pair=pair,
        layer_in=layer_in,
        layer_out=layer_out,
        transported_r2=ev.transported_r2,
        min_active_tokens=ev.min_active_tokens,
        transported=ids(TRANSPORTED),
        synthesised=ids(SYNTHESISED),
        no_verdict=ids(NO_VERDICT),
        sae_reliable=sae_reliable,
        sae_gate_failures=sae_gate_failures,
        features=list(result.kept),
        r2=json_clean(ato_scores["r2"]),
        identity_r2=json_clean(identity_scores["r2"]),
        active_tokens=[int(a) for a in ato_scores["active"]],
    )
