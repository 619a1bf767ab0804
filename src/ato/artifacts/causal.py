"""Causal check results (`ato causal_reference`, `ato causal` → report): log-perplexity of held-out
test text when the residual after block L+k is overwritten (docs/method.md#causal,
docs/statistics.md#intervals).

* `CausalReference` — reports/causal/reference/layer_NN.json (`ato causal_reference`): the conditions
  that depend only on the target layer T = L+k (clean, zero, train_mean), per sequence, computed once
  per T and shared by every pair with that target.
* `CausalSummary` — reports/causal/<pair>.json: numbers per position set and condition, every one
  with its interval, plus flat copies of the headline set's numbers at the top level (`ato_delta_all`,
  `recovered_all`, …). Written without a `format` key (numbers only); its keys are checked on read.
  Its headline Δ and recovered share reach reports/headline.json (`HeadlineMetrics`).
* `CausalSequences` — reports/causal/<pair>_sequences.json: which sequences were used and every
  per-sequence value behind the summary.

Conditions: `clean` (no patch) and the patched ones, `patched_conditions()`. Scopes: `all` (every
prediction but the one made at BOS, which no patch can change) and `after` (predictions at or after
the sequence's first patched position). "Recovered" is 1 − Δ(ato)/Δ(reference) against each of
`recovered_references()`; the headline is `causal.headline_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

from ..kinds import CLEAN_LABEL, keys_for, kinds_for
from ._io import OMIT_EMPTY, ArtifactError, Record

# The map kinds patched come from the registry (`ato.kinds`), asked at each use so that a kind registered
# later is patched, summarised and reported too.


def patched_conditions() -> tuple[str, ...]:
    """ato, identity, zero, bias_only, train_mean (+ registered causal kinds): display order."""
    return keys_for("causal")


def all_conditions() -> tuple[str, ...]:
    """clean, then the patched conditions."""
    return ("clean", *patched_conditions())


def recovered_references() -> tuple[str, ...]:
    """train_mean, zero, identity: the damage "recovered" is measured against."""
    return keys_for("recovered_against")


def condition_labels() -> dict[str, str]:
    """Every condition's label for tables and figures; the text before the two spaces is the short name."""
    return {CLEAN_LABEL: CLEAN_LABEL, **{k.key("causal"): k.label for k in kinds_for("causal")}}


SCOPES = ("all", "after")
Triplet = tuple[float, float, float]  # (point estimate, 95 % CI low, high)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown causal scope {scope!r} (one of {', '.join(SCOPES)})")
    return scope


@dataclass
class CleanScores:
    """Token-weighted log-perplexity (mean NLL, nats/token) of the unpatched model."""

    logppl_all: float  # over every prediction but the one made at BOS
    logppl_after: float  # over the predictions at/after the first patched position

    def logppl(self, scope: str) -> float:
        return float(getattr(self, f"logppl_{_check_scope(scope)}"))


@dataclass
class PatchedScores:
    """One patched condition: its log-perplexity and Δ vs clean, Δ = Σ_j (NLL sum_j − clean sum_j) /
    Σ_j tokens_j over sequences j, with its 95 % interval over sequences (`CausalSummary.interval_method`)."""

    logppl_all: float  # log-perplexity over every prediction but the one made at BOS
    logppl_after: float  # … over the predictions at/after the first patched position
    delta_all_mean: float  # Δ log-ppl vs clean, every prediction but the one made at BOS
    delta_all_lo: float  # 95 % interval
    delta_all_hi: float
    delta_all_half_width: float  # (hi − lo) / 2
    delta_after_mean: float  # Δ log-ppl vs clean, predictions at/after the first patch
    delta_after_lo: float
    delta_after_hi: float
    delta_after_half_width: float

    def logppl(self, scope: str) -> float:
        return float(getattr(self, f"logppl_{_check_scope(scope)}"))

    def delta(self, scope: str) -> Triplet:
        s = _check_scope(scope)
        return getattr(self, f"delta_{s}_mean"), getattr(self, f"delta_{s}_lo"), getattr(self, f"delta_{s}_hi")

    def half_width(self, scope: str) -> float:
        return float(getattr(self, f"delta_{_check_scope(scope)}_half_width"))


