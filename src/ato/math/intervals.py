"""Confidence intervals for the causal check's ratios, with a method chosen by simulation.

The causal stage has, for every held-out sequence j (the resampling unit) and condition c, the
summed NLL s_cj over its scored tokens and the token count m_j (the same for every condition of a
sequence). Its headline numbers are ratios of sums over sequences:

    Δ_c = Σ_j (s_cj − s_clean,j) / Σ_j m_j                                 (`delta_interval`)
    R   = 1 − Δ_ato / Δ_ref = 1 − Σ_j (s_ato,j − s_clean,j) / Σ_j (s_ref,j − s_clean,j)
                                                                          (`recovered_interval`)

(the token counts cancel in R). Both are Q = Σ num_j / Σ den_j, whose delta-method (linearised)
standard error is se = √(Σ_j z_j² / (n(n − 1))) with z_j = (num_j − Q den_j) / mean(den).

Methods (`METHODS`), all two-sided at `level`:

- `t`: Q ± t_{n−1} · se.
- `studentized`: the bootstrap-t; resample sequences, t*_b = (Q*_b − Q) / se*_b, interval
  [Q − t*_{1−α/2} se, Q − t*_{α/2} se]. It corrects for skew, but with heavy symmetric tails its
  t* quantiles are too short.
- `studentized_hull` (the default): each endpoint the farther of the `studentized` and `t`
  endpoints. The two fail in opposite places (t under skew, bootstrap-t under heavy symmetric
  tails), so their hull keeps its coverage under both; on symmetric effects it is ≈ 3 % wider
  than the t-interval at 32 units, on skewed ones as wide as the bootstrap-t (which it needs).
- `bca`, `percentile`: scipy.stats.bootstrap over the same units (paired), for comparison.

The choice rests on the coverage simulation in tests/test_intervals.py: per-sequence effects
scaled by 1/√m_j, m_j uniform on 16..63 tokens; 4000 data sets, 1000 resamples each
(`python tests/test_intervals.py` reprints it); the fraction of nominal 95 % intervals that hold
the true value (Monte-Carlo standard error ≈ 0.004). Δ rows: the token-weighted mean; R rows: the
ratio of the recovered share (reference CV 0.35 per sequence, ρ = 0.5 with the patch's effect).

    effects                n   percentile   bca     t       studentized   studentized_hull
    Δ normal               8   0.884        0.882   0.944   0.945         0.958
    Δ t (3 df)             8   0.873        0.850   0.958   0.928         0.966
    Δ gamma (shape 1)      8   0.843        0.861   0.898   0.932         0.939
    Δ lognormal (σ 0.75)   8   0.817        0.829   0.867   0.907         0.916
    Δ lognormal (σ 1)      8   0.768        0.793   0.818   0.880         0.886
    Δ normal              32   0.931        0.933   0.949   0.948         0.956
    Δ t (3 df)            32   0.922        0.891   0.952   0.915         0.954
    Δ gamma (shape 1)     32   0.919        0.931   0.925   0.949         0.959
    Δ lognormal (σ 0.75)  32   0.895        0.905   0.907   0.929         0.943
    Δ lognormal (σ 1)     32   0.868        0.886   0.876   0.915         0.931
    R normal               8   0.888        0.891   0.949   0.935         0.962
    R t (3 df)             8   0.884        0.865   0.958   0.924         0.967
    R gamma (shape 1)      8   0.855        0.854   0.903   0.926         0.940
    R lognormal (σ 0.75)   8   0.857        0.847   0.902   0.925         0.940
    R normal              32   0.934        0.934   0.952   0.942         0.955
    R t (3 df)            32   0.923        0.902   0.950   0.915         0.953
    R gamma (shape 1)     32   0.924        0.923   0.934   0.946         0.960
    R lognormal (σ 0.75)  32   0.918        0.908   0.928   0.932         0.951

Only the hull holds ≥ 0.93 in every row at 32 sequences (and at the default `causal.n_sequences`, 160);
no method does at 8 under skew. Lognormal σ = 1 (skewness 6.2) is the setting of issue 11's
"77 %" for the percentile interval at 8 units; the per-sequence Δ of the default run have sample
skewness up to 2.4 and excess kurtosis up to 13.7 (L03_k3), a shape the hull covers at 0.961 at the
default 144 sequences (docs/statistics.md).

Everything here is pure numpy/scipy; leading axes of the arrays given to `ratio_bounds` are
independent data sets (what the simulation uses), the last axis is the units.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from .positions import can_change_scored_predictions, unscorable_positions

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Interval",
    "can_change_scored_predictions",
    "delta_interval",
    "denominator_is_bounded",
    "mean_ratio_interval",
    "ratio_bounds",
    "ratio_estimate",
    "ratio_interval",
    "ratio_standard_error",
    "recovered_interval",
    "unscorable_positions",
]

METHODS = ("studentized_hull", "studentized", "t", "bca", "percentile")
DEFAULT_METHOD = "studentized_hull"
_CHUNK_ELEMENTS = 2_000_000  # resampled values held at once by the bootstrap-t (memory bound)

Array = NDArray[np.float64]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided confidence interval."""

    estimate: float  # the statistic on all units
    low: float  # lower bound (−inf: unbounded; nan: not computable, e.g. one unit)
    high: float  # upper bound (+inf: unbounded)
    level: float  # nominal two-sided coverage, e.g. 0.95
    method: str  # one of METHODS
    n_units: int  # resampling units (sequences)
    half_width: float = field(init=False)  # (high − low) / 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "half_width", float((self.high - self.low) / 2.0))


