"""Figures of `ato evaluate` for one pair: the rank sweep (whitened R² and η vs the CCA ceiling, η beside
the η of an exactly linear map, the canonical correlations and the subspace size beside their null),
feature-space R² per verdict, and the per-dimension R² of the ATO and its baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ato.math.heldout import HeldOutCCA, SubspaceReport
from ato.math.linear_reference import LinearReference
from ato.math.metrics import NO_VERDICT, SYNTHESISED, TRANSPORTED, UNDETERMINED

from . import mark_unreliable, pyplot, save_figure

VERDICT_COLOURS = {TRANSPORTED: "tab:green", UNDETERMINED: "tab:olive", SYNTHESISED: "tab:red", NO_VERDICT: "tab:grey"}
CLIP = -1.0  # R² below this is drawn at the clip
STYLES = {"svd": ("tab:blue", "SVD truncation"), "rrr": ("tab:orange", "reduced-rank regression")}


def plot_efficiency(
    path: Path,
    name: str,
    table: dict[str, np.ndarray],
    heldout: HeldOutCCA,
    subspace: SubspaceReport,
    linear: LinearReference,
    n_test: float,
    dpi: int,
) -> Path:
    """Four panels: whitened R²(r) vs the ceiling; η(r) on test raw and without the mean shift beside
    the η of an exactly linear map; canonical correlations in sample and held out beside the null floor;
    the cumulative share of ρ² with the subspace sizes and their null bands."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _panel_r2(axes[0, 0], name, table)
    _panel_eta(axes[0, 1], name, table, linear)
    _panel_rho(axes[1, 0], name, heldout, n_test)
    _panel_subspace(axes[1, 1], name, heldout, subspace)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def _clip_axis(ax: Any, table: dict[str, np.ndarray], keys: tuple[str, ...]) -> None:
    """A few very negative scores (SVD truncation at small rank) would flatten everything else."""
    values = np.concatenate([table[k][np.isfinite(table[k])] for k in keys] + [np.array([0.0, 1.0])])
    if values.min() < CLIP:
        ax.set_ylim(-1.05, max(1.05, values.max() + 0.05))
        ax.set_ylabel(ax.get_ylabel() + "  (axis clipped at −1)")


def _panel_r2(ax: Any, name: str, table: dict[str, np.ndarray]) -> None:
    ranks = table["rank"]
    ax.plot(ranks, table["ceiling"], "k-", lw=2.2, label="CCA ceiling(r) (train; a true bound)")
    for kind, (color, label) in STYLES.items():
        ax.plot(ranks, table[f"r2w_{kind}_train"], "-", color=color, marker="o", ms=3, label=f"{label}, train")
        ax.plot(ranks, table[f"r2w_{kind}_test"], "--", color=color, marker="s", ms=3, label=f"{label}, test")
    ax.set(xscale="log", xlabel="rank r", ylabel="whitened R²", title=f"{name}: whitened R² vs CCA ceiling")
    _clip_axis(ax, table, ("r2w_svd_train", "r2w_svd_test", "r2w_rrr_train", "r2w_rrr_test", "ceiling"))
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, which="both")


def _panel_eta(ax: Any, name: str, table: dict[str, np.ndarray], linear: LinearReference) -> None:
    ranks = table["rank"]
    for kind, (color, label) in STYLES.items():
        ax.plot(ranks, table[f"eta_{kind}_test"], ":", color=color, marker="s", ms=3, label=f"{label}, test (raw)")
        ax.plot(
            ranks,
            table[f"eta_{kind}_test_shift_removed"],
            "-",
            color=color,
            marker="o",
            ms=3,
            label=f"{label}, test, mean shift removed",
        )
    ax.axhline(1.0, color="k", lw=0.8)
    spread = linear.eta_simulated_std if np.isfinite(linear.eta_simulated_std) else 0.0
    ax.axhspan(linear.eta_expected - spread, linear.eta_expected + spread, color="tab:green", alpha=0.2)
    ax.axhline(
        linear.eta_expected,
        color="tab:green",
        ls="--",
        lw=1.2,
        label=f"exactly linear map at this effective n, d: η = {linear.eta_expected:.4f} ± {spread:.4f}",
    )
    ax.plot(
        [ranks[-1]],
        [linear.eta_test],
        "k*",
        ms=11,
        label=f"ATO η(test) = {linear.eta_test:.4f} (ratio to linear {linear.ratio:.4f})",
    )
    ax.set(
        xscale="log",
        xlabel="rank r",
        ylabel="η(r) = R²_w(r) / ceiling(r)",
        title=f"{name}: transport efficiency on test",
    )
    keys = ("eta_svd_test", "eta_rrr_test", "eta_svd_test_shift_removed", "eta_rrr_test_shift_removed")
    _clip_axis(ax, table, keys)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    _inset_full_rank(ax, table, linear, spread)


