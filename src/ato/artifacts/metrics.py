"""Evaluation results (`ato evaluate` → report): one pair's scores on the held-out test split.

* `PairMetrics` — reports/metrics/<pair>.json: one flat JSON object of numbers (the MLflow metric
  names), headline numbers first, non-finite values left out. It is written without a `format` key
  (numbers only); its keys are checked on read instead. A few of them reach reports/headline.json
  (`HeadlineMetrics`, the one DVC metrics file).
* `EfficiencyTable` — reports/evaluate/<pair>/efficiency.csv, the rank sweep (a `dvc plots` file): the
  per-rank series, which the metrics file does not repeat.
* `TransportVerdicts` — reports/evaluate/<pair>/transport.json, which kept SAE features are
  transported, synthesised or without a verdict.

Formulas: docs/method.md#r2, #features, #cca and #efficiency, docs/statistics.md#heldout;
file layout: docs/contracts.md#metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from ..kinds import keys_for
from ._io import ArtifactError, Record, write_numbers_atomic, write_text_atomic

# The evaluate key of the fitted operator (`ato.kinds`): its keys in the metrics file have no prefix,
# every other predictor's carry its key (`identity_r2`, `mean_r2`, …).
OPERATOR_KEY = "ato"
# The rank-sweep columns of efficiency.csv besides rank and ceiling (η(r) raw, then without the mean shift).
SWEEP_COLUMNS = (
    "eta_svd_train",
    "eta_svd_test",
    "eta_rrr_train",
    "eta_rrr_test",
    "eta_svd_test_shift_removed",
    "eta_rrr_test_shift_removed",
)


def write_csv_atomic(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A CSV file (csv module dialect: `\\r\\n` line ends), written atomically; cells as given."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    return Path(path)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArtifactError(f"{where}: expected a number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# reports/metrics/<pair>.json


@dataclass
class BaselineScores:
    """Test-split scores of a baseline predictor ŷ of the residual at L+k (identity, train mean, OLS)."""

    r2: float = math.nan  # R², uniform average over residual dimensions
    r2_weighted: float = math.nan  # 1 − SSE/SST over all dimensions (variance-weighted)
    feature_r2_median: float = math.nan  # median feature-space R² over the judged features


@dataclass
class PredictorScores(BaselineScores):
    """Test-split scores of the ATO: a baseline's, plus the error size and direction."""

    mse: float = math.nan  # mean squared error per coordinate
    cosine: float = math.nan  # mean cosine(y, ŷ) over tokens


def predictor_prefix(key: str) -> str:
    """Prefix of a predictor's keys in the metrics file and MLflow (`ato.kinds` evaluate key)."""
    return "" if key == OPERATOR_KEY else f"{key}_"


def predictor_class(key: str) -> type[BaselineScores]:
    """The operator's scores carry the error size and direction too."""
    return PredictorScores if key == OPERATOR_KEY else BaselineScores


