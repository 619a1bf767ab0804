"""Headline numbers (`ato report` → `dvc metrics`, `dvc exp show`): reports/headline.json, the pipeline's
only DVC metrics file. A few numbers per pair and the quality gates of each target layer's SAE, nested
`{pair: {name: number}}` and `{sae_LNN: {name: number}}`, so that the names DVC flattens them to stay
short (`L05_k1.r2`, `sae_L06.fve`) and a one-param change fits a terminal. Every other number stays in
the stage's own report file (plain outputs). Like `PairMetrics` it is written without a `format` key and
without non-finite values (numbers only, so `dvc metrics diff` compares numbers); its keys are checked
on read instead. File layout: docs/contracts.md#headline."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from ._io import ArtifactError, Record, write_numbers_atomic

SAE_PREFIX = "sae_L"  # key of a target layer's SAE gates: sae_L06


METRICS_KEY = "metrics_key"  # field metadata: the `PairMetrics.flat()` key a headline number copies


def _copied(metrics_key: str) -> Any:
    """A headline number copied from the pair's metrics file (its `PairMetrics.flat()` key): adding
    one to headline.json is this one line (`reporting.headline` fills every such field)."""
    return field(default=math.nan, metadata={METRICS_KEY: metrics_key})


@dataclass
class PairHeadline:
    """One pair's headline numbers (test split; NaN where its stage has not run)."""

    r2: float = _copied("r2")  # residual R² of the operator (uniform over dimensions)
    r2_w: float = _copied("r2_weighted")  # variance-weighted R² (1 − SSE/SST over all dimensions)
    eta: float = _copied("eta_test")  # transport efficiency η(test): whitened R² / CCA ceiling
    ceiling: float = _copied("ceiling_full")  # CCA ceiling(d) on the train statistics
    d_ato: float = math.nan  # Δ log-perplexity of the operator's patch vs clean, nats/token (report.causal_scope)
    d_ato_hw: float = math.nan  # half-width of d_ato's interval (causal.interval)
    recovered: float = math.nan  # share of the headline reference's damage the patch recovers (NaN: degenerate)
    recovered_mean_abl: float = math.nan  # … of mean ablation's damage (keeps no context: flatters any map of x_L)
    recovered_identity: float = math.nan  # … of the identity's damage
    transported: float = _copied("transported_fraction")  # transported fraction of the judged SAE features
    moved: float = math.nan  # context budget (reports/context): R²_w(best context map) − R²_w(ATO), test
    computed: float = math.nan  # … 1 − R²_w(best context map): what no map linear in the context inputs explains

    @classmethod
    def copied_keys(cls) -> dict[str, str]:
        """Field → the `PairMetrics.flat()` key it copies, for the fields copied from the metrics file."""
        return {f.name: f.metadata[METRICS_KEY] for f in dataclasses.fields(cls) if METRICS_KEY in f.metadata}


@dataclass
class SaeHeadline:
    """One target layer's SAE against its quality gates (val split; docs/method.md#features)."""

    fve: float = math.nan  # fraction of variance explained
    dead: float = math.nan  # fraction of latents never active
    ce_rec: float = math.nan  # CE-loss recovered against the gates' ablation (sae.gates.ce_reference)
    reliable: float = math.nan  # 1: every gate passed; 0: feature-level numbers resting on it are unreliable


@dataclass
class HeadlineMetrics(Record):
    """Every pair's headline numbers and every target layer's SAE gates, in params order."""

    FORMAT: ClassVar[str] = "ato-headline/1"  # not written (DVC metrics file); keys checked instead
    PRODUCER: ClassVar[str] = "report"

    pairs: dict[str, PairHeadline] = field(default_factory=dict)  # by pair name
    saes: dict[int, SaeHeadline] = field(default_factory=dict)  # by target layer L + k

    def to_dict(self) -> dict[str, Any]:
        """`{pair: {...}, sae_LNN: {...}}`, non-finite values left out."""
        out = {name: _finite(scores) for name, scores in self.pairs.items()}
        return out | {sae_key(layer): _finite(gates) for layer, gates in self.saes.items()}

    def write(self, path: str | Path) -> None:
        """In insertion order (not sorted: pairs as in params, then the SAEs)."""
        write_numbers_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Self:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object for {cls.__name__}")
        out = cls()
        for key, values in data.items():
            if key.startswith(SAE_PREFIX) and key[len(SAE_PREFIX) :].isdigit():
                out.saes[int(key[len(SAE_PREFIX) :])] = _numbers(SaeHeadline, values, f"{where}.{key}")
            else:
                out.pairs[key] = _numbers(PairHeadline, values, f"{where}.{key}")
        return out


_Scores = TypeVar("_Scores", PairHeadline, SaeHeadline)


def sae_key(layer: int) -> str:
    return f"{SAE_PREFIX}{layer:02d}"


def _finite(scores: PairHeadline | SaeHeadline) -> dict[str, float]:
    values = dataclasses.asdict(scores)
    return {key: float(value) for key, value in values.items() if math.isfinite(value)}


def _numbers(kind: type[_Scores], values: Any, where: str) -> _Scores:
    """`kind` from a JSON object of numbers; an unknown key or a non-number is an error naming it."""
    if not isinstance(values, dict):
        raise ArtifactError(f"{where}: expected an object of numbers")
    names = {f.name for f in dataclasses.fields(kind)}
    for key, value in values.items():
        if key not in names:
            raise ArtifactError(f"{where}: unknown key {key!r} for {kind.__name__}; rerun `ato report`")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArtifactError(f"{where}.{key}: expected a number, got {value!r}")
    return kind(**{key: float(value) for key, value in values.items()})
