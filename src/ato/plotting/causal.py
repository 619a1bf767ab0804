"""Figure of `ato causal` for one pair: Δ log-perplexity vs clean per condition and position set, and the
recovered share against each reference (mean ablation, zero ablation, identity)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ato.artifacts import CausalSummary, PositionSetSummary
from ato.artifacts.causal import DEGENERATE_REASON, condition_labels, patched_conditions, recovered_references
from ato.kinds import kinds_for

from . import condition_colours, pyplot, save_figure


def plot_pair(summary: CausalSummary, pair: str, path: Path, dpi: int = 120, scope: str = "after") -> Path:
    """One panel per position set: Δ log-perplexity vs clean per condition with its 95 % interval, and
    in the title the share of each reference's damage the ATO recovers (the headline reference first).

    A symmetric-log axis keeps the small ATO Δ and the large zero-ablation Δ readable together.
    """
    plt = pyplot()
    names = list(summary.position_sets)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names) + 0.6, 5.0), sharey=True, squeeze=False)
    conditions, colours, labels = patched_conditions(), condition_colours(), condition_labels()
    x = np.arange(len(conditions))
    for ax, name in zip(axes[0], names):
        entry = summary.position_sets[name]
        mean, lo, hi = np.array([entry.patched(c).delta(scope) for c in conditions]).T
        err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
        ax.bar(
            x,
            mean,
            color=[colours[c] for c in conditions],
            yerr=err,
            capsize=4,
            edgecolor="black",
            linewidth=0.5,
        )
        for xi, m in zip(x, mean):
            ax.annotate(
                f"{m:+.3g}",
                (xi, m),
                textcoords="offset points",
                xytext=(0, 3 if m >= 0 else -11),
                ha="center",
                fontsize=8,
            )
        rec_txt = "\n".join(_recovered_lines(entry, summary.headline_reference, scope))
        ax.set_title(f"positions: {name} ({entry.n_patched_tokens} patched)\n{rec_txt}", fontsize=8)
        ax.set_xticks(x, [labels[c] for c in conditions], rotation=35, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.grid(axis="y", alpha=0.3)
    tokens = "tokens after first patch" if scope == "after" else "all tokens"
    axes[0][0].set_ylabel(f"Δ log-perplexity vs clean (nats/token)\n{tokens}, 95% interval ({summary.interval_method})")
    clean = summary.position_sets[names[0]].clean.logppl(scope)
    fig.suptitle(
        f"{pair}: residual patching after block L+k (clean log-ppl {clean:.3f}, {summary.interval_n_units} sequences)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path, dpi)


REFERENCE_LABELS = {k.key("recovered_against"): k.column("recovered_against") for k in kinds_for("recovered_against")}


def _recovered_lines(entry: PositionSetSummary, headline: str, scope: str) -> list[str]:
    """ "recovered vs <reference> m [lo, hi]" per reference, the headline first."""
    lines = []
    for ref in sorted(recovered_references(), key=lambda r: r != headline):
        share = entry.recovered_vs(ref)
        mean, lo, hi = share.triplet(scope)
        if not math.isfinite(mean):
            text = "n/a"
        elif share.degenerate(scope):
            text = f"degenerate ({DEGENERATE_REASON})"
        elif not (math.isfinite(lo) and math.isfinite(hi)):
            text = f"{mean:.1%} [unbounded]"
        else:
            text = f"{mean:.1%} [{lo:.1%}, {hi:.1%}]"
        lines.append(f"recovered vs {REFERENCE_LABELS[ref]}: {text}")
    return lines
