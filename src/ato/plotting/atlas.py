"""Figures of `ato atlas`: heatmaps over (L, k), the operators side by side, and the singular
spectra of the ridge map beside the model's mean Jacobian. Every figure prints the atlas's budget."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import AtlasPair, AtlasResult
from ato.kinds import MapKind, Role, keys_for, kinds_for

from . import pyplot, save_figure


def _operator_kinds() -> list[tuple[Role, MapKind]]:
    """(role, kind) of every atlas operator, then of the mean-ablation reference: the figures' order."""
    roles: tuple[Role, ...] = ("atlas", "atlas_reference")
    return [(role, k) for role in roles for k in kinds_for(role)]


def operator_labels() -> dict[str, str]:
    """Figure label per atlas operator key (`ato.kinds`), the reference last."""
    return {k.key(role): k.label_in(role) for role, k in _operator_kinds()}


def operator_colours() -> dict[str, str]:
    """Colour per atlas operator key (`ato.kinds`), the reference last."""
    return {k.key(role): k.colour for role, k in _operator_kinds()}


Value = Callable[[AtlasPair], float]
# (title, value, colour scale: "r2" −1..1 diverging, "signed" symmetric, "positive" 0..max)
HEATMAPS: tuple[tuple[str, Value, str], ...] = (
    ("residual R² of the ridge map (test, uniform over dims)", lambda p: p.operators["ridge"].r2, "r2"),
    ("residual R² of the ridge map (test, variance-weighted)", lambda p: p.operators["ridge"].r2_weighted, "r2"),
    ("R²(ridge) − R²(identity): what a map adds to carrying x", lambda p: p.gain_over_identity, "signed"),
    ("η(test) / η of an exactly linear map (1 = linear)", lambda p: p.eta_ratio, "ratio"),
    (
        "canonical directions carrying transport (held out, step-down test)",
        lambda p: p.transport_directions,
        "positive",
    ),
    (
        "‖(W − E[J])V‖ / ‖(W − I)V‖: ridge vs mean Jacobian on the computed part",
        lambda p: p.local.rel_diff_update if p.local else math.nan,
        "positive",
    ),
)


def _grid(result: AtlasResult, value: Value) -> tuple[np.ndarray, list[int], list[int]]:
    Ls = sorted({p.L for p in result.pairs})
    ks = sorted({p.k for p in result.pairs})
    grid = np.full((len(ks), len(Ls)), np.nan)
    for p in result.pairs:
        grid[ks.index(p.k), Ls.index(p.L)] = value(p)
    return grid, Ls, ks


def _limits(grid: np.ndarray, scale: str) -> tuple[str, float, float]:
    finite = grid[np.isfinite(grid)]
    peak = float(np.max(np.abs(finite))) if finite.size else 1.0
    if scale == "r2":
        return "RdBu", -1.0, 1.0
    if scale == "ratio":
        return "RdBu", 0.0, 2.0
    if scale == "signed":
        return "RdBu", -peak or -1.0, peak or 1.0
    return "viridis", 0.0, peak or 1.0


