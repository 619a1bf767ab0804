"""Stage `stats`: sufficient statistics of every pair on every split, in one streaming pass per split.

Each needed layer is read once per chunk and serves every pair that uses it; the Gram of a layer
(XᵀX) is formed once and shared by all pairs with that input layer. Files:
`<paths.stats>/<split>/<pair>.safetensors` (float64 tensors n, sum_x, sum_y, xtx, xty, yty).
Engines: `local` (torch matmuls over zarr chunks, in process) or `dask` (the same accumulation
map-reduced over row slices of the parts, on a LocalCluster or a `dask.distributed` scheduler).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import AtoError
from ..math.stats import PairStats
from ..models import resolve_device
from ..params import SPLITS, Params
from ..store import ActivationStore, StoreError, layer_key, require_validated

META_KEYS = ("store_digest", "include_bos", "split", "pair", "layer_in", "layer_out")


class StatsError(AtoError):
    pass


def stats_path(params: Params, split: str, pair_name: str) -> Path:
    return params.path("stats") / split / f"{pair_name}.safetensors"


def save_pair_stats(path: Path, stats: PairStats, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    # One metadata key: safetensors writes a multi-key metadata map in random order, and the
    # bytes must not change between identical runs (DVC would rerun everything downstream).
    save_file(stats.to_tensors(), str(tmp), metadata={"ato": json.dumps(meta, sort_keys=True)})
    tmp.replace(path)


def load_pair_stats(params: Params, split: str, pair_name: str,
                    store_digest: str | None = None) -> PairStats:
    """Load one pair's statistics; refuses a file computed from another store."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = stats_path(params, split, pair_name)
    if not path.exists():
        raise StatsError(f"{path}: missing statistics for pair {pair_name} on {split}; run `ato stats`")
    with safe_open(str(path), "pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("ato", "{}"))
    if store_digest is not None and meta.get("store_digest") != store_digest:
        raise StatsError(f"{path}: computed from store {meta.get('store_digest', '?')[:12]}, "
                         f"but the current store is {store_digest[:12]}; rerun `ato stats`")
    stats = PairStats.from_tensors(load_file(str(path)))
    if stats.n <= 0:
        raise StatsError(f"{path}: pair {pair_name} has no {split} tokens")
    return stats


class LayerStatsAccumulator:
    """Accumulates, for a set of pairs, the Grams and cross products over streamed chunks."""

    def __init__(self, pairs: dict[str, tuple[int, int]], d: int, device: str | torch.device = "cpu"):
        self.pairs = pairs
        self.device = torch.device(device)
        self.layers = sorted({layer for pair in pairs.values() for layer in pair})
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.n = 0.0
        self.sums = {layer: z(d) for layer in self.layers}
        self.grams = {layer: z(d, d) for layer in self.layers}  # one Gram per layer, shared by its pairs
        self.cross = {name: z(d, d) for name in pairs}

    def update(self, chunk: dict[int, np.ndarray]) -> None:
        xs = {layer: torch.from_numpy(np.ascontiguousarray(chunk[layer])).to(self.device, torch.float64)
              for layer in self.layers}
        self.n += float(next(iter(xs.values())).shape[0])
        for layer, x in xs.items():
            self.sums[layer] += x.sum(0)
            self.grams[layer].addmm_(x.T, x)
        for name, (L, T) in self.pairs.items():
            self.cross[name].addmm_(xs[L].T, xs[T])

    def pair_stats(self, name: str) -> PairStats:
        L, T = self.pairs[name]
        host = lambda t: t.cpu().numpy()  # noqa: E731
        return PairStats(self.n, host(self.sums[L]), host(self.sums[T]), host(self.grams[L]),
                         host(self.cross[name]), host(self.grams[T]))


def accumulate_local(store: ActivationStore, split: str, pairs: dict[str, tuple[int, int]],
                     chunk_tokens: int, include_bos: bool, device: str = "cpu") -> dict[str, PairStats]:
    acc = LayerStatsAccumulator(pairs, store.d_model, device)
    with tqdm(total=store.n_tokens(split), unit="tok", unit_scale=True, desc=f"stats {split}",
              dynamic_ncols=True) as bar:
        for chunk in store.iter_chunks(split, acc.layers, chunk_tokens, include_special=True, with_tokens=True):
            keep = slice(None) if include_bos else ~chunk["special"]
            bar.update(len(chunk["special"]))
            acc.update({layer: chunk[layer][keep] for layer in acc.layers})
    return {name: acc.pair_stats(name) for name in pairs}


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


def accumulate_dask(store: ActivationStore, split: str, pairs: dict[str, tuple[int, int]],
                    chunk_tokens: int, include_bos: bool, workers: int = 2,
                    scheduler: str | None = None, client: Any = None) -> dict[str, PairStats]:
    """The same statistics as `accumulate_local`, map-reduced over a dask.distributed cluster.

    The split's token rows are cut into slices of `chunk_tokens` rows (never across parts); each dask
    partition — a contiguous run of slices — reads its slices from zarr itself and accumulates them
    with `LayerStatsAccumulator`, exactly like the local engine; only the d×d partial sums travel and
    are added up. (A dask.array graph instead moves every [chunk, d] float64 block between workers
    and re-aligns it with the BOS mask, which made it slower than one process.) Workers must see the
    store's paths (a local cluster, or a shared filesystem).

    Runs on `client` when given; otherwise opens one with `dask_client(workers, scheduler)`.
    """
    import dask
    import dask.bag as db

    info = store.split_info(split)
    slices = [(str(path), start, min(n, start + chunk_tokens))
              for path, n in zip(store.parts(split), info["part_tokens"], strict=True)
              for start in range(0, n, chunk_tokens)]
    if not slices:
        raise StatsError(f"{store.root}: split {split} has no parts")

    def run(c) -> LayerStatsAccumulator:
        threads = max(1, sum(c.nthreads().values()))
        bag = db.from_sequence(slices, npartitions=min(len(slices), threads))
        total = bag.reduction(partial(_accumulate_slices, pairs=pairs, d=store.d_model, include_bos=include_bos),
                              _merge_accumulators, split_every=8)
        return dask.compute(total, scheduler=c)[0]

    if client is None:
        with dask_client(workers, scheduler) as own:
            acc = run(own)
    else:
        acc = run(client)
    return {name: acc.pair_stats(name) for name in pairs}


def _accumulate_slices(slices, pairs: dict[str, tuple[int, int]], d: int,
                       include_bos: bool) -> LayerStatsAccumulator:
    """One dask partition: read (part path, start, stop) row slices and accumulate them in order."""
    import zarr

    acc = LayerStatsAccumulator(pairs, d)
    for path, start, stop in slices:
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
            keep = slice(None) if include_bos else ~np.asarray(group["special"][start:stop])
            chunk = {layer: np.asarray(group[layer_key(layer)][start:stop])[keep] for layer in acc.layers}
        except Exception as exc:  # noqa: BLE001 - name the part, like the local engine
            raise StoreError(f"{path}: reading rows {start}:{stop} failed: {exc}") from exc
        if len(chunk[acc.layers[0]]):
            acc.update(chunk)
    return acc


def _merge_accumulators(accs) -> LayerStatsAccumulator:
    """Add partial accumulators (float64) into the first."""
    accs = list(accs)
    total = accs[0]
    for other in accs[1:]:
        total.n += other.n
        for mine, theirs in ((total.sums, other.sums), (total.grams, other.grams), (total.cross, other.cross)):
            for key in mine:
                mine[key] += theirs[key]
    return total


def main(params: Params) -> None:
    s = params.stats
    store = ActivationStore.open(params.path("store"))
    require_validated(store, params.path("reports") / "validation" / "validation.json")
    pairs = {name: (pair.L, pair.target) for name, pair in params.pairs.items()}
    store.require_layers(params.needed_layers(), "pairs")
    if store.manifest["model"]["n_layers"] <= max(params.needed_layers()):
        raise StatsError(f"pairs need layer {max(params.needed_layers())}, beyond the store's model")
    for split in SPLITS:
        if store.n_tokens(split) == 0:
            raise StatsError(f"{store.root}: split {split} is empty")
    meta_base = {"store_digest": store.digest, "include_bos": s.include_bos}
    with (dask_client(s.dask_workers, s.dask_scheduler) if s.engine == "dask" else nullcontext()) as client:
        for split in SPLITS:
            _split_stats(params, store, split, pairs, meta_base, client)


def _split_stats(params: Params, store: ActivationStore, split: str, pairs: dict[str, tuple[int, int]],
                 meta_base: dict, client: Any) -> None:
    """Statistics of every pair on one split, checked and saved."""
    s = params.stats
    t0 = time.perf_counter()
    if s.engine == "dask":
        result = accumulate_dask(store, split, pairs, s.chunk_tokens, s.include_bos, client=client)
    else:
        result = accumulate_local(store, split, pairs, s.chunk_tokens, s.include_bos, resolve_device(s.device))
    for name, st in result.items():
        where = f"pair {name} ({split}, layers {pairs[name][0]}→{pairs[name][1]})"
        if st.n == 0:
            raise StatsError(f"{where}: no tokens after excluding BOS")
        try:
            st.check_finite(where)
        except ValueError as exc:
            raise StatsError(str(exc)) from None
        save_pair_stats(stats_path(params, split, name), st,
                        {**meta_base, "split": split, "pair": name,
                         "layer_in": pairs[name][0], "layer_out": pairs[name][1]})
    print(f"stats {split}: {len(pairs)} pairs in {time.perf_counter() - t0:.1f}s")
