"""The summary's transport sections: CCA ceiling and efficiency η beside an exactly linear map's, and the
held-out subspace size beside its null."""

from __future__ import annotations

import math

from .cells import DASH, fmt, fmt_int, fmt_pm, how_to_read, md_table
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
