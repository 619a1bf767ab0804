"""Atlas steps 1–2: the joint pass (banded Gram of every stored layer) and every pair's statistics-based
fits from shared layer factors."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ato.accumulate import BandedGramAccumulator, accumulate_banded
from ato.errors import AtoError
from ato.kinds import keys_for, kinds_for
from ato.math.atlas import (
    LayerFactors,
    PairFit,
    alpha_grid,
    fit_pair,
)
from ato.math.heldout import cca_null
from ato.params import AtlasParams, pair_name
from ato.store import ActivationStore

SPLITS = ("train", "test")


def operators() -> tuple[str, ...]:
    """The atlas's operators (`ato.kinds`, asked at each use so a kind registered later is included):
    identity, procrustes, procrustes_centred, ridge, rrr, jacobian, then registered ones."""
    return keys_for("atlas")


def extra_builders() -> dict[str, Any]:
    """Registered operators built from the train statistics alone (the built-in ones are `fit_pair`'s own)."""
    return {k.key("atlas"): k.build for k in kinds_for("atlas") if k.build is not None}


class AtlasError(AtoError):
    """Atlas inputs that do not fit together; the message names the layer, pair or param."""


def joint_grams(
    store: ActivationStore, ap: AtlasParams, include_bos: bool, device: torch.device
) -> dict[str, BandedGramAccumulator]:
    """The banded joint Gram of every stored layer on train and test (first `atlas.tokens` tokens)."""
    layers = store.layers
    if len(layers) < 2:
        raise AtlasError(f"{store.root}: the atlas needs at least two stored layers, the store has {layers}")
    return {
        split: accumulate_banded(
            store, split, layers, ap.k_max, ap.chunk_tokens, include_bos, ap.tokens[split] or None, device
        )
        for split in SPLITS
    }


def fit_atlas(
    grams: dict[str, BandedGramAccumulator], ap: AtlasParams, workers: int | None = None
) -> dict[str, PairFit]:
    """Every pair of the band fitted on train and scored on test, layer decompositions shared.

    Every decomposition runs on one BLAS thread, `workers` (default: the CPUs) at a time: LAPACK's
    d = 640 SVD gains little from a second thread and loses badly when the cores are busy (9.6 s
    against 0.7 s on one thread, measured on the shared 2-core machine), so each core works on its
    own layer or pair instead. Results do not depend on the number of workers."""
    train, test = grams["train"], grams["test"]
    pairs, d = train.pairs, train.d
    xs, ys = {L for L, _ in pairs}, {T for _, T in pairs}
    factors = {n: LayerFactors.from_moments(*train.layer_moments(n)) for n in sorted(xs | ys)}

    def prepare(n: int) -> None:  # what the layer's pairs need, computed once (cached on the factors)
        f = factors[n]
        if n in xs:
            _ = (f.eigh, f.x_whitening)
        if n in ys:
            _ = f.y_whitening

    alphas: np.ndarray | float = (
        ap.alpha if ap.alpha is not None else alpha_grid(ap.alpha_min, ap.alpha_max, ap.alpha_points)
    )
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        # one null for every pair (same n and d), simulated while the layers are decomposed
        null_job = pool.submit(
            cca_null, int(train.n), int(test.n), d, d, ap.subspace_fraction, ap.null_replicates, ap.seed
        )
        list(pool.map(prepare, factors))
        null = null_job.result()
        jobs = {
            pool.submit(
                fit_pair, L, T, factors[L], factors[T], train.pair_stats(L, T), test.pair_stats(L, T), alphas,
                null, ap.eta_replicates, ap.seed, extra_builders(),
            ): pair_name(L, T - L)
            for L, T in pairs
        }  # fmt: skip
        done = {jobs[job]: job.result() for job in tqdm(as_completed(jobs), total=len(jobs), desc="atlas fits")}
    fits = {pair_name(L, T - L): done[pair_name(L, T - L)] for L, T in pairs}  # plan order
    return fits


def plan(layers: list[int], k_max: int) -> list[tuple[int, int]]:
    """(L, T) of every atlas pair: stored layers L < T ≤ L + k_max (the band of the joint Gram)."""
    return [(L, T) for L in sorted(layers) for T in sorted(layers) if L < T <= L + k_max]


def check_plan(ap: AtlasParams, pairs: list[tuple[int, int]]) -> list[int]:
    """The input layers to probe for the Jacobian; refuses, before any compute, causal pairs and
    Jacobian layers the atlas does not have."""
    names = {pair_name(L, T - L) for L, T in pairs}
    missing = [p for p in ap.causal_pairs if p not in names]
    if missing:
        raise AtlasError(f"atlas.causal_pairs: {missing} are not atlas pairs (stored layers, k ≤ atlas.k_max)")
    with_pairs = sorted({L for L, _ in pairs})
    if ap.jacobian_layers == "all":
        return with_pairs
    bad = sorted(set(ap.jacobian_layers) - set(with_pairs))
    if bad:
        raise AtlasError(f"atlas.jacobian_layers: {bad} have no atlas pairs (input layers: {with_pairs})")
    return sorted(set(ap.jacobian_layers))
