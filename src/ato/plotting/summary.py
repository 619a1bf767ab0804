"""Figures of `ato report` that compare pairs: headline heatmaps over (L, k) (η beside its linear
reference, the count of directions that carry transport), η(r) and ceiling(r) per k, and the α → validation R²
curves. The causal figure (Δ and recovered share per pair) is in `summary_causal`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import PairMetrics
from ato.reporting.cells import fmt, fmt_ci, fmt_int
from ato.reporting.results import PairResults

from . import UNRELIABLE_COLOUR, mark_unreliable, pyplot, save_figure, unreliable_sae_text


def _transported_note(m: PairMetrics) -> str:
    """Sure transported / judged, and the interval of the fraction."""
    judged = m.n_transported + m.n_undetermined + m.n_synthesised
    if not math.isfinite(judged):
        return ""
    low, high = m.transported_fraction_low, m.transported_fraction_high
    interval = f" [{fmt(low, '.2f')}, {fmt(high, '.2f')}]" if math.isfinite(low) and math.isfinite(high) else ""
    return f"{fmt_int(m.n_transported)}/{fmt_int(judged)}{interval}"


def _eta_note(m: PairMetrics) -> str:
    return f"ratio {fmt(m.eta_ratio, '.3f')}" if math.isfinite(m.eta_ratio) else ""


def _directions_note(m: PairMetrics) -> str:
    if not math.isfinite(m.canonical_directions):
        return ""
    spread = f"{fmt_int(m.transport_directions_low)}–{fmt_int(m.transport_directions_high)} "
    return (spread if math.isfinite(m.transport_directions_low) else "") + f"of {fmt_int(m.canonical_directions)}"


Note = Callable[[PairMetrics], str] | None
# (title, kind, value, note under the value): kind "r2" → shared −1..1 scale, "size" → 0..max
HEATMAPS: tuple[tuple[str, str, Callable[[PairMetrics], float], Note], ...] = (
    ("residual R² of the ATO (test)", "r2", lambda m: m.ato.r2, None),
    ("feature-space R², median (test)", "r2", lambda m: m.ato.feature_r2_median, None),
    (
        "transported fraction; sure transported/judged [interval]",
        "r2",
        lambda m: m.transported_fraction,
        _transported_note,
    ),
    ("η(test) = R²_w / ceiling; ratio to an exactly linear map's η", "r2", lambda m: m.eta_test, _eta_note),
    (
        "directions carrying transport (held out); bootstrap, of d",
        "size",
        lambda m: m.transport_directions,
        _directions_note,
    ),
)
# panels whose numbers rest on the target layer's SAE (marked when it missed its quality gates)
FEATURE_PANELS = frozenset({HEATMAPS[1][0], HEATMAPS[2][0]})


def _layer_colours(results: list[PairResults]) -> dict[int, Any]:
    import matplotlib

    Ls = sorted({res.pair.L for res in results})
    cmap = matplotlib.colormaps["tab10" if len(Ls) <= 10 else "tab20"]
    return {L: cmap(i % cmap.N) for i, L in enumerate(Ls)}


# --------------------------------------------------------------------------------------------
# Heatmaps


def unreliable_pairs(results: list[PairResults], sae_failures: dict[int, list[str]]) -> dict[str, str]:
    """pair → the SAE gate failures behind its feature-level numbers, for every pair whose target
    layer's SAE missed its gates (per evaluate's metrics or `sae_failures`: layer → failures)."""
    out = {}
    for res in results:
        flag = res.m.sae_reliable
        if res.pair.target in sae_failures or (math.isfinite(flag) and flag < 1):
            out[res.name] = "; ".join(sae_failures.get(res.pair.target, [])) or "see reports/sae"
    return out


def _mark_feature_cells(ax: Any, Ls: list[int], ks: list[int], results: list[PairResults], bad: dict[str, str]) -> None:
    """A red frame and an UNRELIABLE label on the cells whose feature numbers rest on a failed SAE."""
    from matplotlib.patches import Rectangle

    for res in results:
        if res.name in bad:
            j, i = Ls.index(res.pair.L), ks.index(res.pair.k)
            ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, edgecolor=UNRELIABLE_COLOUR, lw=2.5))
            ax.text(j, i + 0.36, "UNRELIABLE SAE", ha="center", va="center", fontsize=6, color=UNRELIABLE_COLOUR,
                    bbox=dict(facecolor="white", edgecolor="none", pad=0.5))  # fmt: skip


def plot_heatmaps(
    path: Path, results: list[PairResults], dpi: int, sae_failures: dict[int, list[str]] | None = None
) -> Path:
    """One heatmap per headline score over (k rows × L columns), only the L and k values present. The
    feature-level panels mark pairs whose target layer's SAE missed its quality gates (`sae_failures`:
    layer → failures of the unreliable SAEs), with a banner naming the failures."""
    from matplotlib.patches import Patch

    plt = pyplot()
    Ls = sorted({res.pair.L for res in results})
    ks = sorted({res.pair.k for res in results})
    by_lk = {(res.pair.L, res.pair.k): res for res in results}
    bad = unreliable_pairs(results, sae_failures or {})
    panel_w, panel_h = 0.8 * len(Ls) + 2.0, 0.62 * len(ks) + 1.6
    ncols = 1 if len(Ls) > 8 else 2 if len(Ls) > 3 else 3
    nrows = math.ceil(len(HEATMAPS) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * panel_w, nrows * panel_h), squeeze=False)
    flat = axes.ravel()
    for ax, (title, kind, value, note) in zip(flat, HEATMAPS):
        grid = np.full((len(ks), len(Ls)), np.nan)
        for (L, k), res in by_lk.items():
            grid[ks.index(k), Ls.index(L)] = value(res.m)
        _heatmap_panel(fig, ax, grid, kind, title, Ls, ks, by_lk, note)
        if title in FEATURE_PANELS:
            _mark_feature_cells(ax, Ls, ks, results, bad)
    for ax in flat[len(HEATMAPS) :]:
        ax.axis("off")
    fig.legend(
        handles=[
            Patch(facecolor="#e6e6e6", edgecolor="#bbbbbb", label="no such pair in params.pairs"),
            Patch(facecolor="white", edgecolor="#888888", hatch="///", label="pair configured, output missing"),
        ],
        loc="lower center",
        ncols=2,
        fontsize=9,
        frameon=False,
    )
    banner = (0.45 if bad else 0.0) / fig.get_figheight()  # room for the UNRELIABLE banner
    fig.suptitle(f"ato: headline scores per pair (L → L+k), {len(results)} pairs", fontsize=11, y=0.98 - banner)
    if bad:  # feature panels of these pairs rest on an SAE that missed its gates: say so on the figure
        by_layer = {res.pair.target: bad[res.name] for res in results if res.name in bad}
        texts = [f"layer {n}: {why}" for n, why in sorted(by_layer.items())]
        mark_unreliable(fig, unreliable_sae_text(["; ".join(texts)]) + " (feature panels)")
    top = 0.4 / fig.get_figheight() + banner
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1 - top))
    return save_figure(fig, path, dpi)


def _heatmap_panel(
    fig: Any,
    ax: Any,
    grid: np.ndarray,
    kind: str,
    title: str,
    Ls: list[int],
    ks: list[int],
    by_lk: dict[tuple[int, int], PairResults],
    note: Note,
) -> None:
    import matplotlib

    finite = grid[np.isfinite(grid)]
    if kind == "r2":
        vmin = float(max(-1.0, min(0.0, finite.min()))) if finite.size else 0.0
        vmax, cmap, spec = 1.0, matplotlib.colormaps["viridis"], ".3f"
    else:
        vmin, vmax = 0.0, float(max(1.0, finite.max())) if finite.size else 1.0
        cmap, spec = matplotlib.colormaps["cividis"], ".0f"
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    cmap = cmap.with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for i, k in enumerate(ks):
        for j, L in enumerate(Ls):
            _heatmap_cell(ax, i, j, grid[i, j], by_lk.get((L, k)), spec, cmap(norm(grid[i, j])), note)
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


def _heatmap_cell(ax: Any, i: int, j: int, v: float, res: PairResults | None, spec: str, rgba: Any, note: Note) -> None:
    from matplotlib.patches import Rectangle

    if res is None:  # not a configured pair
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e6e6e6", edgecolor="white", lw=1))
        return
    if not math.isfinite(v):  # configured, but its output is missing
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="#888888", hatch="///", lw=0.5))
        ax.text(
            j,
            i,
            "missing",
            ha="center",
            va="center",
            fontsize=7,
            color="#444444",
            bbox=dict(facecolor="white", edgecolor="none", pad=1),
        )
        return
    text = format(v, spec)
    extra = note(res.m) if note is not None else ""
    if extra:
        text += f"\n{extra}"
    r, g, b, _ = rgba
    light = 0.299 * r + 0.587 * g + 0.114 * b > 0.55
    ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if light else "white")


# --------------------------------------------------------------------------------------------
# Efficiency and ceiling per k


def plot_efficiency(path: Path, results: list[PairResults], subspace_fraction: float, dpi: int) -> Path:
    """Per k: η(r) (reduced-rank map solid, the same without the mean shift dotted, SVD truncation dashed;
    test) above ceiling(r) (train) with the held-out subspace size (dotted) beside its null (dash-dot)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    ks = sorted({res.pair.k for res in results})
    colours = _layer_colours(results)
    fig, axes = plt.subplots(2, len(ks), figsize=(4.6 * len(ks) + 0.4, 7.6), squeeze=False, sharex=True)
    for col, k in enumerate(ks):
        ax_eta, ax_ceil = axes[0][col], axes[1][col]
        group = sorted((res for res in results if res.pair.k == k), key=lambda r: r.pair.L)
        handles, absent = _efficiency_lines(ax_eta, ax_ceil, group, colours)
        note = f"\n(efficiency.csv missing: {', '.join(absent)})" if absent else ""
        ax_eta.set_title(f"k = {k}: transport efficiency (test){note}", fontsize=10)
        ax_ceil.set_title(f"k = {k}: CCA ceiling (train){note}", fontsize=10)
        style = [
            Line2D([], [], color="grey", ls="-", lw=1.8, label="reduced-rank map"),
            Line2D([], [], color="grey", ls=":", lw=1.2, label="reduced-rank map, mean shift removed"),
            Line2D([], [], color="grey", ls="--", lw=1.1, label="SVD truncation of the ATO"),
        ]
        ax_eta.legend(handles=handles + style, fontsize=7, loc="best")
        ceil_handles = handles + [
            Line2D([], [], color="grey", ls=":", lw=1.2, label=f"held-out subspace size ({subspace_fraction:.0%})"),
            Line2D([], [], color="grey", ls="-.", lw=0.9, alpha=0.6, label="its null (independent x, y)"),
        ]
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
    return save_figure(fig, path, dpi)