@dataclass
class PairMetrics(Record):
    """One pair's evaluation: the ATO, its baselines (identity ŷ = x, train mean ŷ = ȳ, OLS α = 0), the
    CCA ceiling, η beside the η of an exactly linear map, and the subspace size beside its null.

    On disk (reports/metrics/<pair>.json, also the MLflow metric names): one flat
    JSON object of numbers, the `HEADLINE` keys first, then the rest in field order; predictor scores
    are flat keys with the predictor's prefix (`r2`, `identity_r2`, `mean_r2`, `ols_r2`, …). No per-rank
    series (those are `EfficiencyTable`, the dvc plot). A value absent from the file (non-finite when
    written) reads as NaN. Definitions: docs/method.md#cca, #efficiency and docs/statistics.md#heldout.
    """

    FORMAT: ClassVar[str] = "ato-metrics/1"  # not written (numbers only); keys checked instead
    PRODUCER: ClassVar[str] = "evaluate"
    # the numbers a reader looks for first, in this order at the top of the file
    HEADLINE: ClassVar[tuple[str, ...]] = (
        "r2",
        "r2_weighted",
        "identity_r2",
        "mean_r2",
        "ols_r2",
        "feature_r2_median",
        "n_transported",
        "n_synthesised",
        "sae_reliable",
        "ceiling_full",
        "eta_test",
        "eta_expected",
        "eta_ratio",
        "transport_directions",
        "transport_directions_low",
        "transport_directions_high",
        "transport_directions_share",
        "canonical_directions",
        "heldout_subspace_size",
        "heldout_subspace_size_null",
        "heldout_subspace_size_null_std",
        "heldout_subspace_size_excess",
        "heldout_pr",
        "heldout_pr_null",
        "heldout_pr_null_std",
        "heldout_pr_excess",
        "participation_ratio",
        "participation_ratio_null",
        "n_train_tokens",
        "n_val_tokens",
        "n_test_tokens",
    )

    n_test_tokens: float  # test tokens scored (BOS/special excluded unless stats.include_bos)
    n_train_tokens: float  # train tokens behind the operator
    n_features: float  # kept SAE features of layer L+k
    n_transported: float  # kept features with ≥ min_active_tokens whose R² interval lies ≥ evaluate.transported_r2
    n_synthesised: float  # kept features with enough tokens whose R² interval lies below it
    n_no_verdict: float  # features with fewer than evaluate.min_active_tokens active tokens
    n_val_tokens: float = math.nan  # validation tokens (the tuning objective's split)
    alpha: float = math.nan  # ridge α of the operator (its config.json)
    val_r2: float = math.nan  # R² on the validation split (the tuning objective), from statistics
    ato: PredictorScores = field(default_factory=PredictorScores)  # the operator W x + b
    identity: BaselineScores = field(default_factory=BaselineScores)  # ŷ = x
    mean: BaselineScores = field(default_factory=BaselineScores)  # ŷ = ȳ_train
    ols: BaselineScores = field(default_factory=BaselineScores)  # ridge with α = 0
    transported_fraction: float = math.nan  # share of the judged kept features with R² ≥ evaluate.transported_r2
    feature_pearson_median: float = math.nan  # median Pearson r(a, â) of the ATO, judged features
    feature_rms_ratio_median: float = math.nan  # median rms(â)/rms(a) of the ATO, judged features
    n_undetermined: float = math.nan  # kept features with enough tokens whose R² interval straddles the threshold
    # intervals (_low, _high): document bootstrap over the test documents (evaluate.feature_interval,
    # feature_resamples, feature_level; docs/statistics.md#feature-intervals)
    transported_fraction_low: float = math.nan  # lower end of transported_fraction's interval
    transported_fraction_high: float = math.nan  # upper end of transported_fraction's interval
    feature_r2_median_low: float = math.nan  # lower end of the ATO's feature_r2_median's interval
    feature_r2_median_high: float = math.nan  # upper end of the ATO's feature_r2_median's interval
    feature_pearson_median_low: float = math.nan  # lower end of feature_pearson_median's interval
    feature_pearson_median_high: float = math.nan  # upper end of feature_pearson_median's interval
    feature_rms_ratio_median_low: float = math.nan  # lower end of feature_rms_ratio_median's interval
    feature_rms_ratio_median_high: float = math.nan  # upper end of feature_rms_ratio_median's interval
    # every live feature of layer L+k's SAE (active in select's scan of train tokens), the kept ones a subset
    live_n_features: float = math.nan  # live features
    live_n_judged: float = math.nan  # … with ≥ evaluate.min_active_tokens active test tokens
    live_n_transported: float = math.nan  # judged, R² interval ≥ evaluate.transported_r2
    live_n_synthesised: float = math.nan  # judged, R² interval below it
    live_n_undetermined: float = math.nan  # judged, R² interval straddling it
    live_transported_fraction: float = math.nan  # share of the judged live features with R² ≥ the threshold
    live_transported_fraction_low: float = math.nan  # lower end of live_transported_fraction's interval
    live_transported_fraction_high: float = math.nan  # upper end of live_transported_fraction's interval
    live_feature_r2_median: float = math.nan  # median feature R² of the ATO over the judged live features
    live_feature_r2_median_low: float = math.nan  # lower end of live_feature_r2_median's interval
    live_feature_r2_median_high: float = math.nan  # upper end of live_feature_r2_median's interval
    sae_reliable: float = math.nan  # 1: layer L+k's SAE passed its quality gates (SaeInfo.reliable); 0: it
    # missed them (or has no gate result), so every feature-level number here is unreliable
    # CCA ceiling and transport efficiency (pseudo-inverse whitening: the ceiling is a true in-sample bound)
    ceiling_full: float = math.nan  # ceiling(d) = Σρ²/d_out on the train statistics
    eta_train: float = math.nan  # whitened R² of the ATO on train / ceiling_full (≤ 1 up to rounding)
    eta_test: float = math.nan  # whitened R² of the ATO on test / ceiling_full: the headline η
    eta_expected: float = math.nan  # η(test) an exactly linear map reaches at this n, d and ρ (analytic)
    eta_expected_std: float = math.nan  # spread of η(test) under exact linearity (Wishart simulation)
    eta_ratio: float = math.nan  # eta_test / eta_expected: ≈ 1 is indistinguishable from linear transport
    eta_expected_iid: float = math.nan  # eta_expected at the token counts, as if tokens were independent
    eta_expected_sandwich: float = math.nan  # eta_expected at n_eff / heteroscedasticity (the sandwich form)
    eta_ratio_sandwich: float = math.nan  # eta_test / eta_expected_sandwich
    heteroscedasticity: float = math.nan  # κ = mean ‖x̃‖²‖ε̃‖² / (mean ‖x̃‖² · mean ‖ε̃‖²) on test (1: homoscedastic)
    # learning curve (docs/statistics.md#learning-curve): the ridge map (α) fitted on nested document subsets
    # of train, 1/f of it (f = 8, 4, 2, 1), scored on test; its values at n → ∞ (linear in 1/n) with 95 %
    # intervals (block bootstrap of train ⊕ the test split's document-clustered sd)
    curve_n_f8: float = math.nan  # train tokens of the 1/8 subset
    curve_r2w_f8: float = math.nan  # its R²_w(test)
    curve_eta_f8: float = math.nan  # its η(test): whitened R²(test) / the subset's in-sample ceiling
    curve_n_f4: float = math.nan
    curve_r2w_f4: float = math.nan
    curve_eta_f4: float = math.nan
    curve_n_f2: float = math.nan
    curve_r2w_f2: float = math.nan
    curve_eta_f2: float = math.nan
    curve_n_f1: float = math.nan  # all train tokens (= n_train_tokens)
    curve_r2w_f1: float = math.nan  # = r2_weighted
    curve_eta_f1: float = math.nan  # = eta_test up to rounding
    r2w_inf: float = math.nan  # R²_w(test) extrapolated to n → ∞
    r2w_inf_lo: float = math.nan
    r2w_inf_hi: float = math.nan
    eta_inf: float = math.nan  # η(test) extrapolated to n → ∞ (1 for any law train and test documents share)
    eta_inf_lo: float = math.nan
    eta_inf_hi: float = math.nan
    eta_shortfall: float = math.nan  # 1 − eta_inf: "falls short of linear" only when its interval excludes 0
    eta_shortfall_lo: float = math.nan
    eta_shortfall_hi: float = math.nan
    eta_inf_sd_train: float = math.nan  # sd of eta_inf over the train block bootstrap
    eta_inf_sd_test: float = math.nan  # sd of eta_inf from the test split's sampling (document-clustered)
    # effective n: tokens of a document are dependent; the Wishart references (η's linear reference, the
    # subspace null) are drawn at n / deff (Kish design effects over test documents, docs/statistics.md)
    design_effect_score: float = math.nan  # deff of x̃ε̃ᵀ, the fit's noise: η's reference draws train at n / this
    design_effect_r2: float = math.nan  # deff of the linearised test R²: η's reference draws test at n / this
    design_effect_null: float = math.nan  # deff of a whitened cross-covariance entry (the null uses n / this)
    n_test_documents: float = math.nan  # documents (clusters) the design effects are estimated over
    # directions that carry transport: canonical directions from train whose correlation measured on test
    # passes a one-sided step-down (Holm–Šidák) test against independent x, y at n_test / design_effect_null
    # (docs/statistics.md#directions); the count is also the test's own 95 % lower confidence bound
    canonical_directions: float = math.nan  # m = min(d_in, d_out): the directions tested
    transport_directions: float = math.nan  # directions that pass (family-wise α = 0.05)
    transport_directions_low: float = math.nan  # 2.5 % point of the count over a bootstrap of test documents
    transport_directions_high: float = math.nan  # 97.5 % point (re-added test noise biases it up a little)
    transport_directions_share: float = math.nan  # their Σρ² (train ρ) over Σρ²: their share of ceiling_full
    transport_directions_share_low: float = math.nan  # 2.5 % point of the share over the same bootstrap
    transport_directions_share_high: float = math.nan  # 97.5 % point
    transport_directions_threshold: float = math.nan  # first step: 95 % quantile of the largest of m null ρ
    # PR and subspace size: descriptions of how the held-out correlations spread, not counts of transport
    # directions (a planted rank-200 transport gives the null's PR): canonical directions from train,
    # correlations measured on test (train order), beside the same statistic for independent x and y at
    # the same n and d (Wishart null: mean, sd, excess)
    heldout_subspace_size: float = math.nan  # smallest r with Σ_{i≤r} ρ⁺² ≥ subspace_fraction · Σ ρ⁺² (test ρ)
    heldout_subspace_size_null: float = math.nan  # its mean under the null
    heldout_subspace_size_null_std: float = math.nan  # its standard deviation under the null
    heldout_subspace_size_excess: float = math.nan  # observed − null mean
    heldout_pr: float = math.nan  # participation ratio (Σρ⁺)²/Σρ⁺² of the held-out correlations
    heldout_pr_null: float = math.nan  # its mean under the null
    heldout_pr_null_std: float = math.nan  # its standard deviation under the null
    heldout_pr_excess: float = math.nan  # observed − null mean
    participation_ratio: float = math.nan  # in-sample (Σρ)²/Σρ² of the train canonical correlations
    participation_ratio_null: float = math.nan  # its mean under the null (≈ 0.72·d at d/n = 0.01)
    subspace_size: float = math.nan  # in-sample: smallest r with ceiling(r) ≥ subspace_fraction · ceiling(d)
    subspace_size_null: float = math.nan  # its mean under the null
    # predictors registered beyond the four fields above (`ato.kinds`, evaluate role), by key; written
    # after every other key
    extra: dict[str, BaselineScores] = field(default_factory=dict)

    @classmethod
    def missing(cls) -> Self:
        """Every value NaN: what a pair without a metrics file shows."""
        nan = math.nan
        return cls(
            n_test_tokens=nan,
            n_train_tokens=nan,
            n_features=nan,
            n_transported=nan,
            n_synthesised=nan,
            n_no_verdict=nan,
        )

    def predictor(self, name: str) -> BaselineScores:
        """Scores of a predictor by its evaluate key (`ato.kinds`); NaN for a registered one not scored."""
        if name in _score_fields():
            scores: BaselineScores = getattr(self, name)
            return scores
        if name not in keys_for("evaluate"):
            raise KeyError(f"unknown predictor {name!r} (one of {', '.join(keys_for('evaluate'))})")
        return self.extra.get(name, BaselineScores())

    @classmethod
    def predictor_fields(cls, scores: dict[str, BaselineScores]) -> dict[str, Any]:
        """Constructor arguments for each predictor's scores: a field for the built-in ones, `extra` for the rest."""
        fields = _score_fields()
        return {
            **{k: v for k, v in scores.items() if k in fields},
            "extra": {k: v for k, v in scores.items() if k not in fields},
        }

    def flat(self) -> dict[str, float]:
        """Every value under its file/MLflow name, NaN included: `HEADLINE` first, then field order, then
        the registered predictors."""
        body: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _score_fields():
                body.update(_prefixed(f.name, value))
            elif f.name != "extra":
                body[f.name] = float(value)
        for key in _extra_predictors():
            body.update(_prefixed(key, self.predictor(key)))
        return {**{k: body[k] for k in self.HEADLINE}, **body}

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.flat().items() if math.isfinite(v)}

    def write(self, path: str | Path) -> None:
        """In `flat()` order (not sorted: the headline stays on top), NaN left out."""
        write_numbers_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Self:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object for {cls.__name__}")
        data = {k: v for k, v in data.items() if not (k == "format" and v == cls.FORMAT)}
        keys = _flat_keys()
        kwargs: dict[str, Any] = {}
        nested: dict[str, dict[str, float]] = {name: {} for name in keys_for("evaluate")}
        for key, value in data.items():
            if key not in keys:
                raise ArtifactError(f"{where}: unknown key {key!r} for {cls.__name__}{cls._rerun()}")
            name, sub = keys[key]
            number = _number(value, f"{where}.{key}")
            if sub is None:
                kwargs[name] = number
            else:
                nested[name][sub] = number
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        absent = [name for name in required if name not in kwargs]
        if absent:
            raise ArtifactError(f"{where}: missing key {absent[0]!r} for {cls.__name__}{cls._rerun()}")
        scores = {name: predictor_class(name)(**values) for name, values in nested.items()}
        return cls(**kwargs, **cls.predictor_fields(scores))


