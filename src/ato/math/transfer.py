"""Comparing affine transport maps fitted on different data (e.g. languages): the transfer matrix,
principal angles between top singular subspaces, and the subspace several maps share. Pure numpy.

**Transfer matrix.** For maps (W_i, b_i) and test statistics s_j, R²[i, j] is map i scored exactly on
the rows of s_j (`ato.math.ridge.r2_from_stats`, about s_j's own mean): the diagonal is each map on
its own data, an off-diagonal entry one map carried over.

**Which subspace.** Part of any k-layer map is the carried residual (the identity), which every
language shares trivially; what the blocks add linearly is the *update* W − I. In raw coordinates its
singular vectors follow the scale of the residual dimensions (a few carry 10³–10⁴× the variance of the
rest), not what the map does to the inputs the model actually sees; so the compared subspaces are
the singular subspaces of M = (W − I) S, with S = Σxx^{1/2} the (pooled) input covariance's square
root. The top-r left singular vectors of M span the output directions the update writes most
variance into ("write" subspace); its top-r right singular vectors, in the whitened input
coordinates S⁻¹(x − x̄), the input directions it reads most ("read" subspace). One S for every map
compares the maps, not the languages' input statistics.

**Overlap.** For r-dimensional subspaces with orthonormal bases A, B, the cosines of the principal
angles are the singular values of AᵀB; the overlap is their mean square, ‖AᵀB‖²_F / r ∈ [0, 1]:
1 for the same subspace, r/d in expectation for independent uniformly random subspaces
(`random_overlap`), 0 for orthogonal ones.

**Canonical tracking** (`canonical_tracking`), the transfer score: on the test rows' own CCA, the
target canonical variates v_j = u_jᵀA(y − ȳ) are uncorrelated with unit variance, and the best any
linear function of x does on v_j is squared correlation ρ_j² (the test canonical correlation). A map's
prediction along the same direction, v̂_j = u_jᵀA(ŷ − ȳ), is a linear function of x, so its squared
correlation r_j² with v_j lies in [0, ρ_j²], and

    tracking = Σ_j r_j² / Σ_j ρ_j²  ∈ [0, 1]:

the share of these rows' linearly predictable canonical signal that the map's prediction follows, each
direction counted alike and up to its own gain (a gain or offset error costs R², not tracking; R²
reports those). Unlike the whitened R² over the ceiling (η), a wrong map cannot drive it below 0, and
1 is attained only by a map that predicts every canonical direction as well as the test rows' own
in-sample least-squares map. Its reference is a map fitted the same way on the same number of the
language's own rows: out of sample it falls short of 1 by its estimation error, at whatever effective
n the language's dependent tokens give, with no independence assumed.

**Variance split** (`variance_split_r2`): R²_w restricted to the top principal directions of the test
y that hold a given share of its variance, and to the rest: whether a map errs where y varies most or
in the many low-variance directions.

**Shared subspace.** For bases A_1..A_m, the average projector P̄ = (1/m) Σ A_ℓ A_ℓᵀ has eigenvalues in
[0, 1]; a unit vector v lies in every subspace iff vᵀP̄v = 1. `shared_dimension` counts eigenvalues
≥ `threshold` (each such direction has mean cos² ≥ threshold with the m subspaces).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .cca import CCA
from .ridge import r2_from_stats
from .stats import PairStats

Map = tuple[np.ndarray, np.ndarray]  # (W [d_out, d_in], b [d_out])


def transfer_matrix(maps: Sequence[Map], tests: Sequence[PairStats]) -> dict[str, np.ndarray]:
    """{"r2": [m, t], "r2_weighted": [m, t]}: map i on test statistics j (uniform and variance-weighted R²)."""
    r2 = np.full((len(maps), len(tests)), np.nan)
    r2w = np.full_like(r2, np.nan)
    for i, (W, b) in enumerate(maps):
        for j, s in enumerate(tests):
            out = r2_from_stats(s, W, b)
            r2[i, j], r2w[i, j] = float(out["r2"]), float(out["r2_weighted"])
    return {"r2": r2, "r2_weighted": r2w}


def input_metric(s: PairStats) -> np.ndarray:
    """S = Σxx^{1/2}: the symmetric square root of the centred input covariance of `s` (divided by n)."""
    cxx = s.centred()[0] / s.n
    lam, Q = np.linalg.eigh((cxx + cxx.T) / 2)
    return (Q * np.sqrt(np.clip(lam, 0.0, None))) @ Q.T


def update_subspaces(W: np.ndarray, S: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(write, read): orthonormal [d, r] bases of the top-r left and right singular vectors of
    M = (W − I) S — the output directions the linear update writes most variance into, and the
    (whitened) input directions it reads most, under the input metric S."""
    W = np.asarray(W, dtype=np.float64)
    if W.shape[0] != W.shape[1] or S.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"update subspaces need a square W and a matching S; got {W.shape} and {S.shape}")
    r = min(int(r), W.shape[0])
    U, _, Vt = np.linalg.svd((W - np.eye(W.shape[0])) @ S)
    return U[:, :r], Vt[:r].T


