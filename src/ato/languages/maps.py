"""Per-language maps and their scores, from statistics (exact): ridge at the English α, canonical tracking
beside the own map's, R²_w split by variance, and the overlaps of the maps' update subspaces
(`ato.math.transfer`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ato.languages.inputs import Map
from ato.math.ridge import ridge_fit
from ato.math.stats import PairStats
from ato.math.transfer import (
    canonical_tracking,
    overlap,
    pooled,
    principal_cosines,
    random_overlap,
    shared_dimension,
    update_subspaces,
    variance_split_r2,
)

TOP_VARIANCE_SHARE = 0.9  # the principal directions of test y holding this share are its "high-variance" ones


@dataclass
class PairFits:
    """One pair's maps: each language's own (whole fit split and its two halves) and the pooled one."""

    own: dict[str, Map]
    halves: dict[str, tuple[Map, Map]]
    pooled: Map
    alpha: dict[str, float]  # the α each language's map was fitted at (and "pooled")


def language_alpha(alpha: float, n_operator: float, n: float, scaling: str) -> float:
    """The English α for a fit on n tokens: the same penalty per token (α·n/n_operator; ridge penalises
    XᵀX, which grows with n) or the same absolute α."""
    return alpha * n / n_operator if scaling == "per_token" else alpha


def fit_pair(
    fit: dict[str, tuple[PairStats, PairStats, PairStats]], alpha: float, n_operator: float, scaling: str
) -> PairFits:
    """Ridge maps of every language (whole and halves) and of all languages pooled, at the English α."""
    own, halves, alphas = {}, {}, {}
    for lang, (whole, even, odd) in fit.items():
        alphas[lang] = language_alpha(alpha, n_operator, whole.n, scaling)
        own[lang] = ridge_fit(whole, alphas[lang])
        halves[lang] = (
            ridge_fit(even, language_alpha(alpha, n_operator, even.n, scaling)),
            ridge_fit(odd, language_alpha(alpha, n_operator, odd.n, scaling)),
        )
    all_rows = pooled([whole for whole, _, _ in fit.values()])
    alphas["pooled"] = language_alpha(alpha, n_operator, all_rows.n, scaling)
    return PairFits(own, halves, ridge_fit(all_rows, alphas["pooled"]), alphas)


def transfer_scores(test: PairStats, maps: dict[str, Map]) -> dict[str, float]:
    """On a language's test rows: each map's canonical tracking ∈ [0, 1] (`tracking_<map>`), and for the
    operator and the own map R²_w on the top principal directions of y holding TOP_VARIANCE_SHARE of its
    variance and on the rest (`r2w_top_<map>`, `r2w_rest_<map>`)."""
    out = {f"tracking_{name}": value for name, value in canonical_tracking(test, maps).items()}
    top, split = variance_split_r2(test, {k: maps[k] for k in ("operator", "own")}, TOP_VARIANCE_SHARE)
    out["top_directions"] = top
    for name, (r2w_top, r2w_rest) in split.items():
        out[f"r2w_top_{name}"], out[f"r2w_rest_{name}"] = r2w_top, r2w_rest
    return out


@dataclass
class Overlaps:
    """Update-subspace overlaps of one pair between languages (rows/columns in `languages` order)."""

    write: np.ndarray  # [m, m] mean cos², half-maps; diagonal: the same language's two halves
    read: np.ndarray  # [m, m] the same for the read subspaces
    shared_write: np.ndarray  # [m, m] principal cos² ≥ threshold among the top-r write directions
    shared_dimension: int  # write directions (mean cos² ≥ threshold) shared by every language's whole map
    random: float  # r/d: the overlap of independent random subspaces


def overlap_tables(fits: PairFits, languages: list[str], metric: np.ndarray, rank: int, threshold: float) -> Overlaps:
    """Overlaps of the maps' update subspaces; across languages from half-maps (two per language, all
    four combinations averaged) so that the same-language diagonal is at the same n."""
    bases = {lang: [update_subspaces(W, metric, rank) for W, _ in fits.halves[lang]] for lang in languages}
    m = len(languages)
    write, read, shared = np.zeros((m, m)), np.zeros((m, m)), np.zeros((m, m))
    for i, a in enumerate(languages):
        for j, c in enumerate(languages):
            combos = [(0, 1)] if i == j else [(p, q) for p in range(2) for q in range(2)]
            write[i, j] = np.mean([overlap(bases[a][p][0], bases[c][q][0]) for p, q in combos])
            read[i, j] = np.mean([overlap(bases[a][p][1], bases[c][q][1]) for p, q in combos])
            shared[i, j] = np.mean(
                [np.sum(principal_cosines(bases[a][p][0], bases[c][q][0]) ** 2 >= threshold) for p, q in combos]
            )
    whole = [update_subspaces(fits.own[lang][0], metric, rank)[0] for lang in languages]
    d = metric.shape[0]
    return Overlaps(write, read, shared, shared_dimension(whole, threshold), random_overlap(min(rank, d), d))
