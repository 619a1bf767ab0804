"""Per-part and per-layer statistics of the activation store, streamed once (pure numpy + zarr reads).

The great-expectations suite (`ato.validation.suite`) runs on these tables:

- `layers`   one row per (split, part, layer): shape, dtype, NaN/Inf counts, row-norm mean/max,
             max |value|, mean/std of the values, fraction of all-zero rows, unread chunks;
- `parts`    one row per (split, part): present / readable, layers present, token-array lengths,
             token-id range, position continuity, special tokens;
- `splits`   one row per split: manifest token counts against each other and against the parts;
- `docs`     one row per document id: in how many splits it occurs (must be one);
- `manifest` one row per manifest field: present with the type `StoreManifest` declares.

A part that cannot be read (missing directory, deleted array, truncated or corrupted shard: every
zarr chunk carries a crc32c) becomes a row naming the part and the error, never a traceback.
Memory is ∝ `chunk_tokens` rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import SplitInfo
from ato.artifacts.manifest import type_problems
from ato.params import SPLITS
from ato.store import TOKEN_ARRAYS, ActivationStore, layer_key

from .array_stats import ARRAY_STAT_COLUMNS, ArrayStats

LAYER_COLUMNS = (
    "row",
    "split",
    "part",
    "layer",
    "readable",
    "error",
    "n_rows",
    "n_cols",
    "dtype",
    "expected_rows",
    "missing_chunks",
    *ARRAY_STAT_COLUMNS,
)
PART_COLUMNS = (
    "row",
    "split",
    "part",
    "present",
    "readable",
    "error",
    "n_tokens",
    "expected_tokens",
    *(f"{name}_rows" for name in TOKEN_ARRAYS),
    "missing_layers",
    "missing_layer_list",
    "token_id_min",
    "token_id_max",
    "doc_id_min",
    "position_max",
    "position_breaks",
    "special_count",
    "special_unknown",
    "sequences",
    "documents",
)
SPLIT_COLUMNS = (
    "row",
    "split",
    "present",
    "n_parts",
    "n_part_tokens",
    "parts_on_disk",
    "manifest_tokens",
    "manifest_part_tokens_sum",
    "observed_tokens",
    "manifest_special_tokens",
    "observed_special_tokens",
    "manifest_sequences",
    "observed_sequences",
    "manifest_documents",
    "observed_documents",
    "unreadable_parts",
)
DOC_COLUMNS = ("row", "doc_id", "n_splits", "splits")
MANIFEST_COLUMNS = ("row", "key", "ok", "problem")


@dataclass
class StoreTables:
    """The statistics tables the suite runs on (pandas DataFrames, built by `collect_tables`)."""

    layers: Any
    parts: Any
    splits: Any
    docs: Any
    manifest: Any

    def items(self) -> list[tuple[str, Any]]:
        # most specific first: failures are reported in this order
        return [
            ("manifest", self.manifest),
            ("parts", self.parts),
            ("layers", self.layers),
            ("docs", self.docs),
            ("splits", self.splits),
        ]


def _frame(rows: list[dict[str, Any]], columns: Iterable[str]) -> Any:
    import pandas as pd

    columns = list(columns)
    for i, row in enumerate(rows):
        row["row"] = i
    return pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def error_text(exc: BaseException) -> str:
    """One line naming the exception (its message cut to 300 characters)."""
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(value: Any) -> list[int] | None:
    return list(value) if isinstance(value, list) and all(_is_int(v) for v in value) else None


@dataclass
class _Scan:
    """What every part is checked against, and the rows found so far."""

    layers: list[int]
    chunk_tokens: int
    special_ids: np.ndarray
    check_special: bool  # the manifest's special_ids are well-typed
    bar: Any
    layer_rows: list[dict[str, Any]] = field(default_factory=list)
    part_rows: list[dict[str, Any]] = field(default_factory=list)
    split_rows: list[dict[str, Any]] = field(default_factory=list)
    doc_splits: dict[str, np.ndarray] = field(default_factory=dict)


def collect_tables(store: ActivationStore, chunk_tokens: int, progress: bool = True) -> StoreTables:
    """Stream every part once and build the statistics tables (memory ∝ chunk_tokens rows)."""
    from tqdm import tqdm

    manifest = store.manifest
    manifest_rows = [
        {"key": key, "ok": problem is None, "problem": problem} for key, problem in type_problems(manifest)
    ]
    special = _int_list(manifest.tokenizer.special_ids)
    plan = [(split, manifest.splits.get(split)) for split in SPLITS]
    bar = tqdm(
        total=sum(len(_part_names(info)) for _, info in plan), desc="validate", unit="part", disable=not progress
    )
    scan = _Scan(
        _int_list(manifest.layers) or [],
        chunk_tokens,
        np.asarray(special or [], dtype=np.int64),
        special is not None,
        bar,
    )
    for split, info in plan:
        _scan_split(scan, store.root / split, split, info)
    bar.close()
    return StoreTables(
        layers=_frame(scan.layer_rows, LAYER_COLUMNS),
        parts=_frame(scan.part_rows, PART_COLUMNS),
        splits=_frame(scan.split_rows, SPLIT_COLUMNS),
        docs=_doc_frame(scan.doc_splits),
        manifest=_frame(manifest_rows, MANIFEST_COLUMNS),
    )


def _part_names(info: SplitInfo | None) -> list[str]:
    if info is None or not isinstance(info.parts, list):
        return []
    return [n for n in info.parts if isinstance(n, str)]


def _scan_split(scan: _Scan, split_dir: Path, split: str, info: SplitInfo | None) -> None:
    """Scan one split's parts; append its part, layer and split rows and its document ids."""
    names = _part_names(info)
    part_tokens = (_int_list(info.part_tokens) if info is not None else None) or []
    on_disk = sorted(p.name for p in split_dir.glob("part-*.zarr") if p.is_dir()) if split_dir.is_dir() else []
    observed: dict[str, float] = {"tokens": 0, "special": 0, "sequences": 0}
    unreadable = 0
    docs: list[np.ndarray] = []
    prev_position: int | None = -1  # position of the last token of the previous part (None: unknown)
    for index, name in enumerate(names):
        scan.bar.set_postfix_str(f"{split}/{name}")
        expected = part_tokens[index] if index < len(part_tokens) else None
        prow, prev_position = _scan_part(scan, split_dir / name, split, expected, prev_position, docs)
        if prow["readable"]:
            observed["tokens"] += prow["n_tokens"]
            observed["special"] += prow["special_count"]
            observed["sequences"] += prow["sequences"]
        else:
            unreadable += 1
        scan.bar.update()
    doc_ids = np.unique(np.concatenate(docs)) if docs else np.zeros(0, np.int64)
    scan.doc_splits[split] = doc_ids
    if unreadable:  # the part rows already name the failure; partial sums would only add noise
        observed = {k: math.nan for k in observed}
    scan.split_rows.append(
        {
            "split": split,
            "present": info is not None,
            "n_parts": len(names),
            "n_part_tokens": len(part_tokens),
            "parts_on_disk": len(on_disk),
            "manifest_tokens": _num(info.tokens if info else None),
            "manifest_part_tokens_sum": float(sum(part_tokens)) if part_tokens else math.nan,
            "observed_tokens": observed["tokens"],
            "manifest_special_tokens": _num(info.special_tokens if info else None),
            "observed_special_tokens": observed["special"],
            "manifest_sequences": _num(info.sequences if info else None),
            "observed_sequences": observed["sequences"],
            "manifest_documents": _num(info.documents if info else None),
            "observed_documents": math.nan if unreadable else len(doc_ids),
            "unreadable_parts": unreadable,
        }
    )


