"""Paired bootstrap over units (sequences): seeded percentile confidence intervals.

Causal patching compares conditions on the *same* sequences, so every resample draws one set of
sequence indices and applies it to all conditions at once (a paired design): the CI of a
difference, or of a ratio of two differences, then reflects only between-sequence variation.
Statistics are token-weighted (Σ per-sequence sums / Σ token counts), so sequences with more
scored tokens weigh more, exactly as in the point estimate.
"""

from __future__ import annotations

import numpy as np


def resample_indices(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n_units] indices drawn with replacement; the same seed gives the same draw."""
    if n_units < 1:
        raise ValueError("bootstrap needs at least one unit")
    if n_resamples < 1:
        raise ValueError("bootstrap needs at least one resample")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_units, size=(n_resamples, n_units))


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


def weighted_mean_resamples(values: np.ndarray, weights: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    """Token-weighted mean Σ w·v / Σ w for every resample row of `idx` ([R] array).

    `values` are per-unit means (e.g. a sequence's mean Δ NLL) and `weights` their token counts;
    None weighs every unit equally.
    """
    values = np.asarray(values, dtype=np.float64)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    num = (values * w)[idx].sum(axis=1)
    den = w[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def weighted_mean(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    values = np.asarray(values, dtype=np.float64)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    total = w.sum()
    return float((values * w).sum() / total) if total > 0 else float("nan")


def paired_bootstrap(
    deltas: np.ndarray, n_resamples: int, seed: int, weights: np.ndarray | None = None, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi) of the (token-weighted) mean of per-unit paired differences.

    `deltas[i]` is unit i's condition-minus-baseline value; the CI is the percentile interval of
    the weighted mean over `n_resamples` resamples of units.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    idx = resample_indices(len(deltas), n_resamples, seed)
    lo, hi = _percentile_ci(weighted_mean_resamples(deltas, weights, idx), level)
    return weighted_mean(deltas, weights), lo, hi


def recovered_fraction(delta_patch: float, delta_ablate: float) -> float:
    """1 − Δ(patch)/Δ(ablation): the share of the ablation's damage the patch undoes (nan if Δ(ablation)=0)."""
    if delta_ablate == 0 or not np.isfinite(delta_ablate):
        return float("nan")
    return float(1.0 - delta_patch / delta_ablate)


def paired_bootstrap_recovered(
    delta_patch: np.ndarray,
    delta_ablate: np.ndarray,
    n_resamples: int,
    seed: int,
    weights: np.ndarray | None = None,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(recovered, lo, hi) for 1 − mean Δ(patch) / mean Δ(ablation), both means over the SAME
    resampled units (paired), each token-weighted with `weights`."""
    delta_patch = np.asarray(delta_patch, dtype=np.float64)
    delta_ablate = np.asarray(delta_ablate, dtype=np.float64)
    if delta_patch.shape != delta_ablate.shape:
        raise ValueError(f"paired arrays differ in shape: {delta_patch.shape} vs {delta_ablate.shape}")
    idx = resample_indices(len(delta_patch), n_resamples, seed)
    num = weighted_mean_resamples(delta_patch, weights, idx)
    den = weighted_mean_resamples(delta_ablate, weights, idx)
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = 1.0 - num / den
    samples[den == 0] = np.nan
    point = recovered_fraction(weighted_mean(delta_patch, weights), weighted_mean(delta_ablate, weights))
    lo, hi = _percentile_ci(samples, level)
    return point, lo, hi
