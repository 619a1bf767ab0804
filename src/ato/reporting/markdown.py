"""summary.md: every pair side by side in markdown tables, with links to every figure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ato.artifacts import Layout
from ato.artifacts.causal import REFERENCES, RecoveredShare
from ato.artifacts.metrics import OPERATOR_KEY
from ato.artifacts.model import model_label
from ato.kinds import kinds_for
from ato.params import EvaluateParams, Params, ReportParams
from ato.plotting import CONDITION_LABELS, CONDITIONS

from .feature_cards import LayerCards, cards_markdown
from .results import PairResults, headline_sets, rank_value

DASH = "—"
PAIR_FIGURES = ("efficiency", "feature_r2", "dim_r2", "causal")  # per-pair figures of evaluate and causal
CAPTIONS = {
    "heatmaps": "Headline scores over (L, k), η and held-out subspace size beside their references",
    "efficiency": "Transport efficiency η(r) and CCA ceiling(r) per k, held-out subspace size beside its null",
    "causal": "Causal check: Δ log-perplexity and damage recovered vs mean ablation, with 95 % intervals",
    "alpha": "Ridge penalty α → validation R²",
}


@dataclass
class SummarySettings:
    """What the summary text says about the run besides the per-pair numbers."""

    report: ReportParams
    evaluate: EvaluateParams
    include_bos: bool  # stats.include_bos
    model: str  # display name of the model
    root: Path  # project root: missing files are shown relative to it
    layout: Layout

    @classmethod
    def from_params(cls, params: Params) -> SummarySettings:
        return cls(
            params.report,
            params.evaluate,
            params.stats.include_bos,
            model_label(params.prepare),
            params.root,
            Layout.from_params(params),
        )


# --------------------------------------------------------------------------------------------
# Cells


def fmt(v: Any, spec: str = ".4f") -> str:
    v = _as_float(v)
    return format(v, spec) if math.isfinite(v) else DASH


def fmt_int(v: Any) -> str:
    v = _as_float(v)
    return str(int(round(v))) if math.isfinite(v) else DASH


def fmt_ci(m: float, lo: float, hi: float, spec: str = "+.4f") -> str:
    if not math.isfinite(m):
        return DASH
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return format(m, spec)
    return f"{format(m, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def fmt_ci_hw(m: float, lo: float, hi: float, half_width: float, spec: str = "+.4f") -> str:
    """Δ [lo, hi] ± half-width."""
    text = fmt_ci(m, lo, hi, spec)
    hw = _as_float(half_width)
    return text + f" ±{hw:.4f}" if text != DASH and math.isfinite(hw) else text


def fmt_pm(mean: Any, sd: Any, spec: str = ".4f") -> str:
    """mean ± sd (the sd left out where unknown)."""
    text, sd = fmt(mean, spec), _as_float(sd)
    return text + f" ± {format(sd, spec)}" if text != DASH and math.isfinite(sd) else text


def fmt_share(share: RecoveredShare | None, scope: str) -> str:
    """A recovered share: 81.2% [78.0%, 84.4%] ±3.2%, or its point with “interval unbounded”."""
    if share is None:
        return DASH
    mean, lo, hi = share.triplet(scope)
    if not math.isfinite(mean):
        return DASH
    if not getattr(share, f"{scope}_bounded"):
        return f"{mean:.1%} (interval unbounded)"
    return fmt_ci(mean, lo, hi, ".1%") + (f" ±{share.half_width(scope):.1%}" if math.isfinite(lo) else "")


def _as_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def md_table(header: list[str], rows: list[list[str]], n_left: int = 1) -> str:
    """A GitHub-flavoured markdown table; the first `n_left` columns left-aligned, numbers right-aligned."""
    align = [":--"] * n_left + ["--:"] * (len(header) - n_left)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


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


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


# --------------------------------------------------------------------------------------------
# Sections


def render_summary(
    s: SummarySettings,
    results: list[PairResults],
    figures: dict[str, Path],
    cards: list[LayerCards] | None = None,
    stale: dict[str, list[Path]] | None = None,
) -> str:
    """The whole summary; `cards` (per target layer: SAE gates and feature cards) mark every feature-level
    number of an SAE that missed its quality gates and add the compact feature cards; `stale` lists the
    outputs of pairs and layers no longer in `pairs:` (`ato.reporting.stale`)."""
    cards = cards or []
    sections = (
        _header(s, results),
        _sae_warning(results, cards),
        _missing(s, results),
        _stale(s, stale or {}),
        _residual(results),
        _alpha(results),
        _features(s, results, cards),
        cards_markdown(cards) if cards else [],
        _efficiency(s, results),
        _subspace(s, results),
        _causal(s, results),
        _figures(s, results, figures),
    )
    return "\n".join(line for section in sections for line in section)


def _how_to_read(*sentences: str) -> list[str]:
    return ["**How to read.** " + " ".join(sentences), ""]


def _header(s: SummarySettings, results: list[PairResults]) -> list[str]:
    def sizes(attr: str) -> str:
        values = sorted({v for v in (getattr(res.m, attr) for res in results) if math.isfinite(v)})
        return ", ".join(fmt_int(v) for v in values) or DASH

    return [
        "# ato — summary of the transport operators",
        "",
        f"Model: {s.model}. Pairs: {len(results)} ({', '.join(r.name for r in results)}). "
        "Every score is on the held-out **test** split unless marked otherwise; BOS/special tokens are "
        f"{'included' if s.include_bos else 'excluded'} (`stats.include_bos`). Tokens per pair: "
        f"train {sizes('n_train_tokens')}, validation {sizes('n_val_tokens')}, test {sizes('n_test_tokens')}. "
        "Every headline number stands beside its reference or null; each section ends with how to read it "
        "(docs/statistics.md).",
        "",
    ]


def _missing(s: SummarySettings, results: list[PairResults]) -> list[str]:
    missing = [(res.name, item) for res in results for item in res.missing]
    out = ["## Missing inputs", ""]
    if missing:
        out += [f"{len(missing)} input file(s) are missing; their cells read “{DASH}” and the figures mark them:", ""]
        out += [
            f"- **{name}**: {item.what} — `{_rel(item.path, s.root)}` (made by `{item.command}`)"
            for name, item in missing
        ]
    else:
        out.append("None: every pair has its evaluate, causal and tune outputs.")
    return [*out, ""]


def _stale(s: SummarySettings, stale: dict[str, list[Path]]) -> list[str]:
    if not stale:
        return []
    n = sum(len(paths) for paths in stale.values())
    out = [
        "## Stale outputs",
        "",
        f"{n} file(s) or folder(s) belong to pairs or target layers that are not in `pairs:` (left by an "
        "earlier run, of another model or of removed pairs). Nothing in this summary reads them; delete them "
        "or put the pairs back:",
        "",
    ]
    out += [f"- **{owner}**: " + ", ".join(f"`{_rel(p, s.root)}`" for p in paths) for owner, paths in stale.items()]
    return [*out, ""]


def _residual(results: list[PairResults]) -> list[str]:
    baselines = [k for k in kinds_for("evaluate") if k.key("evaluate") != OPERATOR_KEY]  # identity, mean, ols, …
    rows = []
    for res in results:
        m = res.m
        rows.append(
            [
                res.name,
                f"{res.pair.L} → {res.pair.target}",
                fmt(m.alpha, ".3g"),
                fmt(m.val_r2),
                fmt(m.ato.r2),
                fmt(m.ato.r2_weighted),
                *(fmt(m.predictor(k.key("evaluate")).r2) for k in baselines),
                fmt(m.ato.cosine),
                fmt(m.ato.mse, ".4g"),
            ]
        )
    return [
        "## Residual-space R² (test)",
        "",
        "R² is the uniform average over residual dimensions (what the reference reports); weighted = "
        "1 − SSE/SST over all dimensions. Baselines: identity ŷ = x, train mean ŷ = ȳ, OLS (α = 0). "
        "val R² is the tuning objective at the chosen α.",
        "",
        md_table(
            [
                "pair",
                "L → L+k",
                "α",
                "val R²",
                "R² ATO",
                "R² weighted",
                *(k.column("evaluate") for k in baselines),
                "token cosine",
                "MSE",
            ],
            rows,
        ),
        "",
        *_how_to_read(
            "R² ATO well above identity and train mean says the layers change the residual in a way a linear map "
            "of x_L predicts; R² ATO ≈ OLS says the ridge penalty plays no part. 1 − R² is an upper bound on "
            "what is *not* linear in x_L, not a measure of non-linear computation: it also holds what the "
            "blocks read from other positions (attention) and what no function of x_L predicts. A low R² "
            "alone is therefore no evidence of non-linear computation.",
        ),
    ]


def _unreliable(res: PairResults, cards: list[LayerCards]) -> bool:
    """The pair's feature-level numbers rest on an SAE that missed its gates (per evaluate's metrics, or
    the SAE's own report when evaluate has not run)."""
    if math.isfinite(res.m.sae_reliable):
        return res.m.sae_reliable < 1
    return any(lc.layer == res.pair.target and not lc.reliable for lc in cards)