def _scan_part(
    scan: _Scan, path: Path, split: str, expected: int | None, prev_position: int | None, docs: list[np.ndarray]
) -> tuple[dict[str, Any], int | None]:
    """One part's row (and its layer rows, appended to `scan`); returns (part row, last position)."""
    import zarr

    prow: dict[str, Any] = {
        "split": split,
        "part": path.name,
        "present": path.is_dir(),
        "readable": False,
        "error": None,
        "expected_tokens": _num(expected),
    }
    scan.part_rows.append(prow)
    if not prow["present"]:
        prow.update(readable=None, error=f"part directory {path} is missing")  # one failure, not two
        return prow, None
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        n_tokens = int(group.attrs["n_tokens"])  # type: ignore[arg-type]  # zarr types attrs as any JSON
    except Exception as exc:  # any failure to open is a finding, not a crash
        prow["error"] = f"cannot open part: {error_text(exc)}"
        return prow, None
    prow["n_tokens"] = n_tokens
    tokens_ok, prev_position = _scan_tokens(group, n_tokens, scan, prev_position, prow, docs)
    missing = []
    for layer in scan.layers:
        lrow = _scan_layer(group, layer, scan.chunk_tokens)
        lrow.update(split=split, part=path.name, layer=layer, expected_rows=_num(expected))
        scan.layer_rows.append(lrow)
        if lrow.pop("_missing", False):
            missing.append(layer)
    prow["missing_layers"] = len(missing)
    prow["missing_layer_list"] = ",".join(str(n) for n in missing)
    prow["readable"] = tokens_ok  # layer arrays are judged row by row in the layers table
    return prow, prev_position