def _efficiency_lines(
    ax_eta: Any, ax_ceil: Any, group: list[PairResults], colours: dict[int, Any]
) -> tuple[list[Any], list[str]]:
    """One line per L on both panels; returns the legend handles and the pairs without a table."""
    from matplotlib.lines import Line2D

    handles, absent, low = [], [], 0.0
    for res in group:
        colour, eff = colours[res.pair.L], res.efficiency
        if eff is None:
            absent.append(res.name)
            continue
        ax_eta.plot(eff.rank, eff.eta_rrr_test, "-", color=colour, marker="o", ms=3, lw=1.8)
        ax_eta.plot(eff.rank, eff.eta_rrr_test_shift_removed, ":", color=colour, lw=1.2)
        ax_eta.plot(eff.rank, eff.eta_svd_test, "--", color=colour, lw=1.1, alpha=0.85)
        ax_ceil.plot(eff.rank, eff.ceiling, "-", color=colour, marker="o", ms=3, lw=1.8)
        for size, ls, kw in (
            (res.m.heldout_subspace_size, ":", {"lw": 1.2}),
            (res.m.heldout_subspace_size_null, "-.", {"lw": 0.9, "alpha": 0.6}),
        ):
            if math.isfinite(size) and size > 0:
                ax_ceil.axvline(size, color=colour, ls=ls, **kw)
        curves = (eff.eta_rrr_test, eff.eta_rrr_test_shift_removed, eff.eta_svd_test)
        finite = np.concatenate([c[np.isfinite(c)] for c in curves])
        low = min(low, float(finite.min())) if finite.size else low
        label = f"L={res.pair.L} → {res.pair.target}"
        handles.append(Line2D([], [], color=colour, marker="o", ms=3, lw=1.8, label=label))
    ax_eta.axhline(1.0, color="black", lw=0.7)
    if low < -1.0:  # very negative SVD-truncation scores would flatten everything else
        ax_eta.set_ylim(-1.05, 1.1)
        ax_eta.text(0.98, 0.03, "axis clipped at −1", transform=ax_eta.transAxes, ha="right", fontsize=7)
    return handles, absent


