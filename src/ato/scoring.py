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

`score_text` / `score_file` (`ato score`) score an operator on a user's own documents with the same
pieces: the residual accumulators, the public splice (`ato.splicing`), the LM-head loss and the causal
stage's intervals over units (`ato.math.intervals`), streaming one window at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ato.artifacts import BaselineScores, FeatureSet, PairMetrics, PredictorScores, TransportVerdicts
from ato.errors import AtoError
from ato.math.cca import CCA, efficiency_table, rank_grid
from ato.math.design_effect import DesignEffectAccumulator, DesignEffects, effective_n
from ato.math.heldout import (
    CCANull,
    HeldOutCCA,
    SubspaceReport,
    cca_null,
    heldout_from_cca,
    rank_zero_r2,
    shift_removed_table,
    subspace_report,
)
from ato.math.linear_reference import LinearReference, linear_reference
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
    linear: LinearReference  # η(test) beside η_expected of an exactly linear map (at the effective n)
    linear_iid: LinearReference  # the same at the token count, as if tokens were independent
    design: DesignEffects  # documents make tokens dependent: n_eff = n / deff for the Wishart references


@functools.lru_cache(maxsize=4)
def shared_null(
    n_train: int, n_test: int, d_in: int, d_out: int, fraction: float, replicates: int, seed: int
) -> CCANull:
    """`cca_null`, simulated once per process for each set of sizes (pairs of one store share n and d)."""
    return cca_null(n_train, n_test, d_in, d_out, fraction, replicates, seed)


TestChunks = Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (x_L, y_L+k, document id) per chunk