def _gate_cell(res: PairResults, cards: list[LayerCards]) -> str:
    if not math.isfinite(res.m.sae_reliable):
        return DASH
    return "**UNRELIABLE**" if _unreliable(res, cards) else "pass"


def _sae_warning(results: list[PairResults], cards: list[LayerCards]) -> list[str]:
    """A banner per target layer whose SAE missed its quality gates, naming the pairs it affects."""
    by_layer = {lc.layer: lc for lc in cards}
    layers = sorted({res.pair.target for res in results} | set(by_layer))
    out = []
    for layer in layers:
        lc = by_layer.get(layer)
        pairs = [res.name for res in results if res.pair.target == layer and _unreliable(res, cards)]
        if pairs or (lc is not None and not lc.reliable):
            why = "; ".join(lc.failures) if lc is not None and lc.failures else "see reports/sae"
            out += [
                f"> **UNRELIABLE SAE at layer {layer}: {why}.** Its feature-level numbers (feature R², "
                f"transported / synthesised counts, feature cards) for "
                f"{', '.join(pairs or (lc.pairs if lc else []))} rest on an SAE that missed its quality gates.",
                "",
            ]
    return out


def _features(s: SummarySettings, results: list[PairResults], cards: list[LayerCards] | None = None) -> list[str]:
    ev, cards = s.evaluate, cards or []
    rows = []
    for res in results:
        m = res.m
        rows.append(
            [
                res.name,
                _gate_cell(res, cards),
                fmt_int(m.n_features),
                fmt_int(m.n_transported),
                fmt_int(m.n_synthesised),
                fmt_int(m.n_no_verdict),
                fmt(m.transported_fraction, ".3f"),
                fmt(m.ato.feature_r2_median),
                fmt(m.identity.feature_r2_median),
                fmt(m.ols.feature_r2_median),
                fmt(m.feature_pearson_median, ".3f"),
                fmt(m.feature_rms_ratio_median, ".3f"),
            ]
        )
    return [
        "## Feature space (SAE directions of layer L+k, test)",
        "",
        f"A feature is *transported* when its R² along the unit decoder direction is ≥ "
        f"{ev.transported_r2} over at least {ev.min_active_tokens} tokens where the SAE says it is "
        "active on the true residual (`evaluate.transported_r2`, `evaluate.min_active_tokens`), "
        "*synthesised* when it has enough tokens but a lower R², and gets no verdict otherwise. "
        "Medians are over the judged features. SAE gates: whether layer L+k's SAE passed its quality gates "
        "(reports/sae); the feature numbers of a row marked unreliable rest on an SAE that missed them.",
        "",
        *_sae_warning(results, cards),
        md_table(
            [
                "pair",
                "SAE gates",
                "features",
                "transported",
                "synthesised",
                "no verdict",
                "transported fraction",
                "feature R² median (ATO)",
                "identity",
                "OLS",
                "Pearson r median",
                "rms ratio median",
            ],
            rows,
        ),
        "",
        *_how_to_read(
            "Compare each median with the identity's: the share of features the ATO transports beyond copying "
            "x_L is what the layers add linearly. A *synthesised* feature is one the linear map does not "
            "reconstruct at this threshold, which makes it a candidate for non-linear computation (or for "
            "information from other positions), not evidence of it.",
        ),
    ]


