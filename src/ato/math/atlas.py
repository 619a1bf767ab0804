"""The transport atlas from sufficient statistics: every pair (L, T) of a banded joint Gram fitted and
scored with decompositions shared per layer, five operators side by side, and the model's mean
Jacobian beside the ridge map. See docs/method.md#atlas.

**Shared per layer.** A layer's train covariance enters every pair it belongs to: as x (its
eigendecomposition prices the ridge for every α, its pseudo-inverse whitening is CCA's B) or as y
(CCA's A = Σyy^{+1/2}). `LayerFactors` computes each once, so a pair costs only its cross-covariance
products and one SVD.

**α by generalised cross-validation** (no validation split needed). With the eigendecomposition
XcᵀXc = Q diag(λ) Qᵀ and M = Qᵀ XcᵀYc, the train residual sum of output o scaled by its variance
c_oo, summed over outputs (the uniform R²'s loss), is

    RSS(α) = d_out − Σ_i g_i (2/(λ_i + α) − λ_i/(λ_i + α)²),   g_i = Σ_o M_io² / c_oo,

and GCV(α) = RSS(α)/n / (1 − (df(α) + 1)/n)² with df(α) = Σ λ_i/(λ_i + α) (+1: the intercept): O(d)
per α. GCV treats rows as independent; tokens of one document are not, which can only make the chosen
α smaller than a document-blocked choice (at n/d ≈ 50 the penalty hardly matters; `tune` does the
validation-split choice for the default pairs).

**Operators**, each an affine map ŷ = W x + b scored by exact residual R² on the test statistics:
identity (W = I, b = 0), scaled orthogonal Procrustes plain and centred (`ato.math.procrustes`),
ridge, reduced-rank regression at the held-out subspace size (CCA truncation, `CCA.rrr_map`), and
the mean same-position Jacobian E[J] of the blocks in between (`ato.math.jacobian`; restricted to a
probed input subspace V it replaces the ridge map's action on V: W_J = W + (E[J]V − WV)Vᵀ, and
b_J = ȳ − W_J x̄).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .cca import CCA, pinv_sqrt, whitening
from .directions import TransportDirections, transport_directions
from .heldout import CCANull, VersusNull, heldout_from_cca
from .jacobian import (
    JacobianProbe,
    estimate_noise,
    lag_standard_error,
    linearisation_r2,
    slope_gaps,
    token_variation,
)
from .linear_reference import LinearReference, linear_reference
from .procrustes import peer_linearity_from_eigh, procrustes_centred, procrustes_plain
from .ridge import RidgePath, r2_from_stats
from .stats import PairStats


def _sym(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


# --------------------------------------------------------------------------------------------
# Per-layer factors (train split)


@dataclass
class LayerFactors:
    """One layer's train moments and their decompositions, each computed on first use and shared."""

    n: float
    mean: np.ndarray  # x̄ [d]
    scatter: np.ndarray  # Σ (x − x̄)(x − x̄)ᵀ [d, d]

    @classmethod
    def from_moments(cls, n: float, total: np.ndarray, gram: np.ndarray) -> LayerFactors:
        """From n, Σx and Σx xᵀ (exactly as `PairStats.centred` forms the scatter)."""
        mean = total / n
        return cls(n, mean, gram - n * np.outer(mean, mean))

    @cached_property
    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """(λ ascending, clipped at 0; Q) of the symmetrised scatter: the ridge path's decomposition."""
        lam, Q = np.linalg.eigh(_sym(self.scatter))
        return np.clip(lam, 0, None), Q

    @cached_property
    def x_whitening(self) -> np.ndarray:
        """CCA's B (pseudo-inverse whitening of the equilibrated covariance)."""
        return whitening(self.scatter / self.n)

    @cached_property
    def y_whitening(self) -> tuple[np.ndarray, np.ndarray, float]:
        """CCA's (A = Σ^{+1/2}, Σ^{1/2}, T = tr(A Σ A))."""
        cov = self.scatter / self.n
        A, A_inv, _ = pinv_sqrt(cov)
        return A, A_inv, float(np.sum((A @ cov) * A))