def transport(
    train: PairStats, test: PairStats, W: np.ndarray, b: np.ndarray, ev: EvaluateParams, test_chunks: TestChunks
) -> Transport:
    """Ceiling, rank sweep (raw and without the mean shift), held-out subspace vs null, η vs linear
    reference; the Wishart references at the effective sample size that `test_chunks` (the test
    split's tokens, in store order) give (docs/statistics.md#effective-n)."""
    if ev.null_replicates < 1:
        raise EvaluateError(f"evaluate.null_replicates: must be at least 1, got {ev.null_replicates}")
    cca = CCA.from_stats(train)
    ranks = rank_grid(min(cca.d_in, cca.d_out), ev.n_ranks)
    table = efficiency_table(cca, W, train, test, ranks)
    table.update(shift_removed_table(table, rank_zero_r2(cca, train), rank_zero_r2(cca, test)))
    heldout = heldout_from_cca(cca, test)
    ceiling = float(cca.ceiling())
    eta_test = float(cca.whitened_r2(test, W, b)) / ceiling if ceiling > 0 else float("nan")
    acc = DesignEffectAccumulator(W, b, cca.wy, cca.wx, test.mean_x, test.mean_y)
    for x, y, groups in test_chunks:
        acc.add(x, y, groups)
    design = acc.result()
    null_sizes = (effective_n(train.n, design.null), effective_n(test.n, design.null), cca.d_in, cca.d_out)
    eta_sizes = (effective_n(train.n, design.score), effective_n(test.n, design.r2), cca.d_in, cca.d_out)
    iid_sizes = (int(train.n), int(test.n), cca.d_in, cca.d_out)
    # Many medium-sized (d_in + d_out)³ draws and decompositions: on the shared 2-core machine the
    # 8-replicate null at d = 640 took 4.6 s on one BLAS thread and 59 s on two fighting over a busy core.
    with threadpool_limits(limits=1, user_api="blas"):
        null = shared_null(*null_sizes, ev.subspace_fraction, ev.null_replicates, ev.null_seed)
        linear = linear_reference(eta_test, cca.rho, *eta_sizes, replicates=ev.null_replicates, seed=ev.null_seed)
    linear_iid = linear_reference(eta_test, cca.rho, *iid_sizes)  # analytic only: the contrast
    subspace = subspace_report(train, test, ev.subspace_fraction, null=null, heldout=heldout)
    return Transport(cca, table, heldout, subspace, linear, linear_iid, design)


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
        "eta_expected_iid": t.linear_iid.eta_expected,
        "design_effect_score": t.design.score,
        "design_effect_r2": t.design.r2,
        "design_effect_null": t.design.null,
        "n_test_documents": float(t.design.n_groups),
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
    test_chunks: TestChunks,
) -> Evaluation:
    """Scores of the streamed test sums plus the statistics-based ones (val R², CCA, η, null);
    `test_chunks` streams the test tokens again with their documents, for the effective n."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    feature_scores = {k: acc.features[k].result() for k in PREDICTORS}
    ato = feature_scores["ato"]
    verdicts = feature_verdicts(ato["r2"], ato["active"], ev.transported_r2, ev.min_active_tokens)
    judged = verdicts != NO_VERDICT
    scores: dict[str, Any] = {
        k: predictor_scores(k, acc.residual[k], feature_scores[k]["r2"], judged) for k in PREDICTORS
    }
    t = transport(train, test, predictors.W, predictors.b, ev, test_chunks)
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


# --------------------------------------------------------------------------------------------
# Scoring an operator on the user's own text (`ato score`, `ato.score_text`)


@dataclass
class UnitSums:
    """Per-unit sums for intervals over documents, in bounded memory: once `cap` units exist, adjacent
    units are merged pairwise (a unit then holds 2, 4, … consecutive documents), so a file of any
    length keeps at most `cap` units of a few floats and a few `d`-vectors each."""

    d: int
    cap: int = 4096
    size: int = 1  # documents per unit
    fill: int = 0  # documents in the last unit
    scalars: dict[str, list[float]] = field(default_factory=dict)
    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)  # [d] sums per unit

    @property
    def n_units(self) -> int:
        return len(next(iter(self.scalars.values()), []))

    def add(self, values: dict[str, float], vectors: dict[str, np.ndarray]) -> None:
        if not self.n_units or self.fill == self.size:
            if self.n_units >= self.cap:
                self._halve()
            for key in values:
                self.scalars.setdefault(key, []).append(0.0)
            for key in vectors:
                self.vectors.setdefault(key, []).append(np.zeros(self.d))
            self.fill = 0
        for key, value in values.items():
            self.scalars[key][-1] += value
        for key, vector in vectors.items():
            self.vectors[key][-1] += vector
        self.fill += 1

    def _halve(self) -> None:
        self.scalars = {k: [sum(v[i : i + 2]) for i in range(0, len(v), 2)] for k, v in self.scalars.items()}
        self.vectors = {
            k: [sum(v[i : i + 2], np.zeros(self.d)) for i in range(0, len(v), 2)] for k, v in self.vectors.items()
        }
        self.size *= 2

    def array(self, key: str) -> np.ndarray:
        return np.asarray(self.scalars.get(key, []), dtype=np.float64)

    def matrix(self, key: str) -> np.ndarray:
        """[units, d] of a vector sum."""
        return np.asarray(self.vectors.get(key, []), dtype=np.float64).reshape(-1, self.d)


MIN_RELIABLE_DOCUMENTS = 10  # below this, intervals over documents lose their coverage (docs/statistics.md)
R2_INTERVAL = (
    "R² = 1 − Σ SSE / Σ SST (weighted) or 1 − mean over dimensions of SSE_d / SST_d (uniform): the same "
    "hull of t and bootstrap-t, on log(SSE/SST) and mapped back, so no bound exceeds 1; the pooled mean ȳ "
    "is held fixed (its variability is O(1/n))"
)


@dataclass
class TextScore:
    """An operator scored on a user's documents: residual R² at the spliced positions and Δ log-perplexity
    of the spliced model vs the clean one, each beside the identity map (ŷ = x: blocks L+1..T skipped),
    with intervals over documents (`ato.math.intervals`, docs/statistics.md#intervals)."""

    operator: str  # where the operator came from (directory, registry URI, variant)
    layer_in: int
    layer_out: int
    mode: str  # splice mode ("replace" / "add-delta")
    n_documents: int
    n_sequences: int  # windows of at most max_length tokens, each BOS-led
    n_units: int  # resampling units (documents, merged pairwise beyond the unit cap)
    n_residual_rows: int  # tokens scored for R² (= positions spliced: not BOS, not special)
    n_predictions: int  # next-token predictions scored for log-perplexity
    r2: dict[str, float]  # uniform average over dimensions (the pipeline's headline residual R²) with its interval
    r2_weighted: dict[str, float]  # variance-weighted R² with its interval
    identity_r2: dict[str, float]
    identity_r2_weighted: dict[str, float]
    logppl_clean: float  # mean NLL (nats/token) of the unpatched model
    logppl_spliced: float
    delta_logppl: dict[str, float]  # spliced − clean, with its interval
    identity_delta_logppl: dict[str, float]  # identity splice (replace) − clean, with its interval
    interval: dict[str, Any]  # method, level, resamples, what the unit is
    warnings: list[str] = field(default_factory=list)  # what the reader must know before trusting the numbers

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)

    def table(self) -> str:
        """A plain-text summary: each number beside the identity map's, warnings first."""

        def iv(d: dict[str, float]) -> str:
            return f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

        lvl = f"{100 * self.interval['level']:.0f} %"
        return "\n".join(
            [
                *self.warnings,
                f"operator {self.operator}: layer {self.layer_in} → {self.layer_out}, splice mode {self.mode}",
                f"{self.n_documents} documents, {self.n_sequences} sequences, {self.n_residual_rows} spliced "
                f"positions, {self.n_predictions} predictions; {lvl} intervals over {self.n_units} units "
                f"({self.interval['method']})",
                f"{'':24s} {'operator':>34s} {'identity (ŷ = x)':>34s}",
                f"{'residual R² (uniform)':24s} {iv(self.r2):>34s} {iv(self.identity_r2):>34s}",
                f"{'residual R² (weighted)':24s} {iv(self.r2_weighted):>34s} {iv(self.identity_r2_weighted):>34s}",
                f"{'Δ log-ppl vs clean':24s} {iv(self.delta_logppl):>34s} {iv(self.identity_delta_logppl):>34s}",
                f"clean log-ppl {self.logppl_clean:.4f} nats/token; spliced {self.logppl_spliced:.4f}",
            ]
        )


