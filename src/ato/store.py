"""The activation store (DESIGN §5): zarr v3 parts per split plus a manifest.

    <root>/manifest.json
    <root>/<split>/part-NNNNN.zarr/      zarr v3 group
        resid/layer_NN   float32 [n_tokens, d_model]
        token_id, doc_id, position  int32 [n_tokens]
        special          bool [n_tokens]   (BOS and other special tokens)

Each array is one shard file made of `chunk_tokens`-row chunks, every chunk guarded by a crc32c
checksum, so a flipped byte or a truncated file is an error on read, never silent garbage.
A part is written under a temporary name and renamed when complete: readers never see half a part.
"""

from __future__ import annotations

from .errors import AtoError

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
STORE_FORMAT = "ato-activation-store/1"
TOKEN_ARRAYS = ("token_id", "doc_id", "position", "special")
_TMP_PREFIX = ".tmp-"


class StoreError(AtoError):
    """The activation store is missing, incomplete or inconsistent; the message names what."""


def layer_key(layer: int) -> str:
    return f"resid/layer_{layer:02d}"


def part_name(index: int) -> str:
    return f"part-{index:05d}.zarr"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file + rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _array_codecs():
    from zarr.codecs import Crc32cCodec

    return {"compressors": [Crc32cCodec()]}


def write_part(split_dir: Path, index: int, arrays: dict[str, np.ndarray], chunk_tokens: int,
               attrs: dict[str, Any] | None = None) -> Path:
    """Write one part atomically. `arrays` maps array paths (`resid/layer_NN`, `token_id`, …) to data."""
    import zarr

    split_dir.mkdir(parents=True, exist_ok=True)
    final = split_dir / part_name(index)
    tmp = split_dir / f"{_TMP_PREFIX}{part_name(index)}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    n = len(arrays["token_id"])
    for key, value in arrays.items():
        if len(value) != n:
            raise StoreError(f"part {index}: array {key} has {len(value)} rows, token_id has {n}")
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs.update({"n_tokens": n, **(attrs or {})})
        chunk = max(1, min(chunk_tokens, n))
        shard_rows = chunk * math.ceil(n / chunk)
        for key, value in arrays.items():
            shape = value.shape
            chunks = (chunk, *shape[1:])
            shards = (shard_rows, *shape[1:])
            arr = group.create_array(key, shape=shape, dtype=value.dtype, chunks=chunks, shards=shards,
                                     fill_value=0, **_array_codecs())
            arr[...] = value
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"{final}: writing the part failed ({exc.strerror or exc}); earlier parts are "
                         "intact — free space or fix the cause and rerun to resume") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_temporaries(root: Path) -> None:
    """Delete half-written parts left by an interrupted run."""
    for split_dir in Path(root).glob("*"):
        if split_dir.is_dir():
            for tmp in split_dir.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    for tmp in Path(root).glob(f"{_TMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)


def complete_parts(split_dir: Path) -> list[Path]:
    return sorted(p for p in Path(split_dir).glob("part-*.zarr") if p.is_dir())


def directory_digest(path: Path) -> str:
    """sha256 over relative file names and bytes under `path` (temporaries ignored)."""
    h = hashlib.sha256()
    path = Path(path)
    for f in sorted(p for p in path.rglob("*") if p.is_file() and _TMP_PREFIX not in str(p.relative_to(path))):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class ActivationStore:
    """Read access to a complete store, checked against its manifest."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> ActivationStore:
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise StoreError(f"{root}: no {MANIFEST}; the store is missing or incomplete (run `ato collect`)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: unreadable manifest: {exc}") from None
        if manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: format {manifest.get('format')!r}, expected {STORE_FORMAT!r}")
        return cls(root, manifest)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def digest(self) -> str:
        """Identity of the store's content (recorded in every downstream artifact)."""
        return self.manifest["content_digest"]

    def split_info(self, split: str) -> dict[str, Any]:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise StoreError(f"{self.root}: split {split!r} not in the manifest") from None

    def parts(self, split: str) -> list[Path]:
        info = self.split_info(split)
        return [self.root / split / name for name in info["parts"]]

    def n_tokens(self, split: str) -> int:
        return int(self.split_info(split)["tokens"])

    def require_layers(self, layers: list[int], what: str = "") -> None:
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise StoreError(
                f"{self.root}: layer(s) {missing} {('needed by ' + what + ' ') if what else ''}"
                f"are not in the store (it has {self.layers}); add them to collect.layers"
            )

    def open_part(self, split: str, index: int):
        import zarr

        path = self.parts(split)[index]
        try:
            return zarr.open_group(str(path), mode="r", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{path}: cannot open part: {exc}") from exc

    def iter_chunks(self, split: str, layers: list[int], chunk_tokens: int = 8192,
                    include_special: bool = False, with_tokens: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Yield {layer: float array [m, d], …} chunk by chunk, streaming (memory ∝ chunk_tokens).

        Special tokens (BOS) are dropped unless `include_special`. With `with_tokens`, the chunk
        also carries the per-token arrays under their own names (`layers=[]` reads only those).
        """
        self.require_layers(layers)
        for index, path in enumerate(self.parts(split)):
            group = self.open_part(split, index)
            n = int(group.attrs["n_tokens"])
            for start in range(0, n, chunk_tokens):
                stop = min(n, start + chunk_tokens)
                try:
                    special = np.asarray(group["special"][start:stop])
                    keep = slice(None) if include_special else ~special  # a slice keeps views, no copy
                    n_kept = len(special) if include_special else int(keep.sum())
                    chunk: dict[str, Any] = {}
                    for layer in layers:
                        chunk[layer] = np.asarray(group[layer_key(layer)][start:stop])[keep]
                    if with_tokens:
                        for name in TOKEN_ARRAYS:
                            chunk[name] = np.asarray(group[name][start:stop])[keep]
                except Exception as exc:
                    raise StoreError(f"{path}: reading rows {start}:{stop} failed: {exc}") from exc
                if n_kept:  # `layers` may be empty: token arrays only
                    yield chunk


def require_validated(store: ActivationStore, report: Path) -> None:
    """Refuse to compute on a store that `ato validate` has not passed (or passed in another state)."""
    report = Path(report)
    if not report.exists():
        raise StoreError(f"{report}: no validation report for {store.root}; run `ato validate` first")
    result = json.loads(report.read_text())
    if result.get("store_digest") != store.digest:
        raise StoreError(f"{report}: validated a different store state; rerun `ato validate`")
    if not result.get("success"):
        raise StoreError(f"{store.root} failed validation ({result.get('n_failed')} expectations); "
                         f"see {report.with_suffix('.md')}")
