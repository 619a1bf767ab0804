"""Pair statistics (`ato stats` → tune, fit, evaluate, causal): float64 sufficient statistics of one
pair on one split, as safetensors tensors n, sum_x, sum_y, xtx, xty, yty plus a metadata record.
See docs/contracts.md#stats."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ato.math.stats import PairStats
from ato.params import Pair

from ._io import ArtifactError, atomic_path, read_safetensors, read_safetensors_metadata

FORMAT = "ato-pair-stats/1"

log = logging.getLogger(__name__)


@dataclass
class PairStatsMeta:
    """What a statistics file was computed from (safetensors metadata key `ato`)."""

    store_digest: str  # content digest of the activation store it was computed from
    include_bos: bool  # whether BOS/special tokens were included (stats.include_bos)
    split: str  # train | val | test
    pair: str  # pair name, e.g. L05_k1
    layer_in: int  # L
    layer_out: int  # L + k
    format: str = FORMAT


def write_pair_stats(path: str | Path, stats: PairStats, meta: PairStatsMeta) -> None:
    from safetensors.torch import save_file

    # One metadata key holding sorted JSON: safetensors writes a multi-key metadata map in random
    # order, and identical runs must give identical bytes (else DVC reruns everything downstream).
    with atomic_path(path) as tmp:
        save_file(stats.to_tensors(), str(tmp), metadata={"ato": json.dumps(asdict(meta), sort_keys=True)})


@contextmanager
def publish_stats_dir(directory: str | Path) -> Iterator[Path]:
    """Stage a whole statistics directory and publish it in one rename: every split or none.

    Yields an empty temporary sibling of `directory` to write every `<split>/<pair>.safetensors` into;
    on success it replaces `directory` (an earlier run's files included) at once. On any failure the
    staging directory is removed and so is `directory`: an earlier run's files were computed from other
    inputs or params (that is why stats runs again), and, like `dvc repro`, which deletes a stage's
    outputs before running it, a failed run leaves nothing that tune or fit could take for its output.
    """
    directory = Path(directory)
    try:
        with atomic_path(directory) as staging:
            staging.mkdir()
            yield staging
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


STATS_WHAT = "pair statistics; rerun `ato stats`"


def read_pair_stats_meta(path: str | Path) -> PairStatsMeta:
    raw = read_safetensors_metadata(path, STATS_WHAT, "ato")
    try:
        return PairStatsMeta(**raw)
    except TypeError as exc:  # a key of another format
        raise ArtifactError(f"{path}: foreign metadata ({STATS_WHAT}): {exc}") from None


def read_pair_stats(path: str | Path, store_digest: str | None = None) -> PairStats:
    """One pair's statistics on one split; refuses a file computed from another store or empty."""
    path = Path(path)
    meta = read_pair_stats_meta(path)
    if store_digest is not None and meta.store_digest != store_digest:
        raise ArtifactError(
            f"{path}: computed from store {meta.store_digest[:12]}, but the current store is "
            f"{store_digest[:12]}; rerun `ato stats`"
        )
    tensors, _ = read_safetensors(path, STATS_WHAT)
    try:
        stats = PairStats.from_tensors(tensors)
    except (ValueError, KeyError) as exc:
        raise ArtifactError(f"{path}: incomplete {STATS_WHAT} ({exc})") from None
    if stats.n <= 0:
        raise ArtifactError(f"{path}: pair {meta.pair} has no {meta.split} tokens")
    return stats


def read_train_means(
    stats_path: Callable[[str, str], Path], pairs: Mapping[str, Pair], d_model: int, store_digest: str | None
) -> dict[int, tuple[str, np.ndarray]]:
    """Target layer → (pair, ȳ_train [d] float32): the one mean-ablation value of a layer, shared by
    `causal_reference` and the `sae` gates. It is the train statistics' mean_y (the store's whole TRAIN
    split, BOS/special tokens excluded unless `stats.include_bos`) of the first pair, in `pairs` order,
    with that target. Every pair's file is read, so a missing or foreign one is refused here."""
    out: dict[int, tuple[str, np.ndarray]] = {}
    for name, pair in pairs.items():
        path = stats_path("train", name)
        stats = read_pair_stats(path, store_digest)
        if pair.target in out:
            continue
        if read_pair_stats_meta(path).include_bos:
            log.warning("%s: ȳ_train includes BOS/special tokens (stats.include_bos); mean ablation uses it", path)
        mean_y = np.asarray(stats.mean_y, dtype=np.float32)
        if mean_y.shape != (d_model,) or not np.isfinite(mean_y).all():
            raise ArtifactError(
                f"{path}: mean_y has shape {mean_y.shape} or non-finite values; expected finite [{d_model}]"
            )
        out[pair.target] = (name, mean_y)
    return out
