"""Operator variants: other affine maps x_L → y_{L+k} built from a fitted operator and its pair's
TRAIN statistics, so they can be compared with it as operators in their own right (docs/method.md#variants).

Names (parsed by `ato.kinds.parse_variant`, the registry of map kinds):

    rank<r>      reduced-rank regression at rank r: the rank-r map that maximises the whitened in-sample R²
                 (it attains the CCA ceiling(r); `ato.math.cca.CCA.rrr_sweep`)
    update<r>    identity plus the best rank-r change: ŷ = x + Δ_r x + b, Δ_r the reduced-rank regression of
                 the update y − x on x in the whitened target metric (`update_sweep`): the map that keeps
                 what the blocks carry and learns only r directions of what they change
    svd<r>       the fitted map's SVD truncated to rank r, intercept refitted at the train means
                 (`ato.math.cca.CCA.svd_sweep`: the maps evaluate's η_svd(r) scores; not a default:
                 truncating in raw coordinates ignores Σxx and can score below the identity)
    procrustes   similarity Procrustes: ŷ = s Q (x − x̄) + ȳ with Q orthogonal and s ≥ 0 the least-squares
                 scale (a rotation of the centred residual plus a global gain: the residual norm grows
                 across layers, a pure rotation would miss that)
    identity     ŷ = x (pure carry-over; the identity baseline of evaluate and the causal check)

Every map is returned as (W [d_out, d_in], b [d_out]) in original coordinates, ŷ = W x + b. The
rank of `rank<r>` / `update<r>` / `svd<r>` is capped at min(d_in, d_out) (the cap is reported, not an
error, so a list of variants works on small test models too). Pure numpy: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .cca import CCA, RankSweep
from .stats import PairStats


class VariantName(Protocol):
    """A parsed variant name (`ato.kinds.VariantSpec`): `rank64` → kind "rank", rank 64."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...  # the variant key of its map kind: rank, update, svd, procrustes or identity

    @property
    def rank(self) -> int | None: ...  # requested rank (ranked kinds only)


@dataclass
class VariantMap:
    """One variant's map and what it is."""

    spec: VariantName
    W: np.ndarray  # [d_out, d_in] float64
    b: np.ndarray  # [d_out]
    rank: int | None  # the rank actually used (≤ min(d_in, d_out)); None for full-rank kinds
    scale: float | None = None  # the Procrustes gain s


def variant_map(spec: VariantName, train: PairStats, W: np.ndarray, cca: CCA | None = None) -> VariantMap:
    """The variant `spec` of the fitted map W on the pair's train statistics (`cca`: reuse one
    `CCA.from_stats(train)` across several ranked variants)."""
    d_in, d_out = train.sum_x.shape[0], train.sum_y.shape[0]
    if spec.kind == "identity":
        if d_in != d_out:
            raise ValueError(f"identity variant needs d_in == d_out, got {d_in} and {d_out}")
        return VariantMap(spec, np.eye(d_out), np.zeros(d_out), None)
    if spec.kind == "procrustes":
        Wp, bp, s = procrustes_map(train)
        return VariantMap(spec, Wp, bp, None, s)
    if spec.rank is None:
        raise ValueError(f"variant {spec.name}: a {spec.kind} variant needs a rank")
    cca = cca or CCA.from_stats(train)
    if spec.kind == "update":
        sweep = update_sweep(train, cca)
        rank = min(spec.rank, sweep.max_rank)
        Wu = np.eye(d_out) + sweep.map(rank)[0]
        return VariantMap(spec, Wu, train.mean_y - Wu @ train.mean_x, rank)
    sweep = cca.rrr_sweep() if spec.kind == "rank" else cca.svd_sweep(W)
    rank = min(spec.rank, sweep.max_rank)
    Wr, br = sweep.map(rank)
    return VariantMap(spec, Wr, br, rank)


def update_sweep(train: PairStats, cca: CCA) -> RankSweep:
    """The rank-r changes Δ_r of reduced-rank regression of the update y − x on x, whitened as `rank<r>`
    is (A = Σyy^{+1/2} on the target side, the metric R²_w scores in; B on the source side):
    SVD of A Σ_(y−x)x B = A Σyx B − A Σxx B. `map(r)[0]` is Δ_r; x + Δ_r x + (ȳ − (I + Δ_r) x̄)
    maximises the in-sample R²_w among identity-plus-rank-r maps, and at full rank it is OLS.
    The sweep's own R² curves score Δ_r as a predictor of y, not of the update: use the full map."""
    d_in, d_out = train.sum_x.shape[0], train.sum_y.shape[0]
    if d_in != d_out:
        raise ValueError(f"update variant needs d_in == d_out, got {d_in} and {d_out}")
    cxx, cxy, _ = (m / train.n for m in train.centred())
    update_cross = cca.wy @ (cxy.T - cxx) @ cca.wx  # A Σ_(y−x)x B, [d_out, d_in]
    U, rho, Vt = np.linalg.svd(update_cross, full_matrices=False)
    return RankSweep(cca, p=U, q=cca.wx @ (Vt.T * rho), kind="update")


def procrustes_map(s: PairStats) -> tuple[np.ndarray, np.ndarray, float]:
    """(W = s·Q, b = ȳ − W x̄, s) minimising Σ‖(y − ȳ) − s Q (x − x̄)‖² over orthogonal Q [d_out, d_in]
    (semi-orthogonal when d_in ≠ d_out) and s ≥ 0: Q = U Vᵀ from the SVD U S Vᵀ of the centred
    cross-scatter Σ (y − ȳ)(x − x̄)ᵀ, s = tr S / tr Σ (x − x̄)(x − x̄)ᵀ."""
    xtx, xty, _ = s.centred()
    U, sv, Vt = np.linalg.svd(xty.T, full_matrices=False)  # [d_out, d_in] = U diag(sv) Vᵀ
    Q = U @ Vt
    trace_x = float(np.trace(xtx))
    scale = float(sv.sum() / trace_x) if trace_x > 0 else 0.0
    W = scale * Q
    return W, s.mean_y - W @ s.mean_x, scale
