"""Evaluation results (`ato evaluate` → report): one pair's scores on the held-out test split.

* `PairMetrics` — reports/metrics/<pair>.json, a DVC metrics file: one flat JSON object of numbers
  (the MLflow metric names), non-finite values left out. It is written without a `format` key so
  that `dvc metrics diff` compares numbers only; its keys are checked on read instead.
* `EfficiencyTable` — reports/evaluate/<pair>/efficiency.csv, the rank sweep (a `dvc plots` file).
* `TransportVerdicts` — reports/evaluate/<pair>/transport.json, which kept SAE features are
  transported, synthesised or without a verdict.

Formulas: docs/method.md#r2, #features, #cca and #efficiency; file layout: docs/contracts.md#metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from ._io import ArtifactError, Record, write_text_atomic

# Prefix of each predictor's keys in the metrics file: the ATO's have none.
PREDICTOR_PREFIX = {"ato": "", "identity": "identity_", "mean": "mean_", "ols": "ols_"}
# The rank-sweep columns quoted per rank in the metrics file (eta_<kind>_<split>_r<rank>).
SWEEP_COLUMNS = ("eta_svd_train", "eta_svd_test", "eta_rrr_train", "eta_rrr_test")
_SWEEP_KEY = re.compile(r"^(eta_(?:svd|rrr)_(?:train|test))_r(\d+)$")


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
class PredictorScores:
    """Test-split scores of one predictor ŷ of the residual at L+k (the ATO or a baseline)."""

    r2: float = math.nan  # R², uniform average over residual dimensions
    r2_weighted: float = math.nan  # 1 − SSE/SST over all dimensions (variance-weighted)
    r2_dim_q10: float = math.nan  # 10 % quantile of the per-dimension R²
    r2_dim_q50: float = math.nan  # median per-dimension R²
    r2_dim_q90: float = math.nan  # 90 % quantile of the per-dimension R²
    mse: float = math.nan  # mean squared error per coordinate
    cosine: float = math.nan  # mean cosine(y, ŷ) over tokens
    feature_r2_median: float = math.nan  # median feature-space R² over the judged features
    feature_r2_mean: float = math.nan  # mean feature-space R² over the judged features


_PREDICTOR_FIELDS = frozenset(f.name for f in dataclasses.fields(PredictorScores))


@dataclass
class PairMetrics(Record):
    """One pair's evaluation (ATO and baselines identity ŷ = x, train mean ŷ = ȳ, OLS α = 0).

    On disk the predictor scores are flat keys with the predictor's prefix (`r2`, `identity_r2`,
    `mean_r2`, `ols_r2`, …) and the sweep is `eta_svd_test_r001`-style keys (ranks zero-padded to
    at least three digits). A value absent from the file (non-finite when written) reads as NaN.
    """

    FORMAT: ClassVar[str] = "ato-metrics/1"  # not written (DVC metrics file); keys checked instead
    PRODUCER: ClassVar[str] = "evaluate"

    n_test_tokens: float  # test tokens scored (BOS/special excluded unless stats.include_bos)
    n_train_tokens: float  # train tokens behind the operator
    n_features: float  # kept SAE features of layer L+k
    n_transported: float  # features with ≥ min_active_tokens and R² ≥ evaluate.transported_r2
    n_synthesised: float  # features with enough tokens but a lower (or undefined) R²
    n_no_verdict: float  # features with fewer than evaluate.min_active_tokens active tokens
    alpha: float = math.nan  # ridge α of the operator (its config.json)
    val_r2: float = math.nan  # R² on the validation split (the tuning objective), from statistics
    val_r2_weighted: float = math.nan  # variance-weighted R² on the validation split
    ato: PredictorScores = field(default_factory=PredictorScores)  # the operator W x + b
    identity: PredictorScores = field(default_factory=PredictorScores)  # ŷ = x
    mean: PredictorScores = field(default_factory=PredictorScores)  # ŷ = ȳ_train
    ols: PredictorScores = field(default_factory=PredictorScores)  # ridge with α = 0
    transported_fraction: float = math.nan  # n_transported / judged features
    feature_pearson_median: float = math.nan  # median Pearson r(a, â) of the ATO, judged features
    feature_rms_ratio_median: float = math.nan  # median rms(â)/rms(a) of the ATO, judged features
    ceiling_full: float = math.nan  # CCA ceiling at full rank (train statistics)
    participation_ratio: float = math.nan  # (Σρ)²/Σρ² of the canonical correlations
    subspace_size: float = math.nan  # smallest r with ceiling(r) ≥ evaluate.subspace_fraction · ceiling(d)
    whitened_r2_train: float = math.nan  # whitened R² of the ATO on train
    whitened_r2_test: float = math.nan  # whitened R² of the ATO on test
    ols_whitened_r2_test: float = math.nan  # whitened R² of the OLS map on test
    eta_train: float = math.nan  # whitened_r2_train / ceiling_full
    eta_test: float = math.nan  # whitened_r2_test / ceiling_full
    sweep: dict[str, dict[int, float]] = field(default_factory=dict)  # SWEEP_COLUMNS → {rank: η(r)}

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

    def predictor(self, name: str) -> PredictorScores:
        """Scores of a predictor by its name in PREDICTOR_PREFIX."""
        if name not in PREDICTOR_PREFIX:
            raise KeyError(f"unknown predictor {name!r} (one of {', '.join(PREDICTOR_PREFIX)})")
        scores: PredictorScores = getattr(self, name)
        return scores

    def flat(self) -> dict[str, float]:
        """Every value under its file/MLflow name, NaN included."""
        out: dict[str, float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PredictorScores):
                prefix = PREDICTOR_PREFIX[f.name]
                out.update({f"{prefix}{k}": float(v) for k, v in dataclasses.asdict(value).items()})
            elif f.name == "sweep":
                out.update(_flat_sweep(self.sweep))
            else:
                out[f.name] = float(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.flat().items() if math.isfinite(v)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Self:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object for {cls.__name__}")
        data = {k: v for k, v in data.items() if not (k == "format" and v == cls.FORMAT)}
        scalars = {f.name for f in dataclasses.fields(cls)} - set(PREDICTOR_PREFIX) - {"sweep"}
        kwargs: dict[str, Any] = {name: {} for name in PREDICTOR_PREFIX}
        sweep: dict[str, dict[int, float]] = {}
        for key, value in data.items():
            number = _number(value, f"{where}.{key}")
            match = _SWEEP_KEY.match(key)
            if key in scalars:
                kwargs[key] = number
            elif match:
                sweep.setdefault(match.group(1), {})[int(match.group(2))] = number
            else:
                name, rest = _split_predictor_key(key)
                if rest not in _PREDICTOR_FIELDS:
                    raise ArtifactError(f"{where}: unknown key {key!r} for {cls.__name__}")
                kwargs[name][rest] = number
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        absent = [name for name in required if name not in kwargs]
        if absent:
            raise ArtifactError(f"{where}: missing key {absent[0]!r} for {cls.__name__}{cls._rerun()}")
        for name in PREDICTOR_PREFIX:
            kwargs[name] = PredictorScores(**kwargs[name])
        return cls(**kwargs, sweep=sweep)


def _split_predictor_key(key: str) -> tuple[str, str]:
    for name, prefix in PREDICTOR_PREFIX.items():
        if prefix and key.startswith(prefix):
            return name, key[len(prefix) :]
    return "ato", key


def _flat_sweep(sweep: dict[str, dict[int, float]]) -> dict[str, float]:
    ranks = [r for column in sweep.values() for r in column]
    width = max(3, len(str(max(ranks)))) if ranks else 3
    return {f"{column}_r{r:0{width}d}": float(v) for column, values in sweep.items() for r, v in values.items()}


# --------------------------------------------------------------------------------------------
# reports/evaluate/<pair>/efficiency.csv


@dataclass
class EfficiencyTable:
    """The rank sweep of one pair: ceiling(r) on train, η(r) of SVD truncation and of the
    reduced-rank regression map on train and test, one row per swept rank."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("rank", "ceiling", *SWEEP_COLUMNS)

    rank: np.ndarray  # int ranks, ascending
    ceiling: np.ndarray  # CCA ceiling(r), train statistics
    eta_svd_train: np.ndarray  # η(r) of the SVD truncation of the ATO, train
    eta_svd_test: np.ndarray  # … test
    eta_rrr_train: np.ndarray  # η(r) of the reduced-rank regression map, train
    eta_rrr_test: np.ndarray  # … test

    @classmethod
    def from_columns(cls, table: dict[str, np.ndarray]) -> Self:
        """The sweep columns of `ato.math.cca.efficiency_table` (other columns are ignored)."""
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
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
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
    """Which kept SAE features of layer L+k the operator transports (ids in `FeatureSet.kept` order)."""

    FORMAT: ClassVar[str] = "ato-transport/1"
    PRODUCER: ClassVar[str] = "evaluate"

    pair: str  # pair name, e.g. L05_k1
    layer_in: int  # L
    layer_out: int  # L + k
    transported_r2: float  # evaluate.transported_r2 used for the verdicts
    min_active_tokens: int  # evaluate.min_active_tokens used for the verdicts
    transported: list[int]  # feature ids with R² ≥ transported_r2 over enough active tokens
    synthesised: list[int]  # feature ids with enough active tokens and a lower R²
    no_verdict: list[int]  # feature ids with too few active tokens
