"""Effective sample size: tokens of one document are not independent, so the nulls and references are
drawn at n / deff, with Kish design effects over documents. See docs/statistics.md#effective-n."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DesignEffects:
    """Kish design effects of test statistics under clustering by document, clipped at 1 from below
    (so n_eff ≤ n; the raw values are kept). With Z_g the sum of a per-token quantity z_t over
    document g and z̄ its mean, deff = Σ_g ‖Z_g − n_g z̄‖² / Σ_t ‖z_t − z̄‖².

    - `score`: z_t = x̃_t ε̃_tᵀ, the whitened source times the whitened operator error. OLS's
      estimation error is a linear function of its mean, so this sets the effective n of the fit:
      the in-sample optimism of the ceiling and the out-of-sample loss, i.e. η's linear reference.
    - `r2`: z_t = e_t − (SSE/SST)·d_t, e_t = ‖ε̃_t‖², d_t = ‖ỹ_t − ȳ̃‖², the linearised whitened test R²:
      the effective n of the test split's own sampling noise in η(test).
    - `null`: z_t = x̃_t ỹ_tᵀ, the whitened cross-covariance from which the sample canonical
      correlations (and their Wishart null) are computed. Transport between x and y adds to it, so
      it is at least the independence value (conservative for the null)."""

    score: float
    r2: float
    null: float
    n_groups: int  # documents seen
    raw: tuple[float, float, float]  # score, r2, null before clipping
    r2_sd: float  # sd of the whitened test R² over documents: √Σ_g(E_g − (SSE/SST)·D_g)² / SST
    r2w_sd: float  # the same for the variance-weighted R² (unwhitened ε and y − ȳ)
    heteroscedasticity: float  # κ = mean ‖x̃‖²‖ε̃‖² / (mean ‖x̃‖² · mean ‖ε̃‖²): 1 when the error's size
    # does not depend on the source's; OLS's estimation error scales with κ (the sandwich form)


class _ClusteredSum:
    """Σ_g ‖Z_g − n_g z̄‖² and Σ_t ‖z_t − z̄‖² of a per-token array quantity, streamed group by group."""

    def __init__(self, shape: tuple[int, ...]):
        self.total = np.zeros(shape)  # Σ_t z_t
        self.weighted = np.zeros(shape)  # Σ_g n_g Z_g
        self.group_sq = 0.0  # Σ_g ‖Z_g‖²
        self.token_sq = 0.0  # Σ_t ‖z_t‖²

    def add_tokens(self, token_sq: float) -> None:
        self.token_sq += token_sq

    def add_group(self, n_g: int, Z_g: np.ndarray) -> None:
        self.total += Z_g
        self.weighted += n_g * Z_g
        self.group_sq += float(np.sum(Z_g**2))

    def design_effect(self, n: float, sum_n_sq: float) -> float:
        mean = self.total / n
        m2 = float(np.sum(mean**2))
        group = self.group_sq - 2 * float(np.sum(self.weighted * mean)) + m2 * sum_n_sq
        token = self.token_sq - n * m2
        return group / token if token > 0 else math.nan


class DesignEffectAccumulator:
    """Streams (x, y, document id) chunks in store order (a document's tokens contiguous, possibly
    across chunks) into `DesignEffects`. x, y are raw residuals; B (x side, `CCA.wx`) and A (y side,
    `CCA.wy`) whiten them about the given means; the operator predicts ŷ = x Wᵀ + b."""

    def __init__(
        self, W: np.ndarray, b: np.ndarray, A: np.ndarray, B: np.ndarray, mean_x: np.ndarray, mean_y: np.ndarray
    ):
        self.W, self.b, self.A, self.B, self.mean_x, self.mean_y = W, b, A, B, mean_x, mean_y
        d_x, d_y = B.shape[1], A.shape[1]
        self.sums = {"score": _ClusteredSum((d_x, d_y)), "null": _ClusteredSum((d_x, d_y))}
        self.sizes: list[int] = []
        self.open: dict[str, np.ndarray] | None = None
        self.open_id: int | None = None
        # the r2 quantity e − (SSE/SST)·d needs the final SSE/SST: keep its parts' second moments
        self.r2_tokens = np.zeros(3)  # Σ_t e², e·d, d²
        self.r2_groups = np.zeros(3)  # Σ_g E_g², E_g·D_g, D_g²
        self.r2_totals = np.zeros(2)  # SSE, SST
        self.r2w = _LinearisedR2()  # the same R², unwhitened
        self.hetero = np.zeros(2)  # Σ ‖x̃‖², Σ ‖x̃‖²‖ε̃‖²

    def add(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err_raw, dev_raw = y - x @ self.W.T - self.b, y - self.mean_y
        err, dev = err_raw @ self.A, dev_raw @ self.A
        xw = (x - self.mean_x) @ self.B
        e, d, xx = (np.einsum("ij,ij->i", v, v) for v in (err, dev, xw))
        self.r2_tokens += [e @ e, e @ d, d @ d]
        self.r2_totals += [e.sum(), d.sum()]
        self.r2w.add(groups, *(np.einsum("ij,ij->i", v, v) for v in (err_raw, dev_raw)))
        self.hetero += [xx.sum(), xx @ e]
        self.sums["score"].add_tokens(float(xx @ e))  # ‖x̃ ε̃ᵀ‖_F² = ‖x̃‖²‖ε̃‖²
        self.sums["null"].add_tokens(float(xx @ d))
        bounds = np.flatnonzero(np.diff(groups)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(groups)]):
            run = {
                "score": xw[lo:hi].T @ err[lo:hi],
                "r2": np.array([e[lo:hi].sum(), d[lo:hi].sum()]),
                "null": xw[lo:hi].T @ dev[lo:hi],
            }
            self._add_run(int(groups[lo]), hi - lo, run)

    def _add_run(self, gid: int, n: int, run: dict[str, np.ndarray]) -> None:
        if gid == self.open_id and self.open is not None:
            self.sizes[-1] += n
            for key, value in run.items():
                self.open[key] += value
            return
        self._close()
        self.open_id, self.open = gid, run
        self.sizes.append(n)

    def _close(self) -> None:
        if self.open is not None:
            E, D = self.open.pop("r2")
            self.r2_groups += [E * E, E * D, D * D]
            for key, value in self.open.items():
                self.sums[key].add_group(self.sizes[-1], value)
        self.open = None

    def result(self) -> DesignEffects:
        self._close()
        n, sum_n_sq = float(np.sum(self.sizes)), float(np.sum(np.square(self.sizes)))
        sse, sst = self.r2_totals
        ratio = sse / sst if sst > 0 else 0.0
        weights = np.array([1.0, -2 * ratio, ratio**2])  # Σ(a − ratio·b)² from the second moments
        token = float(weights @ self.r2_tokens)
        raw_r2 = float(weights @ self.r2_groups) / token if token > 0 else math.nan
        raw = (self.sums["score"].design_effect(n, sum_n_sq), raw_r2, self.sums["null"].design_effect(n, sum_n_sq))
        clipped = [max(1.0, v) if math.isfinite(v) else 1.0 for v in raw]
        r2_sd = math.sqrt(max(float(weights @ self.r2_groups), 0.0)) / sst if sst > 0 else math.nan
        sum_xx, sum_xx_e = self.hetero
        kappa = n * sum_xx_e / (sum_xx * sse) if sum_xx * sse > 0 else math.nan
        return DesignEffects(clipped[0], clipped[1], clipped[2], len(self.sizes), raw, r2_sd, self.r2w.sd(), kappa)


class _LinearisedR2:
    """Per-document sums E_g = Σ e_t, D_g = Σ d_t of a squared error e and a squared deviation d, streamed in
    store order: the document-clustered sd of R² = 1 − ΣE/ΣD, √Σ_g(E_g − r·D_g)² / ΣD with r = ΣE/ΣD."""

    def __init__(self) -> None:
        self.closed: list[tuple[float, float]] = []
        self.open_id: int | None = None
        self.open = np.zeros(2)

    def add(self, groups: np.ndarray, e: np.ndarray, d: np.ndarray) -> None:
        bounds = np.flatnonzero(np.diff(groups)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(groups)]):
            if int(groups[lo]) != self.open_id:
                self._close()
                self.open_id = int(groups[lo])
            self.open += [e[lo:hi].sum(), d[lo:hi].sum()]

    def _close(self) -> None:
        if self.open_id is not None:
            self.closed.append((float(self.open[0]), float(self.open[1])))
        self.open = np.zeros(2)

    def sd(self) -> float:
        self._close()
        self.open_id = None
        E, D = np.array(self.closed).reshape(-1, 2).T
        total = float(D.sum())
        return float(np.sqrt(np.sum((E - E.sum() / total * D) ** 2))) / total if total > 0 else math.nan


def effective_n(n: float, design_effect: float) -> int:
    """n / deff, at least 2 (what the Wishart references are drawn at)."""
    return max(2, int(round(n / design_effect)))