# --------------------------------------------------------------------------------------------
# Ridge penalty


def plot_alpha(path: Path, results: list[PairResults], dpi: int) -> Path:
    """α → validation R² per pair on a log α axis, a star at each pair's chosen α. The right panel
    shows R² minus the chosen α's R² on a symmetric-log axis: ridge often gains only ~1e-5 over OLS,
    invisible on the left, and this shows how flat the optimum is and what α → 0 (OLS) costs."""
    plt = pyplot()
    fig, (ax, ax_zoom) = plt.subplots(1, 2, figsize=(13.5, 5.2), sharex=True)
    absent, low, gaps = _alpha_curves(ax, ax_zoom, results)
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
        ax.text(
            0.01,
            0.98,
            "no tuning output: " + ", ".join(absent),
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color="#b22222",
        )
    if len(absent) < len(results):
        ax_zoom.legend(
            *ax.get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False
        )
    fig.suptitle("Ridge penalty per pair: the exact validation R² curve from the statistics", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def _alpha_curves(ax: Any, ax_zoom: Any, results: list[PairResults]) -> tuple[list[str], float, list[float]]:
    """Each pair's curve on both panels; returns (pairs without tuning output, lowest R², R² gaps)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(results) <= 10 else "tab20"]
    styles = ["-", "--", "-.", ":"]
    ks = sorted({res.pair.k for res in results})
    absent: list[str] = []
    low, gaps = math.inf, [0.0]
    for i, res in enumerate(results):
        pts = sorted((p.alpha, p.val_r2) for p in (res.tuning.curve if res.tuning else []))
        pts = [(a, v) for a, v in pts if math.isfinite(a) and a > 0 and math.isfinite(v)]
        if res.tuning is None or not pts:
            absent.append(res.name)
            continue
        colour, style = cmap(i % cmap.N), styles[ks.index(res.pair.k) % len(styles)]
        a, v = np.array(pts).T
        low = min(low, float(v.min()))
        alpha, best = res.tuning.alpha, res.tuning.val_r2
        verdict = (
            " (edge!)" if res.tuning.alpha_edge_warning else " (immaterial)" if res.tuning.alpha_immaterial else ""
        )
        label = f"{res.name}: α = {fmt(alpha, '.3g')}{verdict}, val R² = {fmt(best)}"
        ax.plot(a, v, style, color=colour, lw=1.6, label=label)
        ref = best if math.isfinite(best) else float(v.max())
        ax_zoom.plot(a, v - ref, style, color=colour, lw=1.6)
        gaps += [float((v - ref).min()), float((v - ref).max())]
        if math.isfinite(alpha) and math.isfinite(best):
            for target, y in ((ax, best), (ax_zoom, 0.0)):
                target.plot([alpha], [y], marker="*", ms=13, color=colour, markeredgecolor="black", zorder=4)
    return absent, low, gaps


# --------------------------------------------------------------------------------------------
# Learning curve

CURVE_FRACTIONS = (8, 4, 2, 1)  # the subsets 1/8 … all of train (`PairMetrics.curve_*_f<n>`)


def plot_learning_curve(path: Path, results: list[PairResults], dpi: int) -> Path:
    """One panel per pair: η(test) of the ridge map fitted on 1/8 … all of train against 1/n, the straight
    line through them, and η∞ at 1/n = 0 with its 95 % interval beside 1 (an exactly linear map's η∞)."""
    plt = pyplot()
    cols = min(3, max(1, len(results)))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, res in zip(axes.flat, results):
        _curve_panel(ax, res)
    for ax in list(axes.flat)[len(results) :]:
        ax.set_visible(False)
    fig.suptitle("η(test) on nested train subsets, extrapolated to n → ∞ (◆ = η∞ with its 95 % interval)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def _curve_panel(ax: Any, res: PairResults) -> None:
    m = res.m
    n = np.array([getattr(m, f"curve_n_f{f}") for f in CURVE_FRACTIONS])
    eta = np.array([getattr(m, f"curve_eta_f{f}") for f in CURVE_FRACTIONS])
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    shortfall = fmt_ci(m.eta_shortfall, m.eta_shortfall_lo, m.eta_shortfall_hi, "+.3f")
    ax.set_title(f"{res.name}: shortfall 1 − η∞ = {shortfall}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.set_xlabel("1 / train tokens (×10⁻⁵)")
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(eta)) and math.isfinite(m.eta_inf)):
        ax.text(0.5, 0.5, "no learning curve", transform=ax.transAxes, ha="center", fontsize=8)
        return
    x = 1e5 / n
    slope = np.polyfit(x, eta, 1)[0]
    ax.plot([0.0, x.max()], [m.eta_inf, m.eta_inf + slope * x.max()], color="tab:blue", lw=1, ls="--")
    ax.plot(x, eta, "o", color="tab:blue", label="observed (1/8 … all)")
    ax.errorbar([0.0], [m.eta_inf], yerr=[[m.eta_inf - m.eta_inf_lo], [m.eta_inf_hi - m.eta_inf]],
                fmt="D", color="tab:red", capsize=3, label=f"η∞ {fmt(m.eta_inf, '.3f')}")  # fmt: skip
    ax.legend(fontsize=7, loc="lower left")