# --------------------------------------------------------------------------------------------
# Ratio of sums: estimate, standard error, intervals


def _pair(num: ArrayLike, den: ArrayLike) -> tuple[Array, Array]:
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 1 or a.shape[-1] < 1:
        raise ValueError("an interval needs at least one unit")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-unit sums must be finite")
    return a, b


def ratio_estimate(num: ArrayLike, den: ArrayLike) -> Array:
    """Σ num / Σ den over the last axis (nan where Σ den = 0)."""
    a, b = _pair(num, den)
    total = b.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total != 0, a.sum(-1) / np.where(total != 0, total, 1.0), np.nan)


def _se(a: Array, b: Array, q: Array) -> Array:
    """Delta-method standard error of Σa/Σb at ratio q, over the last axis."""
    n = a.shape[-1]
    if n < 2:
        return np.full(np.shape(q), np.nan)
    z = (a - q[..., None] * b) / b.mean(-1, keepdims=True)
    return np.sqrt((z * z).sum(-1) / (n * (n - 1)))


def ratio_standard_error(num: ArrayLike, den: ArrayLike) -> Array:
    """Delta-method (linearised) standard error of Σ num / Σ den over units (last axis)."""
    a, b = _pair(num, den)
    return _se(a, b, ratio_estimate(a, b))


def _t_bounds(q: Array, se: Array, n: int, level: float) -> tuple[Array, Array]:
    crit = stats.t.ppf((1.0 + level) / 2.0, n - 1) if n >= 2 else np.nan
    return q - crit * se, q + crit * se