@dataclass
class RecoveredShare:
    """1 − Δ(ato)/Δ(reference): the share of a reference condition's damage the operator repairs, with
    its 95 % interval over sequences. NaN (written as null) where the reference does no damage at all;
    where its damage cannot be told from 0 at the interval's level the interval is unbounded: lo/hi
    are written as null and `<scope>_bounded` is false. `<scope>_degenerate`: the reference's damage
    does not exceed the ATO's by more than the interval of Δ(reference) − Δ(ATO) (its lower end ≤ 0),
    so the share is not reported (tables and figures say `DEGENERATE_REASON` instead of a number)."""

    reference: str  # the reference condition (one of `recovered_references()`)
    all_mean: float  # every prediction but the one made at BOS
    all_lo: float
    all_hi: float
    all_half_width: float  # (hi − lo) / 2
    all_bounded: bool  # false: the interval is (−∞, +∞)
    all_degenerate: bool  # true: reference damage not above the ATO's (the share is not reported)
    after_mean: float  # predictions at/after the first patched position
    after_lo: float
    after_hi: float
    after_half_width: float
    after_bounded: bool
    after_degenerate: bool

    def triplet(self, scope: str) -> Triplet:
        s = _check_scope(scope)
        return getattr(self, f"{s}_mean"), getattr(self, f"{s}_lo"), getattr(self, f"{s}_hi")

    def half_width(self, scope: str) -> float:
        return float(getattr(self, f"{_check_scope(scope)}_half_width"))

    def degenerate(self, scope: str) -> bool:
        return bool(getattr(self, f"{_check_scope(scope)}_degenerate"))


DEGENERATE_REASON = "reference damage not above the ATO's"


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
    train_mean: PatchedScores  # ȳ_train (mean ablation)
    mean_update: PatchedScores  # x_L + (ȳ_train − x̄_train): the residual carried, the computation averaged
    recovered: RecoveredShare  # against the headline reference (causal.headline_reference; `.reference`)
    recovered_vs_train_mean: RecoveredShare  # 1 − Δ(ato)/Δ(train_mean)
    recovered_vs_zero: RecoveredShare  # 1 − Δ(ato)/Δ(zero)
    recovered_vs_identity: RecoveredShare  # 1 − Δ(ato)/Δ(identity)
    recovered_vs_mean_update: RecoveredShare  # 1 − Δ(ato)/Δ(mean_update)
    # causal kinds registered beyond the fields above (`ato.kinds`), by key; not written when empty
    registered: dict[str, PatchedScores] = field(default_factory=dict, metadata=OMIT_EMPTY)  # other causal kinds
    # 1 − Δ(context)/Δ(headline reference): the share the union context map (`ato context`, issue 22)
    # recovers, beside the ATO's `recovered`; not written without the context condition
    recovered_context: RecoveredShare | None = field(default=None, metadata=OMIT_EMPTY)

    def patched(self, condition: str) -> PatchedScores:
        known = patched_conditions()
        if condition not in known:
            raise KeyError(f"unknown patched condition {condition!r} (one of {', '.join(known)})")
        if condition in TYPED_CONDITIONS:
            scores: PatchedScores = getattr(self, condition)
            return scores
        if condition not in self.registered:
            raise ArtifactError(f"causal summary without condition {condition!r}; rerun `ato causal`")
        return self.registered[condition]

    def recovered_vs(self, reference: str) -> RecoveredShare:
        known = recovered_references()
        if reference not in known:
            raise KeyError(f"unknown reference {reference!r} (one of {', '.join(known)})")
        share: RecoveredShare = getattr(self, f"recovered_vs_{reference}")
        return share


# the patched conditions with a field of their own in `PositionSetSummary` (the others: `registered`)
TYPED_CONDITIONS = frozenset(f.name for f in fields(PositionSetSummary) if f.type == "PatchedScores")


def headline_keys() -> list[str]:
    """The flat top-level keys of a causal summary (the headline set's numbers)."""
    keys = []
    for s in SCOPES:
        keys.append(f"clean_logppl_{s}")
        for c in patched_conditions():
            keys += [f"{c}_logppl_{s}", f"{c}_delta_{s}", f"{c}_delta_{s}_lo", f"{c}_delta_{s}_hi"]
            keys.append(f"{c}_delta_{s}_half_width")
        for prefix in ("recovered", *(f"recovered_vs_{r}" for r in recovered_references())):
            keys += [f"{prefix}_{s}", f"{prefix}_{s}_lo", f"{prefix}_{s}_hi", f"{prefix}_{s}_half_width"]
    return keys


