"""The summary's transport sections: CCA ceiling and efficiency η beside an exactly linear map's, the
count of directions that carry transport, and how the held-out correlations spread."""

from __future__ import annotations

import math

from .cells import DASH, fmt, fmt_ci, fmt_int, fmt_pm, how_to_read, md_table
from .results import PairResults, rank_value
from .settings import SummarySettings


def efficiency_section(s: SummarySettings, results: list[PairResults]) -> list[str]:
    rows = []
    for res in results:
        m = res.m
        z = (m.eta_test - m.eta_expected) / m.eta_expected_std if m.eta_expected_std > 0 else math.nan
        rows.append(
            [
                res.name,
                fmt(m.ceiling_full),
                fmt(m.eta_test),
                fmt_pm(m.eta_expected, m.eta_expected_std),
                fmt(m.eta_ratio),
                fmt(z, "+.1f"),
                f"{fmt(m.design_effect_score, '.2f')} / {fmt(m.design_effect_r2, '.2f')}",
                fmt(m.eta_expected_iid),
                fmt(m.eta_train),
            ]
        )
    ceil_headers = _rank_headers(results, s.report.ranks, "ceiling")
    eta_headers = _rank_headers(results, s.report.ranks, "eta_rrr_test")
    shift_headers = _rank_headers(results, s.report.ranks, "eta_rrr_test_shift_removed")
    rank_rows = [
        [
            res.name,
            *[_rank_cell(res, "ceiling", r, label) for r, label in ceil_headers],
            *[_rank_cell(res, "eta_rrr_test", r, label) for r, label in eta_headers],
            *[_rank_cell(res, "eta_rrr_test_shift_removed", r, label) for r, label in shift_headers],
        ]
        for res in results
    ]
    return [
        "## CCA ceiling and transport efficiency η, beside the η of an exactly linear map",
        "",
        "ceiling(r) = (1/d) Σ ρ_i² over the r largest canonical correlations (train, pseudo-inverse whitening: "
        "a true in-sample bound) is the most whitened variance any rank-r affine map of x_L explains. "
        "η = whitened R² / ceiling(d) of the ATO. The ceiling is in sample and η(test) out of sample, so even "
        "an exactly linear map loses η: η expected is that map's η(test) at this n, d and ρ (analytic; ± its "
        "spread by simulation), ratio = η(test)/η expected, z = (η(test) − η expected)/sd. Tokens of one "
        "document are not independent: the reference is drawn at the effective sample size n / deff, with "
        "Kish design effects over the test documents (train: deff of the fit's noise x̃ε̃ᵀ; test: deff of the "
        'linearised test R²; docs/statistics.md#effective-n). The column "iid" shows what the reference '
        "would claim if every token were independent: a smaller spread and a higher expectation.",
        "",
        md_table(
            [
                "pair",
                "ceiling(d)",
                "η ATO (test)",
                "η expected (linear)",
                "ratio",
                "z",
                "deff train / test",
                "η expected if iid",
                "η ATO (train)",
            ],  # fmt: skip
            rows,
        ),
        "",
        "Per rank (`report.ranks` → the largest swept rank ≤ r): ceiling(r); η_RRR(r) of the reduced-rank "
        "regression map on test, raw and with the train→test mean shift removed, "
        "(R²_w(r) − R²_w(0)) / ceiling(r) (the raw value is dominated by the shift at small r).",
        "",
        md_table(
            [
                "pair",
                *[f"ceiling({label})" for _, label in ceil_headers],
                *[f"η_RRR({label})" for _, label in eta_headers],
                *[f"η_RRR({label}) shift removed" for _, label in shift_headers],
            ],
            rank_rows,
        ),
        "",
        *how_to_read(
            "A ratio within about 2 sd of 1 (|z| ≲ 2) means the data cannot tell the operator from exactly "
            "linear transport at this sample size, however far η is from 1. A ratio clearly below 1 (z ≪ −2) "
            "means the fitted map falls short of what a linear map reaches here. Non-linear computation, if "
            "any, sits in 1 − ceiling(d), the whitened variance no linear map of x_L reaches, and that share "
            "also holds what comes from other positions.",
        ),
    ]


def subspace_section(s: SummarySettings, results: list[PairResults]) -> list[str]:
    return [*_directions_part(results), *_spread_part(s, results)]


