"""From the streamed sums and the statistics to one pair's `PairMetrics`, feature rows and verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ato.artifacts import BaselineScores, PairMetrics, PredictorScores, TransportVerdicts, json_clean
from ato.evaluate.errors import EvaluateError
from ato.evaluate.features import SaeFeatures
from ato.evaluate.references import TestChunks, Transport, transport, transport_metrics
from ato.evaluate.streaming import Predictors, TestAccumulators, predictor_keys
from ato.math.metrics import (
    NO_VERDICT,
    SYNTHESISED,
    TRANSPORTED,
    UNDETERMINED,
    DocumentFeatureSums,
    FeatureBootstrap,
    ResidualAccumulator,
    bootstrap_feature_scores,
    interval_verdicts,
    percentile_interval,
    set_statistics,
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
    verdicts: np.ndarray  # per kept feature: TRANSPORTED / SYNTHESISED / UNDETERMINED / NO_VERDICT
    feature_scores: dict[str, dict[str, np.ndarray]]  # predictor → FeatureR2Accumulator.result()
    per_dim: dict[str, np.ndarray]  # predictor → per-dimension R²
    live: LiveJudgement  # every live feature: R², its interval, verdict
    kept_in_live: np.ndarray  # the column of each kept feature in `live`

    @property
    def table(self) -> dict[str, np.ndarray]:
        return self.transport.table

    @property
    def kept_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of each kept feature's R²."""
        return self.live.low[self.kept_in_live], self.live.high[self.kept_in_live]


@dataclass
class LiveJudgement:
    """Every live feature of the SAE judged by its R² interval (docs/statistics.md#feature-intervals)."""

    features: list[int]  # live feature ids
    bootstrap: FeatureBootstrap  # the ATO's scores on all test documents and on each resample
    low: np.ndarray  # R² interval per feature
    high: np.ndarray
    verdicts: np.ndarray  # `interval_verdicts`
    method: str  # how the interval was computed, in words

    @property
    def judged(self) -> np.ndarray:
        return self.verdicts != NO_VERDICT


def judge_live_features(sums: DocumentFeatureSums, live: list[int], ev: EvaluateParams) -> LiveJudgement:
    """R² intervals by resampling test documents, and the three-way verdict of every live feature."""
    per_document = sums.per_document()
    if len(per_document) < 2:
        raise EvaluateError(
            f"the feature intervals resample test documents (evaluate.feature_interval), but the test split "
            f"has {len(per_document)}; give it at least 2 documents (corpus.split_fractions)"
        )
    boot = bootstrap_feature_scores(per_document, ev.feature_resamples, ev.feature_seed)
    low, high = percentile_interval(boot.resampled["r2"], ev.feature_level)
    enough = boot.point["active"] >= ev.min_active_tokens
    verdicts = interval_verdicts(low, high, enough, ev.transported_r2)
    method = f"{ev.feature_interval}: {ev.feature_level:.0%} percentile interval, {ev.feature_resamples} resamples"
    return LiveJudgement(live, boot, low, high, verdicts, method)


def set_fields(
    point: dict[str, np.ndarray], boot: FeatureBootstrap, ev: EvaluateParams, names: tuple[str, ...], prefix: str = ""
) -> dict[str, Any]:
    """`set_statistics` over one set of judged features (`point`'s scores), each with its bootstrap
    interval as `<name>_low` / `<name>_high`, keys prefixed by `prefix`."""
    value = set_statistics(point, ev.transported_r2)
    resampled = set_statistics(boot.resampled, ev.transported_r2)
    out: dict[str, Any] = {}
    for name in names:
        low, high = percentile_interval(resampled[name], ev.feature_level)
        out |= {f"{prefix}{name}": float(value[name]), f"{prefix}{name}_low": float(low)}
        out[f"{prefix}{name}_high"] = float(high)
    return out


def verdict_counts(verdicts: np.ndarray, prefix: str = "") -> dict[str, Any]:
    """n_transported, n_synthesised, n_undetermined (prefixed) of a set of verdicts."""
    return {f"{prefix}n_{v}": float((verdicts == v).sum()) for v in (TRANSPORTED, SYNTHESISED, UNDETERMINED)}


