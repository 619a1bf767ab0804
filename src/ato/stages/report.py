"""Stage `report`: one readable summary of every pair's results, plus the figures that compare pairs.

Reads, for every pair in `params.pairs`, what the per-pair stages wrote (all under `paths.reports`):

    metrics/<pair>.json               evaluate: flat scores (R², baselines, feature space, ceiling, η)
    evaluate/<pair>/efficiency.csv    evaluate: the rank sweep (ceiling(r), η(r) SVD/RRR, train/test)
    causal/<pair>.json                causal:   Δ log-perplexity per condition, CIs, damage recovered
    tuning/<pair>.json                tune:     the α → validation R² curve and the chosen α

A missing input is not an error (a pair's evaluate or causal stage may not have run yet): its
cells read "—", the figures mark it, and `summary.md` lists every missing file and the command that
makes it. A present but unreadable input is an error naming the file.

Writes (all under `paths.reports`):

    summary.md                        markdown tables + links to every figure
    figures/summary_heatmaps.png      residual R², feature R², transported fraction, η, subspace size over (L, k)
    figures/summary_efficiency.png    η(r) and ceiling(r) per k, one line per L
    figures/summary_causal.png        Δ log-ppl per pair and condition (95 % CIs), damage recovered
    figures/summary_alpha.png         α → validation R² per pair, chosen α marked
    plots/summary.csv                 one row per pair, headline numbers (for `dvc plots`)
    plots/efficiency_k<k>.csv         rank, log10_rank, then η_RRR(test) and ceiling per L (`dvc plots`)
    plots/alpha.csv                   α, log10_alpha, then validation R² per pair (`dvc plots`;
                                      its templates have no log axis, hence the log10 columns)

and logs summary.md, the figures and the CSVs to the pipeline's parent MLflow run (`report/`).
Params: `report.dpi` (figure resolution), `report.ranks` (ranks at which the tables quote η(r) and
ceiling(r): the largest swept rank ≤ r), `report.causal_scope` (`after`: predictions at or after
the first patched position, the only ones a patch can change; `all`: every prediction).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AtoError
from ..params import Pair, Params

DASH = "—"
CONDITIONS = ("ato", "identity", "zero", "bias_only", "train_mean")  # patched conditions of `causal`
CONDITION_LABELS = {"ato": "ATO  Wx+b", "identity": "identity  x", "zero": "zero", "bias_only": "bias only  b",
                    "train_mean": "train mean  ȳ"}
CONDITION_COLOURS = {"ato": "#1f77b4", "identity": "#2ca02c", "zero": "#d62728", "bias_only": "#9467bd",
                     "train_mean": "#ff7f0e"}
EFFICIENCY_COLUMNS = ("rank", "ceiling", "eta_svd_train", "eta_svd_test", "eta_rrr_train", "eta_rrr_test")
# plots/summary.csv: (column, where it comes from) — metrics keys, then causal keys with the scope
SUMMARY_METRICS = ("alpha", "val_r2", "r2", "r2_weighted", "identity_r2", "mean_r2", "ols_r2",
                   "feature_r2_median", "identity_feature_r2_median", "n_features", "n_transported",
                   "n_synthesised", "n_no_verdict", "transported_fraction", "ceiling_full", "eta_test",
                   "subspace_size", "participation_ratio")


class ReportError(AtoError):
    """A report input exists but cannot be read; the message names the file."""


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class PairResults:
    """Everything the per-pair stages wrote for one pair; None where the file does not exist."""

    name: str
    pair: Pair
    metrics: dict[str, Any] | None = None
    efficiency: dict[str, np.ndarray] | None = None
    causal: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None
    missing: list[tuple[str, Path, str]] = field(default_factory=list)  # (what, file, command that makes it)

    def metric(self, key: str) -> float:
        return _as_float(None if self.metrics is None else self.metrics.get(key))

    def causal_value(self, key: str) -> float:
        return _as_float(None if self.causal is None else self.causal.get(key))


def input_paths(params: Params, name: str) -> dict[str, Path]:
    reports = params.path("reports")
    return {
        "metrics": reports / "metrics" / f"{name}.json",
        "efficiency": reports / "evaluate" / name / "efficiency.csv",
        "causal": reports / "causal" / f"{name}.json",
        "tuning": reports / "tuning" / f"{name}.json",
    }


PRODUCER = {"metrics": "evaluate", "efficiency": "evaluate", "causal": "causal", "tuning": "tune"}


def load_pair(params: Params, name: str) -> PairResults:
    res = PairResults(name, params.pairs[name])
    for what, path in input_paths(params, name).items():
        if not path.exists():
            res.missing.append((what, path, f"dvc repro {PRODUCER[what]}@{name}"))
            continue
        value = read_csv_columns(path, EFFICIENCY_COLUMNS) if what == "efficiency" else read_json_object(path)
        setattr(res, what, value)
    return res


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); rerun the stage that writes it") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_csv_columns(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Numeric CSV → {column: float64 array}; 'nan' and empty cells become NaN."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ReportError(f"{path}: empty CSV (expected the header {', '.join(required)})")
    header, body = rows[0], rows[1:]
    missing = [c for c in required if c not in header]
    if missing:
        raise ReportError(f"{path}: missing column(s) {missing} (header: {header})")
    out: dict[str, np.ndarray] = {}
    for j, col in enumerate(header):
        try:
            out[col] = np.array([float(r[j]) if r[j].strip() else math.nan for r in body], dtype=np.float64)
        except (ValueError, IndexError) as exc:
            raise ReportError(f"{path}: column {col!r} is not numeric on every row ({exc})") from None
    return out


def _as_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


# --------------------------------------------------------------------------------------------
# Derived values


def rank_value(eff: dict[str, np.ndarray] | None, column: str, r: int) -> tuple[float, int | None]:
    """(value, rank used): the largest swept rank ≤ r (the smallest one when r is below all)."""
    if eff is None or len(eff["rank"]) == 0:
        return math.nan, None
    ranks = eff["rank"].astype(int)
    below = np.flatnonzero(ranks <= r)
    i = int(below[np.argmax(ranks[below])]) if below.size else int(np.argmin(ranks))
    return float(eff[column][i]), int(ranks[i])


def causal_set_name(causal: dict[str, Any] | None) -> str | None:
    """The position set the headline keys summarise: `all` when present, else the first one."""
    sets = (causal or {}).get("position_sets") or {}
    if not isinstance(sets, dict) or not sets:
        return None
    return "all" if "all" in sets else next(iter(sets))


def causal_triplet(res: PairResults, condition: str, scope: str) -> tuple[float, float, float]:
    """(Δ, lo, hi) of a patched condition vs clean, from the headline keys."""
    key = f"{condition}_delta_{scope}"
    return res.causal_value(key), res.causal_value(f"{key}_lo"), res.causal_value(f"{key}_hi")


def recovered_triplet(res: PairResults, scope: str) -> tuple[float, float, float]:
    key = f"recovered_{scope}"
    return res.causal_value(key), res.causal_value(f"{key}_lo"), res.causal_value(f"{key}_hi")


# --------------------------------------------------------------------------------------------
# Formatting


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


# --------------------------------------------------------------------------------------------
# summary.md


def render_summary(params: Params, results: list[PairResults], figures: dict[str, Path]) -> str:
    rp, ev = params.report, params.evaluate
    scope = rp.causal_scope
    reports = params.path("reports")
    model = _model_name(params)
    n_test = {res.metric("n_test_tokens") for res in results} - {math.nan}
    n_test = {v for v in n_test if math.isfinite(v)}
    out = [
        "# ato — summary of the transport operators",
        "",
        f"Model: {model}. Pairs: {len(results)} ({', '.join(r.name for r in results)}). "
        "Every score is on the held-out **test** split unless marked otherwise; BOS/special tokens are "
        f"{'included' if params.stats.include_bos else 'excluded'} (`stats.include_bos`). "
        + (f"Test tokens per pair: {', '.join(fmt_int(v) for v in sorted(n_test))}." if n_test else ""),
        "",
    ]
    missing = [(res.name, what, path, cmd) for res in results for what, path, cmd in res.missing]
    out += ["## Missing inputs", ""]
    if missing:
        out.append(f"{len(missing)} input file(s) are missing; their cells read “{DASH}” and the figures mark them:")
        out.append("")
        for name, what, path, cmd in missing:
            out.append(f"- **{name}**: {what} — `{_rel(path, params.root)}` (made by `{cmd}`)")
    else:
        out.append("None: every pair has its evaluate, causal and tune outputs.")
    out.append("")

    # ---- residual space ----------------------------------------------------------------------
    out += ["## Residual-space R² (test)", "",
            "R² is the uniform average over residual dimensions (what the reference reports); weighted = "
            "1 − SSE/SST over all dimensions. Baselines: identity ŷ = x, train mean ŷ = ȳ, OLS (α = 0). "
            "val R² is the tuning objective at the chosen α.", ""]
    rows = []
    for res in results:
        rows.append([res.name, f"{res.pair.L} → {res.pair.target}", fmt(res.metric("alpha"), ".3g"),
                     fmt(res.metric("val_r2")), fmt(res.metric("r2")), fmt(res.metric("r2_weighted")),
                     fmt(res.metric("identity_r2")), fmt(res.metric("mean_r2")), fmt(res.metric("ols_r2")),
                     fmt(res.metric("cosine")), fmt(res.metric("mse"), ".4g")])
    out += [md_table(["pair", "L → L+k", "α", "val R²", "R² ATO", "R² weighted", "identity", "train mean",
                      "OLS", "token cosine", "MSE"], rows), ""]

    # ---- feature space -----------------------------------------------------------------------
    out += ["## Feature space (SAE directions of layer L+k, test)", "",
            f"A feature is *transported* when its R² along the unit decoder direction is ≥ "
            f"{ev.transported_r2} over at least {ev.min_active_tokens} tokens where the SAE says it is "
            "active on the true residual (`evaluate.transported_r2`, `evaluate.min_active_tokens`), "
            "*synthesised* when it has enough tokens but a lower R², and gets no verdict otherwise. "
            "Medians are over the judged features.", ""]
    rows = []
    for res in results:
        rows.append([res.name, fmt_int(res.metric("n_features")), fmt_int(res.metric("n_transported")),
                     fmt_int(res.metric("n_synthesised")), fmt_int(res.metric("n_no_verdict")),
                     fmt(res.metric("transported_fraction"), ".3f"), fmt(res.metric("feature_r2_median")),
                     fmt(res.metric("identity_feature_r2_median")), fmt(res.metric("ols_feature_r2_median")),
                     fmt(res.metric("feature_pearson_median"), ".3f"), fmt(res.metric("feature_rms_ratio_median"), ".3f")])
    out += [md_table(["pair", "features", "transported", "synthesised", "no verdict", "transported fraction",
                      "feature R² median (ATO)", "identity", "OLS", "Pearson r median", "rms ratio median"], rows), ""]

    # ---- ceiling, efficiency, subspace -----------------------------------------------------------
    ceil_headers = _rank_headers(results, rp.ranks, "ceiling")
    eta_headers = _rank_headers(results, rp.ranks, "eta_rrr_test")
    out += ["## CCA ceiling, transport efficiency and subspace size", "",
            "ceiling(r) = (1/d) Σ ρ_i² over the r largest canonical correlations bounds the whitened R² of any rank-r affine map (train "
            "statistics). η = whitened R² / ceiling: for the ATO itself at full rank, and for the "
            f"reduced-rank-regression map at rank r (η_RRR, test). Subspace size = smallest r with "
            f"ceiling(r) ≥ {ev.subspace_fraction:.0%} of ceiling(d) (`evaluate.subspace_fraction`); PR = "
            "participation ratio (Σρ)²/Σρ² of the canonical correlations. Ranks: `report.ranks` → the "
            "largest swept rank ≤ r.", ""]
    rows = []
    for res in results:
        rows.append([res.name, fmt(res.metric("ceiling_full")),
                     *[_rank_cell(res, "ceiling", r, label) for r, label in ceil_headers],
                     fmt(res.metric("eta_test")), fmt(res.metric("eta_train")),
                     *[_rank_cell(res, "eta_rrr_test", r, label) for r, label in eta_headers],
                     fmt_int(res.metric("subspace_size")), fmt(res.metric("participation_ratio"), ".1f")])
    out += [md_table(["pair", "ceiling(d)", *[f"ceiling({label})" for _, label in ceil_headers],
                      "η ATO (test)", "η ATO (train)", *[f"η_RRR({label})" for _, label in eta_headers],
                      "subspace size", "PR"], rows), ""]

    # ---- causal ------------------------------------------------------------------------------
    scope_text = ("the predictions at or after the first patched position, the only ones a patch can change"
                  if scope == "after" else "every prediction of the sequence")
    headline_sets = sorted({causal_set_name(res.causal) for res in results if res.causal} - {None})
    headline_text = ", ".join(f"`{n}`" for n in headline_sets) or "`all`"
    seqs = {(res.causal.get("n_sequences"), res.causal.get("seq_len")) for res in results if res.causal}
    seq_text = ", ".join(f"{n} sequences × {t} tokens" for n, t in sorted(seqs, key=str)) or "no causal output yet"
    out += ["## Causal check (held-out test text)", "",
            "The residual after block L+k is overwritten with each condition's value at the patched "
            f"positions; Δ = log-perplexity − clean log-perplexity (nats/token) over {scope_text} "
            f"(`report.causal_scope: {scope}`), with a paired-bootstrap 95 % CI over sequences. "
            "Recovered = 1 − Δ(ATO)/Δ(zero), the share of the zero-ablation damage the ATO repairs "
            "(— where Δ(zero) is 0 and the share is undefined). "
            f"Headline position set: {headline_text} (`all` = every non-BOS position). Data: {seq_text}.", ""]
    rows = []
    for res in results:
        rows.append([res.name, fmt(res.causal_value(f"clean_logppl_{scope}")),
                     *[fmt_ci(*causal_triplet(res, c, scope)) for c in CONDITIONS],
                     fmt_ci(*recovered_triplet(res, scope), spec=".1%")])
    out += [md_table(["pair", "clean log-ppl", *[f"Δ {CONDITION_LABELS[c].split('  ')[0]}" for c in CONDITIONS],
                      "recovered"], rows), ""]
    rows = []
    for res in results:
        sets = (res.causal or {}).get("position_sets") or {}
        for set_name, entry in sets.items():
            if not isinstance(entry, dict):
                continue
            ato = entry.get("ato") or {}
            zero = entry.get("zero") or {}
            rec = entry.get("recovered") or {}
            rows.append([res.name, set_name, fmt_int(entry.get("n_patched_tokens")),
                         fmt_ci(_as_float(ato.get(f"delta_{scope}_mean")), _as_float(ato.get(f"delta_{scope}_lo")),
                                _as_float(ato.get(f"delta_{scope}_hi"))),
                         fmt_ci(_as_float(zero.get(f"delta_{scope}_mean")), _as_float(zero.get(f"delta_{scope}_lo")),
                                _as_float(zero.get(f"delta_{scope}_hi"))),
                         fmt_ci(_as_float(rec.get(f"{scope}_mean")), _as_float(rec.get(f"{scope}_lo")),
                                _as_float(rec.get(f"{scope}_hi")), spec=".1%")])
    if rows:
        out += ["Per position set (`causal.position_sets`):", "",
                md_table(["pair", "position set", "patched tokens", "Δ ATO", "Δ zero", "recovered"], rows, n_left=2),
                ""]

    # ---- figures -----------------------------------------------------------------------------
    out += ["## Figures", ""]
    captions = {
        "heatmaps": "Headline scores over (L, k)",
        "efficiency": "Transport efficiency η(r) and CCA ceiling(r) per k",
        "causal": "Causal check: Δ log-perplexity and damage recovered",
        "alpha": "Ridge penalty α → validation R²",
    }
    for key, path in figures.items():
        out += [f"### {captions[key]}", "", f"![{captions[key]}]({_rel(path, reports)})", ""]
    per_pair = []
    for res in results:
        links = []
        for kind in ("efficiency", "feature_r2", "dim_r2", "causal"):
            p = reports / "figures" / f"{res.name}_{kind}.png"
            if p.exists():
                links.append(f"[{kind}]({_rel(p, reports)})")
        p = reports / "tuning" / f"{res.name}_alpha.png"
        if p.exists():
            links.append(f"[alpha]({_rel(p, reports)})")
        per_pair.append(f"- {res.name}: {', '.join(links) if links else DASH + ' (no per-pair figures yet)'}")
    out += ["Per-pair figures:", "", *per_pair, ""]
    return "\n".join(out)


def _model_name(params: Params) -> str:
    if params.prepare.source == "embedded":
        return "google/gemma-3-270m (embedded Q4_K_M GGUF, dequantised to float32)"
    return params.prepare.source


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


# --------------------------------------------------------------------------------------------
# CSVs for `dvc plots`


def _cell(v: Any) -> str:
    v = _as_float(v)
    return repr(v) if math.isfinite(v) else ""


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)
    return path


def write_plot_csvs(params: Params, results: list[PairResults]) -> list[Path]:
    scope = params.report.causal_scope
    out_dir = params.path("reports") / "plots"
    causal_cols = ["causal_ato_delta", "causal_ato_delta_lo", "causal_ato_delta_hi", "causal_zero_delta",
                   "causal_recovered", "causal_recovered_lo", "causal_recovered_hi"]
    header = ["pair", "L", "k", "layer_out", *SUMMARY_METRICS, *causal_cols]
    rows = []
    for res in results:
        ato = causal_triplet(res, "ato", scope)
        rec = recovered_triplet(res, scope)
        rows.append([res.name, res.pair.L, res.pair.k, res.pair.target,
                     *[_cell(res.metric(k)) for k in SUMMARY_METRICS],
                     *[_cell(v) for v in (*ato, causal_triplet(res, "zero", scope)[0], *rec)]])
    paths = [write_csv(out_dir / "summary.csv", header, rows)]

    for k in sorted({res.pair.k for res in results}):
        group = sorted((res for res in results if res.pair.k == k), key=lambda r: r.pair.L)
        ranks = sorted({int(r) for res in group if res.efficiency is not None for r in res.efficiency["rank"]})
        cols = [f"{c}_L{res.pair.L:02d}" for res in group for c in ("eta_rrr_test", "ceiling")]
        table = []
        for r in ranks:
            row: list[Any] = [r, repr(math.log10(r))]
            for res in group:
                for c in ("eta_rrr_test", "ceiling"):
                    value = math.nan
                    if res.efficiency is not None:
                        hit = np.flatnonzero(res.efficiency["rank"].astype(int) == r)
                        value = res.efficiency[c][hit[0]] if hit.size else math.nan
                    row.append(_cell(value))
            table.append(row)
        paths.append(write_csv(out_dir / f"efficiency_k{k}.csv", ["rank", "log10_rank", *cols], table))

    curves = {res.name: {float(c["alpha"]): c.get("val_r2") for c in (res.tuning or {}).get("curve", [])
                         if isinstance(c, dict) and "alpha" in c} for res in results}
    alphas = sorted({a for curve in curves.values() for a in curve})
    paths.append(write_csv(out_dir / "alpha.csv", ["alpha", "log10_alpha", *[res.name for res in results]],
                           [[repr(a), repr(math.log10(a)), *[_cell(curves[res.name].get(a)) for res in results]]
                            for a in alphas if a > 0]))
    return paths


# --------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=dpi, format="png")
    _plt().close(fig)
    tmp.replace(path)
    return path


def _layer_colours(results: list[PairResults]) -> dict[int, Any]:
    import matplotlib

    Ls = sorted({res.pair.L for res in results})
    cmap = matplotlib.colormaps["tab10" if len(Ls) <= 10 else "tab20"]
    return {L: cmap(i % cmap.N) for i, L in enumerate(Ls)}


HEATMAPS = (
    # (metric key, title, kind) kind: "r2" → shared −/0..1 scale, "size" → 0..max
    ("r2", "residual R² of the ATO (test)", "r2"),
    ("feature_r2_median", "feature-space R², median (test)", "r2"),
    ("transported_fraction", "transported fraction of judged features", "r2"),
    ("eta_test", "transport efficiency η = R²_w / ceiling (test)", "r2"),
    ("subspace_size", "transport subspace size (rank)", "size"),
)


def plot_heatmaps(path: Path, params: Params, results: list[PairResults]) -> Path:
    """One heatmap per headline score over (k rows × L columns), only the L and k values present."""
    import matplotlib
    from matplotlib.patches import Patch, Rectangle

    plt = _plt()
    Ls = sorted({res.pair.L for res in results})
    ks = sorted({res.pair.k for res in results})
    by_lk = {(res.pair.L, res.pair.k): res for res in results}
    panel_w = 0.8 * len(Ls) + 2.0
    panel_h = 0.62 * len(ks) + 1.6
    ncols = 1 if len(Ls) > 8 else 2 if len(Ls) > 3 else 3
    nrows = math.ceil(len(HEATMAPS) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * panel_w, nrows * panel_h), squeeze=False)
    flat = axes.ravel()
    for ax, (key, title, kind) in zip(flat, HEATMAPS):
        grid = np.full((len(ks), len(Ls)), np.nan)
        for (L, k), res in by_lk.items():
            grid[ks.index(k), Ls.index(L)] = res.metric(key)
        finite = grid[np.isfinite(grid)]
        if kind == "r2":
            vmin = float(max(-1.0, min(0.0, finite.min()))) if finite.size else 0.0
            vmax, cmap, spec = 1.0, matplotlib.colormaps["viridis"], ".3f"
        else:
            vmin, vmax = 0.0, float(max(1.0, finite.max())) if finite.size else 1.0
            cmap, spec = matplotlib.colormaps["cividis"], ".0f"
        norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
        shown = np.ma.masked_invalid(grid)
        cmap = cmap.with_extremes(bad="white")
        im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto")
        for i, k in enumerate(ks):
            for j, L in enumerate(Ls):
                res = by_lk.get((L, k))
                if res is None:  # not a configured pair
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e6e6e6", edgecolor="white", lw=1))
                    continue
                v = grid[i, j]
                if not math.isfinite(v):  # configured, but its output is missing
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="#888888",
                                           hatch="///", lw=0.5))
                    ax.text(j, i, "missing", ha="center", va="center", fontsize=7, color="#444444",
                            bbox=dict(facecolor="white", edgecolor="none", pad=1))
                    continue
                text = format(v, spec)
                if key == "transported_fraction":
                    judged = res.metric("n_transported") + res.metric("n_synthesised")
                    if math.isfinite(judged):
                        text += f"\n{fmt_int(res.metric('n_transported'))}/{fmt_int(judged)}"
                r, g, b, _ = cmap(norm(v))
                light = 0.299 * r + 0.587 * g + 0.114 * b > 0.55
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if light else "white")
        ax.set_xticks(range(len(Ls)), [str(L) for L in Ls])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("L (upstream layer)")
        ax.set_ylabel("k (layers spanned)")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(np.arange(len(Ls) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(ks) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", lw=1.5)
        ax.tick_params(which="minor", length=0)
        bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("rank" if kind == "size" else "", fontsize=8)
    for ax in flat[len(HEATMAPS):]:
        ax.axis("off")
    fig.legend(handles=[Patch(facecolor="#e6e6e6", edgecolor="#bbbbbb", label="no such pair in params.pairs"),
                        Patch(facecolor="white", edgecolor="#888888", hatch="///",
                              label="pair configured, output missing")],
               loc="lower center", ncols=2, fontsize=9, frameon=False)
    fig.suptitle(f"ato: headline scores per pair (L → L+k), {len(results)} pairs", fontsize=11)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1 - 0.4 / fig.get_figheight()))
    return _save(fig, path, params.report.dpi)


def plot_efficiency(path: Path, params: Params, results: list[PairResults]) -> Path:
    """Per k: η(r) (reduced-rank map solid, SVD truncation dashed; test) above ceiling(r) (train)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    plt = _plt()
    ks = sorted({res.pair.k for res in results})
    colours = _layer_colours(results)
    fig, axes = plt.subplots(2, len(ks), figsize=(4.6 * len(ks) + 0.4, 7.6), squeeze=False, sharex=True)
    for col, k in enumerate(ks):
        ax_eta, ax_ceil = axes[0][col], axes[1][col]
        group = sorted((res for res in results if res.pair.k == k), key=lambda r: r.pair.L)
        handles = []
        absent = []
        low = 0.0
        for res in group:
            colour = colours[res.pair.L]
            label = f"L={res.pair.L} → {res.pair.target}"
            eff = res.efficiency
            if eff is None:
                absent.append(res.name)
                continue
            ranks = eff["rank"]
            ax_eta.plot(ranks, eff["eta_rrr_test"], "-", color=colour, marker="o", ms=3, lw=1.8)
            ax_eta.plot(ranks, eff["eta_svd_test"], "--", color=colour, lw=1.1, alpha=0.85)
            ax_ceil.plot(ranks, eff["ceiling"], "-", color=colour, marker="o", ms=3, lw=1.8)
            size = res.metric("subspace_size")
            if math.isfinite(size):
                ax_ceil.axvline(size, color=colour, ls=":", lw=1.2)
            finite = np.concatenate([eff[c][np.isfinite(eff[c])] for c in ("eta_rrr_test", "eta_svd_test")])
            low = min(low, float(finite.min())) if finite.size else low
            handles.append(Line2D([], [], color=colour, marker="o", ms=3, lw=1.8, label=label))
        ax_eta.axhline(1.0, color="black", lw=0.7)
        if low < -1.0:  # very negative SVD-truncation scores would flatten everything else
            ax_eta.set_ylim(-1.05, 1.1)
            ax_eta.text(0.98, 0.03, "axis clipped at −1", transform=ax_eta.transAxes, ha="right", fontsize=7)
        note = f"\n(efficiency.csv missing: {', '.join(absent)})" if absent else ""
        ax_eta.set_title(f"k = {k}: transport efficiency (test){note}", fontsize=10)
        ax_ceil.set_title(f"k = {k}: CCA ceiling (train){note}", fontsize=10)
        style = [Line2D([], [], color="grey", ls="-", lw=1.8, label="reduced-rank map"),
                 Line2D([], [], color="grey", ls="--", lw=1.1, label="SVD truncation of the ATO")]
        ax_eta.legend(handles=handles + style, fontsize=7, loc="best")
        ceil_handles = handles + [Line2D([], [], color="grey", ls=":", lw=1.2,
                                         label=f"subspace size ({params.evaluate.subspace_fraction:.0%} of ceiling(d))")]
        ax_ceil.legend(handles=ceil_handles, fontsize=7, loc="upper left")
        for ax in (ax_eta, ax_ceil):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.grid(alpha=0.3, which="both")
        ax_ceil.set_xlabel("rank r")
        if col == 0:
            ax_eta.set_ylabel("η(r) = whitened R²(r) / ceiling(r)")
            ax_ceil.set_ylabel(r"ceiling(r) = $\frac{1}{d}\sum_{i \leq r} \rho_i^2$")
    fig.suptitle("Transport efficiency and CCA ceiling vs rank, one panel per k, one line per L", fontsize=11)
    fig.tight_layout()
    return _save(fig, path, params.report.dpi)


