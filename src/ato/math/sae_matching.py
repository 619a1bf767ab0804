"""Matching the latents of two SAEs trained on the same data with different seeds (bench/sae_seeds.py).

Two latents are the same feature when their decoder directions agree. The match is one-to-one
(Hungarian assignment maximising the summed decoder cosine, `scipy.optimize.linear_sum_assignment`),
not each latent's best partner: a best-partner match lets many latents of one seed claim the same
latent of the other, which inflates agreement exactly where features split or merge across seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit_rows(w_dec: np.ndarray) -> np.ndarray:
    """Decoder rows [F, d] scaled to unit length (zero rows stay zero)."""
    w = np.asarray(w_dec, dtype=np.float64)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.where(norms > 0, norms, 1.0)


@dataclass
class FeatureMatch:
    """For each latent of SAE a: its partner in SAE b and their decoder cosine."""

    partner: np.ndarray  # [F_a] int: latent of b matched to each latent of a (-1: none, when F_a > F_b)
    cosine: np.ndarray  # [F_a] float: cosine of the two decoder directions (NaN without a partner)

    def share_above(self, threshold: float, among: np.ndarray | None = None) -> float:
        """Share of a's latents (all, or those in the boolean/integer index `among`) whose partner's
        decoder cosine is at least `threshold`."""
        cos = self.cosine if among is None else self.cosine[among]
        return float(np.mean(np.nan_to_num(cos, nan=-np.inf) >= threshold)) if len(cos) else float("nan")


def match_features(w_dec_a: np.ndarray, w_dec_b: np.ndarray) -> FeatureMatch:
    """One-to-one match of a's latents to b's maximising the summed decoder cosine (module docstring)."""
    from scipy.optimize import linear_sum_assignment

    a, b = unit_rows(w_dec_a), unit_rows(w_dec_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders of different widths: d = {a.shape[1]} and {b.shape[1]}")
    cosines = a @ b.T
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    partner = np.full(len(a), -1, dtype=np.int64)
    cosine = np.full(len(a), np.nan)
    partner[rows], cosine[rows] = cols, cosines[rows, cols]
    return FeatureMatch(partner, cosine)


def verdict_agreement(
    verdicts_a: np.ndarray, verdicts_b: np.ndarray, match: FeatureMatch, judged: set[str], min_cosine: float
) -> tuple[float, int]:
    """(share that agree, number of pairs) over the matched pairs whose decoder cosine is at least
    `min_cosine` and whose two verdicts are both in `judged`; `verdicts_a/b` hold one verdict per latent
    of each SAE. NaN share when no pair qualifies."""
    pairs = np.flatnonzero(np.nan_to_num(match.cosine, nan=-np.inf) >= min_cosine)
    va = np.asarray(verdicts_a, dtype=object)[pairs]
    vb = np.asarray(verdicts_b, dtype=object)[match.partner[pairs]]
    both = np.array([x in judged and y in judged for x, y in zip(va, vb)], dtype=bool)
    n = int(both.sum())
    return (float(np.mean(va[both] == vb[both])) if n else float("nan")), n
