"""Streaming sufficient statistics over the activation store (see docs/method.md#ridge and
docs/contracts.md#stats).

One pass over a split serves every pair: each needed layer is read once per chunk, and the Gram of a
layer (XᵀX) is formed once and shared by every pair that uses the layer. Two engines give the same
float64 sums: `accumulate_local` (torch matmuls over zarr chunks, in process) and `accumulate_dask`
(the same accumulation map-reduced over row slices of the parts, on a LocalCluster or a
`dask.distributed` scheduler). `document_block_stats` splits the training split into K blocks of
contiguous documents (the k-fold tuning objective's folds, `kfold_stats`, and evaluate's learning
curve). `accumulate_banded` (`ato atlas`) forms the joint Gram of every stored layer with the next few
layers in one pass, from which every pair in that band has its statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .errors import AtoError
from .math.stats import FIELDS, PairStats
from .store import ActivationStore, StoreError, layer_key

LayerPairs = dict[str, tuple[int, int]]  # pair name → (input layer L, target layer L + k)
RowSlice = tuple[str, int, int]  # (part path, first row, stop row) of one dask read


class StatsError(AtoError):
    """Statistics cannot be computed (an empty split, no tokens left, non-finite sums)."""


class LayerStatsAccumulator:
    """Accumulates, for a set of pairs, the Grams and cross products over streamed chunks."""

    def __init__(self, pairs: LayerPairs, d: int, device: str | torch.device = "cpu"):
        self.pairs = pairs
        self.device = torch.device(device)
        self.layers = sorted({layer for pair in pairs.values() for layer in pair})
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)
        self.n = 0.0
        self.sums = {layer: z(d) for layer in self.layers}
        self.grams = {layer: z(d, d) for layer in self.layers}  # one Gram per layer, shared by its pairs
        self.cross = {name: z(d, d) for name in pairs}

    def update(self, chunk: dict[int, np.ndarray]) -> None:
        xs = {
            layer: torch.from_numpy(np.ascontiguousarray(chunk[layer])).to(self.device, torch.float64)
            for layer in self.layers
        }
        self.n += float(next(iter(xs.values())).shape[0])
        for layer, x in xs.items():
            self.sums[layer] += x.sum(0)
            self.grams[layer].addmm_(x.T, x)
        for name, (L, T) in self.pairs.items():
            self.cross[name].addmm_(xs[L].T, xs[T])

    def merge(self, other: LayerStatsAccumulator) -> None:
        """Add another accumulator's float64 sums into this one."""
        self.n += other.n
        for layer in self.layers:
            self.sums[layer] += other.sums[layer]
            self.grams[layer] += other.grams[layer]
        for name in self.cross:
            self.cross[name] += other.cross[name]

    def pair_stats(self, name: str) -> PairStats:
        L, T = self.pairs[name]
        host = lambda t: t.cpu().numpy()
        return PairStats(
            self.n,
            host(self.sums[L]),
            host(self.sums[T]),
            host(self.grams[L]),
            host(self.cross[name]),
            host(self.grams[T]),
        )

    def all_pair_stats(self) -> dict[str, PairStats]:
        return {name: self.pair_stats(name) for name in self.pairs}


def accumulate_local(
    store: ActivationStore,
    split: str,
    pairs: LayerPairs,
    chunk_tokens: int,
    include_bos: bool,
    device: str | torch.device = "cpu",
) -> dict[str, PairStats]:
    """Every pair's statistics on one split, streamed in this process (memory ∝ chunk_tokens)."""
    acc = LayerStatsAccumulator(pairs, store.d_model, device)
    with tqdm(
        total=store.n_tokens(split), unit="tok", unit_scale=True, desc=f"stats {split}", dynamic_ncols=True
    ) as bar:
        for chunk in store.iter_chunks(split, acc.layers, chunk_tokens, include_special=True, with_tokens=True):
            keep = slice(None) if include_bos else ~chunk["special"]
            bar.update(len(chunk["special"]))
            acc.update({layer: chunk[layer][keep] for layer in acc.layers})
    return acc.all_pair_stats()


@contextmanager
def dask_client(workers: int = 2, scheduler: str | None = None) -> Iterator[Any]:
    """A dask.distributed client: on `scheduler` (a running cluster's address) when given, else on a
    LocalCluster of `workers` single-threaded processes, closed on exit. One client serves every
    split: starting worker processes costs seconds, far more than a tiny split's statistics."""
    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler, set_as_default=False) as client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster, set_as_default=False) as client:
            yield client