def plot_causal(path: Path, params: Params, results: list[PairResults]) -> Path:
    """Grouped bars: Δ log-ppl vs clean per pair and condition (95 % CIs); damage recovered per pair."""
    from matplotlib.patches import Patch

    plt = _plt()
    scope = params.report.causal_scope
    n = len(results)
    w_bars, w_rec = min(16.0, max(7.0, 1.25 * n + 2.5)), min(7.0, max(3.5, 0.45 * n + 2))
    fig, (ax, ax_rec) = plt.subplots(1, 2, figsize=(w_bars + w_rec, 5.2), gridspec_kw={"width_ratios": [w_bars, w_rec]})
    x = np.arange(n)
    width = 0.8 / len(CONDITIONS)
    top = 0.0
    for ci, cond in enumerate(CONDITIONS):
        trip = np.array([causal_triplet(res, cond, scope) for res in results])
        mean, lo, hi = trip[:, 0], trip[:, 1], trip[:, 2]
        ok = np.isfinite(mean)
        err = np.vstack([np.clip(mean - np.where(np.isfinite(lo), lo, mean), 0, None),
                         np.clip(np.where(np.isfinite(hi), hi, mean) - mean, 0, None)])
        pos = x - 0.4 + width * (ci + 0.5)
        top = max([top, *mean[ok] + err[1, ok]])
        ax.bar(pos[ok], mean[ok], width, yerr=err[:, ok], capsize=2, color=CONDITION_COLOURS[cond],
               edgecolor="black", linewidth=0.4, error_kw={"elinewidth": 0.8})
    for i, res in enumerate(results):
        if res.causal is None:
            ax.text(i, 0, "causal\nmissing", ha="center", va="bottom", fontsize=8, color="#b22222")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_yscale("symlog", linthresh=0.01)
    if top > 0:  # headroom so the tallest CI is not cut by the frame
        ax.set_ylim(top=top * 1.8)
    ax.set_xticks(x, [res.name for res in results], rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center")
    ax.set_xlabel("pair")
    scope_label = "tokens at/after the first patch" if scope == "after" else "all predicted tokens"
    ax.set_ylabel(f"Δ log-perplexity vs clean (nats/token, symlog)\n{scope_label}; bars: 95% CI")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(handles=[Patch(facecolor=CONDITION_COLOURS[c], edgecolor="black", label=CONDITION_LABELS[c])
                       for c in CONDITIONS], fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.01),
              ncols=len(CONDITIONS), frameon=False, title="value written into the residual after block L+k",
              title_fontsize=8)
    rec = np.array([recovered_triplet(res, scope) for res in results])
    ok = np.isfinite(rec[:, 0])
    lo = np.where(np.isfinite(rec[:, 1]), rec[:, 1], rec[:, 0])
    hi = np.where(np.isfinite(rec[:, 2]), rec[:, 2], rec[:, 0])
    ax_rec.errorbar(x[ok], 100 * rec[ok, 0], yerr=100 * np.vstack([np.clip(rec[ok, 0] - lo[ok], 0, None),
                                                                  np.clip(hi[ok] - rec[ok, 0], 0, None)]),
                    fmt="o", color=CONDITION_COLOURS["ato"], capsize=4, ms=6)
    for i in np.flatnonzero(ok) if n <= 8 else []:  # labels would collide beyond a few pairs
        ax_rec.annotate(f"{100 * rec[i, 0]:.1f}%", (x[i], 100 * rec[i, 0]), textcoords="offset points",
                        xytext=(7, 0), va="center", fontsize=7)
    for i in np.flatnonzero(~ok):  # no causal output, or Δ(zero) = 0 makes the share undefined
        label = "causal\nmissing" if results[i].causal is None else "undefined"
        ax_rec.text(x[i], 50, label, ha="center", va="center", fontsize=8, color="#b22222")
    ax_rec.axhline(100, color="black", lw=0.8, ls="--")
    ax_rec.axhline(0, color="black", lw=0.8)
    ax_rec.set_xticks(x, [res.name for res in results], rotation=90 if n > 8 else 30 if n > 3 else 0,
                      ha="center" if n > 8 or n <= 3 else "right")
    ax_rec.set_xlim(-0.6, n - 0.4)
    ax_rec.set_ylabel("recovered (%) = 1 − Δ(ATO)/Δ(zero)\n95% CI")
    ax_rec.set_title("Damage recovered by the ATO", fontsize=10)
    ax_rec.grid(axis="y", alpha=0.3)
    sets = sorted({causal_set_name(res.causal) for res in results if res.causal} - {None}) or ["all"]
    what = "every non-BOS position" if sets == ["all"] else "the headline positions"
    fig.suptitle(f"Causal check on held-out test text: patching {what} (position set {', '.join(sets)})",
                 fontsize=11)
    fig.tight_layout()
    return _save(fig, path, params.report.dpi)


