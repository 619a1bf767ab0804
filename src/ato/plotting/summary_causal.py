"""The causal figure of `ato report`: Δ log-perplexity per pair and condition, and the share of each
reference's damage the ATO recovers, with intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts.causal import DEGENERATE_REASON, condition_labels, patched_conditions
from ato.kinds import kinds_for
from ato.params import CausalParams
from ato.reporting.results import PairResults, headline_sets

from . import condition_colours, pyplot, save_figure


def plot_causal(path: Path, results: list[PairResults], scope: str, dpi: int) -> Path:
    """Grouped bars: Δ log-ppl vs clean per pair and condition (95 % intervals); damage recovered per pair
    against mean ablation (the headline reference), zero ablation and identity, with intervals."""
    plt = pyplot()
    n = len(results)
    w_bars, w_rec = min(16.0, max(7.0, 1.25 * n + 2.5)), min(7.0, max(3.5, 0.45 * n + 2))
    fig, (ax, ax_rec) = plt.subplots(1, 2, figsize=(w_bars + w_rec, 5.2), gridspec_kw={"width_ratios": [w_bars, w_rec]})
    _causal_bars(ax, results, scope)
    _recovered_points(ax_rec, results, scope)
    sets = headline_sets(results) or ["all"]
    what = "every non-BOS position" if sets == ["all"] else "the headline positions"
    fig.suptitle(f"Causal check on held-out test text: patching {what} (position set {', '.join(sets)})", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def _causal_bars(ax: Any, results: list[PairResults], scope: str) -> None:
    from matplotlib.patches import Patch

    n = len(results)
    x = np.arange(n)
    conditions, colours, labels = patched_conditions(), condition_colours(), condition_labels()
    width = 0.8 / len(conditions)
    top = 0.0
    for ci, cond in enumerate(conditions):
        mean, lo, hi = np.array([res.causal_delta(cond, scope) for res in results]).T
        ok = np.isfinite(mean)
        err = np.vstack(
            [
                np.clip(mean - np.where(np.isfinite(lo), lo, mean), 0, None),
                np.clip(np.where(np.isfinite(hi), hi, mean) - mean, 0, None),
            ]
        )
        pos = x - 0.4 + width * (ci + 0.5)
        top = max([top, *mean[ok] + err[1, ok]])
        ax.bar(
            pos[ok],
            mean[ok],
            width,
            yerr=err[:, ok],
            capsize=2,
            color=colours[cond],
            edgecolor="black",
            linewidth=0.4,
            error_kw={"elinewidth": 0.8},
        )
    for i, res in enumerate(results):
        if res.causal is None:
            ax.text(i, 0, "causal\nmissing", ha="center", va="bottom", fontsize=8, color="#b22222")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_yscale("symlog", linthresh=0.01)
    if top > 0:  # headroom so the tallest CI is not cut by the frame
        ax.set_ylim(top=top * 1.8)
    ax.set_xticks(x, [res.name for res in results], rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center")
    ax.set_xlabel("pair")
    scope_label = "tokens at/after the first patch" if scope == "after" else "all predicted tokens"
    ax.set_ylabel(f"Δ log-perplexity vs clean (nats/token, symlog)\n{scope_label}; bars: 95% CI")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(
        handles=[Patch(facecolor=colours[c], edgecolor="black", label=labels[c]) for c in conditions],
        fontsize=8,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.01),
        ncols=len(conditions),
        frameon=False,
        title="value written into the residual after block L+k",
        title_fontsize=8,
    )


# recovered-share panel: reference → (colour, legend label); the headline reference is drawn first, large
REFERENCE_STYLE = {
    k.key("recovered_against"): (k.colour, f"vs {k.label_in('recovered_against')}")
    for k in kinds_for("recovered_against")
}


def _recovered_points(ax_rec: Any, results: list[PairResults], scope: str) -> None:
    """Recovered share per pair vs each reference, 95 % intervals: the headline reference (the mean
    update by default) large and labelled, mean ablation, zero ablation and identity small beside it."""
    n = len(results)
    x = np.arange(n)
    heads = {res.headline_reference for res in results if res.headline_reference is not None}
    head = heads.pop() if len(heads) == 1 else CausalParams().headline_reference
    refs = [head, *(r for r in REFERENCE_STYLE if r != head)]
    for j, ref in enumerate(refs):
        rec = np.array([res.recovered(scope, ref) for res in results])
        ok = np.isfinite(rec[:, 0])
        lo = np.where(np.isfinite(rec[:, 1]), rec[:, 1], rec[:, 0])
        hi = np.where(np.isfinite(rec[:, 2]), rec[:, 2], rec[:, 0])
        colour, label = REFERENCE_STYLE[ref]
        ax_rec.errorbar(
            x[ok] + (0.0 if j == 0 else 0.16 * (2 * j - 3)),
            100 * rec[ok, 0],
            yerr=100 * np.vstack([np.clip(rec[ok, 0] - lo[ok], 0, None), np.clip(hi[ok] - rec[ok, 0], 0, None)]),
            fmt="o" if j == 0 else "s",
            color=colour,
            capsize=4 if j == 0 else 2,
            ms=7 if j == 0 else 4,
            alpha=1.0 if j == 0 else 0.7,
            label=label + (" (headline)" if j == 0 else ""),
        )
        degenerate = np.array([_degenerate(res, scope, ref) for res in results], dtype=bool)
        if j == 0:
            _recovered_labels(ax_rec, x, rec, ok, degenerate, results)
        elif degenerate.any():  # not a number: a cross on the 0 line in the reference's colour
            ax_rec.plot(x[degenerate] + 0.16 * (2 * j - 3), np.zeros(degenerate.sum()), "x", color=colour, ms=5)
    ax_rec.axhline(100, color="black", lw=0.8, ls="--")
    ax_rec.axhline(0, color="black", lw=0.8)
    ax_rec.set_xticks(
        x,
        [res.name for res in results],
        rotation=90 if n > 8 else 30 if n > 3 else 0,
        ha="center" if n > 8 or n <= 3 else "right",
    )
    ax_rec.set_xlim(-0.6, n - 0.4)
    ax_rec.set_ylabel("recovered (%) = 1 − Δ(ATO)/Δ(reference)\n95% interval; × on 0: degenerate")
    ax_rec.set_title("Damage recovered by the ATO", fontsize=10)
    ax_rec.legend(fontsize=7, loc="lower left")
    ax_rec.grid(axis="y", alpha=0.3)


def _degenerate(res: PairResults, scope: str, reference: str) -> bool:
    share = res.recovered_share(reference)
    return share is not None and share.degenerate(scope)


def _recovered_labels(
    ax_rec: Any, x: np.ndarray, rec: np.ndarray, ok: np.ndarray, degenerate: np.ndarray, results: list[PairResults]
) -> None:
    """Values of the headline share beside its points; why a share is missing where it is."""
    for i in np.flatnonzero(ok) if len(x) <= 8 else []:  # labels would collide beyond a few pairs
        ax_rec.annotate(
            f"{100 * rec[i, 0]:.1f}%",
            (x[i], 100 * rec[i, 0]),
            textcoords="offset points",
            xytext=(7, 0),
            va="center",
            fontsize=7,
        )
    for i in np.flatnonzero(~ok):  # no causal output, a degenerate reference, or one without damage
        if results[i].causal is None:
            label = "causal\nmissing"
        else:
            label = "degenerate:\n" + DEGENERATE_REASON.replace(" not", "\nnot") if degenerate[i] else "undefined"
        ax_rec.text(x[i], 50, label, ha="center", va="center", fontsize=8, color="#b22222")
