"""Tune's figure: one pair's α → validation R² curve, its Optuna trials, the searched range, the chosen
α, and what the curve says about α (immaterial at this n_val, or best α at an edge of the range)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from ato.artifacts import TuningResult

from . import pyplot, save_figure

DPI = 110


def alpha_note(result: TuningResult) -> str:
    """The figure's verdict on α: immaterial (gain below noise) and/or the edge warning; else material."""
    lines = []
    if result.alpha_immaterial:
        lines.append(
            f"α immaterial at n_val = {result.n_val:,}: gain {result.alpha_gain:.2g} < noise {result.val_r2_noise:.2g}"
        )
    else:
        lines.append(
            f"α material at n_val = {result.n_val:,}: gain {result.alpha_gain:.2g} ≥ noise {result.val_r2_noise:.2g}"
        )
    if result.alpha_edge_warning is not None:
        lines.append("warning: " + result.alpha_edge_warning.removeprefix(f"{result.pair}: "))
    return "\n".join(textwrap.fill(line, 70) for line in lines)


def plot_alpha_curve(result: TuningResult, path: str | Path, dpi: int = DPI) -> Path:
    """The exact objective over the α grid (line), the trials (dots), the searched range (shaded), the
    chosen α (dashed), the noise band below the best R², and the verdict on α (`alpha_note`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    alphas, r2 = [c.alpha for c in result.curve], [c.val_r2 for c in result.curve]
    lo, hi = min(alphas), max(alphas)
    ax.axvspan(lo, hi, color="0.93", zorder=0, label=f"searched range [{lo:.3g}, {hi:.3g}]")
    ax.set_xlim(lo / 10**0.5, hi * 10**0.5)  # the ends of the range stay visible
    ax.plot(alphas, r2, label="exact curve")
    ax.scatter(
        [c.alpha for c in result.trials],
        [c.val_r2 for c in result.trials],
        s=12,
        color="C1",
        label="Optuna trials",
        zorder=3,
    )
    best = max((v for v in r2 if v == v), default=result.val_r2)  # NaN-safe max of the curve
    ax.axhspan(best - result.val_r2_noise, best, color="C2", alpha=0.15, label="best R² − noise")
    ax.axvline(result.alpha, color="C2", ls="--", label=f"chosen α = {result.alpha:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("ridge penalty α")
    ax.set_ylabel("validation R² (uniform average)")
    ax.set_title(f"{result.pair}: α → validation R²")
    colour = "C3" if result.alpha_edge_warning is not None else "0.2"
    ax.text(
        0.02,
        0.03,
        alpha_note(result),
        transform=ax.transAxes,
        fontsize=7.5,
        color=colour,
        va="bottom",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": colour},
    )
    ax.legend(fontsize=7.5, loc="best")
    return save_figure(fig, path, dpi)
