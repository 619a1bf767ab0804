"""Context maps: inputs of layer L at positions s ≤ t stacked beside x_t, and each kind's sub-statistics
(docs/method.md#context-maps).

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

import numpy as np
import torch

from .stats import PairStats

# the kinds, in the order of their files; `context` is the union (ato.artifacts.context.CONTEXT_KINDS)
CONTEXT_KINDS = ("ato", "lagged", "prefix", "routed", "context")


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
        "context": list(range(n_blocks(lags, k))),
    }
    if kind not in blocks_of:
        raise ValueError(f"unknown context kind {kind!r}; expected one of {CONTEXT_KINDS}")
    return np.concatenate([np.arange(b * d, (b + 1) * d) for b in blocks_of[kind]])


def select_inputs(stats: PairStats, columns: np.ndarray) -> PairStats:
    """The statistics of (x[:, columns], y): a kind's from the union's, without a second pass."""
    cols = np.asarray(columns)
    return PairStats(stats.n, stats.sum_x[cols], stats.sum_y, stats.xtx[np.ix_(cols, cols)], stats.xty[cols], stats.yty)
