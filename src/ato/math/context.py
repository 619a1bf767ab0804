"""Context maps: inputs of layer L at positions s ≤ t stacked beside x_t, and each kind's sub-statistics
(docs/method.md#context).

The stacked input of target position t, every block d wide, in this order:

    [x_t, x_{t−1}, …, x_{t−m}, prefix_t, z_{1,t}, …, z_{k,t}]

with prefix_t = mean_{0<s<t} x_s and z_{j,t} the attention output of block L+j (its clean pattern, fixed)
applied to layer L's residuals. Row 0 of a sequence is BOS: its residual (~1e4 in norm) never enters a
lagged or prefix input. An input from BOS or from before the sequence start (t − ℓ ≤ 0, or the empty
prefix at t = 1) is "absent" and takes the value `fill` (the train mean of layer L's non-BOS rows, zero
after centring). A kind reads a subset of the blocks (`context_columns`), so every kind's statistics
are a sub-block of the union's (`select_inputs`): one pass over the tokens serves all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from scipy.stats import norm

from .cca import pinv_sqrt
from .intervals import DEFAULT_METHOD, ratio_bounds, ratio_standard_error
from .learning_curve import ridge_solve
from .ridge import HeldOutR2Weighted, RidgePath, r2_from_stats, search_alpha
from .stats import PairStats

# the kinds, in the order of their files; `context` is the union (ato.artifacts.context.CONTEXT_KINDS)
CONTEXT_KINDS = ("ato", "lagged", "prefix", "routed", "context")
# the budget's increments add the inputs in this order: ato → lagged → lagged + prefix → context, so
# carried + the increments + computed = 1; `lagged_prefix` is fitted for that step alone
INCREMENT_PATH = (
    ("lagged", "ato", "lagged"),
    ("prefix", "lagged", "lagged_prefix"),
    ("routed", "lagged_prefix", "context"),
)
FITTED_KINDS = (*CONTEXT_KINDS, "lagged_prefix")  # every map the budget needs


def stack_context_inputs(
    x: torch.Tensor, z: torch.Tensor | None, lags: int, fill: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T, p] stacked inputs of every position of B sequences (row 0 = BOS), p = d·(1 + m + 1 + k).

    `x` [B, T, d]: layer L's residuals; `z` [B, T, k, d] or None: the routed inputs; `fill` [d]: an absent
    input. With `lengths` [B] (valid tokens, padding after) every padded row is `fill` throughout: no
    valid row reads padding anyway (every input looks back only)."""
    batch, length, d = x.shape
    fill_rows = fill.to(x.dtype).expand(batch, length, d)
    positions = torch.arange(length, device=x.device)
    blocks = [x]
    for lag in range(1, lags + 1):
        shifted = torch.cat([fill_rows[:, : min(lag, length)], x[:, : max(length - lag, 0)]], dim=1)
        blocks.append(torch.where((positions > lag)[None, :, None], shifted, fill_rows))
    blocks.append(_prefix_means(x, fill_rows))
    if z is not None:
        blocks.append(z.reshape(batch, length, -1).to(x.dtype))
    stacked = torch.cat(blocks, dim=-1)
    if lengths is None:
        return stacked
    padded = positions[None, :] >= lengths.to(x.device)[:, None]
    return torch.where(padded[..., None], fill.to(x.dtype).repeat(stacked.shape[-1] // d), stacked)


def _prefix_means(x: torch.Tensor, fill_rows: torch.Tensor) -> torch.Tensor:
    """mean_{0<s<t} x_s at every t (BOS excluded), `fill` where that set is empty (t ≤ 1). The running sum
    is float64: over 127 rows of norm ~1e2 float32 would lose the last digits the Gram reads."""
    length = x.shape[1]
    running = torch.cumsum(x[:, 1:].to(torch.float64), dim=1)  # Σ_{1≤s≤t} x_s at t = 1 … T−1
    counts = torch.arange(1, length, device=x.device, dtype=torch.float64)[None, :, None]
    means = (running / counts).to(x.dtype)  # at t: mean over 1 … t; the prefix of t + 1
    return torch.cat([fill_rows[:, : min(2, length)], means[:, : max(length - 2, 0)]], dim=1)


def n_blocks(lags: int, k: int) -> int:
    """d-wide blocks of the union's stacked input: x_t, m lags, the prefix, k routed."""
    return 1 + lags + 1 + k


def context_columns(kind: str, d: int, lags: int, k: int) -> np.ndarray:
    """Column indices of the union's stacked input that `kind` reads (ascending)."""
    lag_blocks = list(range(1, lags + 1))
    prefix_block = [lags + 1]
    routed_blocks = list(range(lags + 2, lags + 2 + k))
    blocks_of = {
        "ato": [0],
        "lagged": [0, *lag_blocks],
        "prefix": [0, *prefix_block],
        "routed": [0, *routed_blocks],
        "lagged_prefix": [0, *lag_blocks, *prefix_block],
        "context": list(range(n_blocks(lags, k))),
    }
    if kind not in blocks_of:
        raise ValueError(f"unknown context kind {kind!r}; expected one of {FITTED_KINDS}")
    return np.concatenate([np.arange(b * d, (b + 1) * d) for b in blocks_of[kind]])


def select_inputs(stats: PairStats, columns: np.ndarray) -> PairStats:
    """The statistics of (x[:, columns], y): a kind's from the union's, without a second pass."""
    cols = np.asarray(columns)
    return PairStats(stats.n, stats.sum_x[cols], stats.sum_y, stats.xtx[np.ix_(cols, cols)], stats.xty[cols], stats.yty)


# --------------------------------------------------------------------------------------------
# Fitting: the α search of `ato tune`, on exact validation R²_w


class TunedFit(NamedTuple):
    alpha: float
    W: np.ndarray  # [d_out, p]
    b: np.ndarray  # [d_out]
    val_r2_w: float  # exact validation R²_w at α
    ceiling: float  # the CCA ceiling of the kind's inputs on train (`ceiling`)


def tune_and_fit(
    train: PairStats,
    val: PairStats,
    alpha_min: float,
    alpha_max: float,
    n_trials: int,
    seed: int,
    standardize: bool = False,
) -> TunedFit:
    """Ridge at the α that `ato tune`'s search (`ridge.search_alpha`) finds on exact validation R²_w.

    One eigendecomposition of the train Gram and one rotation of the val Gram (each O(p³)) price every
    trial at O(p²) (`HeldOutR2Weighted`); R²_w rather than `ato tune`'s uniform R² because the budget's
    shares are R²_w, and only the total SSE is that cheap at p ≈ 4480. The same eigendecomposition gives
    the kind's CCA ceiling."""
    path = RidgePath.from_stats(train, standardize)
    alpha, val_r2_w = search_alpha(HeldOutR2Weighted.of(path, val), alpha_min, alpha_max, n_trials, seed)
    W, b = path.solve(alpha)
    return TunedFit(alpha, W, b, val_r2_w, ceiling(path, train))


def ceiling(path: RidgePath, train: PairStats) -> float:
    """The CCA ceiling (`CCA.ceiling()`: in-sample whitened R² of OLS, as `PairMetrics.ceiling_full`) from
    the ridge path's eigendecomposition, in O(p d²) instead of `CCA.from_stats`' own O(p³) ones:
    tr(A Syx Sxx⁺ Sxy A) / tr(A Syy A) with A = Syy^{+1/2}, Sxx⁺ Sxy = Q diag(1/λ) Qᵀ Sxy (`shrinkage(0)`:
    the pseudo-inverse; a per-dimension scaling of x cancels)."""
    _, _, syy = train.centred()
    whiten = pinv_sqrt(syy)[0]
    rotated = path.qt_xty @ whiten
    explained = float(path.shrinkage(0.0) @ np.sum(rotated * rotated, axis=1))
    total = float(np.sum((whiten @ syy) * whiten))
    return explained / total if total > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# The budget on the test split: per-sequence sums


@dataclass
class SequenceSums:
    """Per test sequence (the intervals' unit): all an R²_w needs. y may be shifted by any fixed vector
    (the train mean keeps float64's digits for norms ~4e4): SST and SSE do not change."""

    n: np.ndarray  # [S] target rows (BOS excluded)
    sum_y: np.ndarray  # [S, d] Σ (y − shift)
    sum_y2: np.ndarray  # [S] Σ ‖y − shift‖²
    sse: dict[str, np.ndarray] = field(default_factory=dict)  # map → [S] Σ ‖y − ŷ‖² (FITTED_KINDS, identity)

    def sst(self) -> np.ndarray:
        """[S] each sequence's Σ ‖y − ȳ‖² about the test split's mean ȳ: they add up to the SST of
        `r2_from_stats` (about the split's own mean), so R²_w = 1 − Σ SSE / Σ SST, a ratio of sums."""
        mean = self.sum_y.sum(0) / self.n.sum()
        return self.sum_y2 - 2 * self.sum_y @ mean + self.n * float(mean @ mean)


@dataclass
class ShareEstimate:
    """A value with its interval and its learning-curve extrapolation: `ato.artifacts.context.Estimate`'s
    fields (math imports nothing of ours: `Estimate(**asdict(share))`)."""

    value: float
    low: float
    high: float
    extrapolated: float = float("nan")
    extrapolated_low: float = float("nan")
    extrapolated_high: float = float("nan")


Value = TypeVar("Value", float, np.ndarray)


def budget_shares(r2_w: dict[str, Value], one: Value | float = 1.0) -> dict[str, Value]:
    """carried, moved, computed and the increments (`increment_<name>`) from the maps' R²_w: numbers or
    learning curves; or, with R²_w → a sequence's explained sum SST_j − SSE_j and `one` → SST_j, each
    share's numerator per sequence (every share is affine in the R²_w)."""
    missing = [kind for kind in FITTED_KINDS if kind not in r2_w]
    if missing:
        raise KeyError(f"the budget needs the R²_w of {missing} (every map of FITTED_KINDS)")
    out = {"carried": r2_w["ato"], "moved": r2_w["context"] - r2_w["ato"], "computed": one - r2_w["context"]}
    for name, before, after in INCREMENT_PATH:
        out[f"increment_{name}"] = r2_w[after] - r2_w[before]
    return out


# --------------------------------------------------------------------------------------------
# Learning curve: nested train fractions at the kind's α, extrapolated in 1/n


class KindCurve(NamedTuple):
    n_train: np.ndarray  # train tokens of each nested fraction
    r2_w: np.ndarray  # exact test R²_w of the kind's ridge, fitted on that fraction at its tuned α


def nested_curve(
    slices: Sequence[PairStats],
    test: PairStats,
    columns: np.ndarray,
    alpha: float,
    full: tuple[np.ndarray, np.ndarray] | None = None,
) -> KindCurve:
    """`slices`: the union statistics of disjoint train slices in nesting order (the stage's 1/8, 1/8,
    1/4, 1/2 of the train sequences); fraction j is the sum of the first j + 1. One Cholesky per fraction
    (`learning_curve.ridge_solve`), the eigendecomposition's path where the Gram is not numerically PD;
    `full`: the map already fitted at α on all slices (W, b), used for the last fraction instead."""
    held = select_inputs(test, columns)
    n_train, r2_w = [], []
    subset: PairStats | None = None
    for j, piece in enumerate(slices):
        part = select_inputs(piece, columns)
        subset = part if subset is None else subset.merge(part)
        if subset.n <= 1:
            continue
        if full is not None and j == len(slices) - 1:
            W, b = full
        else:
            try:
                W, b = ridge_solve(subset, alpha)
            except np.linalg.LinAlgError:
                W, b = RidgePath.from_stats(subset).solve(alpha)
        n_train.append(subset.n)
        r2_w.append(float(r2_from_stats(held, W, b)["r2_weighted"]))
    return KindCurve(np.array(n_train), np.array(r2_w))


def extrapolated(n_train: np.ndarray, values: np.ndarray, se_test: float, level: float) -> tuple[float, float, float]:
    """(value at n → ∞, low, high): the intercept of the least-squares line in 1/n (as
    `learning_curve.extrapolate`), ± z ·
    √(se_fit² + se_test²). se_fit is the intercept's standard error from the line's residuals (n − 2
    degrees of freedom); se_test the observed value's standard error over test sequences, which moves every point
    of the curve alike (all are scored on the same test split). Train-side sampling beyond what the
    residuals show is not resampled: `learning_curve`'s block bootstrap would cost resamples × fractions
    ridge solves at p ≈ 4480."""
    design = np.column_stack([np.ones(len(n_train)), 1.0 / n_train])
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    value, dof = float(coef[0]), len(n_train) - 2
    if dof < 1:
        return value, float("nan"), float("nan")
    sigma2 = float(np.sum((values - design @ coef) ** 2)) / dof
    se_fit = float(np.sqrt(sigma2 * np.linalg.pinv(design.T @ design)[0, 0]))
    half = float(norm.ppf(0.5 + level / 2)) * float(np.hypot(se_fit, se_test))
    return value, value - half, value + half


# --------------------------------------------------------------------------------------------
# The budget with its intervals


@dataclass
class BudgetEstimates:
    r2_w: dict[str, ShareEstimate]  # every map of the sums (FITTED_KINDS, identity)
    shares: dict[str, ShareEstimate]  # carried, moved, computed, increment_<lagged|prefix|routed>
    method: str  # `ato.math.intervals` method
    resamples: int
    level: float

    @property
    def interval(self) -> str:
        """The words of `ContextBudget.interval`."""
        return (
            f"test sequences as units, every value a ratio of per-sequence sums (Σ num / Σ SST): "
            f"{self.method} ({self.resamples} resamples, level {self.level:g}; docs/statistics.md#context); "
            "extrapolated: ± z·√(se_fit² + se_test²) of the 1/n line"
        )


def context_budget(
    sums: SequenceSums,
    curves: dict[str, KindCurve],
    resamples: int,
    seed: int,
    level: float = 0.95,
    method: str = DEFAULT_METHOD,
) -> BudgetEstimates:
    """Every map's test R²_w and every share with its interval over test sequences, extrapolated where
    `curves` (every fitted kind's `nested_curve`, on the same slices) are given ({}: NaN).

    Each value is Σ_j num_j / Σ_j SST_j over sequences j (num = SST − SSE for an R²_w; a share's from
    `budget_shares`), so the interval is `intervals.ratio_bounds`' (the causal check's method, chosen by
    simulation): a difference of two maps enters as one numerator, paired within each sequence. With
    heavy-tailed heteroscedastic noise the percentile bootstrap held `moved` at 0.915 of nominal 0.95 and
    the default studentized hull at 0.945 (tests/test_context_math.py, 190 sequences)."""
    sst = sums.sst()
    explained = {name: sst - sse for name, sse in sums.sse.items()}
    numerators = {**explained, **budget_shares(explained, sst)}
    rows = np.stack(list(numerators.values()))
    dens = np.broadcast_to(sst, rows.shape)
    value, low, high = ratio_bounds(rows, dens, level=level, method=method, n_resamples=resamples, seed=seed)
    se_test = ratio_standard_error(rows, dens)
    curve_values = {name: c.r2_w for name, c in curves.items()}
    curve_values |= budget_shares(curve_values) if curves else {}
    n_train = next(iter(curves.values())).n_train if curves else np.array([])
    out = {}
    for i, name in enumerate(numerators):
        estimate = ShareEstimate(float(value[i]), float(low[i]), float(high[i]))
        if name in curve_values:
            extra = extrapolated(n_train, curve_values[name], float(se_test[i]), level)
            estimate.extrapolated, estimate.extrapolated_low, estimate.extrapolated_high = extra
        out[name] = estimate
    return BudgetEstimates(
        {name: out[name] for name in explained},
        {name: out[name] for name in numerators if name not in explained},
        method,
        resamples,
        level,
    )