def verdict_fields(
    ato: dict[str, np.ndarray], live: LiveJudgement, kept_in_live: np.ndarray, ev: EvaluateParams
) -> dict[str, Any]:
    """`PairMetrics`' verdict counts, transported fractions and medians with their intervals: the kept set
    (points from the ATO's kept-feature scores `ato`, intervals from the live bootstrap's kept columns)
    and every live feature (keys `live_…`)."""
    judged = live.judged[kept_in_live]
    kept = set_fields(
        {k: v[judged] for k, v in ato.items()},
        live.bootstrap.columns(kept_in_live[judged]),
        ev,
        ("transported_fraction", "feature_r2_median", "feature_pearson_median", "feature_rms_ratio_median"),
    )
    kept.pop("feature_r2_median")  # the ATO's `feature_r2_median` (its PredictorScores)
    every_live = set_fields(
        {k: v[live.judged] for k, v in live.bootstrap.point.items()},
        live.bootstrap.columns(np.flatnonzero(live.judged)),
        ev,
        ("transported_fraction", "feature_r2_median"),
        prefix="live_",
    )
    return {
        **verdict_counts(live.verdicts[kept_in_live]),
        **kept,
        "live_n_features": float(len(live.features)),
        "live_n_judged": float(live.judged.sum()),
        **verdict_counts(live.verdicts, "live_"),
        **every_live,
    }


def evaluate(
    acc: TestAccumulators,
    splits: dict[str, PairStats],
    predictors: Predictors,
    features: SaeFeatures,
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
    live = judge_live_features(acc.live, features.live, ev)
    kept_in_live = features.kept_in_live
    verdicts = live.verdicts[kept_in_live]
    judged = verdicts != NO_VERDICT
    scores: dict[str, Any] = {
        k: predictor_scores(k, acc.residual[k], feature_scores[k]["r2"], judged) for k in predictor_keys()
    }
    t = transport(train, test, predictors.W, predictors.b, ev, test_chunks, train_blocks, alpha)
    metrics = PairMetrics(
        n_test_tokens=float(test.n),
        n_train_tokens=float(train.n),
        n_val_tokens=float(val.n),
        alpha=float(alpha),
        val_r2=float(r2_from_stats(val, predictors.W, predictors.b)["r2"]),
        n_features=float(len(features.kept)),
        n_no_verdict=float((verdicts == NO_VERDICT).sum()),
        **verdict_fields(ato, live, kept_in_live, ev),
        **PairMetrics.predictor_fields(scores),
        **transport_metrics(t, train, predictors.W, predictors.b),
    )
    per_dim = {k: acc.residual[k].r2_per_dim() for k in predictor_keys()}
    return Evaluation(metrics, t, list(features.kept), verdicts, feature_scores, per_dim, live, kept_in_live)


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


# --------------------------------------------------------------------------------------------
# Tables


FEATURE_COLUMNS = [
    "feature",
    "kept_index",
    "active_tokens",
    "r2",
    "r2_low",
    "r2_high",
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
    low, high = result.kept_interval
    return [
        [
            f,
            i,
            int(fr["active"][i]),
            fr["r2"][i],
            low[i],
            high[i],
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
    live, (low, high) = result.live, result.kept_interval
    return TransportVerdicts(
        pair=pair,
        layer_in=layer_in,
        layer_out=layer_out,
        transported_r2=ev.transported_r2,
        min_active_tokens=ev.min_active_tokens,
        transported=ids(TRANSPORTED),
        synthesised=ids(SYNTHESISED),
        no_verdict=ids(NO_VERDICT),
        undetermined=ids(UNDETERMINED),
        sae_reliable=sae_reliable,
        sae_gate_failures=sae_gate_failures,
        features=list(result.kept),
        r2=json_clean(ato_scores["r2"]),
        identity_r2=json_clean(identity_scores["r2"]),
        active_tokens=[int(a) for a in ato_scores["active"]],
        interval=live.method,
        r2_low=json_clean(low),
        r2_high=json_clean(high),
        live_features=list(live.features),
        live_active_tokens=[int(a) for a in live.bootstrap.point["active"]],
        live_r2=json_clean(live.bootstrap.point["r2"]),
        live_r2_low=json_clean(live.low),
        live_r2_high=json_clean(live.high),
        live_verdicts=[str(v) for v in live.verdicts],
    )