def _bootstrap_t(
    a: Array, b: Array, q: Array, n_resamples: int, rng: np.random.Generator, log_scale: bool = False
) -> Array:
    """t*_b = (Q*_b − Q) / se*_b for every data set (rows of a 2-D [R, n] input): [R, n_resamples];
    with `log_scale`, t*_b = (log Q*_b − log Q) / (se*_b / Q*_b)."""
    rows, n = a.shape
    out = np.empty((rows, n_resamples))
    step = max(1, _CHUNK_ELEMENTS // (n_resamples * n))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        idx = rng.integers(0, n, size=(stop - start, n_resamples, n))
        sel = np.arange(start, stop)[:, None, None]
        a_star, b_star = a[sel, idx], b[sel, idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            q_star = a_star.sum(-1) / b_star.sum(-1)
            se_star = _se(a_star, b_star, q_star)
            if log_scale:
                out[start:stop] = (np.log(q_star) - np.log(q[start:stop, None])) / (se_star / q_star)
            else:
                out[start:stop] = (q_star - q[start:stop, None]) / se_star
    return out  # ±inf where a resample has se* = 0 but moved Q; nan where 0/0 (dropped below)


def _studentized(
    a: Array, b: Array, q: Array, se: Array, level: float, n_resamples: int, seed: int, log_scale: bool = False
) -> tuple[Array, Array]:
    """Bootstrap-t bounds of Q, or with `log_scale` of log Q (`se` is then the log scale's, se/Q)."""
    shape = q.shape
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    t_star = _bootstrap_t(a2, b2, q.reshape(-1), n_resamples, np.random.default_rng(seed), log_scale)
    centre = np.log(q) if log_scale else q
    tail = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan rows (se = 0) are replaced by the point
        upper_t, lower_t = np.nanquantile(t_star, [1.0 - tail, tail], axis=-1)
        low = centre.reshape(-1) - upper_t * se.reshape(-1)
        high = centre.reshape(-1) - lower_t * se.reshape(-1)
    return low.reshape(shape), high.reshape(shape)


def _scipy_bootstrap(a: Array, b: Array, level: float, method: str, n_resamples: int, seed: int) -> tuple[Array, Array]:
    def ratio(x: Array, y: Array, axis: int = -1) -> Array:
        return x.sum(axis) / y.sum(axis)

    res = stats.bootstrap(
        (a, b),
        ratio,
        paired=True,
        vectorized=True,
        axis=-1,
        n_resamples=n_resamples,
        method=method,
        confidence_level=level,
        rng=np.random.default_rng(seed),
    )
    return np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)


def ratio_bounds(
    num: ArrayLike,
    den: ArrayLike,
    *,
    level: float = 0.95,
    method: str = DEFAULT_METHOD,
    n_resamples: int = 2000,
    seed: int = 0,
    log_scale: bool = False,
) -> tuple[Array, Array, Array]:
    """(estimate, low, high) of Σ num / Σ den for every data set: units on the last axis,
    leading axes independent data sets. Seeded: the same inputs give the same bounds.

    `log_scale` (for num, den ≥ 0 and Σ num > 0, e.g. SSE / SST): `t` and the bootstrap-t work on log Q with
    se/Q (the delta method) and map back through exp, so both bounds stay > 0 however few or skewed
    the units; on the linear scale a short, skewed sample can put the lower bound below 0 (an R² = 1 − Q
    above 1). `percentile` and `bca` respect the bound on either scale.

    Degenerate cases: one unit → nan bounds; all units exactly proportional (se = 0) → the
    point; Σ den = 0 → nan throughout.
    """
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r}; expected one of {', '.join(METHODS)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    a, b = _pair(num, den)
    n = a.shape[-1]
    q = ratio_estimate(a, b)
    se = _se(a, b, q)
    if n < 2:
        nan = np.full(q.shape, np.nan)
        return q, nan, nan.copy()
    if log_scale and ((a < 0).any() or (b < 0).any()):
        raise ValueError("a log-scale interval needs numerators and denominators ≥ 0")
    if method in ("bca", "percentile"):
        low, high = _scipy_bootstrap(a, b, level, method, n_resamples, seed)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            centre, scale = (np.log(q), se / q) if log_scale else (q, se)
        low, high = _t_bounds(centre, scale, n, level)
        if method != "t":
            s_low, s_high = _studentized(a, b, q, scale, level, n_resamples, seed, log_scale)
            low, high = (s_low, s_high) if method == "studentized" else (np.fmin(low, s_low), np.fmax(high, s_high))
        if log_scale:
            with np.errstate(over="ignore"):  # an upper bound past exp's range is +inf: unbounded
                low, high = np.exp(low), np.exp(high)
    return q, np.where(se == 0, q, low), np.where(se == 0, q, high)


def denominator_is_bounded(den: ArrayLike, level: float = 0.95) -> bool:
    """Fieller's condition for a ratio whose denominator can vanish: the mean of the per-unit
    denominators differs from 0 at `level` (t-test over units). When it does not, every
    confidence set for the ratio at `level` is unbounded. True for fewer than two units."""
    b = np.asarray(den, dtype=np.float64)
    n = b.shape[-1]
    if n < 2:
        return True
    mean, sd = float(b.mean()), float(b.std(ddof=1))
    if sd == 0:
        return mean != 0
    return bool(abs(mean) / (sd / math.sqrt(n)) > stats.t.ppf((1.0 + level) / 2.0, n - 1))


def ratio_interval(
    num: ArrayLike,
    den: ArrayLike,
    *,
    level: float = 0.95,
    method: str = DEFAULT_METHOD,
    n_resamples: int = 2000,
    seed: int = 0,
    log_scale: bool = False,
) -> Interval:
    """Σ num / Σ den over units (1-D arrays, one entry per unit) with its interval (`log_scale`:
    `ratio_bounds`)."""
    a, b = _pair(num, den)
    if a.ndim != 1:
        raise ValueError(f"ratio_interval takes one data set (1-D arrays); got shape {a.shape}")
    q, low, high = ratio_bounds(
        a, b, level=level, method=method, n_resamples=n_resamples, seed=seed, log_scale=log_scale
    )
    return Interval(float(q), float(low), float(high), level, method, int(a.shape[0]))


def mean_ratio_interval(
    num: ArrayLike,
    den: ArrayLike,
    *,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """U = mean over columns d of Σ_j num_jd / Σ_j den_jd (units j on the first axis, [n, d] arrays of
    values ≥ 0; columns with Σ den = 0 are left out), e.g. the uniform R²'s 1 − U with SSE and SST per
    document and dimension. The `studentized_hull` interval on the log scale: the hull of log U ± t·se/U
    and the bootstrap-t of log U, with the delta-method se from the influence values
    z_j = (n/d) Σ_d (num_jd − Q_d den_jd) / Σ den_d, mapped back through exp (both bounds > 0)."""
    a, b = _pair(num, den)
    if a.ndim != 2 or (a < 0).any() or (b < 0).any():
        raise ValueError(f"mean_ratio_interval takes [units, columns] arrays of values ≥ 0; got shape {a.shape}")
    keep = b.sum(0) > 0
    a, b = a[:, keep], b[:, keep]
    n = a.shape[0]
    u, se = _mean_ratio_and_se(a, b, np.ones((1, n)))
    estimate, se_log = float(u[0]), float(se[0] / u[0]) if u[0] > 0 else math.nan
    method = "studentized_hull (log scale)"
    if n < 2 or not math.isfinite(se_log):
        return Interval(estimate, math.nan, math.nan, level, method, n)
    if se_log == 0:
        return Interval(estimate, estimate, estimate, level, method, n)
    t_low, t_high = _t_bounds(np.log(u), np.asarray([se_log]), n, level)
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * a.shape[1]))
    t_star = []
    for start in range(0, n_resamples, step):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(step, n_resamples - start)).astype(np.float64)
        u_star, se_star = _mean_ratio_and_se(a, b, counts)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_star.append((np.log(u_star) - math.log(estimate)) / (se_star / u_star))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tail = (1.0 - level) / 2.0
        upper_t, lower_t = np.nanquantile(np.concatenate(t_star), [1.0 - tail, tail])
    low = min(float(t_low[0]), math.log(estimate) - float(upper_t) * se_log)
    high = max(float(t_high[0]), math.log(estimate) - float(lower_t) * se_log)
    with np.errstate(over="ignore"):  # +inf: unbounded
        return Interval(estimate, float(np.exp(low)), float(np.exp(high)), level, method, n)