def plot_alpha(path: Path, params: Params, results: list[PairResults]) -> Path:
    """α → validation R² per pair on a log α axis, a star at each pair's chosen α. The right panel
    shows R² minus the chosen α's R² on a symmetric-log axis: ridge often gains only ~1e-5 over OLS,
    invisible on the left, and this shows how flat the optimum is and what α → 0 (OLS) costs."""
    import matplotlib

    plt = _plt()
    fig, (ax, ax_zoom) = plt.subplots(1, 2, figsize=(13.5, 5.2), sharex=True)
    cmap = matplotlib.colormaps["tab10" if len(results) <= 10 else "tab20"]
    styles = ["-", "--", "-.", ":"]
    ks = sorted({res.pair.k for res in results})
    absent, low, gaps = [], math.inf, [0.0]
    for i, res in enumerate(results):
        curve = [c for c in (res.tuning or {}).get("curve", []) if isinstance(c, dict)]
        pts = sorted((_as_float(c.get("alpha")), _as_float(c.get("val_r2"))) for c in curve)
        pts = [(a, v) for a, v in pts if math.isfinite(a) and a > 0 and math.isfinite(v)]
        if not pts:
            absent.append(res.name)
            continue
        colour = cmap(i % cmap.N)
        style = styles[ks.index(res.pair.k) % len(styles)]
        a, v = np.array(pts).T
        low = min(low, float(v.min()))
        alpha, best = _as_float(res.tuning.get("alpha")), _as_float(res.tuning.get("val_r2"))
        ax.plot(a, v, style, color=colour, lw=1.6, label=f"{res.name}: α = {fmt(alpha, '.3g')}, val R² = {fmt(best)}")
        ref = best if math.isfinite(best) else float(v.max())
        ax_zoom.plot(a, v - ref, style, color=colour, lw=1.6)
        gaps += [float((v - ref).min()), float((v - ref).max())]
        if math.isfinite(alpha) and math.isfinite(best):
            for target, y in ((ax, best), (ax_zoom, 0.0)):
                target.plot([alpha], [y], marker="*", ms=13, color=colour, markeredgecolor="black", zorder=4)
    ax.set_xscale("log")
    for a_ in (ax, ax_zoom):
        a_.set_xlabel("ridge penalty α (log scale)")
        a_.grid(alpha=0.3, which="both")
    ax.set_ylabel("validation R² (uniform average over dimensions)")
    ax.set_title("α → validation R² (★ = chosen α; line style = k)", fontsize=10)
    lin = 1e-7  # below this |ΔR²| the axis is linear: differences no α search can resolve
    ax_zoom.set_yscale("symlog", linthresh=lin)
    ax_zoom.set_ylim(max(-1.0, min(-10 * lin, 2 * min(gaps))), max(10 * lin, 3 * max(gaps)))
    ax_zoom.axhline(0, color="black", lw=0.8)
    ax_zoom.set_ylabel("val R²(α) − val R² at the chosen α (symlog)")
    ax_zoom.set_title(f"distance from the chosen α (linear for |Δ| < {lin:g})", fontsize=10)
    if low < -1.0:
        ax.set_ylim(-1.05, ax.get_ylim()[1])
        ax.text(0.01, 0.02, "axis clipped at −1", transform=ax.transAxes, fontsize=7)
    if absent:
        ax.text(0.01, 0.98, "no tuning output: " + ", ".join(absent), transform=ax.transAxes, va="top",
                fontsize=8, color="#b22222")
    if len(absent) < len(results):
        ax_zoom.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5),
                       frameon=False)
    fig.suptitle("Ridge penalty per pair: the exact validation R² curve from the statistics", fontsize=11)
    fig.tight_layout()
    return _save(fig, path, params.report.dpi)