def iter_documents(path: str | Path, text_field: str = "text") -> Generator[str]:
    """Documents of a file, streamed: `.jsonl` one JSON object per line (`text_field`), anything else
    plain text with documents separated by blank lines (the corpus's .txt format)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"{path}: no such file")
    with open(path, encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield str(json.loads(line)[text_field])
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise EvaluateError(f"{path}:{line_no}: not a JSON object with {text_field!r}: {exc}") from None
            return
        block: list[str] = []
        for line in fh:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)


def _windows(tokenizer: Any, text: str, max_length: int) -> list[list[int]]:
    """BOS-led windows of at most `max_length` tokens covering the document (each later window gets a BOS too)."""
    from ato.corpus import tokenize_document

    ids = tokenize_document(tokenizer, text, None)
    bos = tokenizer.bos_token_id
    head, body = ([bos], ids[1:]) if bos is not None and ids and ids[0] == bos else ([], ids)
    step = max(1, max_length - len(head))
    return [head + body[i : i + step] for i in range(0, len(body), step) if len(head) + len(body[i : i + step]) >= 2]


def score_text(
    model: Any,
    tokenizer: Any,
    op: Any,
    texts: Iterable[str],
    *,
    max_length: int = 256,
    mode: str = "replace",
    model_digest: str | None = "auto",
    chunk_rows: int = 256,
    level: float = 0.95,
    method: str = "studentized_hull",
    n_resamples: int = 2000,
    seed: int = 0,
    max_units: int = 4096,
    source: str = "",
    progress: bool = True,
) -> TextScore:
    """Score operator `op` (an `ato.Operator`) spliced into `model` on `texts`, streamed one window at a
    time: nothing grows with the input but the (capped) per-unit sums. Every non-BOS, non-special
    position is spliced; a document is the resampling unit."""
    import torch
    from tqdm.auto import tqdm

    from ato.splicing import check_model

    check_model(model, op.config, model_digest)
    d = int(op.config["d_model"])
    units = UnitSums(d, max_units)
    special_ids = torch.as_tensor(sorted(set(tokenizer.all_special_ids)))
    counts = {"documents": 0, "sequences": 0}
    shift: list[np.ndarray] = []
    with torch.inference_mode():
        for text in tqdm(texts, desc="score", unit="doc", disable=not progress):
            doc: dict[str, float] = {}
            doc_vectors = {key: np.zeros(d) for key in ("y", "yy", "sse_op", "sse_identity")}
            for window in _windows(tokenizer, text, max_length):
                sums, rows = _score_window(model, op, window, special_ids, chunk_rows, mode)
                if len(rows["y"]):
                    shift = shift or [rows["y"].mean(0)]
                    yc = rows["y"] - shift[0]  # about a fixed centre: sums of squares without cancellation
                    doc_vectors["y"] += yc.sum(0)
                    doc_vectors["yy"] += (yc * yc).sum(0)
                    for name in ("op", "identity"):
                        doc_vectors[f"sse_{name}"] += ((rows["y"] - rows[name]) ** 2).sum(0)
                for k, v in sums.items():
                    doc[k] = doc.get(k, 0.0) + v
                counts["sequences"] += 1
            if doc:
                units.add(doc, doc_vectors)
                counts["documents"] += 1
    if counts["documents"] == 0:
        raise EvaluateError("no document of at least two tokens to score")
    return _text_score(op, units, counts, mode, source, level, method, n_resamples, seed)


def _score_window(
    model: Any,
    op: Any,
    window: list[int],
    special_ids: Any,
    chunk_rows: int,
    mode: str,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One BOS-led window: the clean forward (residuals x_L, y_T and the NLL), the operator's and the
    identity's spliced forwards; returns its sums and, at the spliced positions, the true y rows and
    the operator's and the identity's predictions."""
    import torch

    from ato.models import capture_residuals, final_hidden
    from ato.patching import token_nll
    from ato.splicing import spliced

    device = next(model.parameters()).device
    ids = torch.tensor([window], device=device)
    mask = ~torch.isin(ids, special_ids.to(device))
    mask[:, 0] = False
    L, T = op.layer_in, op.layer_out
    with capture_residuals(model, [L, T], stop_early=False) as cap:
        hidden = final_hidden(model, ids)
    clean = token_nll(model, ids, chunk_rows, hidden=hidden)
    rows = mask.nonzero(as_tuple=True)
    x, y = cap[L][rows].double().cpu().numpy(), cap[T][rows].double().cpu().numpy()
    param = next(model.parameters())
    W, b = op.W.to(param.device, param.dtype), op.b.to(param.device, param.dtype)
    y_hat = torch.nn.functional.linear(cap[L][rows], W, b).double().cpu().numpy()
    sums = {  # the same keys for every window (UnitSums adds them up per unit)
        "predictions": float(clean.numel()),
        "rows": float(len(y)),
        "nll_clean": float(clean.double().sum()),
    }
    for name, value, how in (
        ("op", lambda v: torch.nn.functional.linear(v, W, b), mode),
        ("identity", lambda v: v, "replace"),
    ):
        with spliced(model, T, value, rows, L, how):
            sums[f"nll_{name}"] = float(token_nll(model, ids, chunk_rows).double().sum())
    return sums, {"y": y, "op": y_hat, "identity": x}