def principal_cosines(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between span(A) and span(B) (orthonormal columns), descending."""
    return np.clip(np.linalg.svd(A.T @ B, compute_uv=False), 0.0, 1.0)


def overlap(A: np.ndarray, B: np.ndarray) -> float:
    """Mean squared principal cosine ‖AᵀB‖²_F / r of two r-dimensional subspaces (orthonormal bases)."""
    if A.shape != B.shape:
        raise ValueError(f"overlap needs bases of one shape; got {A.shape} and {B.shape}")
    return float(np.sum((A.T @ B) ** 2) / A.shape[1])


def random_overlap(r: int, d: int) -> float:
    """E[overlap] of two independent uniformly random r-dimensional subspaces of R^d: r/d."""
    return float(min(r, d) / d)


def shared_dimension(bases: Sequence[np.ndarray], threshold: float) -> int:
    """Number of eigenvalues ≥ threshold of the average projector (1/m) Σ A Aᵀ: directions that lie,
    in mean cos², at least `threshold` inside every one of the m subspaces."""
    if not bases:
        return 0
    P = sum(A @ A.T for A in bases) / len(bases)
    return int(np.sum(np.linalg.eigvalsh((P + P.T) / 2) >= threshold))


def pooled(stats: Sequence[PairStats]) -> PairStats:
    """The statistics of all rows together (disjoint data sets merged)."""
    out = stats[0]
    for s in stats[1:]:
        out = out.merge(s)
    return out


def canonical_tracking(test: PairStats, maps: Mapping[str, Map]) -> dict[str, float]:
    """{map: Σ_j r_j² / Σ_j ρ_j² ∈ [0, 1]} of each ŷ = W x + b on the test rows' own CCA (module docstring;
    one CCA for every map)."""
    cca = CCA.from_stats(test)
    cxx, cxy, cyy = (m / test.n for m in test.centred())
    directions = cca.wy @ cca.u  # column j: a_j with v_j = a_jᵀ(y − ȳ)
    variance_true = np.einsum("oj,oj->j", directions, cyy @ directions)
    attainable = float(np.sum(cca.rho**2))
    out = {}
    for name, (W, _) in maps.items():  # b only shifts the mean of v̂_j
        predicted = directions.T @ W  # row j: a_jᵀ W, so v̂_j − its mean = (a_jᵀ W)(x − x̄)
        covariance = np.einsum("ji,ij->j", predicted, cxy @ directions)
        variance_predicted = np.einsum("ji,ji->j", predicted, predicted @ cxx)
        live = (variance_true > 0) & (variance_predicted > 0)
        r2 = covariance[live] ** 2 / (variance_true[live] * variance_predicted[live])
        out[name] = float(np.sum(r2) / attainable) if attainable > 0 else float("nan")
    return out


def residual_scatter(s: PairStats, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ (y − W x − b)(y − W x − b)ᵀ over the statistics' rows, exactly (its diagonal is `sse_from_stats`)."""
    W, b = np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)
    wxy = W @ s.xty
    offset = W @ s.sum_x - s.sum_y
    return s.yty - wxy - wxy.T + W @ s.xtx @ W.T + np.outer(offset, b) + np.outer(b, offset) + s.n * np.outer(b, b)


def variance_split_r2(
    test: PairStats, maps: Mapping[str, Map], share: float
) -> tuple[int, dict[str, tuple[float, float]]]:
    """(h, {map: (R²_w on the top-h principal directions of test y, R²_w on the other d − h)}), h the
    fewest directions holding `share` of the variance about the test mean."""
    _, _, cyy = test.centred()
    variances, axes = np.linalg.eigh((cyy + cyy.T) / 2)
    variances, axes = np.clip(variances[::-1], 0.0, None), axes[:, ::-1]
    h = int(np.searchsorted(np.cumsum(variances) / variances.sum(), share) + 1)
    out = {}
    for name, (W, b) in maps.items():
        error = np.einsum("oj,oj->j", axes, residual_scatter(test, W, b) @ axes)
        out[name] = (1 - error[:h].sum() / variances[:h].sum(), 1 - error[h:].sum() / variances[h:].sum())
    return h, {name: (float(top), float(rest)) for name, (top, rest) in out.items()}
