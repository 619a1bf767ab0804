"""The activation store (docs/contracts.md#store): zarr v3 parts per split plus a manifest.

    <root>/manifest.json                 `ato.artifacts.StoreManifest`, written last
    <root>/<split>/part-NNNNN.zarr/      zarr v3 group
        resid/layer_NN   float32 [n_tokens, d_model]
        token_id, doc_id, position  int32 [n_tokens]
        special          bool [n_tokens]   (BOS and other special tokens)

Each array is one shard file made of `chunk_tokens`-row chunks, every chunk guarded by a crc32c
checksum, so a flipped byte or a truncated file is an error on read, never silent garbage.
A part is written under a temporary name and renamed when complete: readers never see half a part.
`require_validated` binds a stage to the bytes `ato validate` checked (docs/contracts.md#validation).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import ArtifactError, StoreManifest, ValidationVerdict, atomic_path
from .artifacts._io import TMP_PREFIX
from .artifacts.manifest import STORE_FORMAT, SplitInfo
from .errors import AtoError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKEN_ARRAYS = ("token_id", "doc_id", "position", "special")
_READ_BLOCK = 1 << 24  # bytes per read when hashing

__all__ = [
    "MANIFEST",
    "STORE_FORMAT",
    "TOKEN_ARRAYS",
    "ActivationStore",
    "StoreError",
    "StoredSequence",
    "bind_parts",
    "changed_parts",
    "complete_parts",
    "directory_digest",
    "layer_key",
    "manifest_sha256",
    "part_digests",
    "part_name",
    "remove_temporaries",
    "stat_signature",
    "require_validated",
    "token_sequences",
    "write_part",
]


class StoreError(AtoError):
    """The activation store is missing, incomplete or inconsistent; the message names what."""


def layer_key(layer: int) -> str:
    return f"resid/layer_{layer:02d}"


def part_name(index: int) -> str:
    return f"part-{index:05d}.zarr"


def _array_codecs() -> dict[str, Any]:
    from zarr.codecs import Crc32cCodec

    return {"compressors": [Crc32cCodec()]}


def write_part(
    split_dir: Path, index: int, arrays: dict[str, np.ndarray], chunk_tokens: int, attrs: dict[str, Any] | None = None
) -> Path:
    """Write one part atomically. `arrays` maps array paths (`resid/layer_NN`, `token_id`, …) to data."""
    import zarr

    final = Path(split_dir) / part_name(index)
    n = len(arrays["token_id"])
    for key, value in arrays.items():
        if len(value) != n:
            raise StoreError(f"part {index}: array {key} has {len(value)} rows, token_id has {n}")
    chunk = max(1, min(chunk_tokens, n))
    shard_rows = chunk * math.ceil(n / chunk)
    try:
        with atomic_path(final) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            group.attrs.update({"n_tokens": n, **(attrs or {})})
            for key, value in arrays.items():
                shape = value.shape
                arr = group.create_array(
                    key,
                    shape=shape,
                    dtype=value.dtype,
                    chunks=(chunk, *shape[1:]),
                    shards=(shard_rows, *shape[1:]),
                    fill_value=0,
                    **_array_codecs(),
                )
                arr[...] = value
    except OSError as exc:
        raise StoreError(
            f"{final}: writing the part failed ({exc.strerror or exc}); earlier parts are "
            "intact — free space or fix the cause and rerun to resume"
        ) from exc
    return final


def remove_temporaries(root: Path) -> None:
    """Delete half-written parts and files left by an interrupted run."""
    for split_dir in Path(root).glob("*"):
        if split_dir.is_dir():
            for tmp in split_dir.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    for tmp in Path(root).glob(f"{TMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)


def complete_parts(split_dir: Path) -> list[Path]:
    return sorted(p for p in Path(split_dir).glob("part-*.zarr") if p.is_dir())


# --------------------------------------------------------------------------------------------
# Binding a validation verdict to the bytes on disk (docs/contracts.md#validation)
#
# The verdict records every part's sha256 (the authority) and, beside it, a digest of its files'
# stat data (name, inode, size, mtime_ns, ctime_ns). Any write through the filesystem changes a
# file's ctime, which no user call can set back, so equal stat data mean unchanged bytes and
# `require_validated` re-hashes only the parts whose stat data differ (a moved or copied store is
# re-hashed and accepted if its bytes are the same). Changes below the filesystem (bit rot) are
# caught on read by every chunk's crc32c.

_SETTLE_NS = 1_000_000_000  # a file changed this recently before validation is re-hashed on every check


def _part_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and TMP_PREFIX not in str(p.relative_to(path)))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_READ_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def directory_digest(path: Path) -> str:
    """sha256 over relative file names and bytes under `path` (temporaries ignored)."""
    h = hashlib.sha256()
    path = Path(path)
    for f in _part_files(path):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(_READ_BLOCK), b""):
                h.update(block)
    return h.hexdigest()


def stat_signature(path: Path) -> tuple[str, int]:
    """(sha256 of every file's relative name, inode, size, mtime_ns and ctime_ns; the newest of those
    times) for the files under `path`."""
    h = hashlib.sha256()
    newest = 0
    for f in _part_files(path):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    return h.hexdigest(), newest


def _part_names(store: ActivationStore) -> list[str]:
    """ "split/part-NNNNN.zarr" of every part the manifest lists and the disk holds."""
    return [f"{split}/{path.name}" for split in store.manifest.splits for path in store.parts(split) if path.is_dir()]


def part_digests(store: ActivationStore, names: list[str] | None = None, workers: int | None = None) -> dict[str, str]:
    """`directory_digest` of the parts `names` (default: every part the manifest lists; a missing part
    is left out). Parts are hashed in parallel threads: hashlib and file reads release the GIL, so
    this runs at disk (or sha256) speed on every core."""
    names = _part_names(store) if names is None else names
    if not names:
        return {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers or min(len(names), os.cpu_count() or 1)) as pool:
        digests = dict(zip(names, pool.map(lambda name: directory_digest(store.root / name), names), strict=True))
    log.debug("sha256 of %d parts of %s in %.1fs", len(names), store.root, time.perf_counter() - t0)
    return digests


def bind_parts(store: ActivationStore) -> tuple[dict[str, str], dict[str, str]]:
    """What a verdict records of the parts: (sha256 of each, stat signature of each whose files were
    unchanged while hashing and last changed before validation began, so that timestamp granularity
    cannot hide a later write)."""
    started = time.time_ns()
    names = _part_names(store)
    before = {name: stat_signature(store.root / name) for name in names}
    digests = part_digests(store, names)
    signatures = {
        name: sig
        for name, (sig, newest) in before.items()
        if newest < started - _SETTLE_NS and stat_signature(store.root / name) == (sig, newest)
    }
    return digests, signatures


def manifest_sha256(root: Path) -> str:
    return _file_sha256(Path(root) / MANIFEST)


def changed_parts(store: ActivationStore, digests: dict[str, str], signatures: dict[str, str]) -> list[str]:
    """Parts whose bytes differ from the recorded `digests` (or that appeared or disappeared); a part
    whose stat signature equals the recorded one is unchanged without reading it."""
    names = _part_names(store)
    unsettled = [n for n in names if n not in signatures or stat_signature(store.root / n)[0] != signatures[n]]
    now = part_digests(store, unsettled)
    return sorted(
        n
        for n in set(names) | set(digests)
        if n not in digests or n not in names or (n in now and now[n] != digests[n])
    )


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class ActivationStore:
    """Read access to a complete store, checked against its manifest."""

    root: Path
    manifest: StoreManifest

    @classmethod
    def open(cls, root: str | Path) -> ActivationStore:
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise StoreError(f"{root}: no {MANIFEST}; the store is missing or incomplete (run `ato collect`)")
        try:
            manifest = StoreManifest.read(path)
        except ArtifactError as exc:
            raise StoreError(f"unreadable store manifest: {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong shape (a list for a dict …)
            raise StoreError(f"{path}: malformed store manifest ({exc}); rerun `ato collect`") from None
        return cls(root, manifest)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def d_model(self) -> int:
        return int(self.manifest.d_model)

    @property
    def digest(self) -> str:
        """Identity of the store's content (recorded in every downstream artifact)."""
        return self.manifest.content_digest

    def split_info(self, split: str) -> SplitInfo:
        try:
            return self.manifest.splits[split]
        except KeyError:
            raise StoreError(f"{self.root}: split {split!r} not in the manifest") from None

    def parts(self, split: str) -> list[Path]:
        return [self.root / split / name for name in self.split_info(split).parts]

    def n_tokens(self, split: str) -> int:
        return int(self.split_info(split).tokens)

    def require_layers(self, layers: list[int], what: str = "") -> None:
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise StoreError(
                f"{self.root}: layer(s) {missing} {('needed by ' + what + ' ') if what else ''}"
                f"are not in the store (it has {self.layers}); add them to collect.layers"
            )

    def open_part(self, split: str, index: int) -> Any:
        import zarr

        path = self.parts(split)[index]
        try:
            return zarr.open_group(str(path), mode="r", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{path}: cannot open part: {exc}") from exc

    def iter_chunks(
        self,
        split: str,
        layers: list[int],
        chunk_tokens: int = 8192,
        include_special: bool = False,
        with_tokens: bool = False,
    ) -> Iterator[dict[Any, np.ndarray]]:
        """Yield {layer: float array [m, d], …} chunk by chunk, streaming (memory ∝ chunk_tokens).

        Special tokens (BOS) are dropped unless `include_special`. With `with_tokens`, the chunk
        also carries the per-token arrays under their own names (`layers=[]` reads only those).
        """
        self.require_layers(layers)
        names = [*(layer_key(layer) for layer in layers), *(TOKEN_ARRAYS if with_tokens else ())]
        keys: list[Any] = [*layers, *(TOKEN_ARRAYS if with_tokens else ())]
        for index, path in enumerate(self.parts(split)):
            group = self.open_part(split, index)
            n = int(group.attrs["n_tokens"])
            for start in range(0, n, chunk_tokens):
                stop = min(n, start + chunk_tokens)
                try:
                    special = np.asarray(group["special"][start:stop])
                    if include_special:  # a slice keeps views, no copy
                        chunk = {key: np.asarray(group[name][start:stop]) for key, name in zip(keys, names)}
                        n_kept = len(special)
                    else:
                        keep = ~special
                        chunk = {key: np.asarray(group[name][start:stop])[keep] for key, name in zip(keys, names)}
                        n_kept = int(keep.sum())
                except Exception as exc:
                    raise StoreError(f"{path}: reading rows {start}:{stop} failed: {exc}") from exc
                if n_kept:  # `layers` may be empty: token arrays only
                    yield chunk


@dataclass
class StoredSequence:
    """One stored sequence's per-token arrays (no residuals): BOS-led, positions 0 … n − 1."""

    token_ids: np.ndarray  # int64 [n]
    special: np.ndarray  # bool [n]: BOS and other special tokens
    doc_id: int


def token_sequences(store: ActivationStore, split: str) -> list[StoredSequence]:
    """Every sequence of `split` in store order, from the token arrays alone (a sequence starts at
    position 0 and may cross a part boundary)."""
    chunks = list(store.iter_chunks(split, [], include_special=True, with_tokens=True))
    if not chunks:
        return []
    cols = {key: np.concatenate([c[key] for c in chunks]) for key in ("token_id", "special", "doc_id", "position")}
    starts = np.flatnonzero(cols["position"] == 0)
    if len(starts) == 0 or starts[0] != 0:
        raise StoreError(f"{store.root}/{split}: the split does not start at a sequence start (position 0)")
    ends = np.append(starts[1:], len(cols["position"]))
    return [
        StoredSequence(
            cols["token_id"][a:b].astype(np.int64), cols["special"][a:b].astype(bool), int(cols["doc_id"][a])
        )
        for a, b in zip(starts, ends)
    ]


def require_validated(store: ActivationStore, report: Path) -> None:
    """Refuse to compute on a store that `ato validate` has not passed, or whose bytes changed since.

    The verdict records the sha256 of manifest.json and of every part as validated; a part rewritten
    after validation — even through zarr, with valid checksums — is refused by name. Parts whose
    files' stat data are unchanged are not re-read (see `changed_parts`): milliseconds in a pipeline
    run, one parallel sha256 pass over the store after it was copied or moved.
    """
    report = Path(report)
    if not report.exists():
        raise StoreError(f"{report}: no validation report for {store.root}; run `ato validate` first")
    try:
        verdict = ValidationVerdict.read(report)
    except ArtifactError as exc:
        raise StoreError(str(exc)) from None  # the record's message already names the file and the fix
    if verdict.store_digest != store.digest:
        raise StoreError(f"{report}: validated a different store state; rerun `ato validate`")
    if not verdict.success:
        raise StoreError(
            f"{store.root} failed validation ({verdict.n_failed} expectations); see {report.with_suffix('.md')}"
        )
    if verdict.manifest_sha256 != manifest_sha256(store.root):
        raise StoreError(f"{store.root / MANIFEST}: changed since `ato validate` checked it; rerun `ato validate`")
    changed = changed_parts(store, verdict.part_sha256, verdict.part_stat)
    if changed:
        what = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise StoreError(
            f"{store.root}: part(s) {what} changed since `ato validate` checked them ({report}); rerun `ato validate`"
        )