def plot_atlas_heatmaps(path: Path, result: AtlasResult, dpi: int) -> Path:
    """One heatmap per headline number over (k rows × L columns), each cell annotated."""
    plt = pyplot()
    _, Ls, ks = _grid(result, lambda p: 0.0)
    fig, axes = plt.subplots(len(HEATMAPS), 1, figsize=(0.62 * len(Ls) + 2.5, len(HEATMAPS) * (0.5 * len(ks) + 1.1)))
    for ax, (title, value, scale) in zip(np.atleast_1d(axes), HEATMAPS):
        grid, _, _ = _grid(result, value)
        cmap, lo, hi = _limits(grid, scale)
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for i in range(len(ks)):
            for j in range(len(Ls)):
                v = grid[i, j]
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}", ha="center", va="center", fontsize=6.5)
        ax.set_xticks(range(len(Ls)), [str(L) for L in Ls], fontsize=7)
        ax.set_yticks(range(len(ks)), [str(k) for k in ks], fontsize=7)
        ax.set_xlabel("input layer L", fontsize=8)
        ax.set_ylabel("k", fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    fig.suptitle(f"Transport atlas — {result.model}\n{result.budget.label()}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def plot_operator_bars(path: Path, result: AtlasResult, dpi: int) -> Path:
    """Left: median test R² of each operator per k (whiskers: min … max over L). Right: causal Δ of
    each operator on the causal pairs, with its 95 % interval."""
    plt = pyplot()
    causal = [p for p in result.pairs if math.isfinite(p.operators["ridge"].causal_delta)]
    fig, axes = plt.subplots(1, 2 if causal else 1, figsize=(13 if causal else 8, 4.6), squeeze=False)
    ax = axes[0, 0]
    ks = sorted({p.k for p in result.pairs})
    ops, labels, colours = keys_for("atlas"), operator_labels(), operator_colours()
    width = 0.8 / len(ops)
    for i, op in enumerate(ops):
        medians, lows, highs = [], [], []
        for k in ks:
            v = np.array([p.operators[op].r2 for p in result.pairs if p.k == k and op in p.operators])
            v = v[np.isfinite(v)]
            mid = float(np.median(v)) if v.size else np.nan
            medians.append(mid)
            lows.append(mid - v.min() if v.size else 0.0)
            highs.append(v.max() - mid if v.size else 0.0)
        x = np.arange(len(ks)) + (i - (len(ops) - 1) / 2) * width
        ax.bar(x, medians, width, yerr=[lows, highs], capsize=2, color=colours[op], label=labels[op])
    ax.set_xticks(range(len(ks)), [f"k = {k}" for k in ks])
    ax.set_ylabel("residual R² (test, uniform), median over L; whiskers min…max")
    if ax.get_ylim()[0] < -1.0:  # a few early-layer identity/Procrustes scores reach −10: keep the bars readable
        ax.set_ylim(-1.0, 1.0)
        ax.text(0.99, 0.02, "y clipped at −1 (atlas.md has every value)", transform=ax.transAxes, ha="right",
                fontsize=7)  # fmt: skip
    else:
        ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.0)
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{len(ops)} operators, scored the same way", fontsize=9)
    if causal:
        _causal_panel(axes[0, 1], causal)
    fig.suptitle(result.budget.label(), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def _causal_panel(ax: Any, pairs: list[AtlasPair]) -> None:
    labels, colours = operator_labels(), operator_colours()
    ops = [op for op in labels if any(op in p.operators for p in pairs)]
    width = 0.8 / max(1, len(pairs))
    for j, p in enumerate(pairs):
        ys = [p.operators[op].causal_delta if op in p.operators else np.nan for op in ops]
        lo = [y - p.operators[op].causal_low if op in p.operators else 0.0 for op, y in zip(ops, ys)]
        hi = [p.operators[op].causal_high - y if op in p.operators else 0.0 for op, y in zip(ops, ys)]
        x = np.arange(len(ops)) + (j - (len(pairs) - 1) / 2) * width
        ax.bar(x, ys, width, yerr=[np.nan_to_num(lo), np.nan_to_num(hi)], capsize=2,
               color=[colours[op] for op in ops], alpha=1.0 - 0.35 * j, label=p.pair)  # fmt: skip
    ax.set_xticks(range(len(ops)), [labels[op] for op in ops], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylabel("Δ log-perplexity (nats/token), 95 % interval")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("causal cost of patching layer L+k with each operator (" + ", ".join(p.pair for p in pairs) + ")",
                 fontsize=9)  # fmt: skip


def spectra_pairs(result: AtlasResult, n: int = 4) -> list[AtlasPair]:
    """Up to n probed pairs: the causal ones first, then k = 1 pairs spread over L."""
    probed = [p for p in result.pairs if p.local is not None]
    chosen = [p for p in probed if p.pair in result.budget.causal_pairs]
    ones = [p for p in probed if p.k == 1 and p not in chosen]
    for i in np.linspace(0, len(ones) - 1, min(len(ones), max(0, n - len(chosen)))).round().astype(int):
        chosen.append(ones[int(i)])
    return chosen[:n] or probed[:n]


def plot_spectra(path: Path, result: AtlasResult, dpi: int) -> Path:
    """Singular values of the ridge map, the mean same-position Jacobian and the total response, all
    restricted to the probed subspace V."""
    plt = pyplot()
    pairs = spectra_pairs(result)
    fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(3.6 * max(1, len(pairs)), 3.6), squeeze=False)
    for ax, p in zip(axes[0], pairs):
        lg = p.local
        assert lg is not None
        for values, label, colour, style in (
            (lg.sv_ridge, "ridge W V", operator_colours()["ridge"], "-o"),
            (lg.sv_jacobian, "E[J] V (same position)", operator_colours()["jacobian"], "-s"),
            (lg.sv_total, "E[Σ_s J_ts] V (whole stream)", "#7f7f7f", "--^"),
        ):
            ax.plot(np.arange(1, len(values) + 1), values, style, ms=3, color=colour, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("singular value index")
        noise = lg.sequence_noise  # sequences as the unit: tokens of one sequence are not independent
        ax.set_title(f"{p.pair}: ‖(W−E[J])V‖/‖WV‖ = {lg.rel_diff:.2f} (noise {noise:.2f})", fontsize=8)
    axes[0, 0].set_ylabel("singular value")
    axes[0, 0].legend(fontsize=7)
    if not pairs:
        axes[0, 0].text(0.5, 0.5, "no pair probed (atlas.jacobian_layers)", ha="center", va="center")
    fig.suptitle(result.budget.label(), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi)
