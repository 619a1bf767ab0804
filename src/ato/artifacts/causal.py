"""Causal check results (`ato causal` → report): log-perplexity of held-out test text when the
residual after block L+k is overwritten (docs/method.md#causal, docs/contracts.md#causal).

* `CausalSummary` — reports/causal/<pair>.json, a DVC metrics file: numbers per position set and
  condition, plus flat copies of the headline set's numbers at the top level (`ato_delta_all`, …).
  Written without a `format` key so that `dvc metrics diff` compares numbers only.
* `CausalSequences` — reports/causal/<pair>_sequences.json: which sequences were used and every
  per-sequence value behind the summary.

Conditions: `clean` (no patch) and the patched ones in `PATCHED`. Scopes: `all` (every predicted
token) and `after` (predictions at or after the sequence's first patched position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ._io import ArtifactError, Record

PATCHED = ("ato", "identity", "zero", "bias_only", "train_mean")  # patched conditions, display order
CONDITIONS = ("clean", *PATCHED)
SCOPES = ("all", "after")
Triplet = tuple[float, float, float]  # (point estimate, 95 % CI low, high)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown causal scope {scope!r} (one of {', '.join(SCOPES)})")
    return scope


@dataclass
class CleanScores:
    """Token-weighted log-perplexity (mean NLL, nats/token) of the unpatched model."""

    logppl_all: float  # over every predicted token
    logppl_after: float  # over the predictions at/after the first patched position

    def logppl(self, scope: str) -> float:
        return float(getattr(self, f"logppl_{_check_scope(scope)}"))


@dataclass
class PatchedScores:
    """One patched condition: its log-perplexity and Δ vs clean with a paired-bootstrap 95 % CI."""

    logppl_all: float  # log-perplexity over every predicted token
    logppl_after: float  # … over the predictions at/after the first patched position
    delta_all_mean: float  # Δ log-ppl vs clean, every predicted token
    delta_all_lo: float  # 95 % CI
    delta_all_hi: float
    delta_after_mean: float  # Δ log-ppl vs clean, predictions at/after the first patch
    delta_after_lo: float
    delta_after_hi: float

    def logppl(self, scope: str) -> float:
        return float(getattr(self, f"logppl_{_check_scope(scope)}"))

    def delta(self, scope: str) -> Triplet:
        s = _check_scope(scope)
        return getattr(self, f"delta_{s}_mean"), getattr(self, f"delta_{s}_lo"), getattr(self, f"delta_{s}_hi")


@dataclass
class RecoveredShare:
    """1 − Δ(ato)/Δ(zero): the share of the zero-ablation damage the operator repairs (NaN, written
    as null, where Δ(zero) is 0), with its paired-bootstrap 95 % CI."""

    all_mean: float  # every predicted token
    all_lo: float
    all_hi: float
    after_mean: float  # predictions at/after the first patched position
    after_lo: float
    after_hi: float

    def triplet(self, scope: str) -> Triplet:
        s = _check_scope(scope)
        return getattr(self, f"{s}_mean"), getattr(self, f"{s}_lo"), getattr(self, f"{s}_hi")


@dataclass
class PositionSetSummary:
    """Every condition on one position set (`causal.position_sets`)."""

    n_patched_tokens: int  # residual positions overwritten, over all sequences
    first_patched_position: int  # smallest first patched position over sequences (−1: none)
    n_tokens_all: int  # predicted tokens in scope `all`
    n_tokens_after: int  # predicted tokens in scope `after`
    clean: CleanScores
    ato: PatchedScores  # W x_L + b
    identity: PatchedScores  # x_L
    zero: PatchedScores  # 0 (ablation: the damage reference)
    bias_only: PatchedScores  # b
    train_mean: PatchedScores  # ȳ_train
    recovered: RecoveredShare

    def patched(self, condition: str) -> PatchedScores:
        if condition not in PATCHED:
            raise KeyError(f"unknown patched condition {condition!r} (one of {', '.join(PATCHED)})")
        scores: PatchedScores = getattr(self, condition)
        return scores


def headline_keys() -> list[str]:
    """The flat top-level keys of a causal summary (the headline set's numbers)."""
    keys = []
    for s in SCOPES:
        keys.append(f"clean_logppl_{s}")
        for c in PATCHED:
            keys += [f"{c}_logppl_{s}", f"{c}_delta_{s}", f"{c}_delta_{s}_lo", f"{c}_delta_{s}_hi"]
        keys += [f"recovered_{s}", f"recovered_{s}_lo", f"recovered_{s}_hi"]
    return keys


@dataclass
class CausalSummary(Record):
    """One pair's causal check; the headline set is `all` when present, else the first set."""

    FORMAT: ClassVar[str] = "ato-causal/1"  # not written (DVC metrics file); keys checked instead
    PRODUCER: ClassVar[str] = "causal"

    L: int  # layer whose residual feeds the patch values
    k: int  # layers spanned: the residual after block L+k is overwritten
    n_sequences: int  # held-out test sequences
    seq_len: int  # tokens per sequence (BOS first)
    seconds: float  # wall time of this pair's forward passes
    tokens_per_second: float  # forward tokens (clean + every patched pass) per second
    position_sets: dict[str, PositionSetSummary]  # per position set

    @property
    def headline_set(self) -> str:
        if not self.position_sets:
            raise ArtifactError("causal summary without position sets")
        return "all" if "all" in self.position_sets else next(iter(self.position_sets))

    @property
    def headline(self) -> PositionSetSummary:
        return self.position_sets[self.headline_set]

    def headline_metrics(self) -> dict[str, float]:
        """The headline set's numbers under their flat names (`ato_delta_all`, `recovered_after_lo`, …)."""
        entry, flat = self.headline, {}
        for s in SCOPES:
            flat[f"clean_logppl_{s}"] = entry.clean.logppl(s)
            for c in PATCHED:
                scores = entry.patched(c)
                mean, lo, hi = scores.delta(s)
                flat |= {
                    f"{c}_logppl_{s}": scores.logppl(s),
                    f"{c}_delta_{s}": mean,
                    f"{c}_delta_{s}_lo": lo,
                    f"{c}_delta_{s}_hi": hi,
                }
            mean, lo, hi = entry.recovered.triplet(s)
            flat |= {f"recovered_{s}": mean, f"recovered_{s}_lo": lo, f"recovered_{s}_hi": hi}
        return flat

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        del out["format"]
        return {**out, **self.headline_metrics()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Self:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object for {cls.__name__}")
        flat = set(headline_keys())
        absent = sorted(flat - set(data))
        if absent:
            raise ArtifactError(f"{where}: missing key {absent[0]!r} for {cls.__name__}{cls._rerun()}")
        rest = {k: v for k, v in data.items() if k not in flat}
        rest.setdefault("format", cls.FORMAT)
        return super().from_dict(rest, where)


@dataclass
class SequenceDetail:
    """Per-sequence values of one position set (lists run over the sequences, in order)."""

    positions: Any  # the set as configured: a list of positions, or "all"
    n_patched: list[int]  # positions overwritten in each sequence
    first_patched_position: list[int]  # first patched position of each sequence that has one
    n_tokens: dict[str, list[int]]  # scope → predicted tokens in scope
    mean_nll: dict[str, dict[str, list[float]]]  # condition → scope → mean NLL (null: undefined)


@dataclass
class CausalSequences(Record):
    """The held-out sequences of one pair's causal check and the per-sequence values."""

    FORMAT: ClassVar[str] = "ato-causal-sequences/1"
    PRODUCER: ClassVar[str] = "causal"

    pair: str  # pair name
    split: str  # always "test"
    seq_len: int  # tokens per sequence
    sequence_offsets: list[int]  # row of each sequence's first token in the split
    doc_ids: list[int]  # document of each sequence
    conditions: list[str]  # CONDITIONS
    scopes: dict[str, str]  # scope → what it covers
    position_sets: dict[str, SequenceDetail]  # per position set


SCOPE_TEXT = {
    "all": "every predicted token (positions 1..T-1 predicted from 0..T-2)",
    "after": "predictions made at or after the sequence's first patched position",
}