def _score_fields() -> tuple[str, ...]:
    """The PairMetrics fields holding a predictor's scores (the built-in predictors)."""
    return tuple(
        f.name for f in dataclasses.fields(PairMetrics) if f.default_factory in (PredictorScores, BaselineScores)
    )


def _extra_predictors() -> tuple[str, ...]:
    """Evaluate keys of the registered predictors without a PairMetrics field, in registry order."""
    return tuple(k for k in keys_for("evaluate") if k not in _score_fields())


def _prefixed(key: str, scores: BaselineScores) -> dict[str, float]:
    return {f"{predictor_prefix(key)}{k}": float(v) for k, v in dataclasses.asdict(scores).items()}


def _flat_keys() -> dict[str, tuple[str, str | None]]:
    """File key → (PairMetrics field or predictor key, predictor score field or None)."""
    out: dict[str, tuple[str, str | None]] = {}
    for f in dataclasses.fields(PairMetrics):
        if f.name not in (*_score_fields(), "extra"):
            out[f.name] = (f.name, None)
    for key in keys_for("evaluate"):
        for sub in dataclasses.fields(predictor_class(key)):
            out[predictor_prefix(key) + sub.name] = (key, sub.name)
    return out


# --------------------------------------------------------------------------------------------
# reports/evaluate/<pair>/efficiency.csv


