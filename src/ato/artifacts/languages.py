"""Transport across languages (`ato languages`): the English-fitted operators scored on other languages'
text, maps fitted per language, their transfer matrix and subspace overlaps, and what a pooled map keeps.

* `LanguageReport` — reports/languages/transfer.json: every number beside its reference (the
  language's own map, the identity, mean ablation, the same language's split-half overlap, r/d).
* reports/languages/metrics.json — the same headline numbers as nested `{pair: {language: {name:
  number}}}` (`LanguageReport.metrics`; no strings).
* reports/languages/scores.csv — one row per (pair, language), the `dvc plots` table (`SCORE_COLUMNS`).

Definitions: docs/method.md#languages; file layout: docs/contracts.md#languages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ._io import Record


@dataclass
class LanguageSource:
    """Where one language's text came from and how much of it was used."""

    source: str  # `store` (the reference language: the activation store's splits), `embedded`, or a file/dir
    n_fit_tokens: int  # fit tokens behind its maps (TRAIN documents; BOS/special excluded unless stats.include_bos)
    n_test_tokens: int  # test tokens every map is scored on (TEST documents; same exclusion)
    fit_documents: int  # documents the fit tokens come from
    test_documents: int  # documents the test tokens come from
    causal_sequences: int  # test sequences of the causal check (cut to causal_seq_len tokens)
    clean_logppl: float  # the unpatched model's log-perplexity on them (nats/token, scored predictions)


@dataclass
class IntervalScore:
    """A causal statistic with its interval over sequences."""

    mean: float  # estimate on all sequences
    lo: float  # lower bound (interval_level, interval_method)
    hi: float  # upper bound
    half_width: float  # (hi − lo) / 2


@dataclass
class LanguageScores:
    """One pair on one language's TEST tokens: the English operator beside its references."""

    alpha: float  # ridge α of this language's own map (languages.alpha_scaling of the operator's α)
    r2_operator: float  # R² (uniform over dimensions) of the English operator
    r2_recentred: float  # … of the English W with this language's intercept ȳ − W x̄ (its fit rows): W alone
    r2_own: float  # … of the map fitted on this language's fit tokens (same n for every language)
    r2_pooled: float  # … of one map fitted on every language's fit tokens together
    r2_identity: float  # … of ŷ = x (pure carry-over)
    r2w_operator: float  # variance-weighted R² of the English operator
    r2w_recentred: float  # … of the English W with this language's intercept
    r2w_own: float  # … of the own map
    r2w_pooled: float  # … of the pooled map
    r2w_identity: float  # … of the identity
    tracking_operator: float  # canonical tracking ∈ [0, 1] of the English operator on test (ato.math.transfer)
    tracking_own: float  # … of the own map: the reference, a map fitted on as many of this language's tokens
    top_directions: int  # principal directions of test y holding 90 % of its variance (the high-variance ones)
    r2w_top_operator: float  # R²_w of the English operator on those directions
    r2w_rest_operator: float  # … on the other, low-variance directions
    r2w_top_own: float  # R²_w of the own map on the high-variance directions
    r2w_rest_own: float  # … on the low-variance ones
    feature_r2_operator: float  # median feature-space R² of the English operator over the judged features
    feature_r2_own: float  # … of the own map
    feature_r2_identity: float  # … of the identity
    transported_fraction_operator: float  # judged features with R² ≥ evaluate.transported_r2 (English operator)
    transported_fraction_own: float  # … (own map)
    n_judged_features: int  # kept features active on ≥ evaluate.min_active_tokens of these test tokens
    delta_operator: IntervalScore  # Δ log-ppl vs clean, residual L+k patched by the English operator
    delta_own: IntervalScore  # … by the own map (NaN unless languages.causal_own)
    delta_mean: IntervalScore  # … by this language's ȳ (mean ablation: the damage reference)
    recovered: IntervalScore  # 1 − Δ(operator)/Δ(mean): share of the mean-ablation damage repaired
    recovered_bounded: bool  # false: mean ablation's damage is not distinguishable from 0 (interval ±∞)


