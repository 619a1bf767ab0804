"""summary.md: every pair side by side in markdown tables, with links to every figure."""

from __future__ import annotations

import math
from pathlib import Path

from ato.artifacts.metrics import OPERATOR_KEY
from ato.kinds import kinds_for

from .cells import DASH, fmt, fmt_ci, fmt_int, how_to_read, md_table
from .feature_cards import LayerCards, cards_markdown
from .markdown_causal import causal_section
from .markdown_context import budget_section
from .markdown_sae import sae_section
from .markdown_transport import efficiency_section, subspace_section
from .results import PairResults
from .settings import SummarySettings

PAIR_FIGURES = ("efficiency", "feature_r2", "dim_r2", "causal")  # per-pair figures of evaluate and causal
CAPTIONS = {
    "budget": "Variance budget per pair: carried / moved / computed (R²_w, test) with intervals; moved's increments",
    "heatmaps": "Headline scores over (L, k), η beside its reference and the directions that carry transport",
    "efficiency": "Transport efficiency η(r) and CCA ceiling(r) per k, held-out subspace size beside its null",
    "causal": "Causal check: Δ log-perplexity and damage recovered vs mean ablation, with 95 % intervals",
    "alpha": "Ridge penalty α → validation R²",
    "learning_curve": "η(test) on nested train subsets and its value at n → ∞ (learning curve)",
}


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
        budget_section(results),
        _sae_warning(results, cards),
        _missing(s, results),
        _stale(s, stale or {}),
        _residual(results),
        _alpha(results),
        sae_section(s, results),
        _features(s, results, cards),
        cards_markdown(cards) if cards else [],
        efficiency_section(s, results),
        subspace_section(s, results),
        causal_section(s, results),
        _figures(s, results, figures),
    )
    return "\n".join(line for section in sections for line in section)


def _header(s: SummarySettings, results: list[PairResults]) -> list[str]:
    def sizes(attr: str) -> str:
        values = sorted({v for v in (getattr(res.m, attr) for res in results) if math.isfinite(v)})
        return ", ".join(fmt_int(v) for v in values) or DASH

    return [
        "# ato — summary of the transport operators",
        "",
        *_smoke_banner(s.report.profile),
        f"Model: {s.model}. Pairs: {len(results)} ({', '.join(r.name for r in results)}). "
        "Every score is on the held-out **test** split unless marked otherwise; BOS/special tokens are "
        f"{'included' if s.include_bos else 'excluded'} (`stats.include_bos`). Tokens per pair: "
        f"train {sizes('n_train_tokens')}, validation {sizes('n_val_tokens')}, test {sizes('n_test_tokens')}. "
        "Every headline number stands beside its reference or null; each section ends with how to read it "
        "(docs/statistics.md).",
        "",
    ]


