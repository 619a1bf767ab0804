"""Figures of `ato evaluate` for one pair: the rank sweep (whitened R² and η vs the CCA ceiling),
feature-space R² per verdict, and the per-dimension R² of the ATO and its baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ato.math.metrics import NO_VERDICT, SYNTHESISED, TRANSPORTED

from . import pyplot, save_figure

VERDICT_COLOURS = {TRANSPORTED: "tab:green", SYNTHESISED: "tab:red", NO_VERDICT: "tab:grey"}
CLIP = -1.0  # R² below this is drawn at the clip


def plot_efficiency(
    path: Path,
    name: str,
    table: dict[str, np.ndarray],
    participation_ratio: float,
    fraction: float,
    size: int,
    dpi: int,
) -> Path:
    """Left: whitened R²(r) of SVD truncation and RRR vs the ceiling; right: η(r)."""
    plt = pyplot()
    ranks = table["rank"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(ranks, table["ceiling"], "k-", lw=2.2, label="CCA ceiling(r) (train)")
    styles = {"svd": ("tab:blue", "SVD truncation"), "rrr": ("tab:orange", "reduced-rank regression")}
    for kind, (color, label) in styles.items():
        for ax, what in ((ax1, "r2w"), (ax2, "eta")):
            ax.plot(ranks, table[f"{what}_{kind}_train"], "-", color=color, marker="o", ms=3, label=f"{label}, train")
            ax.plot(ranks, table[f"{what}_{kind}_test"], "--", color=color, marker="s", ms=3, label=f"{label}, test")
    ax1.axvline(size, color="grey", ls=":", label=f"subspace size {size} ({fraction:.0%} of ceiling)")
    ax1.set(
        xscale="log",
        xlabel="rank r",
        ylabel="whitened R²",
        title=f"{name}: whitened R² vs CCA ceiling (PR {participation_ratio:.1f})",
    )
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set(xscale="log", xlabel="rank r", ylabel="η(r) = R²_w(r) / ceiling(r)", title=f"{name}: transport efficiency")
    for ax, keys in (
        (ax1, ("r2w_svd_train", "r2w_svd_test", "r2w_rrr_train", "r2w_rrr_test", "ceiling")),
        (ax2, ("eta_svd_train", "eta_svd_test", "eta_rrr_train", "eta_rrr_test")),
    ):
        values = np.concatenate([table[k][np.isfinite(table[k])] for k in keys] + [np.array([0.0, 1.0])])
        if values.min() < CLIP:  # a few very negative SVD-truncation scores would flatten everything else
            ax.set_ylim(-1.05, max(1.05, values.max() + 0.05))
            ax.set_ylabel(ax.get_ylabel() + "  (axis clipped at −1)")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def plot_feature_r2(
    path: Path, name: str, r2: np.ndarray, identity_r2: np.ndarray, verdicts: np.ndarray, threshold: float, dpi: int
) -> Path:
    """Left: stacked histogram of the ATO's feature R² per verdict; right: ATO vs identity per feature."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lo = CLIP
    bins = np.linspace(lo, 1.0, 41)
    groups, group_colors, group_labels = [], [], []
    for verdict, color in VERDICT_COLOURS.items():
        sel = (verdicts == verdict) & np.isfinite(r2)
        if sel.any():
            groups.append(np.clip(r2[sel], lo, 1.0))
            group_colors.append(color)
            group_labels.append(f"{verdict} ({int((verdicts == verdict).sum())})")
            ax2.scatter(
                np.clip(identity_r2[sel], lo, 1.0),
                np.clip(r2[sel], lo, 1.0),
                s=12,
                color=color,
                alpha=0.8,
                label=verdict,
            )
    if groups:  # stacked, so no verdict hides another
        ax1.hist(groups, bins=bins, color=group_colors, label=group_labels, stacked=True, alpha=0.85)
    ax1.axvline(threshold, color="k", ls="--", label=f"threshold R² = {threshold}")
    ax1.set(
        xlabel=f"feature R² of the ATO (clipped at {lo})",
        ylabel="features",
        title=f"{name}: feature-space R² on test (active tokens only)",
    )
    ax2.plot([lo, 1], [lo, 1], "k:", lw=1, label="y = x")
    ax2.axhline(threshold, color="k", ls="--", lw=0.8)
    ax2.set(
        xlim=(lo - 0.05, 1.05),
        ylim=(lo - 0.05, 1.05),
        xlabel=f"feature R² of identity (ŷ = x), clipped at {lo}",
        ylabel=f"feature R² of the ATO, clipped at {lo}",
        title=f"{name}: ATO vs identity per feature",
    )
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def plot_dim_r2(path: Path, name: str, per_dim: dict[str, np.ndarray], dpi: int) -> Path:
    """Histogram of the per-dimension R² of the ATO, OLS and identity."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    bins = np.linspace(CLIP, 1.0, 51)
    styles = {
        "ato": ("ATO", "tab:blue", "-", 2.6),
        "ols": ("OLS (α = 0)", "tab:orange", "--", 1.6),
        "identity": ("identity (ŷ = x)", "tab:green", "-", 1.6),
    }
    for k, (label, color, ls, lw) in styles.items():
        v = per_dim[k][np.isfinite(per_dim[k])]
        if v.size:
            ax.hist(
                np.clip(v, CLIP, 1.0),
                bins=bins,
                histtype="step",
                lw=lw,
                ls=ls,
                color=color,
                label=f"{label}: median {np.median(v):.3f}",
            )
    ax.set(
        xlabel=f"R² per residual dimension (clipped at {CLIP})",
        ylabel="dimensions",
        title=f"{name}: per-dimension R² on test",
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi)