def _text_score(
    op: Any,
    units: UnitSums,
    counts: dict[str, int],
    mode: str,
    source: str,
    level: float,
    method: str,
    n_resamples: int,
    seed: int,
) -> TextScore:
    from ato.math.intervals import delta_interval, mean_ratio_interval, ratio_interval

    kw: dict[str, Any] = {"level": level, "method": method, "n_resamples": n_resamples, "seed": seed}
    n_rows = units.array("rows")
    m = units.matrix("y")  # [units, d] Σ (y − shift)
    mean = m.sum(0) / n_rows.sum() if n_rows.sum() > 0 else np.zeros(units.d)
    # SST_jd about the pooled mean: Σ(y − ȳ)² = Σ(y − c)² − 2 (ȳ − c) Σ(y − c) + n (ȳ − c)², with c = shift
    sst = np.clip(units.matrix("yy") - 2 * m * mean + n_rows[:, None] * mean**2, 0.0, None)
    preds = units.array("predictions")

    def r2(name: str, weighted: bool) -> dict[str, float]:
        sse = units.matrix(f"sse_{name}")
        if sst.sum() <= 0:
            return _interval_dict(math.nan, math.nan, math.nan)
        if weighted:  # Σ SSE / Σ SST, R² = 1 − that
            iv = ratio_interval(sse.sum(1), sst.sum(1), log_scale=True, **kw)
        else:
            iv = mean_ratio_interval(sse, sst, level=level, n_resamples=n_resamples, seed=seed)
        return _interval_dict(1 - iv.estimate, 1 - iv.high, 1 - iv.low)

    def delta(name: str) -> dict[str, float]:
        iv = delta_interval(units.array(f"nll_{name}"), units.array("nll_clean"), preds, **kw)
        return _interval_dict(iv.estimate, iv.low, iv.high)

    return TextScore(
        operator=source,
        layer_in=op.layer_in,
        layer_out=op.layer_out,
        mode=mode,
        n_documents=counts["documents"],
        n_sequences=counts["sequences"],
        n_units=len(preds),
        n_residual_rows=int(n_rows.sum()),
        n_predictions=int(preds.sum()),
        r2=r2("op", weighted=False),
        r2_weighted=r2("op", weighted=True),
        identity_r2=r2("identity", weighted=False),
        identity_r2_weighted=r2("identity", weighted=True),
        logppl_clean=float(units.array("nll_clean").sum() / preds.sum()),
        logppl_spliced=float(units.array("nll_op").sum() / preds.sum()),
        delta_logppl=delta("op"),
        identity_delta_logppl=delta("identity"),
        interval={
            "method": method,
            "level": level,
            "resamples": n_resamples,
            "unit": f"document (merged in runs of {units.size})" if units.size > 1 else "document",
            "r2_method": R2_INTERVAL,
        },
        warnings=[_few_documents_warning(counts["documents"])] if counts["documents"] < MIN_RELIABLE_DOCUMENTS else [],
    )


