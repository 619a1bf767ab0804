"""The budget figure of `ato report`: per pair, ordered by (L, k), the test R²_w budget stacked as carried /
moved / computed with interval whiskers, the identity's R²_w for scale, and moved's increments (lagged,
+ prefix, + routed) on their own axis, where they are visible."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ato import kinds
from ato.artifacts.context import Estimate
from ato.reporting.markdown_context import INCREMENTS
from ato.reporting.results import PairResults

from . import pyplot, save_figure

COMPUTED_COLOUR = "#d9d9d9"  # the remainder: no map kind explains it
MISSING_HATCH = "///"  # a configured pair without a budget file, as in the heatmaps
# A share or increment drawn in the colour of the map kind that adds it, where the registry has that kind;
# these stand in until it does (moved: the union map "context").
FALLBACK_COLOURS = {"context": "#7570b3", "lagged": "#66a61e", "prefix": "#e7298a", "routed": "#1b9e77"}


def kind_colour(name: str) -> str:
    """The registry's colour of map kind `name`, or its stand-in."""
    try:
        return kinds.get(name).colour
    except KeyError:
        return FALLBACK_COLOURS[name]


def _whisker(ax: Any, x: float, value: float, low: float, high: float) -> None:
    if math.isfinite(value) and math.isfinite(low) and math.isfinite(high):
        ax.errorbar(x, value, yerr=[[max(value - low, 0)], [max(high - value, 0)]], fmt="none", ecolor="black",
                    elinewidth=0.9, capsize=3)  # fmt: skip


def _stacked(ax: Any, results: list[PairResults]) -> None:
    """carried (0 → c), moved (c → c + m, drawn where m > 0), computed (the rest up to 1); whiskers: carried's
    interval at its top, the union map's (1 − computed's) at the top of moved."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colours = {"carried": kind_colour("ato"), "moved": kind_colour("context"), "computed": COMPUTED_COLOUR}
    identity = kinds.get("identity")
    for i, res in enumerate(results):
        b = res.context
        if b is None or not math.isfinite(b.carried.value):
            ax.bar(i, 1.0, 0.7, color="white", edgecolor="#888888", hatch=MISSING_HATCH)
            ax.text(i, 0.5, "no budget", ha="center", va="center", fontsize=8, rotation=90, color="#b22222")
            continue
        carried, moved = b.carried.value, b.moved.value if math.isfinite(b.moved.value) else 0.0
        top = carried + max(moved, 0.0)
        ax.bar(i, carried, 0.7, color=colours["carried"], edgecolor="black", linewidth=0.4)
        ax.bar(i, max(moved, 0.0), 0.7, bottom=carried, color=colours["moved"], edgecolor="black", linewidth=0.4)
        ax.bar(i, max(1.0 - top, 0.0), 0.7, bottom=top, color=colours["computed"], edgecolor="black", linewidth=0.4)
        _whisker(ax, i - 0.12, carried, b.carried.low, b.carried.high)
        c = b.computed
        _whisker(ax, i + 0.12, 1 - c.value, 1 - c.high, 1 - c.low)
        ax.text(i, 1.02, f"moved\n{b.moved.value:+.3f}", ha="center", va="bottom", fontsize=7)
        shown = min(max(b.identity_r2_w, -0.08), 1.0)  # clipped at the axis: its value is printed beside
        ax.plot(i + 0.3, shown, marker="D", color=identity.colour, markeredgecolor="black", markersize=5)
        if shown != b.identity_r2_w and math.isfinite(b.identity_r2_w):
            ax.text(i + 0.36, shown, f"{b.identity_r2_w:.2f}", fontsize=6, va="center", color=identity.colour)
    ax.set_ylim(-0.1, 1.15)
    ax.set_ylabel("share of y's variance (R²_w, test)")
    ax.axhline(0, color="black", lw=0.6)
    handles = [
        *(Patch(facecolor=colour, edgecolor="black", label=share) for share, colour in colours.items()),
        Line2D([], [], marker="D", ls="none", color=identity.colour, markeredgecolor="black", label="identity R²_w"),
    ]
    if any(res.context is None for res in results):
        handles.append(Patch(facecolor="white", edgecolor="#888888", hatch=MISSING_HATCH, label="no budget file"))
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set_title("carried / moved / computed; whiskers: carried's and the union map's intervals", fontsize=9)


def _increments(ax: Any, results: list[PairResults]) -> None:
    """Grouped bars of the lagged, + prefix and + routed increments with their intervals."""
    from matplotlib.patches import Patch

    width = 0.8 / len(INCREMENTS)
    for i, res in enumerate(results):
        if res.context is None:
            ax.text(i, 0, "no budget", ha="center", va="bottom", fontsize=8, color="#b22222")
    for j, kind in enumerate(INCREMENTS):
        for i, res in enumerate(results):
            e = res.context.increments.get(kind, Estimate()) if res.context is not None else Estimate()
            if not math.isfinite(e.value):
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, e.value, width, color=kind_colour(kind), edgecolor="black", linewidth=0.4)
            _whisker(ax, x, e.value, e.low, e.high)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("gain in R²_w (test)")
    ax.legend(
        handles=[Patch(facecolor=kind_colour(k), edgecolor="black", label=f"+ {k}") for k in INCREMENTS],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set_title("moved, as each input block joins the map (in this order)", fontsize=9)


def plot_budget(path: Path, results: list[PairResults], dpi: int) -> Path:
    """The budget of every pair, ordered by (L, k); a pair without a budget file is a hatched bar."""
    plt = pyplot()
    ordered = sorted(results, key=lambda res: (res.pair.L, res.pair.k))
    n = len(ordered)
    width = min(18.0, max(7.5, 0.9 * n + 4.5))  # + the legends' column on the right
    fig, (ax, ax_inc) = plt.subplots(2, 1, figsize=(width, 8.0), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    _stacked(ax, ordered)
    _increments(ax_inc, ordered)
    x = np.arange(n)
    labels = [f"{res.name}\n{res.pair.L}→{res.pair.target}" for res in ordered]
    ax_inc.set_xticks(x, labels, rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center", fontsize=8)
    ax_inc.set_xlim(-0.6, n - 0.4)
    for a in (ax, ax_inc):
        a.grid(axis="y", alpha=0.3)
    fig.suptitle("Variance budget per pair (L → L+k), test", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi)