def _mean_ratio_and_se(a: Array, b: Array, counts: Array) -> tuple[Array, Array]:
    """U and its delta-method se for each row of `counts` [R, n] (how often each unit is drawn)."""
    n, d = a.shape
    A, B = counts @ a, counts @ b  # [R, d]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = A / B
        u = np.nanmean(q, axis=1) if d else np.full(len(counts), np.nan)
        inv = np.where(B > 0, 1.0 / B, 0.0)
        z = (n / d) * (inv @ a.T - np.where(B > 0, q * inv, 0.0) @ b.T)  # [R, n]
    se = np.sqrt((counts * z * z).sum(1) / (n * (n - 1))) if n > 1 else np.full(len(counts), np.nan)
    return u, se


# --------------------------------------------------------------------------------------------
# The causal check's two statistics


def delta_interval(
    patched: ArrayLike,
    clean: ArrayLike,
    n_tokens: ArrayLike,
    *,
    level: float = 0.95,
    method: str = DEFAULT_METHOD,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Δ = Σ_j (patched_j − clean_j) / Σ_j n_tokens_j: the token-weighted change in mean NLL (nats).

    `patched`, `clean`: per-sequence NLL *sums* over the scored tokens; `n_tokens`: their counts.
    """
    p, c = _pair(patched, clean)
    return ratio_interval(p - c, n_tokens, level=level, method=method, n_resamples=n_resamples, seed=seed)


def recovered_interval(
    patched: ArrayLike,
    reference: ArrayLike,
    clean: ArrayLike,
    *,
    level: float = 0.95,
    method: str = DEFAULT_METHOD,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """R = 1 − Δ_patched / Δ_reference, both token-weighted over the same sequences.

    Per-sequence NLL sums as in `delta_interval`; the token counts cancel. The interval is that
    of the ratio Σ(patched − clean) / Σ(reference − clean), mapped through 1 − ·; it is
    (−inf, +inf) when the reference's damage is not distinguishable from 0
    (`denominator_is_bounded`).
    """
    p, c = _pair(patched, clean)
    r, _ = _pair(reference, clean)
    q = ratio_interval(p - c, r - c, level=level, method=method, n_resamples=n_resamples, seed=seed)
    if not denominator_is_bounded(r - c, level):
        return Interval(1.0 - q.estimate, -math.inf, math.inf, level, method, q.n_units)
    return Interval(1.0 - q.estimate, 1.0 - q.high, 1.0 - q.low, level, method, q.n_units)