def _alpha(results: list[PairResults]) -> list[str]:
    rows, n_val = [], set()
    for res in results:
        t = res.tuning
        if t is None:
            rows.append([res.name, *[DASH] * 7])
            continue
        n_val.add(t.n_val)
        if t.alpha_edge_warning:
            verdict = f"edge: {t.alpha_edge_warning}"
        elif t.alpha_immaterial:
            verdict = f"α immaterial at n_val = {t.n_val}"
        else:
            verdict = f"α matters at n_val = {t.n_val} (gain > noise)"
        rows.append(
            [
                res.name,
                fmt(t.alpha, ".3g"),
                t.objective,
                fmt(t.val_r2),
                fmt(t.alpha_flatness, ".2e"),
                fmt(t.alpha_gain, ".2e"),
                fmt(t.val_r2_noise, ".2e"),
                verdict,
            ]
        )
    return [
        "## Ridge penalty α",
        "",
        "The α → validation R² curve of `ato tune`: flatness = max − min of the curve over the searched range; "
        "gain = best R² − R² at the smallest α searched (≈ OLS); noise = standard error of the best validation "
        "R² at n_val tokens, (1 − R²)·√(2/n_val). α is *immaterial* when the gain is below the noise; an edge "
        "warning means the best α lies within one grid step of the searched range's end."
        + (f" n_val: {', '.join(str(n) for n in sorted(n_val))}." if n_val else ""),
        "",
        md_table(["pair", "chosen α", "objective", "val R²", "flatness", "gain", "noise", "verdict"], rows),
        "",
        *_how_to_read(
            "When α is immaterial, the chosen value is noise and the operator is in effect OLS (which is what "
            "η's linear reference assumes); differences between pairs' α mean nothing. An edge warning means "
            "the searched range should be widened before the α is quoted. α says nothing about non-linear "
            "computation either way.",
        ),
    ]