def _inset_full_rank(ax: Any, table: dict[str, np.ndarray], linear: LinearReference, spread: float) -> None:
    """Zoom on the top ranks, where η(test) and the linear reference differ by ~1e-2 (invisible at full scale)."""
    from matplotlib.ticker import NullFormatter

    ranks = table["rank"]
    top = ranks >= max(1, ranks[-1] // 8)
    values = [table[k][top] for k in ("eta_rrr_test", "eta_rrr_test_shift_removed")]
    values += [np.array([linear.eta_test, linear.eta_expected - spread, linear.eta_expected + spread, 1.0])]
    finite = np.concatenate(values)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return
    inset = ax.inset_axes((0.42, 0.42, 0.55, 0.38))
    color = STYLES["rrr"][0]
    inset.plot(ranks[top], table["eta_rrr_test"][top], ":", color=color, marker="s", ms=2.5)
    inset.plot(ranks[top], table["eta_rrr_test_shift_removed"][top], "-", color=color, marker="o", ms=2.5)
    inset.axhspan(linear.eta_expected - spread, linear.eta_expected + spread, color="tab:green", alpha=0.2)
    inset.axhline(linear.eta_expected, color="tab:green", ls="--", lw=1.2)
    inset.axhline(1.0, color="k", lw=0.8)
    inset.plot([ranks[-1]], [linear.eta_test], "k*", ms=9)
    margin = 0.1 * max(finite.max() - finite.min(), 1e-3)
    inset.set(xscale="log", ylim=(finite.min() - margin, finite.max() + margin))
    inset.set_title("top ranks (RRR, test)", fontsize=7)
    inset.tick_params(labelsize=6)
    inset.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels collide at this size
    inset.grid(alpha=0.3, which="both")


def _panel_rho(ax: Any, name: str, heldout: HeldOutCCA, n_test: float) -> None:
    index = np.arange(1, len(heldout.rho_train) + 1)
    floor = 1.96 / np.sqrt(n_test) if n_test > 0 else np.nan
    band = f"null: a direction carrying nothing (±1.96/√n_test = ±{floor:.3f})"
    ax.axhspan(-floor, floor, color="grey", alpha=0.3, label=band)
    ax.plot(index, heldout.rho_train, "-", color="tab:purple", lw=1.2, label="in sample (train)")
    ax.plot(index, heldout.rho_test, ".", color="tab:cyan", ms=2.5, label="held out (train directions, test data)")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set(
        xscale="log",
        xlabel="canonical direction i (train order)",
        ylabel="canonical correlation ρ_i",
        title=f"{name}: canonical correlations, in sample vs held out",
    )
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3, which="both")


def _panel_subspace(ax: Any, name: str, heldout: HeldOutCCA, rep: SubspaceReport) -> None:
    for rho, stat, color, label in (
        (heldout.rho_test, rep.heldout_size, "tab:cyan", "held out"),
        (heldout.rho_train, rep.insample_size, "tab:purple", "in sample"),
    ):
        share = np.cumsum(np.clip(rho, 0.0, None) ** 2)
        share = share / share[-1] if len(share) and share[-1] > 0 else share
        ax.plot(np.arange(1, len(share) + 1), share, "-", color=color, lw=1.4, label=f"{label}: cumulative ρ⁺² share")
        ax.axvline(stat.observed, color=color, lw=1.6, label=f"{label} size {stat.observed:.0f}")
        band = (stat.null - stat.null_std, stat.null + stat.null_std)
        ax.axvspan(*band, color=color, alpha=0.25)
        ax.axvline(
            stat.null,
            color=color,
            ls=":",
            lw=1.2,
            label=f"{label} null {stat.null:.0f} ± {stat.null_std:.0f} (excess {stat.excess:+.0f})",
        )
    ax.axhline(rep.fraction, color="k", ls="--", lw=0.8, label=f"{rep.fraction:.0%} of Σρ⁺²")
    ax.set(
        xscale="log",
        xlabel="rank r",
        ylabel="Σ_{i≤r} ρ_i⁺² / Σ ρ_i⁺²",
        title=f"{name}: subspace size vs null (PR held out {rep.heldout_pr.observed:.1f}, "
        f"null {rep.heldout_pr.null:.1f} ± {rep.heldout_pr.null_std:.1f})",
    )
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="both")


def plot_feature_r2(
    path: Path,
    name: str,
    r2: np.ndarray,
    identity_r2: np.ndarray,
    verdicts: np.ndarray,
    threshold: float,
    dpi: int,
    unreliable: str | None = None,
) -> Path:
    """Left: stacked histogram of the ATO's feature R² per verdict; right: ATO vs identity per feature.
    `unreliable`: the banner text when the SAE missed its quality gates (`unreliable_sae_text`)."""
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
    mark_unreliable(fig, unreliable)
    fig.tight_layout(rect=(0, 0, 1, 0.92) if unreliable else (0, 0, 1, 1))
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
