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
                fmt(m.eta_expected_sandwich),
                fmt(m.eta_ratio_sandwich),
                fmt(m.heteroscedasticity, ".2f"),
                fmt(m.eta_train),
            ]
        )
    sd_error = 1 / math.sqrt(2 * (s.evaluate.null_replicates - 1)) if s.evaluate.null_replicates > 1 else math.nan
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
        "a true in-sample bound) is the most whitened variance any rank-r affine map of x_L at the same position "
        "explains; a map that also reads other positions is bounded by the budget's context ceiling instead. "
        "η compares the ATO with its own bound, so it says nothing of what other positions add (the budget's moved). "
        "η = whitened R² / ceiling(d) of the ATO. The ceiling is in sample and η(test) out of sample, so even "
        "an exactly linear map loses η: η expected is that map's η(test) at this n, d and ρ (analytic; ± its "
        "spread by simulation), ratio = η(test)/η expected, z = (η(test) − η expected)/sd. Tokens of one "
        "document are not independent: the reference is drawn at the effective sample size n / deff, with "
        "Kish design effects over the test documents (train: deff of the fit's noise x̃ε̃ᵀ; test: deff of the "
        'linearised test R²; docs/statistics.md#effective-n). The column "iid" shows what the reference '
        "would claim if every token were independent: a smaller spread and a higher expectation. "
        "Both assume the error's size does not depend on x; the sandwich reference drops that assumption: "
        "OLS's estimation error grows with κ = mean ‖x̃‖²‖ε̃‖² / (mean ‖x̃‖² · mean ‖ε̃‖²) (1 when it does "
        "not), so it is the same reference at n_eff / κ (first order; docs/statistics.md#learning-curve). "
        f"The sd behind z comes from {s.evaluate.null_replicates} Wishart replicates "
        f"(`evaluate.null_replicates`): it has a relative error of about {sd_error:.0%} itself, and so has z.",
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
                "η expected (sandwich)",
                "ratio (sandwich)",
                "κ",
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
        *learning_curve_section(results),
    ]


def learning_curve_section(results: list[PairResults]) -> list[str]:
    """η and R²_w of the ridge map fitted on 1/8 … all of train, and their values at n → ∞."""
    rows = []
    for res in results:
        m = res.m
        rows.append(
            [
                res.name,
                *[fmt(getattr(m, f"curve_eta_f{f}")) for f in (8, 4, 2, 1)],
                fmt_ci(m.eta_inf, m.eta_inf_lo, m.eta_inf_hi, ".4f"),
                fmt_ci(m.eta_shortfall, m.eta_shortfall_lo, m.eta_shortfall_hi, "+.4f"),
                shortfall_verdict(m.eta_shortfall_lo, m.eta_shortfall_hi),
                fmt(m.curve_r2w_f8),
                fmt(m.curve_r2w_f1),
                fmt_ci(m.r2w_inf, m.r2w_inf_lo, m.r2w_inf_hi, ".4f"),
            ]
        )
    return [
        "### Learning curve: the shortfall that more data would not remove",
        "",
        "The ridge map (the operator's α) fitted on nested document subsets of train (1/8, 1/4, 1/2, all: "
        "`evaluate.curve_blocks` blocks of documents, mean over 4 random orders of the blocks), each scored on "
        "the same test split; η of a subset = "
        "whitened R²(test) / that subset's own in-sample ceiling (at “all”, the η above). η and R²_w are "
        "extrapolated to n → ∞ by a straight line in 1/n; the 95 % interval adds the sd of a bootstrap "
        "over the train blocks (`evaluate.curve_resamples`) and the test split's own sd (clustered by "
        "document) in quadrature. Shortfall = 1 − η∞ (docs/statistics.md#learning-curve).",
        "",
        md_table(
            [
                "pair",
                "η (1/8)",
                "η (1/4)",
                "η (1/2)",
                "η (all)",
                "η∞ [95 %]",
                "shortfall 1 − η∞ [95 %]",
                "reads",
                "R²_w (1/8)",
                "R²_w (all)",
                "R²_w∞ [95 %]",
            ],
            rows,
        ),
        "",
        *how_to_read(
            "The ratio and z above compare η(test) with what an exactly linear map reaches at this n; the "
            "learning curve asks the question they cannot settle, whether the gap survives more data. η rising "
            "along the curve is finite-sample error: it is all that separates η from 1 when the shortfall's "
            "interval contains 0 (“no shortfall shown”), however low the ratio or z. “Falls short of linear” "
            "is said only when the interval lies above 0: the train-fitted map loses part of the linearly "
            "predictable variance on the test documents even with unlimited train data (train and test "
            "documents differ, or the curve bends away from 1/n). A shortfall below 0 (η∞ above 1, “above "
            "linear”) is not better-than-linear transport: no map beats the ceiling on its own rows, so it says "
            "the test documents are more linearly predictable than train's. A ratio above 1 in the table above "
            "is read the same way, or as a reference that overstates the finite-sample loss. Non-linear "
            "computation, if any, is not a shortfall of η at all (η∞ is 1 for any law train and test share): "
            "it sits in 1 − ceiling(d), the whitened variance no linear map of x_t reaches. Of that, the context "
            "ceiling's excess over ceiling(d) is reachable linearly from earlier positions (the budget's moved, "
            "on its own scale), and only 1 − context ceiling is left to non-linear computation. R²_w∞ is the "
            "share of y's variance the best same-position map carries (the budget's carried ∞).",
        ),
    ]


def shortfall_verdict(lo: float, hi: float) -> str:
    """The words the interval of 1 − η∞ supports."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return DASH
    if lo > 0:
        return "falls short of linear"
    if hi < 0:
        return "above linear (test easier)"
    return "no shortfall shown"


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