@dataclass
class PairTransfer:
    """One pair across languages. Matrices are [row language][column language] in `languages` order."""

    L: int  # input layer
    k: int  # layers spanned
    alpha_operator: float  # the English operator's ridge α (its config.json)
    n_operator_tokens: float  # the English operator's training tokens
    feature_reliable: bool  # the target layer's SAE passed every quality gate (SaeInfo.reliable)
    scores: dict[str, LanguageScores]  # language → its scores
    transfer_r2: list[list[float]]  # map fitted on the row language, scored on the column language's test (R²)
    transfer_r2_weighted: list[list[float]]  # the same, variance-weighted R²
    overlap_write: list[list[float]]  # mean cos² of the top-r write subspaces of (W − I)S; diagonal: split halves
    overlap_read: list[list[float]]  # the same for the read subspaces (whitened input coordinates)
    shared_write: list[list[float]]  # top-r write directions with principal cos² ≥ shared_threshold
    shared_dimension: int  # write directions shared (mean cos² ≥ shared_threshold) by every language's map
    overlap_random: float  # r/d: the expected overlap of independent random r-dimensional subspaces


@dataclass
class LanguageReport(Record):
    """`ato languages`: the English operators on other languages, per-language maps compared."""

    FORMAT: ClassVar[str] = "ato-languages/1"
    PRODUCER: ClassVar[str] = "languages"

    reference: str  # the activation store's language (corpus.language): the operators were fitted on it
    languages: list[str]  # reference first: the row/column order of every matrix
    sources: dict[str, LanguageSource]  # language → its text
    pairs: dict[str, PairTransfer]  # pair name → its results
    alpha_scaling: str  # per_token (α·n/n_operator: the operator's penalty per token) or absolute
    overlap_rank: int  # r of the compared update subspaces
    shared_threshold: float  # cos² at or above which a direction counts as shared
    causal_seq_len: int  # tokens per causal sequence (BOS first, never patched)
    causal_scope: str  # predictions scored: at/after the first patched position
    interval_method: str  # causal.interval: method of every causal interval (over sequences)
    interval_level: float  # its two-sided level
    seconds: float  # wall time of the stage
    notes: list[str] = field(default_factory=list)  # caveats, e.g. an SAE that failed its quality gates

    METRICS: ClassVar[tuple[str, ...]] = (
        "r2_operator",
        "r2w_operator",
        "r2_recentred",
        "r2w_recentred",
        "r2_own",
        "r2w_own",
        "r2_pooled",
        "r2w_pooled",
        "r2_identity",
        "r2w_identity",
        "tracking_operator",
        "tracking_own",
        "r2w_top_operator",
        "r2w_rest_operator",
        "r2w_top_own",
        "r2w_rest_own",
        "feature_r2_operator",
        "feature_r2_own",
    )

    def metrics(self) -> dict[str, Any]:
        """{pair: {language: {name: number}}} of the headline numbers (non-finite values left out)."""
        out: dict[str, Any] = {}
        for name, pair in self.pairs.items():
            out[name] = {}
            for lang, s in pair.scores.items():
                row = {key: getattr(s, key) for key in self.METRICS}
                row |= {"delta_operator": s.delta_operator.mean, "delta_mean": s.delta_mean.mean}
                row |= {"recovered": s.recovered.mean}
                out[name][lang] = {k: float(v) for k, v in row.items() if math.isfinite(v)}
        return out


SCORE_COLUMNS = (
    "pair",
    "language",
    "r2_operator",
    "r2w_operator",
    "r2_recentred",
    "r2w_recentred",
    "r2_own",
    "r2w_own",
    "r2_pooled",
    "r2w_pooled",
    "r2_identity",
    "r2w_identity",
    "tracking_operator",
    "tracking_own",
    "r2w_top_operator",
    "r2w_rest_operator",
    "r2w_top_own",
    "r2w_rest_own",
    "feature_r2_operator",
    "feature_r2_own",
    "feature_r2_identity",
    "delta_operator",
    "delta_operator_lo",
    "delta_operator_hi",
    "delta_own",
    "delta_mean",
    "recovered",
)


def score_rows(report: LanguageReport) -> list[list[Any]]:
    """One row of SCORE_COLUMNS per (pair, language)."""
    rows = []
    for name, pair in report.pairs.items():
        for lang in report.languages:
            s = asdict(pair.scores[lang])
            flat = {**s, **{f"{k}_{b}": s[k][b] for k in ("delta_operator",) for b in ("lo", "hi")}}
            flat |= {k: s[k]["mean"] for k in ("delta_operator", "delta_own", "delta_mean", "recovered")}
            rows.append([name, lang, *(flat[c] for c in SCORE_COLUMNS[2:])])
    return rows