# --------------------------------------------------------------------------------------------
# The stage


def main(params: Params) -> Path:
    """Write summary.md, the summary figures and the plot CSVs; log them to the parent MLflow run."""
    results = [load_pair(params, name) for name in params.pairs]
    reports = params.path("reports")
    fig_dir = reports / "figures"
    figures = {
        "heatmaps": plot_heatmaps(fig_dir / "summary_heatmaps.png", params, results),
        "efficiency": plot_efficiency(fig_dir / "summary_efficiency.png", params, results),
        "causal": plot_causal(fig_dir / "summary_causal.png", params, results),
        "alpha": plot_alpha(fig_dir / "summary_alpha.png", params, results),
    }
    csvs = write_plot_csvs(params, results)
    summary = reports / "summary.md"
    tmp = summary.with_name(f".tmp-{summary.name}")
    tmp.write_text(render_summary(params, results, figures) + "\n")
    tmp.replace(summary)
    n_missing = sum(len(res.missing) for res in results)
    _log_mlflow(params, [summary, *figures.values(), *csvs], n_missing)
    print(f"report: {summary} ({len(results)} pairs, {n_missing} missing input file(s)); "
          f"figures in {fig_dir}", flush=True)
    return summary


def _log_mlflow(params: Params, artifacts: list[Path], n_missing: int) -> None:
    import mlflow

    from ..tracking import log_flat_metrics, pipeline_run

    with pipeline_run(params, "report"):
        log_flat_metrics({"report_missing_inputs": n_missing})
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="report")
