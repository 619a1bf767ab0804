"""The lagged map's slopes W_ℓ beside the model's lagged mean Jacobians E[∂y_t/∂x_{t−ℓ}] (`ato context`).

Stein's lemma with positions, Cov(y_t, x_s) = Σ_u E[J_tu] Cov(x_u, x_s), makes the lagged regression's
W_ℓ, not the same-position slope, the counterpart of E[J_{t,t−ℓ}] (docs/method.md#atlas). Per pair: one
traced forward of a few TRAIN sequences (shared by all pairs), one random-sign jvp pass through blocks
L+1 … L+k on the top-r right singular vectors V of the stacked [W_0; …; W_m] (`ato.math.jacobian`: every
lag from the same jvps), and the relative differences with their noise, sequences as the unit.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ato.artifacts import LaggedJacobian
from ato.atlas.jacobian import probe_blocks, torch_threads, traced_sequences
from ato.math.atlas import probe_directions
from ato.math.jacobian import slope_gaps
from ato.params import ContextParams
from ato.store import ActivationStore

MAX_CHUNK = 64  # tangents per vmapped jvp call: memory ∝ chunk × sequences × seq_len × d


def lagged_jacobians(
    model: Any,
    store: ActivationStore,
    pairs: dict[str, tuple[int, int]],
    slopes: dict[str, tuple[np.ndarray, np.ndarray]],
    cp: ContextParams,
) -> dict[str, LaggedJacobian]:
    """Per pair name → (L, k): `LaggedJacobian` of its slopes (W_lagged [d, d·(1 + m)] in the stacked order
    x_t, x_{t−1}, …, x_{t−m}; W_ato [d, d]). Switches the model to eager attention (forward-mode AD has no
    rule for fused kernels) and freezes its weights; {} when `context.jacobian_sequences` is 0."""
    if cp.jacobian_sequences == 0:
        return {}
    model.set_attn_implementation("eager")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = sorted({v for L, k in pairs.values() for v in (L, L + k)})
    generator = torch.Generator().manual_seed(cp.seed)
    out = {}
    with torch_threads(1):  # many small ops: one thread is faster on a busy CPU (as `atlas.threads`)
        t0 = time.perf_counter()
        trace, mask = traced_sequences(model, store, cp.jacobian_sequences, cp.jacobian_seq_len, layers)
        trace_seconds = (time.perf_counter() - t0) / len(pairs)
        for name, (L, k) in pairs.items():
            t0 = time.perf_counter()
            W_lagged, W_ato = slopes[name]
            d = W_ato.shape[1]
            blocks = [W_lagged[:, lag * d : (lag + 1) * d] for lag in range(cp.lags + 1)]
            V = probe_directions(blocks, cp.jacobian_directions)
            chunk = min(MAX_CHUNK, 3 * V.shape[1] + 3)
            p = probe_blocks(model, trace, L, [L + k], V, mask, generator, chunk, cp.lags)[0]
            rel_diff, noise = slope_gaps(blocks, V, p)
            (ato_diff,), (ato_noise,) = slope_gaps([W_ato], V, p)
            out[name] = LaggedJacobian(
                directions=V.shape[1],
                sequences=int(p.lag_counts.shape[0]),
                tokens=p.n_tokens,
                rel_diff=rel_diff,
                noise=noise,
                ato_rel_diff=ato_diff,
                ato_noise=ato_noise,
                seconds=time.perf_counter() - t0 + trace_seconds,
            )
    return out