def _few_documents_warning(n_documents: int) -> str:
    return (
        f"WARNING: only {n_documents} document(s): intervals over documents are unreliable below "
        f"{MIN_RELIABLE_DOCUMENTS} (too few units to estimate their spread); score more documents"
    )


def _interval_dict(estimate: float, low: float, high: float) -> dict[str, float]:
    return {"estimate": float(estimate), "low": float(low), "high": float(high), "half_width": float((high - low) / 2)}


def score_file(
    text: str | Path,
    operator: str | Path,
    model_dir: str | Path = "models/base",
    *,
    variant: str | None = None,
    device: str = "cpu",
    text_field: str = "text",
    tracking_uri: str | None = None,
    **kwargs: Any,
) -> TextScore:
    """`ato score`: check the text file, load the operator (directory or `models:/…`; `tracking_uri`:
    `ato.operators.registry_tracking_uri`) and the model (a prepared directory, else any HF causal LM
    directory or id), then `score_text` over the file's documents, streamed."""
    from ato.models import load_prepared, load_source, resolve_device
    from ato.operators import identity_warning, load_operator, variant_dir

    documents = iter_documents(text, text_field)  # before the slow part: a bad file fails now
    first = next(documents, None)
    documents.close()
    if first is None:
        raise EvaluateError(f"{text}: no documents (the file is empty or holds only blank lines)")
    op = load_operator(operator, variant=variant, tracking_uri=tracking_uri)
    if (Path(model_dir) / "ato_model.json").exists():
        model, tokenizer, _info = load_prepared(model_dir, device=str(resolve_device(device)))
    else:
        model, tokenizer = load_source(str(model_dir))
        model.to(resolve_device(device))
    where = f"{operator}" + (f" (variant {variant})" if variant else "")
    try:
        result = score_text(model, tokenizer, op, iter_documents(text, text_field), source=where, **kwargs)
    except EvaluateError as exc:
        raise EvaluateError(f"{text}: {exc}") from None
    local = None if str(operator).startswith("models:/") else Path(operator)
    below = identity_warning(op.config, variant_dir(local, variant) if local and variant else local)
    result.warnings += [below] if below else []
    return result


def score_command(args: Any) -> int:
    """`ato score` (arguments: `ato.cli`): the table on stdout, the JSON to a file too (`--json FILE`),
    or the JSON alone on stdout and the table on stderr (`--json`); warnings head the table."""
    import json
    import sys

    from ato.artifacts import json_clean, write_json_atomic

    result = score_file(
        args.text,
        args.operator,
        args.model,
        variant=args.variant,
        device=args.device,
        text_field=args.text_field,
        tracking_uri=args.tracking_uri,
        max_length=args.max_length,
        mode=args.mode,
    )
    to_stdout = args.json == "-"
    (sys.stderr if to_stdout else sys.stdout).write(result.table() + "\n")
    if to_stdout:
        sys.stdout.write(json.dumps(json_clean(result.to_dict()), indent=2, sort_keys=True, allow_nan=False) + "\n")
    elif args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0
