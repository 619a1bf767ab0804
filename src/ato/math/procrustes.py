"""Orthogonal Procrustes maps between two residual layers, from sufficient statistics (`PairStats`).

The "secretly linear" measure of Razzhigaev et al. asks how well an orthogonal map (a rotation or
reflection, plus one isotropic scale) carries layer L onto layer T. With rows x, y:

* **plain**: ŷ = s R x, R orthogonal; R = V Uᵀ from the SVD Σ x yᵀ = U Σ Vᵀ (uncentred), and the
  least-squares scale s = tr Σ / Σ‖x‖². No intercept.
* **centred**: ŷ = s R (x − x̄) + ȳ, the same on the centred scatter XcᵀYc.

Residual norms grow with depth, so an orthogonal map without the scale s would score the norm
growth, not the geometry; s makes both maps similarity transforms (the best scaled rotation).
`orthogonal_score`: centre and normalise both sides to unit Frobenius norm, then
1 − min_R ‖Ã R − B̃‖²_F = 2‖ÃᵀB̃‖_* − 1 (‖·‖_*: nuclear norm), in sample; an orthogonal-Procrustes fit.

**The peer's number is another one.** Razzhigaev et al.'s published code (`llm-microscope`,
`procrustes_similarity`) does not constrain the map: on the same centred, unit-Frobenius rows it takes
the least-squares A = Ã⁺B̃ and reports 1 − ‖ÃA − B̃‖²_F, the in-sample variance-weighted R² of an
unconstrained linear map with intercept. From statistics that is tr(CxyᵀCxx⁺Cxy)/tr(Cyy), the scale
of either side cancelling (`peer_linearity`). Being in sample it grows as n falls towards d (at n ≤ d
it is exactly 1), so it is comparable only at the same n.
"""

from __future__ import annotations

import numpy as np

from .stats import PairStats


def _rotation(m: np.ndarray) -> tuple[np.ndarray, float]:
    """(R [d_out, d_in] orthogonal with R = argmax tr(R M) for M = Σ x yᵀ [d_in, d_out], ‖M‖_*)."""
    u, sigma, vt = np.linalg.svd(np.asarray(m, dtype=np.float64), full_matrices=False)
    return vt.T @ u.T, float(sigma.sum())


def procrustes_plain(s: PairStats) -> tuple[np.ndarray, np.ndarray, float]:
    """(W = s R, b = 0, s) of the scaled orthogonal map ŷ = s R x fitted on uncentred rows."""
    if s.xtx.shape != s.yty.shape:
        raise ValueError("orthogonal Procrustes needs d_in == d_out")
    R, nuclear = _rotation(s.xty)
    norm = float(np.trace(s.xtx))
    scale = nuclear / norm if norm > 0 else 0.0
    return scale * R, np.zeros(R.shape[0]), scale


def procrustes_centred(s: PairStats) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(W = s R, b = ȳ − W x̄, s, linearity score) of the scaled orthogonal map fitted on centred rows;
    the linearity score (`linearity_score`) comes from the same SVD."""
    if s.xtx.shape != s.yty.shape:
        raise ValueError("orthogonal Procrustes needs d_in == d_out")
    cxx, cxy, cyy = s.centred()
    R, nuclear = _rotation(cxy)
    norm = float(np.trace(cxx))
    scale = nuclear / norm if norm > 0 else 0.0
    W = scale * R
    return W, s.mean_y - W @ s.mean_x, scale, _linearity(nuclear, norm, float(np.trace(cyy)))


def _linearity(nuclear: float, tr_xx: float, tr_yy: float) -> float:
    norm = float(np.sqrt(tr_xx * tr_yy))
    return 2.0 * nuclear / norm - 1.0 if norm > 0 else float("nan")


def orthogonal_score(s: PairStats) -> float:
    """2‖ÃᵀB̃‖_* − 1 on centred, unit-Frobenius-norm rows: the orthogonal-Procrustes fit, in sample."""
    cxx, cxy, cyy = s.centred()
    nuclear = float(np.linalg.svd(cxy, compute_uv=False).sum())
    return _linearity(nuclear, float(np.trace(cxx)), float(np.trace(cyy)))


def peer_linearity(s: PairStats) -> float:
    """Razzhigaev et al.'s linearity score as `llm_microscope.procrustes_similarity` computes it: the
    in-sample R²_w of the unconstrained least-squares map on centred rows (module docstring)."""
    cxx, cxy, cyy = s.centred()
    eigvals, eigvecs = np.linalg.eigh((cxx + cxx.T) / 2)
    return peer_linearity_from_eigh(eigvals, eigvecs.T @ cxy, float(np.trace(cyy)))


def peer_linearity_from_eigh(eigvals: np.ndarray, qt_xty: np.ndarray, tr_yy: float) -> float:
    """`peer_linearity` from the centred input scatter's eigendecomposition Q diag(λ) Qᵀ, M = Qᵀ Cxy and
    tr Cyy: Σ_i ‖M_i‖²/λ_i / tr Cyy. Eigenvalues within float64 rounding of 0 (λ ≤ d·ε·λ_max) are
    directions the rows do not span, left out as a pseudo-inverse does."""
    cutoff = eigvals.max(initial=0.0) * len(eigvals) * np.finfo(np.float64).eps
    kept = eigvals > cutoff
    explained = float(((qt_xty[kept] ** 2).sum(1) / eigvals[kept]).sum())
    return explained / tr_yy if tr_yy > 0 else float("nan")