def ridge_path(fx: LayerFactors, fy: LayerFactors, train: PairStats) -> RidgePath:
    """`RidgePath.from_stats(train)` (no standardisation) from x's shared eigendecomposition."""
    lam, Q = fx.eigh
    _, cxy, _ = train.centred()
    return RidgePath(lam, Q, Q.T @ cxy, np.ones(len(lam)), fx.mean, fy.mean)


def cca_from_factors(fx: LayerFactors, fy: LayerFactors, train: PairStats) -> CCA:
    """`CCA.from_stats(train)` from the shared whitenings: one SVD per pair."""
    wx = fx.x_whitening
    wy, wy_inv, total = fy.y_whitening
    _, cxy, _ = train.centred()
    C = wy @ (cxy / train.n).T @ wx
    U, rho, Vt = np.linalg.svd(C, full_matrices=False)
    return CCA(fx.mean.copy(), fy.mean.copy(), wy, wy_inv, wx, rho, U, Vt.T, total)


# --------------------------------------------------------------------------------------------
# α by generalised cross-validation


def alpha_grid(alpha_min: float, alpha_max: float, points: int) -> np.ndarray:
    return np.logspace(np.log10(alpha_min), np.log10(alpha_max), points)


def gcv_curve(path: RidgePath, train: PairStats, alphas: np.ndarray) -> np.ndarray:
    """GCV(α) of the uniform (per-output variance-scaled) loss for every α (module docstring)."""
    _, _, cyy = train.centred()
    c = np.diag(cyy)
    live = c > 0
    g = ((path.qt_xty[:, live] ** 2) / c[live]).sum(1)  # [d_in]
    lam, n = path.eigvals[:, None], train.n
    a = np.asarray(alphas, dtype=np.float64)[None, :]
    rss = live.sum() - (g[:, None] * (2 / (lam + a) - lam / (lam + a) ** 2)).sum(0)
    df = (lam / (lam + a)).sum(0)
    return (rss / n) / (1 - (df + 1) / n) ** 2


def choose_alpha(path: RidgePath, train: PairStats, alphas: np.ndarray) -> tuple[float, bool]:
    """(α minimising GCV over the grid, whether it sits at an edge of the grid)."""
    curve = gcv_curve(path, train, alphas)
    i = int(np.nanargmin(curve))
    return float(alphas[i]), i in (0, len(alphas) - 1)


# --------------------------------------------------------------------------------------------
# One pair


@dataclass
class Scores:
    """Residual R² of one operator on the test statistics."""

    r2: float  # uniform average over output dimensions
    r2_weighted: float  # 1 − SSE/SST over all dimensions


def score(test: PairStats, W: np.ndarray, b: np.ndarray) -> Scores:
    out = r2_from_stats(test, W, b)
    return Scores(float(out["r2"]), float(out["r2_weighted"]))


@dataclass
class PairFit:
    """The statistics-only part of one atlas pair: maps, test scores, η and the subspace size."""

    L: int
    T: int
    alpha: float
    alpha_at_edge: bool
    maps: dict[str, tuple[np.ndarray, np.ndarray]]  # operator → (W, b); "jacobian" added by `with_jacobian`
    scores: dict[str, Scores]  # operator → test R²
    procrustes_scale: float
    procrustes_centred_scale: float
    orthogonal_score: float  # 2‖ÃᵀB̃‖_* − 1, the centred orthogonal-Procrustes fit (train, in sample)
    peer_linearity: float  # Razzhigaev et al.'s score as their code computes it (train, in sample)
    ceiling: float  # CCA ceiling (train)
    linear: LinearReference  # η(test) beside an exactly linear map's
    heldout_size: VersusNull  # held-out subspace size beside its null
    rrr_rank: int  # rank of the reduced-rank map (= the observed held-out subspace size)
    directions: TransportDirections  # directions whose held-out ρ passes the step-down test (no interval)
    extra: dict[str, float] = field(default_factory=dict)  # local-vs-global numbers, when probed