@dataclass
class EfficiencyTable:
    """The rank sweep of one pair: ceiling(r) on train, η(r) of SVD truncation and of the
    reduced-rank regression map on train and test, and on test also without the train→test mean
    shift, (R²_w(r) − R²_w(0)) / ceiling(r); one row per swept rank."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("rank", "ceiling", *SWEEP_COLUMNS)

    rank: np.ndarray  # int ranks, ascending
    ceiling: np.ndarray  # CCA ceiling(r), train statistics
    eta_svd_train: np.ndarray  # η(r) of the SVD truncation of the ATO, train
    eta_svd_test: np.ndarray  # … test
    eta_rrr_train: np.ndarray  # η(r) of the reduced-rank regression map, train
    eta_rrr_test: np.ndarray  # … test
    eta_svd_test_shift_removed: np.ndarray  # (R²_w(r) − R²_w(0)) / ceiling(r) of the SVD truncation, test
    eta_rrr_test_shift_removed: np.ndarray  # … of the reduced-rank regression map, test

    @classmethod
    def from_columns(cls, table: dict[str, np.ndarray]) -> Self:
        """The sweep columns of `ato.math.cca.efficiency_table` plus `ato.math.heldout.shift_removed_table`
        (other columns are ignored)."""
        return cls(**{c: np.asarray(table[c]) for c in cls.COLUMNS})

    def column(self, name: str) -> np.ndarray:
        if name not in self.COLUMNS:
            raise KeyError(f"unknown efficiency column {name!r}")
        values: np.ndarray = getattr(self, name)
        return values

    def write(self, path: str | Path) -> Path:
        rows = [[csv_cell(self.column(c)[i]) for c in self.COLUMNS] for i in range(len(self.rank))]
        return write_csv_atomic(path, self.COLUMNS, rows)

    @classmethod
    def read(cls, path: str | Path) -> Self:
        """Numeric columns as float64 arrays; 'nan' and empty cells are NaN."""
        path = Path(path)
        if not path.exists():
            raise ArtifactError(f"{path}: missing efficiency table; run `ato evaluate`")
        try:
            with open(path, newline="") as fh:
                text = fh.read()
        except UnicodeDecodeError:
            raise ArtifactError(f"{path}: not a text CSV file; rerun `ato evaluate`") from None
        if text and not text.endswith("\n"):  # the writer ends every row with a line break
            raise ArtifactError(f"{path}: truncated CSV (no line break after its last row); rerun `ato evaluate`")
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows:
            raise ArtifactError(f"{path}: empty CSV (expected the header {', '.join(cls.COLUMNS)})")
        header, body = rows[0], rows[1:]
        absent = [c for c in cls.COLUMNS if c not in header]
        if absent:
            raise ArtifactError(f"{path}: missing column(s) {absent} (header: {header})")
        out: dict[str, np.ndarray] = {}
        for c in cls.COLUMNS:
            j = header.index(c)
            try:
                out[c] = np.array([float(r[j]) if r[j].strip() else math.nan for r in body], dtype=np.float64)
            except (ValueError, IndexError) as exc:
                raise ArtifactError(f"{path}: column {c!r} is not numeric on every row ({exc})") from None
        return cls(**out)


def csv_cell(v: Any) -> Any:
    """Floats as repr (full precision) or 'nan', numpy integers as int."""
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


# --------------------------------------------------------------------------------------------
# reports/evaluate/<pair>/transport.json


@dataclass
class TransportVerdicts(Record):
    """Which SAE features of layer L+k the operator transports: the kept ones (ids in `FeatureSet.kept`
    order) and every live one (by id), each with its R² interval and three-way verdict."""

    FORMAT: ClassVar[str] = "ato-transport/2"
    PRODUCER: ClassVar[str] = "evaluate"

    pair: str  # pair name, e.g. L05_k1
    layer_in: int  # L
    layer_out: int  # L + k
    transported_r2: float  # evaluate.transported_r2 used for the verdicts
    min_active_tokens: int  # evaluate.min_active_tokens used for the verdicts
    transported: list[int]  # kept ids with enough active tokens and an R² interval wholly ≥ transported_r2
    synthesised: list[int]  # kept ids with enough active tokens and an R² interval wholly below it
    no_verdict: list[int]  # kept ids with too few active tokens
    sae_reliable: bool = False  # layer L+k's SAE passed its quality gates (SaeInfo.reliable)
    sae_gate_failures: list[str] = field(default_factory=list)  # SaeInfo.gate_failures (or why there is none)
    features: list[int] = field(default_factory=list)  # the kept feature ids, in FeatureSet.kept order
    r2: list[float | None] = field(default_factory=list)  # feature R² of the ATO per entry of `features`
    identity_r2: list[float | None] = field(default_factory=list)  # … of the identity map ŷ = x
    active_tokens: list[int] = field(default_factory=list)  # test tokens where the feature is active
    undetermined: list[int] = field(default_factory=list)  # kept ids whose R² interval straddles transported_r2
    interval: str = ""  # how r2_low / r2_high were computed: method, resamples, level
    r2_low: list[float | None] = field(default_factory=list)  # R² interval per entry of `features`, lower end
    r2_high: list[float | None] = field(default_factory=list)  # … its upper end
    live_features: list[int] = field(default_factory=list)  # every live feature id of the SAE (ascending)
    live_active_tokens: list[int] = field(default_factory=list)  # per entry of `live_features`
    live_r2: list[float | None] = field(default_factory=list)  # feature R² of the ATO
    live_r2_low: list[float | None] = field(default_factory=list)  # its interval, lower end
    live_r2_high: list[float | None] = field(default_factory=list)  # … upper end
    live_verdicts: list[str] = field(default_factory=list)  # transported | synthesised | undetermined | no_verdict