def _smoke_banner(profile: str) -> list[str]:
    """A run of a reduced params profile says so before any number: its sizes are too small to read."""
    if profile == "default":
        return []
    return [
        f"> **SMOKE RUN — params profile `{profile}`** (`scripts/repro.sh --profile {profile}`): fewer tokens, "
        "pairs, trials, SAE steps and causal sequences than the default. It shows that every stage runs and "
        "what each section looks like; its numbers, intervals and gates are not results. Run the default "
        "(`bash scripts/repro.sh`, `report.profile: default`) for those.",
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
        out.append("None: every pair has its evaluate, causal, tune and context outputs.")
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
                *(
                    fmt(getattr(m.predictor(k.key("evaluate")), attr))
                    for k in baselines
                    for attr in ("r2", "r2_weighted")
                ),
                fmt(m.ato.cosine),
                fmt(m.ato.mse, ".4g"),
            ]
        )
    return [
        "## Residual-space R² (test)",
        "",
        "R² is the uniform average over residual dimensions (what the reference reports); R²_w (weighted) = "
        "1 − SSE/SST over all dimensions, shown beside it for every predictor. Baselines: identity ŷ = x, "
        "train mean ŷ = ȳ, OLS (α = 0). val R² is the tuning objective (uniform) at the chosen α.",
        "",
        md_table(
            [
                "pair",
                "L → L+k",
                "α",
                "val R²",
                "R² ATO",
                "R²_w ATO",
                *(f"{word} {k.column('evaluate')}" for k in baselines for word in ("R²", "R²_w")),
                "token cosine",
                "MSE",
            ],
            rows,
        ),
        "",
        *how_to_read(
            "R² ATO well above identity and train mean says the layers change the residual in a way a linear map "
            "of x_L predicts; R² ATO ≈ OLS says the ridge penalty plays no part. 1 − R²_w of the ATO is not a "
            "measure of non-linear computation: the budget above splits it into moved (read linearly from other "
            "positions) and computed (what no map linear in x_L at s ≤ t explains); only computed, read at "
            "n → ∞, is left to non-linear computation (an upper bound on it). Without a budget 1 − R² holds both. "
            "R² counts every residual dimension alike, R²_w counts each by its variance: a few high-variance "
            "dimensions decide R²_w, the many low-variance ones R². They can disagree in size and in the "
            "direction of a difference (between pairs, or between the ATO and a baseline); read a comparison "
            "as settled only where both agree.",
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
    kept_rows, live_rows = [], []
    for res in results:
        m, gate = res.m, _gate_cell(res, cards)
        kept_rows.append(
            [
                res.name,
                gate,
                fmt_int(m.n_features),
                *_verdict_cells(m.n_transported, m.n_undetermined, m.n_synthesised),
                fmt_int(m.n_no_verdict),
                fmt_ci(m.transported_fraction, m.transported_fraction_low, m.transported_fraction_high, ".3f"),
                fmt_ci(m.ato.feature_r2_median, m.feature_r2_median_low, m.feature_r2_median_high, ".4f"),
                fmt(m.identity.feature_r2_median),
                fmt(m.ols.feature_r2_median),
                fmt_ci(m.feature_pearson_median, m.feature_pearson_median_low, m.feature_pearson_median_high, ".3f"),
                fmt_ci(
                    m.feature_rms_ratio_median, m.feature_rms_ratio_median_low, m.feature_rms_ratio_median_high, ".3f"
                ),  # fmt: skip
            ]
        )
        live_rows.append(
            [
                res.name,
                gate,
                fmt_int(m.live_n_features),
                fmt_int(m.live_n_judged),
                *_verdict_cells(m.live_n_transported, m.live_n_undetermined, m.live_n_synthesised),
                fmt_ci(
                    m.live_transported_fraction,
                    m.live_transported_fraction_low,
                    m.live_transported_fraction_high,
                    ".3f",
                ),  # fmt: skip
                fmt_ci(m.live_feature_r2_median, m.live_feature_r2_median_low, m.live_feature_r2_median_high, ".4f"),
            ]
        )
    verdicts = ["transported", "undetermined", "synthesised"]
    return [
        "## Feature space (SAE directions of layer L+k, test)",
        "",
        "A feature's R² is measured along its unit decoder direction over the test tokens where the SAE says "
        f"it is active on the true residual; it is judged when it has at least {ev.min_active_tokens} such "
        "tokens (`evaluate.min_active_tokens`), and gets no verdict otherwise. Its R² has an interval from "
        "resampling test documents (`evaluate.feature_interval`, `feature_resamples`, `feature_level`; "
        "docs/statistics.md#feature-intervals): *transported* when the interval lies wholly at or above "
        f"{ev.transported_r2} (`evaluate.transported_r2`), *synthesised* when wholly below, *undetermined* when "
        "it straddles the threshold. The transported fraction is the share of judged features whose R² is at or "
        "above the threshold, and the medians are over the judged features, each with its interval [low, high] "
        "from the same resamples. SAE gates: whether layer L+k's SAE passed its quality gates (reports/sae); "
        "the feature numbers of a row marked unreliable rest on an SAE that missed them.",
        "",
        *_sae_warning(results, cards),
        "**Selected features** (`select`'s kept set: the high-quality subset, the feature cards below)",
        "",
        md_table(
            [
                "pair",
                "SAE gates",
                "features",
                *verdicts,
                "no verdict",
                "transported fraction",
                "feature R² median (ATO)",
                "identity",
                "OLS",
                "Pearson r median",
                "rms ratio median",
            ],
            kept_rows,
        ),
        "",
        "**Every live feature** (active in `select`'s scan of train tokens) with enough active test tokens",
        "",
        md_table(
            ["pair", "SAE gates", "live features", "judged", *verdicts, "transported fraction", "feature R² median"],
            live_rows,
        ),
        "",
        *how_to_read(
            "Compare each median with the identity's: the share of features the ATO transports beyond copying "
            "x_L is what the layers add linearly. *Synthesised* here means the same-position map misses the "
            "feature at this threshold; the budget's reading (feature cards, the budget table's counts) splits "
            "these into *moved* (a context map reaches the threshold: linear in layer L at earlier positions) "
            "and *synthesised* (none does): only the latter is a candidate for non-linear computation, and a "
            "candidate, not evidence (the SAE direction and the test's power stand between). An *undetermined* "
            "feature is one this test split cannot place on either side of the threshold: count it with "
            "neither. The transported fraction normally lies between transported/judged and (transported + "
            "undetermined)/judged; its interval says how far another sample of documents could move it. The "
            "selected set is chosen for quality, so its fraction need not be the live set's: the live row is "
            "what the operator does to the SAE as a whole.",
        ),
    ]


def _verdict_cells(transported: float, undetermined: float, synthesised: float) -> list[str]:
    return [fmt_int(transported), fmt_int(undetermined), fmt_int(synthesised)]


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
        *how_to_read(
            "When α is immaterial, the chosen value is noise and the operator is in effect OLS (which is what "
            "η's linear reference assumes); differences between pairs' α mean nothing. An edge warning means "
            "the searched range should be widened before the α is quoted. α says nothing about non-linear "
            "computation either way.",
        ),
    ]


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
