"""Figures of `ato languages`: the language-transfer matrices, the update-subspace overlaps, and per
pair the English operator's scores on every language beside its references. Every figure states its
budget (tokens per language, causal sequences)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ato import kinds
from ato.artifacts import LanguageReport

from . import condition_colours, pyplot, save_figure

PREDICTOR_LABELS = {
    "operator": "English operator",
    "recentred": "English W, own intercept",
    "own": kinds.get("own").label,
    "pooled": "pooled map",
    "identity": "identity  x",
}
R2_FLOOR = -0.5  # lower edge of the R² panels; lower values are printed on the clipped bar

PREDICTOR_COLOURS = {
    "operator": kinds.get("ato").colour,
    "recentred": "#aec7e8",
    "own": kinds.get("own").colour,
    "pooled": "#8c564b",
    "identity": kinds.get("identity").colour,
}


def budget(report: LanguageReport) -> str:
    """The data behind every number, for figure titles."""
    ref = report.sources[report.reference]
    return (
        f"fit {ref.n_fit_tokens} / test {ref.n_test_tokens} tokens per language (BOS excluded), "
        f"{ref.causal_sequences} causal sequences × {report.causal_seq_len} tokens"
    )


def _matrix_panel(ax: Any, matrix: np.ndarray, labels: list[str], title: str, vmin: float, vmax: float) -> Any:
    image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            text = "—" if not np.isfinite(value) else f"{value:.3f}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value < (vmin + vmax) / 2 else "black",
            )
    _frame_diagonal(ax, len(labels))
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    return image


def _frame_diagonal(ax: Any, n: int) -> None:
    """Outline the diagonal cells: each row's own-language (or same-language) reference."""
    from matplotlib.patches import Rectangle

    for i in range(n):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.5))