def accumulate_dask(
    store: ActivationStore,
    split: str,
    pairs: LayerPairs,
    chunk_tokens: int,
    include_bos: bool,
    workers: int = 2,
    scheduler: str | None = None,
    client: Any = None,
) -> dict[str, PairStats]:
    """The same statistics as `accumulate_local`, map-reduced over a dask.distributed cluster.

    The split's token rows are cut into slices of `chunk_tokens` rows (never across parts); each dask
    partition — a contiguous run of slices — reads its slices from zarr itself and accumulates them
    with `LayerStatsAccumulator`, exactly like the local engine; only the d×d partial sums travel and
    are added up. (A dask.array graph instead moves every [chunk, d] float64 block between workers
    and re-aligns it with the BOS mask, which made it slower than one process.) Workers must see the
    store's paths (a local cluster, or a shared filesystem).

    Runs on `client` when given; otherwise opens one with `dask_client(workers, scheduler)`.
    """
    info = store.split_info(split)
    slices = [
        (str(path), start, min(n, start + chunk_tokens))
        for path, n in zip(store.parts(split), info.part_tokens, strict=True)
        for start in range(0, n, chunk_tokens)
    ]
    if not slices:
        raise StatsError(f"{store.root}: split {split} has no parts")
    if client is None:
        with dask_client(workers, scheduler) as own:
            acc = _reduce_on(own, slices, pairs, store.d_model, include_bos)
    else:
        acc = _reduce_on(client, slices, pairs, store.d_model, include_bos)
    return acc.all_pair_stats()


def _reduce_on(
    client: Any, slices: list[RowSlice], pairs: LayerPairs, d: int, include_bos: bool
) -> LayerStatsAccumulator:
    """Partition the slices over the client's threads, accumulate each partition, add them up."""
    import dask
    import dask.bag as db

    threads = max(1, sum(client.nthreads().values()))
    bag = db.from_sequence(slices, npartitions=min(len(slices), threads))
    total = bag.reduction(
        partial(_accumulate_slices, pairs=pairs, d=d, include_bos=include_bos), _merge_accumulators, split_every=8
    )
    return dask.compute(total, scheduler=client)[0]


def _accumulate_slices(
    slices: Iterable[RowSlice], pairs: LayerPairs, d: int, include_bos: bool
) -> LayerStatsAccumulator:
    """One dask partition: read (part path, start, stop) row slices and accumulate them in order."""
    import zarr

    acc = LayerStatsAccumulator(pairs, d)
    for path, start, stop in slices:
        try:
            group: Any = zarr.open_group(path, mode="r", zarr_format=3)  # its members are arrays
            keep = slice(None) if include_bos else ~np.asarray(group["special"][start:stop])
            chunk = {layer: np.asarray(group[layer_key(layer)][start:stop])[keep] for layer in acc.layers}
        except Exception as exc:  # name the part, like the local engine
            raise StoreError(f"{path}: reading rows {start}:{stop} failed: {exc}") from exc
        if len(chunk[acc.layers[0]]):
            acc.update(chunk)
    return acc


def _merge_accumulators(accs: Iterable[LayerStatsAccumulator]) -> LayerStatsAccumulator:
    """Add partial accumulators (float64) into the first."""
    accs = list(accs)
    total = accs[0]
    for other in accs[1:]:
        total.merge(other)
    return total


class BandedGramAccumulator:
    """The joint Gram of the stored layers, restricted to a band: for every layer L, Σ x_L x_Tᵀ for
    T = L and every later layer T ≤ L + band (`ato atlas`). Every pair (L, T) in the band then has its
    `PairStats` (XᵀX = the L diagonal block, XᵀY the (L, T) block, YᵀY the T diagonal block) without
    a per-pair pass; the block rows are one matmul per layer per chunk, shared by all of L's pairs.

    Memory: Σ_L d² · (1 + #targets of L) float64 numbers (≈ 0.3 GB for 18 layers, d = 640, band 4)."""

    def __init__(self, layers: list[int], band: int, d: int, device: str | torch.device = "cpu"):
        if band < 1:
            raise ValueError(f"band must be at least 1, got {band}")
        self.layers = sorted(set(layers))
        self.band, self.d, self.device = band, d, torch.device(device)
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        # targets of L: the stored layers after L within the band; one block row per L, contiguous in
        # the stacked chunk because `layers` is sorted
        self.targets = {L: [T for T in self.layers if L < T <= L + band] for L in self.layers}
        self.n = 0.0
        self.sums = torch.zeros(len(self.layers), d, dtype=torch.float64, device=self.device)
        self.rows = {
            L: torch.zeros(d, d * (1 + len(ts)), dtype=torch.float64, device=self.device)
            for L, ts in self.targets.items()
        }

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(L, T) of every pair in the band, by L then T."""
        return [(L, T) for L in self.layers for T in self.targets[L]]

    def update(self, chunk: dict[int, np.ndarray]) -> None:
        """Add a chunk {layer: [m, d]} (the same m rows of every layer)."""
        host = [torch.from_numpy(np.ascontiguousarray(chunk[layer])) for layer in self.layers]
        x = torch.cat([t.to(self.device, torch.float64) for t in host], dim=1)  # [m, n_layers · d]
        self.n += float(x.shape[0])
        self.sums += x.sum(0).view(len(self.layers), self.d)
        d = self.d
        for L, row in self.rows.items():
            i = self.index[L]
            row.addmm_(x[:, i * d : (i + 1) * d].T, x[:, i * d : (i + row.shape[1] // d) * d])

    def merge(self, other: BandedGramAccumulator) -> None:
        self.n += other.n
        self.sums += other.sums
        for L, row in self.rows.items():
            row += other.rows[L]

    def _block(self, L: int, T: int) -> torch.Tensor:
        j = 0 if T == L else 1 + self.targets[L].index(T)
        return self.rows[L][:, j * self.d : (j + 1) * self.d]

    def layer_moments(self, layer: int) -> tuple[float, np.ndarray, np.ndarray]:
        """(n, Σx, Σx xᵀ) of one layer (host float64 arrays)."""
        return self.n, self.sums[self.index[layer]].cpu().numpy(), self._block(layer, layer).cpu().numpy()

    def pair_stats(self, L: int, T: int) -> PairStats:
        """The `PairStats` of pair (L, T), equal to the `stats` stage's for the same rows."""
        if T not in self.targets.get(L, []):
            raise KeyError(f"pair ({L}, {T}) is outside the band (layers {self.layers}, band {self.band})")
        host = lambda t: t.cpu().numpy()
        return PairStats(
            self.n,
            host(self.sums[self.index[L]]),
            host(self.sums[self.index[T]]),
            host(self._block(L, L)),
            host(self._block(L, T)),
            host(self._block(T, T)),
        )


