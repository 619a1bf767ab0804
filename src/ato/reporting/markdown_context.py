"""The summary's opening section: every pair's variance budget (`ato context` → reports/context/<pair>.json,
`ContextBudget`) — carried by the same-position ATO, moved from other positions by a context map,
computed (the rest) — each share beside its interval, its learning-curve value at n → ∞ and its
references (the identity's R²_w, p/n, the same-position and context CCA ceilings)."""

from __future__ import annotations

import math
from collections import Counter

from ato.artifacts.context import BUDGET_SHARES, CONTEXT_KINDS, ContextBudget, Estimate

from .cells import DASH, fmt, fmt_int, how_to_read, md_table
from .results import PairResults

INCREMENTS = ("lagged", "prefix", "routed")  # the input blocks joining the map, in this order
FEATURE_READINGS = ("transported", "moved", "synthesised", "undetermined")  # `ContextFeatureVerdicts.verdict`


def fmt_estimate(e: Estimate, spec: str = ".3f") -> str:
    """A share with its interval and its value at n → ∞: 0.031 [0.024, 0.038] (∞: 0.029)."""
    if not math.isfinite(e.value):
        return DASH
    text = format(e.value, spec)
    if math.isfinite(e.low) and math.isfinite(e.high):
        text += f" [{format(e.low, spec)}, {format(e.high, spec)}]"
    return text + (f" (∞: {format(e.extrapolated, spec)})" if math.isfinite(e.extrapolated) else "")


def _interval(e: Estimate, spec: str = ".3f") -> str:
    """The n → ∞ value with its interval (the learning curve's own)."""
    if not math.isfinite(e.extrapolated):
        return DASH
    low, high = e.extrapolated_low, e.extrapolated_high
    bounds = f" [{format(low, spec)}, {format(high, spec)}]" if math.isfinite(low) and math.isfinite(high) else ""
    return format(e.extrapolated, spec) + bounds


def _feature_counts(b: ContextBudget) -> str:
    """transported / moved / synthesised / undetermined counts of the judged SAE features."""
    if not b.features.verdict:
        return DASH
    counts = Counter(b.features.verdict)
    return " / ".join(str(counts[v]) for v in FEATURE_READINGS)


def _budget_row(res: PairResults) -> list[str]:
    b = res.context
    if b is None:
        return [res.name, "no budget (`dvc repro context` has not run)", *[DASH] * 10]
    union = b.kinds.get("context")
    return [
        res.name,
        fmt_estimate(b.carried),
        fmt_estimate(b.moved),
        *(fmt_estimate(b.increments.get(kind, Estimate())) for kind in INCREMENTS),
        fmt_estimate(b.computed),
        fmt(b.identity_r2_w, ".3f"),
        fmt(union.p_over_n if union else math.nan, ".3f"),
        fmt(b.ceiling_same, ".3f"),
        fmt(b.ceiling_context, ".3f"),
        _feature_counts(b),
    ]


def _maps_row(res: PairResults) -> list[str]:
    b = res.context
    if b is None:
        return [res.name, *[DASH] * (len(CONTEXT_KINDS) + len(BUDGET_SHARES))]
    maps = []
    for kind in CONTEXT_KINDS:
        score = b.kinds.get(kind)
        maps.append(DASH if score is None else f"{fmt(score.r2_w.value, '.3f')} ({fmt(score.p_over_n, '.3f')})")
    return [res.name, *maps, *(_interval(getattr(b, share)) for share in BUDGET_SHARES)]


def _sizes(budgets: list[ContextBudget]) -> str:
    def values(attr: str) -> str:
        return ", ".join(fmt_int(v) for v in sorted({getattr(b, attr) for b in budgets}))

    intervals = "; ".join(sorted({b.interval for b in budgets if b.interval}))
    lags = ", ".join(str(v) for v in sorted({b.lags for b in budgets}))
    return (
        f"Lags m = {lags}. Tokens: train {values('n_train')}, validation {values('n_val')}, test {values('n_test')} "
        f"({values('n_docs_test')} test sequences). Intervals: {intervals or DASH}."
    )


def budget_section(results: list[PairResults]) -> list[str]:
    """The budget table, the maps' own scores and n → ∞ values, and how to read them."""
    budgets = [res.context for res in results if res.context is not None]
    sizes = [_sizes(budgets), ""] if budgets else []
    missing = [res.name for res in results if res.context is None]
    note = [f"No budget for {', '.join(missing)}: its row says so (stage `context` not run).", ""] if missing else []
    return [
        "## Carried, moved or computed: the variance budget (test)",
        "",
        "Each pair's target y_{L+k} on the variance-weighted scale R²_w (docs/method.md#context). **Carried** = "
        "R²_w of the same-position map ŷ_t = W x_t + b (the ATO, refitted on these tokens). **Moved** = what a "
        "map that also reads layer L at earlier positions s ≤ t of the same sequence adds: the union of the lags "
        "x_{t−1} … x_{t−m}, the prefix mean and the routed inputs (block L+j's own attention pattern of the "
        "clean forward applied to layer L's values, j = 1 … k); the increments are its gains as the lagged, "
        "prefix and routed blocks join in that order. **Computed** = 1 − R²_w of the union map. Each cell: "
        "value [interval] (∞: its learning-curve value at n_train → ∞). For scale: the identity ŷ = x_t's "
        "R²_w, p/n of the union map, and the CCA ceilings (whitened, train) of x_t alone and of every "
        "context input. Features: the judged SAE features of layer L+k read across maps, transported / "
        "moved / synthesised / undetermined (feature cards).",
        "",
        *sizes,
        *note,
        md_table(
            [
                "pair",
                "carried (ATO)",
                "moved",
                "lagged",
                "+ prefix",
                "+ routed",
                "computed",
                "identity R²_w",
                "p/n (union)",
                "ceiling x_t",
                "ceiling context",
                "features T / M / S / U",
            ],
            [_budget_row(res) for res in results],
        ),
        "",
        "Each map's test R²_w (p/n), and the budget at n_train → ∞ with the learning curve's interval:",
        "",
        md_table(
            ["pair", *CONTEXT_KINDS, *(f"{share} ∞" for share in BUDGET_SHARES)],
            [_maps_row(res) for res in results],
        ),
        "",
        *how_to_read(
            "Carried + moved + computed = 1. Moved is variance a linear map reads from earlier positions and "
            "the same-position map cannot: the lagged and prefix increments a fixed look-back, the routed one "
            "what attention's mixing adds beyond it. The routed inputs take each pattern from the clean forward: "
            "where to look is computed by the model and handed to the map, so routed counts what attention "
            "carries, not how it chooses. Computed is what no map linear in these inputs explains, with the "
            "union map's finite-sample loss: an upper bound on the non-linear computation of blocks L+1 … L+k "
            "other than the choice of pattern (the maps do not span every linear function of the prefix). Read "
            "the observed values with their intervals. The ∞ values extrapolate a line in 1/n through nested "
            "train fractions; at the smallest fraction the union map's p/n is 8× the one shown, where ridge's "
            "excess error is far from linear in 1/n, so the union's ∞ over-shoots (computed ∞ can reach 0 or "
            "below): treat the union's ∞ as unreliable until the curve is fitted in 1/(n − p). The ceiling "
            "of x_t bounds the ATO, not a map that reads other positions: the context ceiling bounds those "
            "(both whitened and in sample, so compare them with each other, not with R²_w).",
        ),
    ]
