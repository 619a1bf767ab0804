"""Scoring one transport operator on the held-out test split (the compute behind `ato evaluate`).

Per pair (L, k), with T = L + k:

* residual-space scores, streamed over the test split (R² uniform and variance-weighted,
  per-dimension quantiles, MSE, token cosine) for the ATO and the baselines identity (ŷ = x),
  train mean (ŷ = ȳ_train) and OLS (ridge with α = 0 on the train statistics);
* feature-space scores for every kept feature of layer T's SAE along its unit decoder direction,
  over the test tokens where that SAE's own encoder (TopK / JumpReLU, never a plain ReLU) says the
  feature is active on the TRUE y; each feature is transported, synthesised, or gets no verdict
  (too few active tokens);
* the CCA ceiling on the train statistics (a true in-sample bound), η(r) for SVD truncation and
  reduced-rank regression on train and test over a log-spaced rank sweep (one decomposition per pair,
  see `ato.math.cca`), and on test also without the train→test mean shift;
* each headline number beside its reference (`ato.math.heldout`): η(test) beside the η an exactly
  linear map reaches at this n, d and ρ; the participation ratio and the 90 % subspace size from
  canonical correlations measured on TEST (directions from train), each beside the same statistic for
  independent x and y at the same n and d (a Wishart null).

Formulas: docs/method.md#r2, #features, #cca, #efficiency; docs/statistics.md#heldout.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ato.artifacts import BaselineScores, FeatureSet, PairMetrics, PredictorScores, TransportVerdicts
from ato.errors import AtoError
from ato.math.cca import CCA, efficiency_table, rank_grid
from ato.math.heldout import (
    CCANull,
    HeldOutCCA,
    LinearReference,
    SubspaceReport,
    cca_null,
    heldout_from_cca,
    linear_reference,
    rank_zero_r2,
    shift_removed_table,
    subspace_report,
)
from ato.math.metrics import (
    NO_VERDICT,
    SYNTHESISED,
    TRANSPORTED,
    FeatureR2Accumulator,
    ResidualAccumulator,
    feature_verdicts,
    unit_directions,
)
from ato.math.ridge import r2_from_stats, ridge_fit
from ato.math.stats import PairStats
from ato.params import EvaluateParams

PREDICTORS = ("ato", "identity", "mean", "ols")  # the ATO and its baselines
SAE_ENCODE_ROWS = 2048  # rows per SAE encode call: bounds the [rows, d_sae] activation buffer


class EvaluateError(AtoError):
    """Evaluation inputs that do not fit together; the message names the file or pair."""


# --------------------------------------------------------------------------------------------
# SAE features of the target layer


@dataclass
class SaeFeatures:
    """Layer T's SAE and the unit decoder directions of its kept features."""

    layer: int  # residual layer T
    sae: Any  # sae_lens.SAE, eval mode
    kept: list[int]  # kept feature ids (FeatureSet.kept order)
    directions: np.ndarray  # [d, F] float64 unit decoder directions


def load_sae_features(sae_dir: Path, features_path: Path, layer: int, d_model: int) -> SaeFeatures:
    """Layer `layer`'s SAE (`ato.sae.load_sae`) and its kept features; clear errors when they do not fit."""
    from ato.sae import load_sae

    sae = load_sae(sae_dir)
    kept = FeatureSet.read(features_path).kept
    if not kept:
        raise EvaluateError(f"{features_path}: needs a non-empty list `kept` of feature ids")
    if int(sae.cfg.d_in) != d_model:
        raise EvaluateError(f"{sae_dir}: SAE d_in={sae.cfg.d_in} but the store's d_model={d_model}")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in kept if not isinstance(f, int) or not 0 <= f < d_sae]
    if bad:
        raise EvaluateError(f"{features_path}: kept ids {bad[:5]} outside 0..{d_sae - 1} of the layer-{layer} SAE")
    try:
        directions = unit_directions(sae.W_dec.detach(), kept)
    except ValueError as exc:
        raise EvaluateError(f"{sae_dir}: {exc}") from None
    return SaeFeatures(layer, sae, [int(f) for f in kept], directions)