def accumulate_banded(
    store: ActivationStore,
    split: str,
    layers: list[int],
    band: int,
    chunk_tokens: int,
    include_bos: bool,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
) -> BandedGramAccumulator:
    """The banded joint Gram of `layers` on one split, in one streamed float64 pass over the store:
    the first `max_tokens` kept tokens (BOS excluded unless `include_bos`; None or 0: all)."""
    acc = BandedGramAccumulator(layers, band, store.d_model, device)
    total = store.n_tokens(split) if not max_tokens else min(max_tokens, store.n_tokens(split))
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"joint Gram {split}", dynamic_ncols=True) as bar:
        for chunk in store.iter_chunks(split, acc.layers, chunk_tokens, include_special=include_bos):
            rows = len(chunk[acc.layers[0]])
            if max_tokens:
                rows = min(rows, max_tokens - int(acc.n))
            acc.update({layer: chunk[layer][:rows] for layer in acc.layers})
            bar.update(rows)
            if max_tokens and acc.n >= max_tokens:
                break
    if acc.n == 0:
        raise StatsError(f"{store.root}: split {split} has no tokens for the joint Gram")
    return acc


def kfold_stats(
    store: ActivationStore, layer_in: int, layer_out: int, k: int, chunk_tokens: int, include_bos: bool
) -> list[tuple[PairStats, PairStats]]:
    """(train-minus-fold, fold) statistics of one pair for K blocks of contiguous training documents."""
    folds = document_block_stats(store, layer_in, layer_out, k, chunk_tokens, include_bos)
    total = folds[0]
    for fold in folds[1:]:
        total = total.merge(fold)
    return [(_minus(total, fold), fold) for fold in folds]


def document_block_stats(
    store: ActivationStore, layer_in: int, layer_out: int, k: int, chunk_tokens: int, include_bos: bool
) -> list[PairStats]:
    """Statistics of one pair for K blocks of contiguous training documents (stored order), in one pass."""
    n_docs = int(store.split_info("train").documents)
    rank: dict[int, int] = {}  # documents are stored contiguously, so first appearance = stored order
    folds = [PairStats.zeros(store.d_model, store.d_model) for _ in range(k)]
    for chunk in store.iter_chunks(
        "train", [layer_in, layer_out], chunk_tokens, include_special=include_bos, with_tokens=True
    ):
        for doc in chunk["doc_id"].tolist():
            rank.setdefault(doc, len(rank))
        fold_ids = np.array([rank[doc] * k // n_docs for doc in chunk["doc_id"].tolist()])
        for f in np.unique(fold_ids):
            rows = fold_ids == f
            folds[f].update(chunk[layer_in][rows], chunk[layer_out][rows])
    return folds


def _minus(a: PairStats, b: PairStats) -> PairStats:
    """The statistics of a's rows that are not b's (b ⊂ a)."""
    return PairStats(*(getattr(a, f) - getattr(b, f) for f in FIELDS))


def check_pair_stats(stats: dict[str, PairStats], pairs: LayerPairs, split: str) -> None:
    """Refuse statistics with no tokens or non-finite sums, naming the pair and split."""
    for name, st in stats.items():
        where = f"pair {name} ({split}, layers {pairs[name][0]}→{pairs[name][1]})"
        if st.n == 0:
            raise StatsError(f"{where}: no tokens after excluding BOS")
        try:
            st.check_finite(where)
        except ValueError as exc:
            raise StatsError(str(exc)) from None