def fit_pair(
    L: int,
    T: int,
    fx: LayerFactors,
    fy: LayerFactors,
    train: PairStats,
    test: PairStats,
    alphas: np.ndarray | float,
    null: CCANull,
    eta_replicates: int = 0,
    seed: int = 0,
    extra: Mapping[str, Callable[[PairStats], tuple[np.ndarray, np.ndarray]]] | None = None,
) -> PairFit:
    """Fit every statistics-based operator of pair (L, T) on train and score it on test.

    `alphas`: a grid (GCV choice) or one fixed α; `null`: the held-out subspace null at this n and d;
    `extra`: more operators by name, each built from the train statistics alone (registered map kinds)."""
    path = ridge_path(fx, fy, train)
    if np.ndim(alphas) == 0:
        alpha, edge = float(np.asarray(alphas)), False
    else:
        alpha, edge = choose_alpha(path, train, np.asarray(alphas))
    cca = cca_from_factors(fx, fy, train)
    held = heldout_from_cca(cca, test)
    size = held.subspace_size(null.fraction)
    d_in, d_out = train.xtx.shape[0], train.yty.shape[0]
    W_p, b_p, s_p = procrustes_plain(train)
    W_c, b_c, s_c, orthogonal = procrustes_centred(train)
    maps = {
        "identity": (np.eye(d_out, d_in), np.zeros(d_out)),
        "procrustes": (W_p, b_p),
        "procrustes_centred": (W_c, b_c),
        "ridge": path.solve(alpha),
        "rrr": cca.rrr_map(size),
    }
    maps.update({name: build(train) for name, build in (extra or {}).items()})
    W, b = maps["ridge"]
    ceiling = float(cca.ceiling())
    eta = float(cca.whitened_r2(test, W, b)) / ceiling if ceiling > 0 else float("nan")
    sizes = (int(train.n), int(test.n), d_in, d_out)
    linear = linear_reference(eta, cca.rho, *sizes, replicates=eta_replicates, seed=seed)
    return PairFit(
        L=L,
        T=T,
        alpha=alpha,
        alpha_at_edge=edge,
        maps=maps,
        scores={name: score(test, *m) for name, m in maps.items()},
        procrustes_scale=s_p,
        procrustes_centred_scale=s_c,
        orthogonal_score=orthogonal,
        peer_linearity=peer_linearity_from_eigh(path.eigvals, path.qt_xty, float(np.trace(train.centred()[2]))),
        ceiling=ceiling,
        linear=linear,
        heldout_size=VersusNull.of(size, null.heldout_size),
        rrr_rank=size,
        # at the token count, like the atlas's null: tokens of a sequence are dependent, so it is optimistic
        directions=transport_directions(held, test.n),
    )


# --------------------------------------------------------------------------------------------
# The Jacobian beside the ridge map


def probe_directions(maps: list[np.ndarray], r: int) -> np.ndarray:
    """[d_in, r] orthonormal: the top-r right singular vectors of the stacked maps [W_1; W_2; …] (the
    input directions the ridge maps out of one layer act on most); the identity when r ≥ d_in."""
    d_in = maps[0].shape[1]
    if r >= d_in:
        return np.eye(d_in)
    _, _, vt = np.linalg.svd(np.vstack(maps), full_matrices=False)
    return vt[:r].T


def jacobian_map(W: np.ndarray, V: np.ndarray, JV: np.ndarray, train: PairStats) -> tuple[np.ndarray, np.ndarray]:
    """(W_J, b_J): E[J] on span V, the ridge map on its complement, intercept at the train means."""
    W_J = W + (JV - W @ V) @ V.T
    return W_J, train.mean_y - W_J @ train.mean_x


