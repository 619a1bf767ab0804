"""Cells and tables of the summary's markdown: numbers as text (a dash where there is none), intervals,
recovered shares, and the "how to read" paragraph under each table. The figures use the same numbers."""

from __future__ import annotations

import math
from typing import Any

from ato.artifacts.causal import DEGENERATE_REASON, RecoveredShare

DASH = "—"


def fmt(v: Any, spec: str = ".4f") -> str:
    v = _as_float(v)
    return format(v, spec) if math.isfinite(v) else DASH


def fmt_int(v: Any) -> str:
    v = _as_float(v)
    return str(int(round(v))) if math.isfinite(v) else DASH


def fmt_ci(m: float, lo: float, hi: float, spec: str = "+.4f") -> str:
    if not math.isfinite(m):
        return DASH
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return format(m, spec)
    return f"{format(m, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def fmt_ci_hw(m: float, lo: float, hi: float, half_width: float, spec: str = "+.4f") -> str:
    """Δ [lo, hi] ± half-width."""
    text = fmt_ci(m, lo, hi, spec)
    hw = _as_float(half_width)
    return text + f" ±{hw:.4f}" if text != DASH and math.isfinite(hw) else text


def fmt_pm(mean: Any, sd: Any, spec: str = ".4f") -> str:
    """mean ± sd (the sd left out where unknown)."""
    text, sd = fmt(mean, spec), _as_float(sd)
    return text + f" ± {format(sd, spec)}" if text != DASH and math.isfinite(sd) else text


def fmt_share(share: RecoveredShare | None, scope: str) -> str:
    """A recovered share: 81.2% [78.0%, 84.4%] ±3.2%, or its point with “interval unbounded”, or
    “degenerate” with the reason instead of a number."""
    if share is None:
        return DASH
    mean, lo, hi = share.triplet(scope)
    if not math.isfinite(mean):
        return DASH
    if share.degenerate(scope):
        return f"degenerate ({DEGENERATE_REASON})"
    if not getattr(share, f"{scope}_bounded"):
        return f"{mean:.1%} (interval unbounded)"
    return fmt_ci(mean, lo, hi, ".1%") + (f" ±{share.half_width(scope):.1%}" if math.isfinite(lo) else "")


def _as_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def md_table(header: list[str], rows: list[list[str]], n_left: int = 1) -> str:
    """A GitHub-flavoured markdown table; the first `n_left` columns left-aligned, numbers right-aligned."""
    align = [":--"] * n_left + ["--:"] * (len(header) - n_left)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def how_to_read(*sentences: str) -> list[str]:
    return ["**How to read.** " + " ".join(sentences), ""]