def _scan_tokens(
    group: Any, n_tokens: int, scan: _Scan, prev_position: int | None, prow: dict[str, Any], docs: list[np.ndarray]
) -> tuple[bool, int | None]:
    """Per-token array checks of one part; fills `prow`. Returns (readable, last position)."""
    arrays = {}
    try:
        for name in TOKEN_ARRAYS:
            arrays[name] = group[name]
            prow[f"{name}_rows"] = int(arrays[name].shape[0])
    except Exception as exc:
        prow["error"] = f"token array {name!r} missing or unreadable: {error_text(exc)}"
        return False, None
    tmin, tmax, dmin, pmax = math.inf, -math.inf, math.inf, -math.inf
    breaks = special = unknown = sequences = 0
    n = min([n_tokens, *(int(a.shape[0]) for a in arrays.values())])
    chunk_tokens, start = scan.chunk_tokens, 0
    try:
        for start in range(0, n, chunk_tokens):
            stop = min(n, start + chunk_tokens)
            tok = np.asarray(arrays["token_id"][start:stop]).astype(np.int64)
            doc = np.asarray(arrays["doc_id"][start:stop]).astype(np.int64)
            pos = np.asarray(arrays["position"][start:stop]).astype(np.int64)
            spc = np.asarray(arrays["special"][start:stop]).astype(bool)
            tmin, tmax = min(tmin, int(tok.min())), max(tmax, int(tok.max()))
            dmin, pmax = min(dmin, int(doc.min())), max(pmax, int(pos.max()))
            prev = np.concatenate([[-2 if prev_position is None else prev_position], pos[:-1]])
            ok = (pos == 0) | (pos == prev + 1)
            if prev_position is None:
                ok[0] = True
            breaks += int((~ok).sum())
            prev_position = int(pos[-1])
            sequences += int((pos == 0).sum())
            special += int(spc.sum())
            if scan.check_special:
                unknown += int((spc & ~np.isin(tok, scan.special_ids)).sum())
            docs.append(np.unique(doc))
    except Exception as exc:
        prow["error"] = f"token arrays unreadable at rows {start}:{min(n, start + chunk_tokens)}: {error_text(exc)}"
        return False, None
    prow.update(
        token_id_min=tmin if n else math.nan,
        token_id_max=tmax if n else math.nan,
        doc_id_min=dmin if n else math.nan,
        position_max=pmax if n else math.nan,
        position_breaks=breaks,
        special_count=special,
        special_unknown=unknown if scan.check_special else math.nan,
        sequences=sequences,
        documents=int(len(np.unique(np.concatenate(docs)))) if docs else 0,
    )
    return True, prev_position


def _scan_layer(group: Any, layer: int, chunk_tokens: int) -> dict[str, Any]:
    """Statistics of one residual array of a part, streamed in row chunks."""
    key = layer_key(layer)
    row: dict[str, Any] = {"readable": False, "error": None}
    try:
        arr = group[key]
    except KeyError:
        row.update(error=f"array {key} is missing", _missing=True)
        return row
    except Exception as exc:
        row["error"] = f"array {key} cannot be opened: {error_text(exc)}"
        return row
    shape = tuple(int(s) for s in arr.shape)
    row.update(
        n_rows=shape[0] if shape else math.nan, n_cols=shape[1] if len(shape) == 2 else math.nan, dtype=str(arr.dtype)
    )
    if len(shape) != 2:
        row["error"] = f"array {key} has shape {shape}, expected [n_tokens, d_model]"
        return row
    stats = ArrayStats()
    start = 0
    try:
        row["missing_chunks"] = int(arr.nchunks) - int(arr.nchunks_initialized)
        for start in range(0, shape[0], chunk_tokens):
            stats.update(np.asarray(arr[start : start + chunk_tokens]))
    except Exception as exc:
        row["error"] = (
            f"array {key} unreadable at rows {start}:{min(shape[0], start + chunk_tokens)}: {error_text(exc)}"
        )
        return row
    row.update(stats.as_row(), readable=True)
    return row


def _doc_frame(doc_splits: dict[str, np.ndarray]) -> Any:
    """One row per document id: how many splits it occurs in, and which (vectorised: 1e6 docs is fine)."""
    import pandas as pd

    names = list(doc_splits)
    ids = [doc_splits[s] for s in names]
    if not any(len(v) for v in ids):
        return _frame([], DOC_COLUMNS)
    all_ids = np.concatenate(ids)
    membership = np.concatenate([np.full(len(v), i) for i, v in enumerate(ids)])
    order = np.lexsort((membership, all_ids))
    all_ids, membership = all_ids[order], membership[order]
    uniq, first, counts = np.unique(all_ids, return_index=True, return_counts=True)
    splits = np.asarray(names, dtype=object)[membership[first]]
    for i in np.flatnonzero(counts > 1):
        splits[i] = ",".join(names[m] for m in membership[first[i] : first[i] + counts[i]])
    return pd.DataFrame({"row": np.arange(len(uniq)), "doc_id": uniq, "n_splits": counts, "splits": splits})
