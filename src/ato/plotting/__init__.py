"""Every figure of the pipeline, with one set of labels and colours for causal conditions and
operators. Submodules per subject (`tuning`, `evaluate`, `causal`, `summary`); this module holds
what they share. Figures are written atomically like every other output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifacts import atomic_path
from ..kinds import CLEAN_COLOUR, CLEAN_LABEL, kinds_for


def condition_colours() -> dict[str, str]:
    """Every causal condition's colour (`ato.kinds`, asked at each use); "clean" is the unpatched model."""
    return {CLEAN_LABEL: CLEAN_COLOUR, **{k.key("causal"): k.colour for k in kinds_for("causal")}}


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


UNRELIABLE_COLOUR = "#b00020"


def unreliable_sae_text(failures: list[str]) -> str:
    """The words every feature-level figure shows when its SAE missed its quality gates."""
    return "UNRELIABLE SAE: " + ("; ".join(failures) or "no gate result")


def mark_unreliable(fig: Any, text: str | None) -> None:
    """A red banner across the top of `fig` (nothing when `text` is None); call before tight_layout
    with room left at the top (`rect` top ≤ 0.93)."""
    if text:
        fig.text(
            0.5,
            0.995,
            text,
            ha="center",
            va="top",
            fontsize=9,
            color="white",
            wrap=True,
            bbox=dict(facecolor=UNRELIABLE_COLOUR, edgecolor="none", pad=4),
        )


def save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """Write `fig` as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path
