"""Tune's figure: one pair's α → validation R² curve, its Optuna trials and the chosen α."""

from __future__ import annotations

from pathlib import Path

from ato.artifacts import TuningResult

from . import pyplot, save_figure

DPI = 110


def plot_alpha_curve(result: TuningResult, path: str | Path, dpi: int = DPI) -> Path:
    """The exact objective over the α grid (line), the trials (dots) and the chosen α (dashed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.plot([c.alpha for c in result.curve], [c.val_r2 for c in result.curve], label="exact curve")
    ax.scatter(
        [c.alpha for c in result.trials],
        [c.val_r2 for c in result.trials],
        s=12,
        color="C1",
        label="Optuna trials",
        zorder=3,
    )
    ax.axvline(result.alpha, color="C2", ls="--", label=f"chosen α = {result.alpha:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("ridge penalty α")
    ax.set_ylabel("validation R² (uniform average)")
    ax.set_title(f"{result.pair}: α → validation R²")
    ax.legend()
    return save_figure(fig, path, dpi)
