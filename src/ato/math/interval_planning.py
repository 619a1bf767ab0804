"""Planning the causal check: how wide the t-interval of a ratio of sums Σnum/Σden would be with n
units, and how many units a target half-width needs, from the per-unit spread of pilot units
(`ato.math.intervals` has the intervals themselves). See docs/statistics.md#intervals."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from .intervals import ratio_standard_error

__all__ = ["planned_half_width", "required_units"]


def _pilot_sigma(num: ArrayLike, den: ArrayLike, pilot_confidence: float | None) -> float:
    """Per-unit standard deviation of the linearised values z_j of the pilot units (optionally its
    one-sided upper confidence bound, χ² with n_pilot − 1 df)."""
    se = ratio_standard_error(num, den)  # checks the pairing: same shape, finite, at least one unit
    n_pilot = np.shape(num)[-1]
    if np.ndim(se) != 0 or n_pilot < 2:
        raise ValueError("planning needs one pilot data set of at least two units")
    sigma = float(se) * math.sqrt(n_pilot)
    if pilot_confidence is not None:
        if not 0.0 < pilot_confidence < 1.0:
            raise ValueError(f"pilot_confidence must lie in (0, 1), got {pilot_confidence}")
        sigma *= math.sqrt((n_pilot - 1) / stats.chi2.ppf(1.0 - pilot_confidence, n_pilot - 1))
    return sigma


def _t_half_width(sigma: float, n_units: int, level: float) -> float:
    return float(stats.t.ppf((1.0 + level) / 2.0, n_units - 1) * sigma / math.sqrt(n_units))


def planned_half_width(
    num: ArrayLike, den: ArrayLike, n_units: int, *, level: float = 0.95, pilot_confidence: float | None = None
) -> float:
    """The t half-width t_{n−1} · σ / √n of Σnum/Σden that `n_units` units would give, σ the
    per-unit standard deviation of the linearised values z_j measured on the pilot units given.

    `pilot_confidence` (e.g. 0.8) replaces σ by its one-sided upper confidence bound from the
    pilot, so that a small pilot does not promise too narrow an interval. The default method is
    never narrower than the t-interval; on near-symmetric effects the two agree within a few per cent.
    """
    if n_units < 2:
        raise ValueError("an interval needs at least two units")
    return _t_half_width(_pilot_sigma(num, den, pilot_confidence), n_units, level)


def required_units(
    num: ArrayLike,
    den: ArrayLike,
    target_half_width: float,
    *,
    level: float = 0.95,
    pilot_confidence: float | None = None,
    max_units: int = 1_000_000,
) -> int:
    """The smallest number of units whose `planned_half_width` is ≤ `target_half_width`.

    For Δ of the causal check: num = per-sequence (patched − clean) NLL sums of the pilot
    sequences, den = their token counts.
    """
    if target_half_width <= 0:
        raise ValueError(f"target half-width must be positive, got {target_half_width}")
    sigma = _pilot_sigma(num, den, pilot_confidence)
    if _t_half_width(sigma, max_units, level) > target_half_width:
        raise ValueError(f"a half-width of {target_half_width} needs more than {max_units} units")
    # the normal-theory count; the t quantile is larger, so the answer is at least this
    n = max(2, math.ceil((stats.norm.ppf((1.0 + level) / 2.0) * sigma / target_half_width) ** 2))
    while _t_half_width(sigma, n, level) > target_half_width:
        n += 1
    return n