def _efficiency(s: SummarySettings, results: list[PairResults]) -> list[str]:
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
        *_how_to_read(
            "A ratio within about 2 sd of 1 (|z| ≲ 2) means the data cannot tell the operator from exactly "
            "linear transport at this sample size, however far η is from 1. A ratio clearly below 1 (z ≪ −2) "
            "means the fitted map falls short of what a linear map reaches here. Non-linear computation, if "
            "any, sits in 1 − ceiling(d), the whitened variance no linear map of x_L reaches, and that share "
            "also holds what comes from other positions.",
        ),
    ]


def _subspace(s: SummarySettings, results: list[PairResults]) -> list[str]:
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
        *_how_to_read(
            "An excess within a few null sd of 0 means no more shared structure than independent x and y show at "
            "this n and d. Once the excess is clearly positive, read the held-out size itself beside its null: "
            "it counts the directions that carry transport, which is a statement about linear structure, not "
            "about non-linear computation. Tokens of one document are correlated, so the null is drawn at the "
            "effective n (deff column), not at the raw token count. The in-sample PR and size mostly measure the "
            "noise floor.",
        ),
    ]


REFERENCE_LABELS = {k.key("recovered_against"): k.label_in("recovered_against") for k in kinds_for("recovered_against")}


def _causal_references(results: list[PairResults]) -> list[str]:
    """The headline reference first, then the others of REFERENCES."""
    heads = {res.headline_reference for res in results if res.headline_reference is not None}
    head = heads.pop() if len(heads) == 1 else "train_mean"
    return [head, *(r for r in REFERENCES if r != head)]


def _causal(s: SummarySettings, results: list[PairResults]) -> list[str]:
    scope = s.report.causal_scope
    refs = _causal_references(results)
    delta_rows = [
        [
            res.name,
            fmt(res.clean_logppl(scope)),
            *[fmt_ci_hw(*res.causal_delta(c, scope), res.causal_half_width(c, scope)) for c in CONDITIONS],
        ]
        for res in results
    ]
    share_rows = [[res.name, *[fmt_share(res.recovered_share(r), scope) for r in refs]] for res in results]
    out = [
        "## Causal check (held-out test text)",
        "",
        *_causal_intro(s, results, refs[0]),
        md_table(
            ["pair", "clean log-ppl", *[f"Δ {CONDITION_LABELS[c].split('  ')[0]}" for c in CONDITIONS]],
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
            ],
            share_rows,
        ),
        "",
        *_how_to_read(
            "Δ(ATO) with an interval above 0 is damage the linear map of x_L does not repair: computation it "
            "does not carry, non-linear or read from other positions. A recovered share vs mean ablation whose "
            "interval reaches 100 % means no lost computation is detectable with these sequences; the "
            "half-width is the smallest effect they resolve. A share vs identity whose interval includes 0 means "
            "the ATO repairs no more than copying x_L. Shares vs zero ablation flatter every patch (zeroing the "
            "residual is worse than a uniform guess) and are shown for comparison only.",
        ),
    ]
    return out + _causal_per_set(results, scope, refs[0])


def _causal_intro(s: SummarySettings, results: list[PairResults], head: str) -> list[str]:
    scope = s.report.causal_scope
    scope_text = (
        "the predictions at or after the first patched position, the only ones a patch can change"
        if scope == "after"
        else "every prediction of the sequence"
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
    header = ["pair", "position set", "patched tokens", "Δ ATO", "Δ train mean", "Δ zero"]
    header.append(f"recovered vs {REFERENCE_LABELS[head]}")
    return ["Per position set (`causal.position_sets`):", "", md_table(header, rows, n_left=2), ""]


def _figures(s: SummarySettings, results: list[PairResults], figures: dict[str, Path]) -> list[str]:
    reports, layout = s.layout.reports, s.layout
    out = ["## Figures", ""]
    for key, path in figures.items():
        out += [f"### {CAPTIONS[key]}", "", f"![{CAPTIONS[key]}]({_rel(path, reports)})", ""]
    per_pair = []
    for res in results:
        paths = [(kind, layout.pair_figure(res.name, kind)) for kind in PAIR_FIGURES]
        paths.append(("alpha", layout.tuning_figure(res.name)))
        links = [f"[{kind}]({_rel(p, reports)})" for kind, p in paths if p.exists()]
        per_pair.append(f"- {res.name}: {', '.join(links) if links else DASH + ' (no per-pair figures yet)'}")
    return [*out, "Per-pair figures:", "", *per_pair, ""]
