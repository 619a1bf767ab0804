"""Stage `stats`: sufficient statistics of every pair on every split, in one streaming pass per split.

Writes `<paths.stats>/<split>/<pair>.safetensors` (see docs/contracts.md#stats) for every split, or
none: the files are staged in a temporary directory and published together once every split is done
(a failure leaves no statistics at all). The engines live in `ato.accumulate`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from ato.accumulate import LayerPairs, StatsError, accumulate_dask, accumulate_local, check_pair_stats, dask_client
from ato.artifacts import Layout, PairStatsMeta, publish_stats_dir, write_pair_stats
from ato.math.stats import PairStats
from ato.models import resolve_device
from ato.params import SPLITS, Params, StatsParams
from ato.store import ActivationStore, require_validated

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    layout = Layout.from_params(params)
    pairs = {name: (pair.L, pair.target) for name, pair in params.pairs.items()}
    with publish_stats_dir(layout.stats) as staging:  # all splits or none, even on a failed check
        store = ActivationStore.open(layout.store)
        require_validated(store, layout.validation)
        check_store(store, params.needed_layers())
        staged = dataclasses.replace(layout, stats=staging)
        with _engine(params.stats) as client:
            for split in SPLITS:
                t0 = time.perf_counter()
                result = _accumulate(store, split, pairs, params.stats, client)
                check_pair_stats(result, pairs, split)
                write_split(staged, split, result, pairs, store.digest, params.stats.include_bos)
                log.info("stats %s: %d pairs in %.1fs", split, len(pairs), time.perf_counter() - t0)


def check_store(store: ActivationStore, layers: list[int]) -> None:
    """The store holds every layer the pairs need, and no split is empty."""
    store.require_layers(layers, "pairs")
    if store.manifest.model.n_layers <= max(layers):
        raise StatsError(f"pairs need layer {max(layers)}, beyond the store's model")
    for split in SPLITS:
        if store.n_tokens(split) == 0:
            raise StatsError(f"{store.root}: split {split} is empty")


def _engine(s: StatsParams) -> AbstractContextManager[Any]:
    """A dask client serving every split (`stats.engine: dask`), else nothing."""
    return dask_client(s.dask_workers, s.dask_scheduler) if s.engine == "dask" else nullcontext()


def _accumulate(
    store: ActivationStore, split: str, pairs: LayerPairs, s: StatsParams, client: Any
) -> dict[str, PairStats]:
    if s.engine == "dask":
        return accumulate_dask(store, split, pairs, s.chunk_tokens, s.include_bos, client=client)
    return accumulate_local(store, split, pairs, s.chunk_tokens, s.include_bos, resolve_device(s.device))


def write_split(
    layout: Layout, split: str, result: dict[str, PairStats], pairs: LayerPairs, store_digest: str, include_bos: bool
) -> None:
    for name, st in result.items():
        L, T = pairs[name]
        meta = PairStatsMeta(
            store_digest=store_digest, include_bos=include_bos, split=split, pair=name, layer_in=L, layer_out=T
        )
        write_pair_stats(layout.pair_stats(split, name), st, meta)
