"""How many canonical directions carry transport: a one-sided step-down test (Holm–Šidák) of the
held-out canonical correlations against independent x and y at the effective test n, with a
document-bootstrap interval from per-document projection sums (no stage holds all tokens). See
docs/statistics.md#directions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from .heldout import HeldOutCCA

DIRECTIONS_ALPHA = 0.05  # family-wise error rate of the step-down test
DIRECTIONS_REPLICATES = 200  # document-bootstrap replicates of the count's interval
DIRECTIONS_LEVEL = 0.95  # level of that interval


def step_down_thresholds(m: int, n_eff: float, alpha: float = DIRECTIONS_ALPHA) -> np.ndarray:
    """[m] Holm–Šidák thresholds on the correlation scale, for the held-out correlations sorted descending.

    Under independence a held-out correlation of train directions is the correlation of two fixed
    projections on test: atanh(ρ)·√(n_eff − 3) ~ N(0, 1), the same law for every direction (see
    `significant_directions`). The j-th largest (j = 0, 1, …) is compared with the (1 − α) quantile of
    the largest of the m − j directions not yet rejected."""
    if n_eff <= 3:
        raise ValueError(f"the step-down test needs an effective n above 3, got {n_eff}")
    remaining = m - np.arange(m)
    return np.tanh(special.ndtri((1.0 - alpha) ** (1.0 / remaining)) / math.sqrt(n_eff - 3.0))


def significant_directions(rho_test: np.ndarray, n_eff: float, alpha: float = DIRECTIONS_ALPHA) -> np.ndarray:
    """Boolean mask (train order) of the directions whose held-out correlation is significantly above 0.

    Step-down: sort descending, reject while the j-th largest exceeds `step_down_thresholds`[j], stop at
    the first that does not. Directions that carry nothing are then counted with probability ≤ α in
    all (family-wise): with probability ≥ 1 − α the count is at most the number that carry transport.
    One-sided, because the train directions fix the sign that transport gives."""
    rho = np.asarray(rho_test, dtype=np.float64)
    order = np.argsort(-rho, kind="stable")
    fails = np.flatnonzero(rho[order] <= step_down_thresholds(len(rho), n_eff, alpha))
    mask = np.zeros(len(rho), dtype=bool)
    mask[order[: fails[0] if len(fails) else len(rho)]] = True
    return mask


class DocumentProjectionSums:
    """Per-document sums of the held-out direction projections p_i = b_iᵀ(x − x̄), q_i = a_iᵀ(y − ȳ)
    (x̄, ȳ the train means): n_g and Σp, Σq, Σp², Σq², Σpq per direction, from (x, y, document id)
    chunks in store order (a document's tokens contiguous, possibly across chunks). Reweighting the
    documents (a bootstrap) gives the held-out correlations of a resampled test split."""

    def __init__(self, held: HeldOutCCA, mean_x: np.ndarray, mean_y: np.ndarray):
        self.held, self.mean_x, self.mean_y = held, mean_x, mean_y
        self.rows: list[np.ndarray] = []  # per document: [1 + 5m] = n_g, then the five sums
        self.ids: list[int] = []

    def add(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
        p = (np.asarray(x, np.float64) - self.mean_x) @ self.held.x_dirs
        q = (np.asarray(y, np.float64) - self.mean_y) @ self.held.y_dirs
        starts = np.r_[0, np.flatnonzero(np.diff(groups)) + 1]
        sizes = np.diff(np.r_[starts, len(p)])[:, None].astype(np.float64)
        # summed per document run one product at a time: a [tokens, 5m] block would be 200 MB per chunk
        sums = [np.add.reduceat(v, starts, axis=0) for v in (p, q)]
        sums += [np.add.reduceat(a * b, starts, axis=0) for a, b in ((p, p), (q, q), (p, q))]
        for gid, row in zip(np.asarray(groups)[starts], np.hstack([sizes, *sums])):
            if self.ids and self.ids[-1] == gid:
                self.rows[-1] += row
            else:
                self.ids.append(int(gid))
                self.rows.append(row)

    def correlations(self, weights: np.ndarray) -> np.ndarray:
        """[replicates, m] held-out correlations with document g counted weights[:, g] times."""
        w_sums = np.asarray(weights, np.float64) @ np.asarray(self.rows)
        m = self.held.x_dirs.shape[1]
        n, sp, sq, spp, sqq, spq = w_sums[:, :1], *(w_sums[:, 1 + i * m : 1 + (i + 1) * m] for i in range(5))
        cov, var_p, var_q = spq - sp * sq / n, spp - sp**2 / n, sqq - sq**2 / n
        ok = (var_p > 0) & (var_q > 0)
        return np.where(ok, cov / np.sqrt(np.where(ok, var_p * var_q, 1.0)), 0.0)


@dataclass(frozen=True)
class TransportDirections:
    """How many of the m canonical directions carry transport held out, and their share of the ceiling."""

    count: int  # directions whose held-out correlation passes the step-down test
    count_low: float  # document-bootstrap percentile interval of the count (nan without documents)
    count_high: float
    share: float  # Σ_{significant} ρ_i² / Σ_i ρ_i² (train ρ): their share of the CCA ceiling
    share_low: float
    share_high: float
    m: int  # canonical directions tested (min(d_in, d_out))
    n_eff: float  # the effective test n the null is taken at
    threshold: float  # the first step-down threshold: (1 − α) quantile of the largest of m null correlations
    alpha: float
    replicates: int  # bootstrap replicates (0: no interval)


def _ceiling_share(rho_train: np.ndarray, mask: np.ndarray) -> np.ndarray:
    total = float(np.sum(rho_train**2))
    return (mask @ rho_train**2) / total if total > 0 else np.full(mask.shape[:-1], np.nan)


def transport_directions(
    held: HeldOutCCA,
    n_eff: float,
    documents: DocumentProjectionSums | None = None,
    alpha: float = DIRECTIONS_ALPHA,
    replicates: int = DIRECTIONS_REPLICATES,
    seed: int = 0,
    level: float = DIRECTIONS_LEVEL,
) -> TransportDirections:
    """The step-down count of `held`'s directions at `n_eff`, with its ceiling share; with `documents`
    (the test split's per-document sums), percentile intervals over a document bootstrap that keeps
    the train directions and n_eff fixed (so the interval is the test split's sampling noise only)."""
    mask = significant_directions(held.rho_test, n_eff, alpha)
    count, share = int(mask.sum()), float(_ceiling_share(held.rho_train, mask))
    test_setup = (len(mask), n_eff, float(step_down_thresholds(len(mask), n_eff, alpha)[0]), alpha)
    if documents is None or len(documents.rows) < 2:
        return TransportDirections(count, math.nan, math.nan, share, math.nan, math.nan, *test_setup, 0)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(documents.rows), np.full(len(documents.rows), 1 / len(documents.rows)), replicates)
    masks = np.array([significant_directions(rho, n_eff, alpha) for rho in documents.correlations(weights)])
    tails = [(1 - level) / 2, (1 + level) / 2]
    c_low, c_high = np.quantile(masks.sum(axis=1), tails)
    s_low, s_high = np.quantile(_ceiling_share(held.rho_train, masks.astype(np.float64)), tails)
    return TransportDirections(
        count, float(c_low), float(c_high), share, float(s_low), float(s_high), *test_setup, replicates
    )