def sae_active(sae: Any, y: np.ndarray, kept: list[int]) -> np.ndarray:
    """[m, F] bool: feature active on the true y according to the SAE's own encode()."""
    import torch

    idx = torch.as_tensor(kept, dtype=torch.long)
    out = np.zeros((len(y), len(kept)), dtype=bool)
    dtype = next(sae.parameters()).dtype
    with torch.inference_mode():
        for start in range(0, len(y), SAE_ENCODE_ROWS):
            rows = torch.as_tensor(y[start : start + SAE_ENCODE_ROWS]).to(dtype)
            out[start : start + len(rows)] = (sae.encode(rows)[:, idx] > 0).cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# The streaming pass over the test split


@dataclass
class Predictors:
    """The affine maps scored: the ATO, OLS on the train statistics, and the train mean."""

    W: np.ndarray  # [d_out, d_in] float64, the ATO
    b: np.ndarray  # [d_out]
    W_ols: np.ndarray  # ridge with α = 0 on the train statistics
    b_ols: np.ndarray
    mean_y: np.ndarray  # ȳ over the train split

    @classmethod
    def build(cls, W: np.ndarray, b: np.ndarray, train: PairStats) -> Predictors:
        W_ols, b_ols = ridge_fit(train, 0.0)
        return cls(W, b, W_ols, b_ols, train.mean_y)

    def predict(self, x: np.ndarray, y_shape: tuple[int, ...]) -> Iterator[tuple[str, np.ndarray]]:
        """(name, ŷ) for every predictor, in PREDICTORS order."""
        yield "ato", x @ self.W.T + self.b
        yield "identity", x
        yield "mean", np.broadcast_to(self.mean_y, y_shape)
        yield "ols", x @ self.W_ols.T + self.b_ols


@dataclass
class TestAccumulators:
    """Streaming residual- and feature-space sums per predictor."""

    residual: dict[str, ResidualAccumulator]
    features: dict[str, FeatureR2Accumulator]

    @classmethod
    def empty(cls, d: int, n_features: int) -> TestAccumulators:
        return cls(
            {k: ResidualAccumulator(d) for k in PREDICTORS}, {k: FeatureR2Accumulator(n_features) for k in PREDICTORS}
        )

    @property
    def n_tokens(self) -> float:
        return self.residual["ato"].n


def score_test_split(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    predictors: Predictors,
    features: SaeFeatures,
    total: int,
    desc: str,
) -> TestAccumulators:
    """One pass over (x_L, y_T) chunks: every predictor's residual and feature-space sums."""
    from tqdm import tqdm

    acc = TestAccumulators.empty(len(predictors.b), len(features.kept))
    U = features.directions
    with tqdm(total=total, desc=desc, unit="tok", leave=False) as bar:
        for x_raw, y_raw in chunks:
            x, y = x_raw.astype(np.float64), y_raw.astype(np.float64)
            active = sae_active(features.sae, y_raw, features.kept)
            a = y @ U
            for name, y_hat in predictors.predict(x, y.shape):
                acc.residual[name].update(y, y_hat)
                acc.features[name].update_projected(a, y_hat @ U, active)
            bar.update(len(x))
    return acc


# --------------------------------------------------------------------------------------------
# The CCA ceiling, η and the subspace size, each beside its reference


@dataclass
class Transport:
    """What the train and test statistics say about linear transport for one pair (docs/statistics.md#heldout)."""

    cca: CCA  # train canonical correlations (pseudo-inverse whitening: a true in-sample bound)
    table: dict[str, np.ndarray]  # `efficiency_table` + `shift_removed_table` columns, one entry per swept rank
    heldout: HeldOutCCA  # train directions, correlations measured on test
    subspace: SubspaceReport  # held-out / in-sample PR and subspace size beside the Wishart null
    linear: LinearReference  # η(test) beside η_expected of an exactly linear map


@functools.lru_cache(maxsize=4)
def shared_null(
    n_train: int, n_test: int, d_in: int, d_out: int, fraction: float, replicates: int, seed: int
) -> CCANull:
    """`cca_null`, simulated once per process for each set of sizes (pairs of one store share n and d)."""
    return cca_null(n_train, n_test, d_in, d_out, fraction, replicates, seed)


