"""Is the ridge penalty α material? Diagnostics of the validation curve α → R² (issue 11, item 6).

At the default sizes the validation R² is flat to ~1e-5 from α = 1e-3 up to ~1e4 and only falls
at far larger α, so the chosen α is noise: any α on the plateau, or none, gives the same operator
to the digits reported. These helpers say so from the searched curve:

- `alpha_flatness`: max − min validation R² over the searched range (what the summary prints).
  Over a range that runs into over-regularisation this is large even when α is immaterial, so
- `alpha_gain`: what the best α buys over the least-regularised end of the range,
  R²(best) − R²(smallest α), decides materiality:
- `alpha_is_immaterial`: the gain is below `r2_noise`, the standard error of a validation R²
  from n_val scored rows, (1 − R²)·√(2/n_val) (Gaussian residuals: Var(ê²) = 2σ⁴, so the mean
  squared error, hence 1 − R², carries a relative error √(2/n)). A gain below the objective's
  own noise cannot be told from chance at this sample size; as n_val grows the tolerance
  shrinks and a real gain is reported as material.
- `alpha_edge_warning`: the best α within one grid step of either end of the searched range.

`diagnose_alpha` gathers all of them for one tuned pair (what `TuningResult` records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "AlphaDiagnostics",
    "alpha_edge_warning",
    "alpha_flatness",
    "alpha_gain",
    "alpha_is_immaterial",
    "diagnose_alpha",
    "r2_noise",
]


def _curve(curve_alpha: ArrayLike, curve_r2: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The finite points of the curve, sorted by α."""
    a = np.asarray(curve_alpha, dtype=np.float64).ravel()
    r = np.asarray(curve_r2, dtype=np.float64).ravel()
    if a.shape != r.shape:
        raise ValueError(f"curve_alpha and curve_r2 differ in length: {a.size} vs {r.size}")
    keep = np.isfinite(a) & np.isfinite(r)
    if not keep.any():
        raise ValueError("the α curve has no finite point")
    order = np.argsort(a[keep])
    return a[keep][order], r[keep][order]


def alpha_flatness(curve_alpha: ArrayLike, curve_r2: ArrayLike) -> float:
    """max − min validation R² over the searched range (non-finite points ignored)."""
    _, r = _curve(curve_alpha, curve_r2)
    return float(r.max() - r.min())


def alpha_gain(curve_alpha: ArrayLike, curve_r2: ArrayLike) -> float:
    """Best validation R² minus the R² at the smallest α searched (≥ 0): what regularising buys."""
    _, r = _curve(curve_alpha, curve_r2)
    return float(r.max() - r[0])


def r2_noise(r2: float, n_val: int) -> float:
    """Standard error of a validation R² from `n_val` scored rows: (1 − R²)·√(2/n_val)."""
    if n_val < 1:
        raise ValueError(f"n_val must be ≥ 1, got {n_val}")
    return float((1.0 - r2) * math.sqrt(2.0 / n_val))


def alpha_is_immaterial(curve_alpha: ArrayLike, curve_r2: ArrayLike, n_val: int) -> bool:
    """True when the best α beats the least-regularised end of the range by less than the noise of
    the validation R² itself (`r2_noise` at the best R²): at this sample size α does not matter."""
    _, r = _curve(curve_alpha, curve_r2)
    return alpha_gain(curve_alpha, curve_r2) < r2_noise(float(r.max()), n_val)


def alpha_edge_warning(curve_alpha: ArrayLike, best_alpha: float, name: str = "") -> str | None:
    """A warning when `best_alpha` lies within one grid step of either end of the searched range
    (`curve_alpha`, the grid the curve was evaluated on); None otherwise."""
    a = np.unique(np.asarray(curve_alpha, dtype=np.float64))
    a = a[np.isfinite(a)]
    if a.size < 2:
        raise ValueError("the α grid needs at least two points")
    where = "lowest" if best_alpha <= a[1] else "highest" if best_alpha >= a[-2] else None
    if where is None:
        return None
    label = f"{name}: " if name else ""
    return (
        f"{label}best α {best_alpha:.4g} lies at the {where} grid step of the searched range "
        f"[{a[0]:.4g}, {a[-1]:.4g}]; the optimum may lie outside it (widen tune.alpha_min/alpha_max)"
    )


@dataclass(frozen=True)
class AlphaDiagnostics:
    """What the searched α → validation R² curve says about the chosen α."""

    n_val: int  # scored validation rows behind the objective (tokens)
    flatness: float  # max − min validation R² over the searched range
    gain: float  # best validation R² minus the R² at the smallest α searched
    noise: float  # standard error of the best validation R² at n_val: (1 − R²)·√(2/n_val)
    immaterial: bool  # gain < noise: at this sample size α does not matter
    edge_warning: str | None  # set when the best α lies within one grid step of an end of the range


def diagnose_alpha(
    curve_alpha: ArrayLike, curve_r2: ArrayLike, best_alpha: float, n_val: int, name: str = ""
) -> AlphaDiagnostics:
    """Flatness, gain, noise, materiality and the edge warning of one tuned α (see the module doc)."""
    _, r = _curve(curve_alpha, curve_r2)
    gain = alpha_gain(curve_alpha, curve_r2)
    noise = r2_noise(float(r.max()), n_val)
    return AlphaDiagnostics(
        n_val=n_val,
        flatness=alpha_flatness(curve_alpha, curve_r2),
        gain=gain,
        noise=noise,
        immaterial=gain < noise,
        edge_warning=alpha_edge_warning(curve_alpha, best_alpha, name),
    )