@dataclass
class CausalSummary(Record):
    """One pair's causal check; the headline set is `all` when present, else the first set."""

    FORMAT: ClassVar[str] = "ato-causal/1"  # not written (numbers only); keys checked instead
    PRODUCER: ClassVar[str] = "causal"

    L: int  # layer whose residual feeds the patch values
    k: int  # layers spanned: the residual after block L+k is overwritten
    n_sequences: int  # held-out test sequences
    seq_len: int  # tokens per sequence (BOS first)
    seconds: float  # wall time of this pair's forward passes (ato, identity, bias_only; the shared
    # clean/zero/train_mean passes are in the target layer's CausalReference)
    tokens_per_second: float  # held-out tokens × (1 + conditions run here × position sets) per second
    headline_reference: str  # causal.headline_reference: what `recovered` is measured against
    interval_method: str  # causal.interval: how every interval was computed (ato.math.intervals)
    interval_level: float  # two-sided nominal coverage of every interval
    interval_n_units: int  # resampling units behind every interval: the sequences
    interval_resamples: int  # bootstrap resamples (causal.bootstrap_resamples; unused by `t`)
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
            for c in patched_conditions():
                scores = entry.patched(c)
                mean, lo, hi = scores.delta(s)
                flat |= {
                    f"{c}_logppl_{s}": scores.logppl(s),
                    f"{c}_delta_{s}": mean,
                    f"{c}_delta_{s}_lo": lo,
                    f"{c}_delta_{s}_hi": hi,
                }
                flat[f"{c}_delta_{s}_half_width"] = scores.half_width(s)
            references = recovered_references()
            shares = {"recovered": entry.recovered} | {f"recovered_vs_{r}": entry.recovered_vs(r) for r in references}
            for prefix, share in shares.items():
                mean, lo, hi = share.triplet(s)
                flat |= {
                    f"{prefix}_{s}": mean,
                    f"{prefix}_{s}_lo": lo,
                    f"{prefix}_{s}_hi": hi,
                    f"{prefix}_{s}_half_width": share.half_width(s),
                }
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
    nll_sum: dict[str, dict[str, list[float]]]  # condition → scope → summed NLL (what the intervals resample)
    mean_nll: dict[str, dict[str, list[float]]]  # condition → scope → mean NLL (0 where no token is in scope)


@dataclass
class CausalSequences(Record):
    """The held-out sequences of one pair's causal check and the per-sequence values."""

    FORMAT: ClassVar[str] = "ato-causal-sequences/1"
    PRODUCER: ClassVar[str] = "causal"

    pair: str  # pair name
    split: str  # always "test"
    reference: str  # the CausalReference file whose clean/zero/train_mean sums were used
    seq_len: int  # tokens per sequence
    sequence_offsets: list[int]  # row of each sequence's first token in the split
    doc_ids: list[int]  # document of each sequence
    conditions: list[str]  # `all_conditions()`
    scopes: dict[str, str]  # scope → what it covers
    position_sets: dict[str, SequenceDetail]  # per position set


SCOPE_TEXT = {
    "all": "every prediction but the one made at BOS (no patch changes it): positions 1..T-2 predicting 2..T-1",
    "after": "predictions made at or after the sequence's first patched position",
}


@dataclass
class ReferenceSet:
    """Per-sequence values of one position set at one target layer (lists run over the sequences)."""

    positions: Any  # the set as configured: a list of positions, or "all"
    n_patched: list[int]  # positions overwritten in each sequence
    first_patched_position: list[int]  # first patched position of each sequence that has one
    n_tokens: dict[str, list[int]]  # scope → predicted tokens in scope
    nll_sum: dict[str, dict[str, list[float]]]  # clean | zero | train_mean → scope → summed NLL


@dataclass
class CausalReference(Record):
    """The pair-independent conditions of one target layer T = L+k: clean, zero and train_mean (ȳ_train
    at T), per sequence and position set. Every pair with target T reads it (`ato causal`) and checks
    that its sequences, model, store and position sets are the ones this record was computed for."""

    FORMAT: ClassVar[str] = "ato-causal-reference/1"
    PRODUCER: ClassVar[str] = "causal_reference"

    layer: int  # T: the residual after block T is overwritten
    split: str  # always "test"
    seq_len: int  # tokens per sequence (BOS first)
    batch_size: int  # sequences per forward (causal.batch_size)
    sequence_offsets: list[int]  # row of each sequence's first token in the split
    doc_ids: list[int]  # document of each sequence
    model_digest: str  # weights digest of the model that ran
    store_digest: str | None  # content digest of the activation store the sequences came from
    mean_source: str  # the pair whose train statistics' mean_y is the train_mean value (any pair with target T)
    clean_nll: list[list[float]]  # [sequence][column j]: clean −log p(token j+1 | tokens ≤ j)
    position_sets: dict[str, ReferenceSet]  # per position set
    seconds: float  # wall time of this layer's forward passes
