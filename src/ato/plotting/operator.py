"""Figure of one operator for its model card (`ato export`): the singular values of W beside the
identity map's (all 1), and the share of ‖W‖²_F in the top r directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ato import kinds

from . import pyplot, save_figure


def plot_spectrum(W: np.ndarray, title: str, path: Path, dpi: int = 110) -> Path:
    """Singular values σ_i of W (log scale) with the identity's σ = 1 as reference, and the cumulative
    energy Σ_{i≤r} σ_i² / Σ σ_i² (how much of the map a rank-r truncation keeps)."""
    s = np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False)
    r = np.arange(1, len(s) + 1)
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    ax1.semilogy(r, np.clip(s, 1e-12, None), color=kinds.get("ato").colour, label="operator W")
    ax1.axhline(1.0, color=kinds.get("identity").colour, linestyle="--", label="identity (σ = 1)")
    ax1.set_xlabel("index i")
    ax1.set_ylabel("singular value σᵢ")
    ax1.legend(frameon=False)
    energy = np.cumsum(s**2) / (s**2).sum() if (s**2).sum() > 0 else np.zeros_like(s)
    ax2.plot(r, energy, color=kinds.get("ato").colour, label="operator W")
    ax2.plot(r, r / len(s), color=kinds.get("identity").colour, linestyle="--", label="identity (r / d)")
    ax2.set_xscale("log")
    ax2.set_xlabel("rank r")
    ax2.set_ylabel("share of Σσᵢ² in the top r")
    ax2.set_ylim(0, 1.02)
    ax2.legend(frameon=False, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi)
