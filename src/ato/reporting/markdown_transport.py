"""The summary's transport sections: CCA ceiling and efficiency η beside an exactly linear map's, and the
held-out subspace size beside its null."""

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
        "a true in-sample bound) is the most whitened variance any rank-r affine map of x_L explains. "
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
            "it sits in 1 − ceiling(d), the whitened variance no linear map of x_L reaches, which also holds "
            "what comes from other positions; R²_w∞ is the share of y's variance the best linear map carries.",
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
    rows = []
    for res in results:
        m = res.m
        rows.append(
            [
                res.name,
                fmt_int(m.heldout_subspace_size),
                fmt_pm(m.heldout_subspace_size_null, m.heldout_subspace_size_null_std, ".1f"),
                fmt(m.heldout_subspace_size_excess, "+.1f"),
                fmt(m.heldout_pr, ".1f"),
                fmt_pm(m.heldout_pr_null, m.heldout_pr_null_std, ".1f"),
                fmt(m.heldout_pr_excess, "+.1f"),
                fmt(m.design_effect_null, ".2f"),
                fmt(m.participation_ratio, ".1f"),
                fmt(m.participation_ratio_null, ".1f"),
                fmt_int(m.subspace_size),
                fmt(m.subspace_size_null, ".1f"),
            ]
        )
    return [
        "## Subspace size against its null",
        "",
        "Canonical directions from train, canonical correlations ρ measured on test (held out). Subspace "
        f"size = smallest r whose Σ_{{i≤r}} ρ⁺² reaches {s.evaluate.subspace_fraction:.0%} of the total "
        "(`evaluate.subspace_fraction`); PR = participation ratio (Σρ⁺)²/Σρ⁺². Null = the same statistic for "
        "independent x and y at the same d and effective n (Wishart simulation: mean ± sd; n / deff, the Kish "
        "design effect of the whitened cross-covariance over test documents, column deff); excess = observed − "
        "null mean. In sample (train ρ) for comparison only: its null alone is ≈ 0.72·d at d/n = 0.01.",
        "",
        md_table(
            [
                "pair",
                "held-out size",
                "null",
                "excess",
                "held-out PR",
                "null",
                "excess",
                "deff",
                "in-sample PR",
                "null",
                "in-sample size",
                "null",
            ],
            rows,
        ),
        "",
        *how_to_read(
            "An excess within a few null sd of 0 means no more shared structure than independent x and y show at "
            "this n and d. Once the excess is clearly positive, read the held-out size itself beside its null: "
            "it counts the directions that carry transport, which is a statement about linear structure, not "
            "about non-linear computation. Tokens of one document are correlated, so the null is drawn at the "
            "effective n (deff column), not at the raw token count. The in-sample PR and size mostly measure the "
            "noise floor.",
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