def _top_left(m: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    return u[:, :q], s


def alignment(a: np.ndarray, b: np.ndarray, q: int) -> float:
    """Mean cos² of the principal angles between the top-q left singular subspaces of a and b (1:
    the same subspace; q/d for random ones)."""
    ua, _ = _top_left(a, q)
    ub, _ = _top_left(b, q)
    return float(np.sum((ua.T @ ub) ** 2) / q)


def local_vs_global(
    W: np.ndarray, b: np.ndarray, V: np.ndarray, probe: JacobianProbe, identity: np.ndarray | None = None
) -> dict[str, float | list[float]]:
    """The ridge map W beside the mean Jacobian on span V (docs/method.md#atlas):

    rel_diff ‖(W − E[J])V‖/‖WV‖ and rel_diff_update ‖(W − E[J])V‖/‖(W − I)V‖ (against the computed
    part only: both maps carry the identity), the same for the total response, alignment of the top
    ⌈r/2⌉ left singular subspaces of WV and E[J]V (and of their updates) with its random-subspace value
    q/d, the share of ‖W‖² on V, the token-to-token variation ν of J, the estimate's sign noise and its
    token-sampling error √(ν/n) (tokens taken as independent: a lower bound within sequences), the
    variance-weighted R² on the probe tokens of the per-token linearisations beside W x + b, the
    singular values of WV, E[J]V and E[J_total]V, and `sequence_fields` (noise with sequences as the
    unit, the lagged Jacobians)."""
    JV = probe.mean.numpy()
    JtV = probe.total.numpy()
    WV = W @ V
    I_V = (np.eye(*W.shape) if identity is None else identity) @ V
    r = V.shape[1]
    q = max(1, (r + 1) // 2)
    norm_wv, norm_upd = np.linalg.norm(WV), np.linalg.norm(WV - I_V)
    x, y = probe.x.numpy(), probe.y.numpy()
    ridge_err = y - x @ W.T - b
    sst = float(((y - y.mean(0)) ** 2).sum())
    lin = linearisation_r2(probe)
    variation = token_variation(probe)
    return {
        "directions": float(r),
        "w_captured": float(norm_wv**2 / np.linalg.norm(W) ** 2),
        "rel_diff": float(np.linalg.norm(WV - JV) / norm_wv),
        "rel_diff_update": float(np.linalg.norm(WV - JV) / norm_upd) if norm_upd > 0 else float("nan"),
        "rel_diff_total": float(np.linalg.norm(WV - JtV) / norm_wv),
        "alignment": alignment(WV, JV, q),
        "alignment_update": alignment(WV - I_V, JV - I_V, q),
        "alignment_null": q / W.shape[0],
        "token_variation": variation,
        "estimate_noise": estimate_noise(probe),
        "sampling_error": float(np.sqrt(max(variation, 0.0) / probe.n_tokens)),
        "linearisation_r2": lin["same"],
        "total_linearisation_r2": lin["total"],
        "ridge_r2_probe": 1 - float((ridge_err**2).sum()) / sst if sst > 0 else float("nan"),
        "n_probe_tokens": float(probe.n_tokens),
        "sv_ridge": np.linalg.svd(WV, compute_uv=False).tolist(),
        "sv_jacobian": np.linalg.svd(JV, compute_uv=False).tolist(),
        "sv_total": np.linalg.svd(JtV, compute_uv=False).tolist(),
        **sequence_fields(probe, W, V),
    }


def sequence_fields(
    probe: JacobianProbe, W: np.ndarray, V: np.ndarray, margin: float = 2.0
) -> dict[str, float | list[float]]:
    """The noise of Ê[J_tt]V with sequences as the unit on the scale of the gap ‖(W − E[J])V‖/‖WV‖
    (`slope_gaps`), the sequences at which it would fall to gap/`margin` (SE ∝ 1/√sequences), and the
    lagged responses ‖E[J_{t,t−ℓ}]V‖_F/‖E[J_tt]V‖_F for ℓ = 1 … m with their noise on that scale.
    One sequence gives no standard error: nan."""
    (gap,), (noise,) = slope_gaps([W], V, probe)
    se, lagged = lag_standard_error(probe).numpy(), probe.lag_mean.numpy()
    sequences = probe.lag_counts.shape[0]
    same = float(np.linalg.norm(lagged[0]))
    return {
        "n_probe_sequences": float(sequences),
        "sequence_noise": noise,
        "sequences_for_gap": _sequences_for(sequences, margin * noise / gap) if gap > 0 else math.nan,
        "lag_response": [float(np.linalg.norm(j)) / same for j in lagged[1:]],
        "lag_noise": [float(np.linalg.norm(e)) / same for e in se[1:]],
    }


def _sequences_for(sequences: int, relative_noise: float) -> float:
    """Sequences at which a standard error now `relative_noise` × the target falls to the target (∝ 1/√n)."""
    if not math.isfinite(relative_noise):
        return math.nan
    return float(max(2, math.ceil(sequences * relative_noise**2)))