def _directions_part(results: list[PairResults]) -> list[str]:
    rows = []
    for res in results:
        m = res.m
        rows.append(
            [
                res.name,
                f"{fmt_int(m.transport_directions)} of {fmt_int(m.canonical_directions)}",
                f"{fmt_int(m.transport_directions_low)}–{fmt_int(m.transport_directions_high)}",
                fmt_ci(
                    m.transport_directions_share,
                    m.transport_directions_share_low,
                    m.transport_directions_share_high,
                    ".4f",
                ),
                fmt(m.transport_directions_threshold),
                fmt(m.design_effect_null, ".2f"),
            ]
        )
    return [
        "## Directions that carry transport",
        "",
        "Canonical directions from train, canonical correlations ρ measured on test (held out). A direction "
        "carries transport when its held-out ρ passes a one-sided step-down test (Holm–Šidák, family-wise "
        "α = 0.05) against independent x and y: sorted from the largest, the j-th must exceed the 95 % "
        "quantile of the largest of the m − j + 1 directions not yet passed, at the effective test n (n / deff, "
        "the Kish design effect of the whitened cross-covariance over test documents, column deff). Threshold "
        "= the first of these quantiles. Bootstrap = 2.5–97.5 % points over 200 resamplings of the test "
        "documents, train directions fixed. Share = Σρ² (train) of the counted directions over Σρ²: the part "
        "of ceiling(d) they carry.",
        "",
        md_table(
            [
                "pair",
                "directions carrying transport",
                "bootstrap 95 %",
                "share of ceiling(d) [bootstrap]",
                "threshold",
                "deff",
            ],
            rows,
        ),
        "",
        *how_to_read(
            "The count says how many of the d directions transport spreads over: with 95 % confidence no "
            "direction that carries nothing is counted, so the count is also a 95 % lower bound; a direction "
            "whose held-out ρ stays below the threshold may still carry a little, too little to tell at this n. "
            "The bootstrap's upper end re-adds test noise and so passes a few noise directions more. A count "
            "near d with a share near 1 says that transport is spread over the whole residual stream, not "
            "concentrated in a low-dimensional subspace; it is a statement about linear structure, not about "
            "non-linear computation.",
        ),
    ]


def _spread_part(s: SummarySettings, results: list[PairResults]) -> list[str]:
    rows = []
    for res in results:
        m = res.m
        rows.append(
            [
                res.name,
                fmt_int(m.heldout_subspace_size),
                fmt_pm(m.heldout_subspace_size_null, m.heldout_subspace_size_null_std, ".1f"),
                fmt(m.heldout_pr, ".1f"),
                fmt_pm(m.heldout_pr_null, m.heldout_pr_null_std, ".1f"),
                fmt(m.participation_ratio, ".1f"),
                fmt(m.participation_ratio_null, ".1f"),
                fmt_int(m.subspace_size),
                fmt(m.subspace_size_null, ".1f"),
            ]
        )
    return [
        "### How the canonical correlations spread (descriptions)",
        "",
        f"Subspace size = smallest r whose Σ_{{i≤r}} ρ⁺² reaches {s.evaluate.subspace_fraction:.0%} of the "
        "total (`evaluate.subspace_fraction`; held out: test ρ in train order); PR = participation ratio "
        "(Σρ⁺)²/Σρ⁺². Null = the same statistic for independent x and y at the same d and effective n "
        "(Wishart simulation: mean ± sd). In sample: train ρ.",
        "",
        md_table(
            [
                "pair",
                "held-out size",
                "null",
                "held-out PR",
                "null",
                "in-sample PR",
                "null",
                "in-sample size",
                "null",
            ],
            rows,
        ),
        "",
        *how_to_read(
            "These describe the shape of the correlation spectrum, not the amount of transport: neither grows "
            "with the number of directions that carry it (a planted rank-200 transport at ρ = 0.95 gives a PR "
            "near the null's, a full-rank one a size near the null's), so their distance from the null is not "
            "a count. Read the count above for that. The in-sample PR and size mostly measure the noise floor.",
        ),
    ]


def _rank_headers(results: list[PairResults], ranks: list[int], column: str) -> list[tuple[int, str]]:
    """(requested r, header label): the header names the swept rank actually used when all pairs agree."""
    out = []
    for r in ranks:
        used = {rank_value(res.efficiency, column, r)[1] for res in results if res.efficiency is not None}
        used.discard(None)
        label = f"r={used.pop()}" if len(used) == 1 else f"r≈{r}"
        out.append((r, label))
    return out


def _rank_cell(res: PairResults, column: str, r: int, label: str) -> str:
    value, used = rank_value(res.efficiency, column, r)
    text = fmt(value)
    if used is not None and label != f"r={used}" and text != DASH:
        text += f" (r={used})"
    return text