def plot_transfer(path: Path, report: LanguageReport, dpi: int) -> Path:
    """One heatmap per pair: R² of the map fitted on the row language, scored on the column language's
    test tokens; the diagonal is each language's own fit. A second row: the same for the variance-
    weighted R²."""
    plt = pyplot()
    names, langs = list(report.pairs), report.languages
    fig, axes = plt.subplots(2, len(names), figsize=(3.1 * len(names) + 1.2, 6.6), squeeze=False, layout="constrained")
    kinds = (("transfer_r2", "R²"), ("transfer_r2_weighted", "R² weighted"))
    values = np.array([v for p in report.pairs.values() for key, _ in kinds for row in getattr(p, key) for v in row])
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0  # one colour scale for every panel: one colour bar
    hi = max(lo + 1e-6, float(finite.max()) if finite.size else 1.0)
    for col, name in enumerate(names):
        pair = report.pairs[name]
        for row, (key, label) in enumerate(kinds):
            m = np.asarray(getattr(pair, key), dtype=np.float64)
            image = _matrix_panel(axes[row][col], m, langs, f"{name}: {label}", lo, hi)
        axes[1][col].set_xlabel("scored on (test)", fontsize=8)
    for row in range(2):
        axes[row][0].set_ylabel("map fitted on", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
    fig.suptitle(f"Language-transfer matrix of the per-language ridge maps\n{budget(report)}", fontsize=9)
    return save_figure(fig, path, dpi)


def plot_overlap(path: Path, report: LanguageReport, dpi: int) -> Path:
    """One heatmap per pair: overlap (mean cos² of the principal angles) of the top-r write subspaces of
    the maps' updates (W − I)S between languages; the diagonal is the same language's two halves, the
    reference for the off-diagonal (random subspaces: r/d)."""
    plt = pyplot()
    names, langs = list(report.pairs), report.languages
    fig, axes = plt.subplots(2, len(names), figsize=(3.1 * len(names) + 1.2, 6.6), squeeze=False, layout="constrained")
    for col, name in enumerate(names):
        pair = report.pairs[name]
        for row, (key, label) in enumerate((("overlap_write", "write"), ("overlap_read", "read"))):
            m = np.asarray(getattr(pair, key), dtype=np.float64)
            title = f"{name}: {label} (random {pair.overlap_random:.3f})"
            image = _matrix_panel(axes[row][col], m, langs, title, 0.0, 1.0)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
    fig.suptitle(
        f"Overlap of the top-{report.overlap_rank} update subspaces of half-maps; diagonal: split halves\n"
        f"{budget(report)}",
        fontsize=9,
    )
    return save_figure(fig, path, dpi)


def plot_scores(path: Path, report: LanguageReport, dpi: int) -> Path:
    """Per pair (columns): residual R² of the English operator on every language beside the own-language
    map, the pooled map and the identity (top); causal Δ log-ppl of the operator and the own map patches
    beside mean ablation, with intervals (bottom, symmetric-log axis)."""
    plt = pyplot()
    names, langs = list(report.pairs), report.languages
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names) + 0.6, 7.0), squeeze=False, layout="constrained")
    x = np.arange(len(langs))
    preds = list(PREDICTOR_LABELS)
    width = 0.8 / len(preds)
    for col, name in enumerate(names):
        scores = report.pairs[name].scores
        ax = axes[0][col]
        for i, pred in enumerate(preds):
            values = np.array([getattr(scores[lang], f"r2_{pred}") for lang in langs])
            xs = x + (i - (len(preds) - 1) / 2) * width
            ax.bar(xs, np.maximum(values, R2_FLOOR), width, color=PREDICTOR_COLOURS[pred], label=PREDICTOR_LABELS[pred])
            for xi, v in zip(xs, values):  # the identity's R² at k ≥ 2 is far below 0: clipped, value printed
                if v < R2_FLOOR:
                    ax.annotate(f"{v:.2f}", (xi, R2_FLOOR), xytext=(0, 2), textcoords="offset points",
                                ha="center", fontsize=6, rotation=90)  # fmt: skip
        ax.set_xticks(x, langs, fontsize=8)
        ax.set_title(f"{name}: residual R² (test)", fontsize=9)
        ax.set_ylim(R2_FLOOR, 1.0)
        ax.grid(axis="y", alpha=0.3)
        _delta_panel(axes[1][col], scores, langs, report.interval_method)
    axes[0][0].set_ylabel("residual R² (test)", fontsize=8)
    axes[1][0].set_ylabel(f"Δ log-ppl vs clean (nats/token), {report.interval_level:.0%} interval", fontsize=8)
    legend: dict[str, Any] = {}  # label → handle, the two rows' entries once each
    for row in axes:
        for handle, label in zip(*row[0].get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=len(legend), fontsize=7)
    fig.suptitle(f"English-fitted operators on other languages\n{budget(report)}", fontsize=9)
    return save_figure(fig, path, dpi)


def _delta_panel(ax: Any, scores: dict[str, Any], langs: list[str], method: str) -> None:
    x = np.arange(len(langs))
    kinds = (
        ("delta_operator", "operator", PREDICTOR_LABELS["operator"]),
        ("delta_own", "own", PREDICTOR_LABELS["own"]),
        ("delta_mean", None, "mean ablation  ȳ"),
    )
    width = 0.8 / len(kinds)
    for i, (key, pred, label) in enumerate(kinds):
        vals = [getattr(scores[lang], key) for lang in langs]
        mean = np.array([v.mean for v in vals])
        err = np.vstack([np.clip(mean - [v.lo for v in vals], 0, None), np.clip([v.hi for v in vals] - mean, 0, None)])
        colour = PREDICTOR_COLOURS[pred] if pred else condition_colours()["train_mean"]
        ax.bar(x + (i - 1) * width, mean, width, yerr=np.nan_to_num(err), capsize=3, color=colour, label=label)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, langs, fontsize=8)
    ax.set_title(f"causal Δ ({method})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
