"""The summary's causal sections: Δ log-perplexity per condition, the share of each reference's damage
the ATO recovers, and the same per position set."""

from __future__ import annotations

from ato.artifacts.causal import RecoveredShare, condition_labels, patched_conditions, recovered_references
from ato.kinds import kinds_for
from ato.params import CausalParams

from .cells import fmt, fmt_ci_hw, fmt_int, fmt_share, how_to_read, md_table
from .results import PairResults, headline_sets
from .settings import SummarySettings

REFERENCE_LABELS = {k.key("recovered_against"): k.label_in("recovered_against") for k in kinds_for("recovered_against")}


def _causal_references(results: list[PairResults]) -> list[str]:
    """The headline reference first, then the others of `recovered_references()`."""
    heads = {res.headline_reference for res in results if res.headline_reference is not None}
    head = heads.pop() if len(heads) == 1 else CausalParams().headline_reference
    return [head, *(r for r in recovered_references() if r != head)]


def _context_share(res: PairResults) -> RecoveredShare | None:
    """1 − Δ(context)/Δ(headline reference) on the headline set: the union context map's share (issue 22)."""
    return None if res.headline is None else res.headline.recovered_context


def causal_section(s: SummarySettings, results: list[PairResults]) -> list[str]:
    scope = s.report.causal_scope
    refs, conditions, labels = _causal_references(results), patched_conditions(), condition_labels()
    delta_rows = [
        [
            res.name,
            fmt(res.clean_logppl(scope)),
            *[fmt_ci_hw(*res.causal_delta(c, scope), res.causal_half_width(c, scope)) for c in conditions],
        ]
        for res in results
    ]
    share_rows = [
        [res.name, *[fmt_share(res.recovered_share(r), scope) for r in refs], fmt_share(_context_share(res), scope)]
        for res in results
    ]
    out = [
        "## Causal check (held-out test text)",
        "",
        *_causal_intro(s, results, refs[0]),
        md_table(
            ["pair", "clean log-ppl", *[f"Δ {labels[c].split('  ')[0]}" for c in conditions]],
            delta_rows,
        ),
        "",
        md_table(
            [
                "pair",
                *[
                    f"recovered vs {REFERENCE_LABELS[r]}" + (" (headline)" if i == 0 else "")
                    for i, r in enumerate(refs)
                ],
                f"context map: recovered vs {REFERENCE_LABELS[refs[0]]}",
            ],
            share_rows,
        ),
        "",
        *how_to_read(
            "Δ(ATO) with an interval above 0 is damage the linear map of x_L does not repair: computation it "
            "does not carry, non-linear or read from other positions. The headline reference, the mean update "
            "x_L + (ȳ_train − x̄_train), keeps the context x_L carries and replaces blocks L+1..L+k by their "
            "average update: its damage is the computation those blocks do, and the share vs it is the part of "
            "that computation the ATO carries. A share whose interval reaches 100 % means no lost computation "
            "is detectable with these sequences; the half-width is the smallest effect they resolve. Mean "
            "ablation erases the context too, so the identity alone “recovers” most of its damage: a high share "
            "vs mean ablation says the ATO keeps the context, not that it does the computation. A share vs "
            "identity whose interval includes 0 means the ATO repairs no more than copying x_L. Shares vs zero "
            "ablation flatter every patch and are shown for comparison only. “Degenerate” replaces a share "
            "whose reference does not damage more than the ATO by more than the interval of the difference "
            "Δ(reference) − Δ(ATO): a share of such a reference's damage measures nothing.",
        ),
    ]
    return out + _causal_per_set(results, scope, refs[0])


def _causal_intro(s: SummarySettings, results: list[PairResults], head: str) -> list[str]:
    scope = s.report.causal_scope
    scope_text = (
        "the predictions at or after the first patched position, the only ones a patch can change"
        if scope == "after"
        else "every prediction but the one made at BOS, which no patch can change"
    )
    headline_text = ", ".join(f"`{n}`" for n in headline_sets(results)) or "`all`"
    runs = {
        (c.n_sequences, c.seq_len, c.interval_method, c.interval_level, c.interval_n_units, c.interval_resamples)
        for c in (res.causal for res in results)
        if c is not None
    }
    data_text = "; ".join(
        f"{n} sequences × {t} tokens, {level:.0%} interval `{method}` over n = {units} sequences"
        + (f" ({resamples} resamples)" if method != "t" else "")
        for n, t, method, level, units, resamples in sorted(runs, key=str)
    )
    return [
        "The residual after block L+k is overwritten with each condition's value at the patched positions; "
        f"Δ = log-perplexity − clean log-perplexity (nats/token) over {scope_text} "
        f"(`report.causal_scope: {scope}`), shown as Δ [95 % interval] ± half-width. Recovered vs a reference "
        "= 1 − Δ(ATO)/Δ(reference), the share of that reference's damage the ATO repairs; headline reference: "
        f"{REFERENCE_LABELS[head]} (`causal.headline_reference`). A share is “unbounded” when the reference's "
        f"damage cannot be told from 0. Headline position set: {headline_text} (`all` = every non-BOS position). "
        f"Data: {data_text or 'no causal output yet'}.",
        "",
    ]


def _causal_per_set(results: list[PairResults], scope: str, head: str) -> list[str]:
    rows = [
        [
            res.name,
            set_name,
            fmt_int(entry.n_patched_tokens),
            fmt_ci_hw(*entry.ato.delta(scope), entry.ato.half_width(scope)),
            fmt_ci_hw(*entry.mean_update.delta(scope), entry.mean_update.half_width(scope)),
            fmt_ci_hw(*entry.train_mean.delta(scope), entry.train_mean.half_width(scope)),
            fmt_ci_hw(*entry.zero.delta(scope), entry.zero.half_width(scope)),
            fmt_share(entry.recovered_vs(head), scope),
        ]
        for res in results
        if res.causal is not None
        for set_name, entry in res.causal.position_sets.items()
    ]
    if not rows:
        return []
    header = ["pair", "position set", "patched tokens", "Δ ATO", "Δ mean update", "Δ train mean", "Δ zero"]
    header.append(f"recovered vs {REFERENCE_LABELS[head]}")
    return ["Per position set (`causal.position_sets`):", "", md_table(header, rows, n_left=2), ""]
