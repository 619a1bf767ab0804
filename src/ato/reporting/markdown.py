"""summary.md: every pair side by side in markdown tables, with links to every figure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ato.artifacts import Layout
from ato.params import EvaluateParams, Params, ReportParams
from ato.plotting import CONDITION_LABELS, CONDITIONS

from .results import PairResults, headline_sets, rank_value

DASH = "—"
PAIR_FIGURES = ("efficiency", "feature_r2", "dim_r2", "causal")  # per-pair figures of evaluate and causal
CAPTIONS = {
    "heatmaps": "Headline scores over (L, k)",
    "efficiency": "Transport efficiency η(r) and CCA ceiling(r) per k",
    "causal": "Causal check: Δ log-perplexity and damage recovered",
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
        source = params.prepare.source
        model = "google/gemma-3-270m (embedded Q4_K_M GGUF, dequantised to float32)" if source == "embedded" else source
        return cls(
            params.report, params.evaluate, params.stats.include_bos, model, params.root, Layout.from_params(params)
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


def render_summary(s: SummarySettings, results: list[PairResults], figures: dict[str, Path]) -> str:
    sections = (
        _header(s, results),
        _missing(s, results),
        _residual(results),
        _features(s, results),
        _ceiling(s, results),
        _causal(s, results),
        _figures(s, results, figures),
    )
    return "\n".join(line for section in sections for line in section)


def _header(s: SummarySettings, results: list[PairResults]) -> list[str]:
    n_test = {v for v in (res.m.n_test_tokens for res in results) if math.isfinite(v)}
    return [
        "# ato — summary of the transport operators",
        "",
        f"Model: {s.model}. Pairs: {len(results)} ({', '.join(r.name for r in results)}). "
        "Every score is on the held-out **test** split unless marked otherwise; BOS/special tokens are "
        f"{'included' if s.include_bos else 'excluded'} (`stats.include_bos`). "
        + (f"Test tokens per pair: {', '.join(fmt_int(v) for v in sorted(n_test))}." if n_test else ""),
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


def _residual(results: list[PairResults]) -> list[str]:
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
                fmt(m.identity.r2),
                fmt(m.mean.r2),
                fmt(m.ols.r2),
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
                "identity",
                "train mean",
                "OLS",
                "token cosine",
                "MSE",
            ],
            rows,
        ),
        "",
    ]


def _features(s: SummarySettings, results: list[PairResults]) -> list[str]:
    ev = s.evaluate
    rows = []
    for res in results:
        m = res.m
        rows.append(
            [
                res.name,
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
        "Medians are over the judged features.",
        "",
        md_table(
            [
                "pair",
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
    ]


def _ceiling(s: SummarySettings, results: list[PairResults]) -> list[str]:
    ceil_headers = _rank_headers(results, s.report.ranks, "ceiling")
    eta_headers = _rank_headers(results, s.report.ranks, "eta_rrr_test")
    rows = []
    for res in results:
        m = res.m
        rows.append(
            [
                res.name,
                fmt(m.ceiling_full),
                *[_rank_cell(res, "ceiling", r, label) for r, label in ceil_headers],
                fmt(m.eta_test),
                fmt(m.eta_train),
                *[_rank_cell(res, "eta_rrr_test", r, label) for r, label in eta_headers],
                fmt_int(m.subspace_size),
                fmt(m.participation_ratio, ".1f"),
            ]
        )
    return [
        "## CCA ceiling, transport efficiency and subspace size",
        "",
        "ceiling(r) = (1/d) Σ ρ_i² over the r largest canonical correlations bounds the whitened R² of any "
        "rank-r affine map (train statistics). η = whitened R² / ceiling: for the ATO itself at full rank, "
        "and for the reduced-rank-regression map at rank r (η_RRR, test). Subspace size = smallest r with "
        f"ceiling(r) ≥ {s.evaluate.subspace_fraction:.0%} of ceiling(d) (`evaluate.subspace_fraction`); PR = "
        "participation ratio (Σρ)²/Σρ² of the canonical correlations. Ranks: `report.ranks` → the "
        "largest swept rank ≤ r.",
        "",
        md_table(
            [
                "pair",
                "ceiling(d)",
                *[f"ceiling({label})" for _, label in ceil_headers],
                "η ATO (test)",
                "η ATO (train)",
                *[f"η_RRR({label})" for _, label in eta_headers],
                "subspace size",
                "PR",
            ],
            rows,
        ),
        "",
    ]


def _causal(s: SummarySettings, results: list[PairResults]) -> list[str]:
    scope = s.report.causal_scope
    scope_text = (
        "the predictions at or after the first patched position, the only ones a patch can change"
        if scope == "after"
        else "every prediction of the sequence"
    )
    headline_text = ", ".join(f"`{n}`" for n in headline_sets(results)) or "`all`"
    seqs = {(res.causal.n_sequences, res.causal.seq_len) for res in results if res.causal is not None}
    seq_text = ", ".join(f"{n} sequences × {t} tokens" for n, t in sorted(seqs, key=str)) or "no causal output yet"
    rows = [
        [
            res.name,
            fmt(res.clean_logppl(scope)),
            *[fmt_ci(*res.causal_delta(c, scope)) for c in CONDITIONS],
            fmt_ci(*res.recovered(scope), spec=".1%"),
        ]
        for res in results
    ]
    out = [
        "## Causal check (held-out test text)",
        "",
        "The residual after block L+k is overwritten with each condition's value at the patched "
        f"positions; Δ = log-perplexity − clean log-perplexity (nats/token) over {scope_text} "
        f"(`report.causal_scope: {scope}`), with a paired-bootstrap 95 % CI over sequences. "
        "Recovered = 1 − Δ(ATO)/Δ(zero), the share of the zero-ablation damage the ATO repairs "
        "(— where Δ(zero) is 0 and the share is undefined). "
        f"Headline position set: {headline_text} (`all` = every non-BOS position). Data: {seq_text}.",
        "",
        md_table(
            ["pair", "clean log-ppl", *[f"Δ {CONDITION_LABELS[c].split('  ')[0]}" for c in CONDITIONS], "recovered"],
            rows,
        ),
        "",
    ]
    per_set = [
        [
            res.name,
            set_name,
            fmt_int(entry.n_patched_tokens),
            fmt_ci(*entry.ato.delta(scope)),
            fmt_ci(*entry.zero.delta(scope)),
            fmt_ci(*entry.recovered.triplet(scope), spec=".1%"),
        ]
        for res in results
        if res.causal is not None
        for set_name, entry in res.causal.position_sets.items()
    ]
    if per_set:
        out += [
            "Per position set (`causal.position_sets`):",
            "",
            md_table(["pair", "position set", "patched tokens", "Δ ATO", "Δ zero", "recovered"], per_set, n_left=2),
            "",
        ]
    return out


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