def transport(train: PairStats, test: PairStats, W: np.ndarray, b: np.ndarray, ev: EvaluateParams) -> Transport:
    """Ceiling, rank sweep (raw and without the mean shift), held-out subspace vs null, η vs linear reference."""
    if ev.null_replicates < 1:
        raise EvaluateError(f"evaluate.null_replicates: must be at least 1, got {ev.null_replicates}")
    cca = CCA.from_stats(train)
    ranks = rank_grid(min(cca.d_in, cca.d_out), ev.n_ranks)
    table = efficiency_table(cca, W, train, test, ranks)
    table.update(shift_removed_table(table, rank_zero_r2(cca, train), rank_zero_r2(cca, test)))
    heldout = heldout_from_cca(cca, test)
    ceiling = float(cca.ceiling())
    eta_test = float(cca.whitened_r2(test, W, b)) / ceiling if ceiling > 0 else float("nan")
    sizes = (int(train.n), int(test.n), cca.d_in, cca.d_out)
    # Many medium-sized (d_in + d_out)³ draws and decompositions: on the shared 2-core machine the
    # 8-replicate null at d = 640 took 4.6 s on one BLAS thread and 59 s on two fighting over a busy core.
    with threadpool_limits(limits=1, user_api="blas"):
        null = shared_null(*sizes, ev.subspace_fraction, ev.null_replicates, ev.null_seed)
        linear = linear_reference(eta_test, cca.rho, *sizes, replicates=ev.null_replicates, seed=ev.null_seed)
    subspace = subspace_report(train, test, ev.subspace_fraction, null=null, heldout=heldout)
    return Transport(cca, table, heldout, subspace, linear)


def transport_metrics(t: Transport, train: PairStats, W: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The `PairMetrics` fields of a `Transport` (floats, under their field names)."""
    ceiling = float(t.cca.ceiling())
    rep, lin = t.subspace, t.linear
    return {
        "ceiling_full": ceiling,
        "eta_train": float(t.cca.whitened_r2(train, W, b)) / ceiling if ceiling > 0 else float("nan"),
        "eta_test": lin.eta_test,
        "eta_expected": lin.eta_expected,
        "eta_expected_std": lin.eta_simulated_std,
        "eta_ratio": lin.ratio,
        "heldout_subspace_size": rep.heldout_size.observed,
        "heldout_subspace_size_null": rep.heldout_size.null,
        "heldout_subspace_size_null_std": rep.heldout_size.null_std,
        "heldout_subspace_size_excess": rep.heldout_size.excess,
        "heldout_pr": rep.heldout_pr.observed,
        "heldout_pr_null": rep.heldout_pr.null,
        "heldout_pr_null_std": rep.heldout_pr.null_std,
        "heldout_pr_excess": rep.heldout_pr.excess,
        "participation_ratio": rep.insample_pr.observed,
        "participation_ratio_null": rep.insample_pr.null,
        "subspace_size": rep.insample_size.observed,
        "subspace_size_null": rep.insample_size.null,
    }


# --------------------------------------------------------------------------------------------
# From sums to scores


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
) -> Evaluation:
    """Scores of the streamed test sums plus the statistics-based ones (val R², CCA, η, null)."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    feature_scores = {k: acc.features[k].result() for k in PREDICTORS}
    ato = feature_scores["ato"]
    verdicts = feature_verdicts(ato["r2"], ato["active"], ev.transported_r2, ev.min_active_tokens)
    judged = verdicts != NO_VERDICT
    scores: dict[str, Any] = {
        k: predictor_scores(k, acc.residual[k], feature_scores[k]["r2"], judged) for k in PREDICTORS
    }
    t = transport(train, test, predictors.W, predictors.b, ev)
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
        **scores,
        **transport_metrics(t, train, predictors.W, predictors.b),
    )
    per_dim = {k: acc.residual[k].r2_per_dim() for k in PREDICTORS}
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
    result: Evaluation, pair: str, layer_in: int, layer_out: int, ev: EvaluateParams
) -> TransportVerdicts:
    def ids(verdict: str) -> list[int]:
        return [f for f, v in zip(result.kept, result.verdicts) if v == verdict]

    return TransportVerdicts(
        pair=pair,
        layer_in=layer_in,
        layer_out=layer_out,
        transported_r2=ev.transported_r2,
        min_active_tokens=ev.min_active_tokens,
        transported=ids(TRANSPORTED),
        synthesised=ids(SYNTHESISED),
        no_verdict=ids(NO_VERDICT),
    )
