"""Stage `validate`: check the activation store before anything is fitted on it.

Why: every later number (R², ceilings, perplexities) silently inherits bad activations — a NaN
poisons a Gram matrix, an all-zero row (a dropped batch) biases the means, a manifest that disagrees
with the parts makes token counts and digests lie. So the store is streamed once, chunk by chunk
(memory ∝ `stats.chunk_tokens` rows), into small statistics tables, and a great-expectations suite
with thresholds from `params.validate` decides pass / fail:

- `layers`  one row per (split, part, layer): shape, dtype, NaN/Inf counts, row-norm mean/max,
            max |value|, mean/std of the values, fraction of all-zero rows, unread chunks;
- `parts`   one row per (split, part): present / readable, layers present, token-array lengths,
            token-id range, position continuity, special tokens;
- `splits`  one row per split: manifest token counts against each other and against the parts;
- `docs`    one row per document id: in how many splits it occurs (must be one);
- `manifest` one row per required manifest key.

A part that cannot be read (missing directory, deleted array, truncated or corrupted shard: every
zarr chunk carries a crc32c) becomes a failed row naming the part and the error, never a traceback.

The report (`<paths.reports>/validation/`: validation.json, validation.md, stats.csv, parts.csv,
splits.csv, metrics.json) is always written; on any failure `ValidationError` is raised afterwards,
so `ato validate` exits 1 and `dvc repro` stops.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AtoError
from ..params import SPLITS, Params, ValidateParams
from ..store import TOKEN_ARRAYS, ActivationStore, StoreError, layer_key, write_json_atomic

log = logging.getLogger(__name__)

REPORT_SUBDIR = "validation"
MAX_MESSAGE_LINES = 12  # failure lines in the exception message (all are in the report)
MAX_ROWS_PER_EXPECTATION = 200  # failing rows kept per expectation in validation.json


class ValidationError(AtoError):
    """The activation store failed validation; the message names split/part, layer and expectation."""


# --------------------------------------------------------------------------------------------
# Streaming statistics (pure numpy)


@dataclass
class ArrayStats:
    """Streaming statistics of one [n, d] float array, merged chunk by chunk (Chan et al.)."""

    rows: int = 0
    nan: int = 0
    inf: int = 0
    zero_rows: int = 0
    finite_rows: int = 0
    norm_sum: float = 0.0
    norm_max: float = 0.0
    abs_max: float = 0.0
    n_values: int = 0  # finite values seen (rows with a NaN/Inf are left out of the moments)
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 2:
            x = x.reshape(len(x), -1)
        self.rows += len(x)
        finite = np.isfinite(x)
        if not finite.all():
            self.nan += int(np.isnan(x).sum())
            self.inf += int(np.isinf(x).sum())
            x = x[finite.all(axis=1)]
        if not len(x):
            return
        x64 = x.astype(np.float64)
        row_sq = np.einsum("ij,ij->i", x64, x64)
        norms = np.sqrt(row_sq)
        self.finite_rows += len(x)
        self.zero_rows += int((row_sq == 0).sum())
        self.norm_sum += float(norms.sum())
        self.norm_max = max(self.norm_max, float(norms.max()))
        self.abs_max = max(self.abs_max, float(np.abs(x64).max()) if x64.size else 0.0)
        n_c = x64.size
        if n_c:
            s = float(x64.sum())
            mean_c = s / n_c
            m2_c = max(0.0, float(row_sq.sum()) - s * mean_c)
            n = self.n_values + n_c
            delta = mean_c - self.mean
            self.mean += delta * n_c / n
            self.m2 += m2_c + delta * delta * self.n_values * n_c / n
            self.n_values = n

    def as_row(self) -> dict[str, Any]:
        return {
            "token_count": self.rows,
            "nan_count": self.nan,
            "inf_count": self.inf,
            "mean_norm": self.norm_sum / self.finite_rows if self.finite_rows else math.nan,
            "max_norm": self.norm_max if self.finite_rows else math.nan,
            "max_abs": self.abs_max if self.finite_rows else math.nan,
            "mean": self.mean if self.n_values else math.nan,
            "std": math.sqrt(self.m2 / self.n_values) if self.n_values else math.nan,
            "zero_row_fraction": self.zero_rows / self.rows if self.rows else math.nan,
        }


_LAYER_STAT_COLUMNS = ("token_count", "nan_count", "inf_count", "mean_norm", "max_norm", "max_abs",
                       "mean", "std", "zero_row_fraction")
LAYER_COLUMNS = ("row", "split", "part", "layer", "readable", "error", "n_rows", "n_cols", "dtype",
                 "expected_rows", "missing_chunks", *_LAYER_STAT_COLUMNS)
PART_COLUMNS = ("row", "split", "part", "present", "readable", "error", "n_tokens", "expected_tokens",
                *(f"{name}_rows" for name in TOKEN_ARRAYS), "missing_layers", "missing_layer_list",
                "token_id_min", "token_id_max", "doc_id_min", "position_max", "position_breaks",
                "special_count", "special_unknown", "sequences", "documents")
SPLIT_COLUMNS = ("row", "split", "present", "n_parts", "n_part_tokens", "parts_on_disk", "manifest_tokens",
                 "manifest_part_tokens_sum", "observed_tokens", "manifest_special_tokens", "observed_special_tokens",
                 "manifest_sequences", "observed_sequences", "manifest_documents", "observed_documents",
                 "unreadable_parts")
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
        return [("manifest", self.manifest), ("parts", self.parts), ("layers", self.layers),
                ("docs", self.docs), ("splits", self.splits)]


def _frame(rows: list[dict[str, Any]], columns: Iterable[str]):
    import pandas as pd

    columns = list(columns)
    for i, row in enumerate(rows):
        row["row"] = i
    return pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _err(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


REQUIRED_KEYS: dict[str, str] = {
    "format": "str", "layers": "list[int]", "d_model": "int", "dtype": "str", "tokenizer.vocab_size": "int",
    "tokenizer.special_ids": "list[int]", "corpus.max_length": "int", "content_digest": "str",
    **{f"splits.{s}.{k}": "int" for s in SPLITS for k in ("tokens", "special_tokens", "sequences", "documents")},
    **{f"splits.{s}.parts": "list[str]" for s in SPLITS},
    **{f"splits.{s}.part_tokens": "list[int]" for s in SPLITS},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(value: Any) -> list[int] | None:
    return list(value) if isinstance(value, list) and all(_is_int(v) for v in value) else None


def _manifest_row(manifest: dict[str, Any], key: str, kind: str) -> dict[str, Any]:
    """Is manifest `key` present and of the expected kind? (A string d_model would skip the shape check.)"""
    value = _get(manifest, *key.split("."))
    if value is None:
        return {"key": key, "ok": False, "problem": "missing"}
    ok = {"str": lambda v: isinstance(v, str), "int": _is_int,
          "list[int]": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
          "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}[kind](value)
    return {"key": key, "ok": ok, "problem": None if ok else f"expected {kind}, got {value!r:.80}"}


def collect_tables(store: ActivationStore, chunk_tokens: int, progress: bool = True) -> StoreTables:
    """Stream every part once and build the statistics tables (memory ∝ chunk_tokens rows)."""
    import zarr
    from tqdm import tqdm

    manifest = store.manifest
    manifest_rows = [_manifest_row(manifest, key, kind) for key, kind in REQUIRED_KEYS.items()]
    layers = _int_list(manifest.get("layers")) or []
    special_ids = np.asarray(_int_list(_get(manifest, "tokenizer", "special_ids")) or [], dtype=np.int64)
    check_special = _int_list(_get(manifest, "tokenizer", "special_ids")) is not None

    layer_rows: list[dict[str, Any]] = []
    part_rows: list[dict[str, Any]] = []
    split_rows: list[dict[str, Any]] = []
    doc_splits: dict[str, np.ndarray] = {}

    splits_info = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    plan = []
    for split in SPLITS:
        info = splits_info.get(split) if isinstance(splits_info.get(split), dict) else {}
        names = [n for n in info["parts"] if isinstance(n, str)] if isinstance(info.get("parts"), list) else []
        plan.append((split, info, names))
    bar = tqdm(total=sum(len(names) for *_, names in plan), desc="validate", unit="part", disable=not progress)
    for split, info, names in plan:
        part_tokens = _int_list(info.get("part_tokens")) or []
        split_dir = store.root / split
        on_disk = sorted(p.name for p in split_dir.glob("part-*.zarr") if p.is_dir()) if split_dir.is_dir() else []
        observed = {"tokens": 0, "special": 0, "sequences": 0}
        unreadable = 0
        docs: list[np.ndarray] = []
        prev_position: int | None = -1  # position of the last token of the previous part (None: unknown)
        for index, name in enumerate(names):
            bar.set_postfix_str(f"{split}/{name}")
            path = split_dir / name
            expected = part_tokens[index] if index < len(part_tokens) else None
            prow: dict[str, Any] = {"split": split, "part": name, "present": path.is_dir(), "readable": False,
                                    "error": None, "expected_tokens": _num(expected)}
            part_rows.append(prow)
            if not prow["present"]:
                prow.update(readable=None, error=f"part directory {path} is missing")  # one failure, not two
                unreadable += 1
                prev_position = None
                bar.update()
                continue
            try:
                group = zarr.open_group(str(path), mode="r", zarr_format=3)
                n_tokens = int(group.attrs["n_tokens"])
            except Exception as exc:  # noqa: BLE001 - any failure to open is a finding, not a crash
                prow["error"] = f"cannot open part: {_err(exc)}"
                unreadable += 1
                prev_position = None
                bar.update()
                continue
            prow["n_tokens"] = n_tokens
            tokens_ok, prev_position = _scan_tokens(group, n_tokens, chunk_tokens, prev_position, special_ids,
                                                    check_special, prow, docs)
            missing = []
            for layer in layers:
                lrow = _scan_layer(group, layer, chunk_tokens)
                lrow.update(split=split, part=name, layer=layer, expected_rows=_num(expected))
                layer_rows.append(lrow)
                if lrow.pop("_missing", False):
                    missing.append(layer)
            prow["missing_layers"] = len(missing)
            prow["missing_layer_list"] = ",".join(str(n) for n in missing)
            prow["readable"] = tokens_ok  # layer arrays are judged row by row in the layers table
            if tokens_ok:
                observed["tokens"] += n_tokens
                observed["special"] += prow["special_count"]
                observed["sequences"] += prow["sequences"]
            else:
                unreadable += 1
            bar.update()
        doc_ids = np.unique(np.concatenate(docs)) if docs else np.zeros(0, np.int64)
        doc_splits[split] = doc_ids
        if unreadable:  # the part rows already name the failure; partial sums would only add noise
            observed = {k: math.nan for k in observed}
        split_rows.append({
            "split": split, "present": split in splits_info, "n_parts": len(names), "n_part_tokens": len(part_tokens),
            "parts_on_disk": len(on_disk), "manifest_tokens": _num(info.get("tokens")),
            "manifest_part_tokens_sum": float(sum(part_tokens)) if part_tokens else math.nan,
            "observed_tokens": observed["tokens"],
            "manifest_special_tokens": _num(info.get("special_tokens")), "observed_special_tokens": observed["special"],
            "manifest_sequences": _num(info.get("sequences")), "observed_sequences": observed["sequences"],
            "manifest_documents": _num(info.get("documents")),
            "observed_documents": math.nan if unreadable else len(doc_ids),
            "unreadable_parts": unreadable,
        })
    bar.close()

    return StoreTables(layers=_frame(layer_rows, LAYER_COLUMNS), parts=_frame(part_rows, PART_COLUMNS),
                       splits=_frame(split_rows, SPLIT_COLUMNS), docs=_doc_frame(doc_splits),
                       manifest=_frame(manifest_rows, MANIFEST_COLUMNS))


def _scan_tokens(group, n_tokens: int, chunk_tokens: int, prev_position: int | None, special_ids: np.ndarray,
                 check_special: bool, prow: dict[str, Any], docs: list[np.ndarray]) -> tuple[bool, int | None]:
    """Per-token array checks of one part; fills `prow`. Returns (readable, last position)."""
    arrays = {}
    try:
        for name in TOKEN_ARRAYS:
            arrays[name] = group[name]
            prow[f"{name}_rows"] = int(arrays[name].shape[0])
    except Exception as exc:  # noqa: BLE001
        prow["error"] = f"token array {name!r} missing or unreadable: {_err(exc)}"
        return False, None
    tmin, tmax, dmin, pmax = math.inf, -math.inf, math.inf, -math.inf
    breaks = special = unknown = sequences = 0
    n = min([n_tokens, *(int(a.shape[0]) for a in arrays.values())])
    start = 0
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
            if check_special:
                unknown += int((spc & ~np.isin(tok, special_ids)).sum())
            docs.append(np.unique(doc))
    except Exception as exc:  # noqa: BLE001
        prow["error"] = f"token arrays unreadable at rows {start}:{min(n, start + chunk_tokens)}: {_err(exc)}"
        return False, None
    prow.update(token_id_min=tmin if n else math.nan, token_id_max=tmax if n else math.nan,
                doc_id_min=dmin if n else math.nan, position_max=pmax if n else math.nan,
                position_breaks=breaks, special_count=special, special_unknown=unknown if check_special else math.nan,
                sequences=sequences, documents=int(len(np.unique(np.concatenate(docs)))) if docs else 0)
    return True, prev_position


def _scan_layer(group, layer: int, chunk_tokens: int) -> dict[str, Any]:
    """Statistics of one residual array of a part, streamed in row chunks."""
    key = layer_key(layer)
    row: dict[str, Any] = {"readable": False, "error": None}
    try:
        arr = group[key]
    except KeyError:
        row.update(error=f"array {key} is missing", _missing=True)
        return row
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"array {key} cannot be opened: {_err(exc)}"
        return row
    shape = tuple(int(s) for s in arr.shape)
    row.update(n_rows=shape[0] if shape else math.nan, n_cols=shape[1] if len(shape) == 2 else math.nan,
               dtype=str(arr.dtype))
    if len(shape) != 2:
        row["error"] = f"array {key} has shape {shape}, expected [n_tokens, d_model]"
        return row
    stats = ArrayStats()
    start = 0
    try:
        row["missing_chunks"] = int(arr.nchunks) - int(arr.nchunks_initialized)
        for start in range(0, shape[0], chunk_tokens):
            stats.update(np.asarray(arr[start:start + chunk_tokens]))
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"array {key} unreadable at rows {start}:{min(shape[0], start + chunk_tokens)}: {_err(exc)}"
        return row
    row.update(stats.as_row(), readable=True)
    return row


def _doc_frame(doc_splits: dict[str, np.ndarray]):
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
        splits[i] = ",".join(names[m] for m in membership[first[i]:first[i] + counts[i]])
    return pd.DataFrame({"row": np.arange(len(uniq)), "doc_id": uniq, "n_splits": counts, "splits": splits})


# --------------------------------------------------------------------------------------------
# The expectation suite


@dataclass
class Check:
    """One expectation on one table, plus how to describe a failing row to a human."""

    table: str
    expectation: str  # class name in `great_expectations.expectations`
    kwargs: dict[str, Any]
    describe: str  # e.g. "nan_count ≤ 0"
    show: tuple[str, ...]  # columns whose values explain a failing row

    @property
    def type_name(self) -> str:
        import re

        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.expectation).lower()


def build_checks(manifest: dict[str, Any], cfg: ValidateParams) -> list[Check]:
    """The suite, with thresholds from `params.validate` and expected values from the manifest."""
    d_model, dtype = manifest.get("d_model"), manifest.get("dtype")
    vocab = _get(manifest, "tokenizer", "vocab_size")
    max_length = _get(manifest, "corpus", "max_length")

    def between(table, column, lo, hi, describe, show=None):
        kwargs = {"column": column}
        if lo is not None:
            kwargs["min_value"] = lo
        if hi is not None:
            kwargs["max_value"] = hi
        return Check(table, "ExpectColumnValuesToBeBetween", kwargs, describe, show or (column,))

    def in_set(table, column, values, describe, show=None):
        return Check(table, "ExpectColumnValuesToBeInSet", {"column": column, "value_set": values}, describe,
                     show or (column,))

    def equal(table, a, b, describe):
        return Check(table, "ExpectColumnPairValuesToBeEqual",
                     {"column_A": a, "column_B": b, "ignore_row_if": "either_value_is_missing"}, describe, (a, b))

    checks = [
        in_set("manifest", "ok", [True], "required manifest key present and well-typed", ("problem",)),
        in_set("splits", "present", [True], "split present in the manifest", ("split",)),
        equal("splits", "manifest_part_tokens_sum", "manifest_tokens", "sum(part_tokens) == tokens"),
        equal("splits", "n_part_tokens", "n_parts", "len(part_tokens) == len(parts)"),
        equal("splits", "observed_tokens", "manifest_tokens", "tokens in parts == manifest tokens"),
        equal("splits", "observed_special_tokens", "manifest_special_tokens", "special tokens == manifest"),
        equal("splits", "observed_sequences", "manifest_sequences", "sequences (position 0) == manifest"),
        equal("splits", "observed_documents", "manifest_documents", "distinct doc_ids == manifest documents"),
        in_set("parts", "present", [True], "part directory present", ("error",)),
        in_set("parts", "readable", [True], "part readable", ("error",)),
        between("parts", "missing_layers", 0, 0, "every manifest layer present", ("missing_layer_list",)),
        equal("parts", "n_tokens", "expected_tokens", "part n_tokens == manifest part_tokens"),
        *(equal("parts", f"{name}_rows", "expected_tokens", f"{name} rows == manifest part_tokens")
          for name in TOKEN_ARRAYS),
        between("parts", "token_id_min", 0, None, "token_id ≥ 0"),
        between("parts", "doc_id_min", 0, None, "doc_id ≥ 0"),
        between("parts", "position_breaks", 0, 0, "positions count up from 0 within each sequence"),
        between("parts", "special_unknown", 0, 0, "special tokens have a special token id"),
        in_set("layers", "readable", [True], "array readable", ("error",)),
        between("layers", "missing_chunks", 0, 0, "every chunk stored (missing ones read as zeros)"),
        between("layers", "nan_count", 0, cfg.max_nan, f"nan_count ≤ {cfg.max_nan}"),
        between("layers", "inf_count", 0, cfg.max_inf, f"inf_count ≤ {cfg.max_inf}"),
        between("layers", "zero_row_fraction", 0, cfg.max_zero_row_fraction,
                f"zero_row_fraction ≤ {cfg.max_zero_row_fraction:g}"),
        equal("layers", "n_rows", "expected_rows", "rows == manifest part_tokens"),
        between("layers", "mean_norm", cfg.min_mean_norm, cfg.max_mean_norm,
                f"{cfg.min_mean_norm:g} ≤ mean_norm ≤ {cfg.max_mean_norm:g}"),
        between("layers", "max_abs", None, cfg.max_abs_value, f"max_abs ≤ {cfg.max_abs_value:g}"),
        between("docs", "n_splits", 1, 1, "n_splits == 1: a document in one split only", ("n_splits", "splits")),
    ]
    if isinstance(d_model, int):
        checks.append(in_set("layers", "n_cols", [d_model], f"n_cols == manifest d_model {d_model}"))
    if isinstance(dtype, str):
        checks.append(in_set("layers", "dtype", [dtype], f"dtype == manifest dtype {dtype}"))
    if isinstance(vocab, int):
        checks.append(between("parts", "token_id_max", None, vocab - 1, f"token_id < vocab_size {vocab}"))
    if isinstance(max_length, int):
        checks.append(between("parts", "position_max", None, max_length - 1, f"position < max_length {max_length}"))
    return checks


@dataclass
class CheckResult:
    check: Check
    success: bool
    element_count: int
    unexpected_count: int
    exception: str | None
    failures: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.check.table, "expectation": self.check.type_name, "kwargs": self.check.kwargs,
                "describe": self.check.describe, "success": self.success, "element_count": self.element_count,
                "unexpected_count": self.unexpected_count, "exception": self.exception}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _where(table: str, row: dict[str, Any]) -> str:
    if table == "layers":
        return f"{row['split']}/{row['part']} layer {row['layer']}"
    if table == "parts":
        return f"{row['split']}/{row['part']}"
    if table == "splits":
        return f"split {row['split']}"
    if table == "docs":
        return f"doc_id {row['doc_id']}"
    if table == "manifest":
        return f"manifest key {row['key']}"
    return table


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if not value.is_integer() or abs(value) >= 1e15 else str(int(value))
    return str(value)


def run_checks(tables: StoreTables, checks: list[Check]) -> list[CheckResult]:
    """Run the great-expectations suites (one per table) on the statistics tables."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("ato_store")
    frames = dict(tables.items())
    results: list[CheckResult] = []
    for table, df in tables.items():
        mine = [c for c in checks if c.table == table]
        if not mine:
            continue
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": df})
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"ato_store_{table}"))
        for check in mine:
            suite.add_expectation(getattr(gx.expectations, check.expectation)(**check.kwargs))
        outcome = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                       "unexpected_index_column_names": ["row"]})
        by_type: dict[tuple, Any] = {}
        for r in outcome.results:
            cfg = r.expectation_config
            by_type[(cfg.type, _kwargs_key(cfg.kwargs))] = r
        for check in mine:
            r = by_type.get((check.type_name, _kwargs_key(check.kwargs)))
            results.append(_check_result(check, r, frames[table]))
    return results


def _kwargs_key(kwargs: dict[str, Any]) -> tuple:
    keys = ("column", "column_A", "column_B")
    return tuple(kwargs.get(k) for k in keys)


def _check_result(check: Check, r: Any, df) -> CheckResult:
    if r is None:
        return CheckResult(check, False, 0, 0, "expectation result missing")
    info = r.exception_info or {}
    raised = info.get("raised_exception") if isinstance(info, dict) else getattr(info, "raised_exception", False)
    exception = None
    if raised:
        exception = (info.get("exception_message") if isinstance(info, dict) else str(info)) or "raised"
    res = r.result or {}
    indices = [item["row"] if isinstance(item, dict) else item for item in res.get("unexpected_index_list") or []]
    result = CheckResult(check, bool(r.success) and not raised, int(res.get("element_count") or len(df)),
                         int(res.get("unexpected_count") or len(indices)), exception)
    if result.success:
        return result
    if exception:
        result.failures.append({"table": check.table, "expectation": check.type_name, "where": check.table,
                                "message": f"{check.table}: {check.type_name}({check.describe}) could not run: "
                                           f"{exception}"})
        return result
    lookup = df.set_index("row", drop=False)
    for index in indices[:MAX_ROWS_PER_EXPECTATION]:
        row = {k: _jsonable(v) for k, v in lookup.loc[int(index)].to_dict().items()}
        text = ("error", "problem")  # free-text columns are shown as they are
        detail = ", ".join(str(row.get(c)) if c in text else f"{c} = {_format_value(row.get(c))}"
                           for c in check.show)
        if "error" not in check.show and row.get("error"):
            detail = f"{detail}; {row['error']}"
        where = _where(check.table, row)
        result.failures.append({"table": check.table, "expectation": check.type_name, "where": where,
                                "row": row, "message": f"{where}: {check.type_name}({check.describe}) failed: {detail}"})
    return result


# --------------------------------------------------------------------------------------------
# Running, reporting


@dataclass
class ValidationReport:
    """Outcome of validating one store; `failures` are ready-made messages naming where and what."""

    store: str
    success: bool
    results: list[CheckResult]
    failures: list[dict[str, Any]]
    tables: StoreTables | None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return sum(not r.success for r in self.results) + sum(1 for f in self.failures if f["table"] == "store")

    def metrics(self) -> dict[str, float]:
        """Flat numbers for DVC metrics and MLflow."""
        out: dict[str, float] = {
            "validate_success": float(self.success),
            "validate_n_expectations": float(len(self.results)),
            "validate_n_failed": float(self.n_failed),
            "validate_n_failed_rows": float(len(self.failures)),
        }
        if self.tables is not None:
            splits, layers = self.tables.splits, self.tables.layers
            for _, r in splits.iterrows():
                out[f"validate_tokens_{r['split']}"] = float(r["observed_tokens"])
            out["validate_n_parts"] = float(len(self.tables.parts))
            out["validate_n_unreadable_parts"] = float((~self.tables.parts["readable"].astype(bool)).sum())
            if len(layers):
                readable = layers[layers["readable"].astype(bool)]
                for layer, g in readable.groupby("layer"):
                    w = g["token_count"].astype(float)
                    if w.sum() > 0:
                        out[f"validate_mean_norm_layer_{int(layer):02d}"] = float(
                            (g["mean_norm"].astype(float) * w).sum() / w.sum())
                out["validate_max_abs"] = float(readable["max_abs"].astype(float).max()) if len(readable) else math.nan
        return {k: v for k, v in out.items() if math.isfinite(v)}


def validate_store(root: str | Path, cfg: ValidateParams, chunk_tokens: int = 8192,
                   progress: bool = True) -> ValidationReport:
    """Validate the store at `root`; never raises for bad data (see `ValidationReport.success`)."""
    try:
        store = ActivationStore.open(root)
    except StoreError as exc:
        failure = {"table": "store", "expectation": "store_opens", "where": str(root),
                   "message": f"{root}: store cannot be opened: {exc}"}
        return ValidationReport(str(root), False, [], [failure], None)
    tables = collect_tables(store, chunk_tokens, progress=progress)
    results = run_checks(tables, build_checks(store.manifest, cfg))
    failures = [f for r in results for f in r.failures]
    success = all(r.success for r in results)
    return ValidationReport(str(root), success, results, failures, tables, store.manifest)


def write_report(report: ValidationReport, directory: Path) -> dict[str, Path]:
    """validation.json, validation.md, stats.csv (+ parts.csv, splits.csv) and metrics.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in
             ("validation.json", "validation.md", "stats.csv", "parts.csv", "splits.csv", "metrics.json")}
    columns = {"stats.csv": LAYER_COLUMNS, "parts.csv": PART_COLUMNS, "splits.csv": SPLIT_COLUMNS}
    frames = {"stats.csv": "layers", "parts.csv": "parts", "splits.csv": "splits"}
    for name, attr in frames.items():
        if report.tables is not None:
            df = getattr(report.tables, attr).drop(columns=["row"])
        else:
            import pandas as pd

            df = pd.DataFrame(columns=[c for c in columns[name] if c != "row"])
        tmp = paths[name].with_name(f".tmp-{name}.{os.getpid()}")
        df.to_csv(tmp, index=False)
        os.replace(tmp, paths[name])
    summary = {
        "success": report.success,
        "store": report.store,
        "store_digest": report.manifest.get("content_digest"),
        "n_expectations": len(report.results),
        "n_failed": report.n_failed,
        "results": [r.as_dict() for r in report.results],
        "failures": report.failures,
    }
    write_json_atomic(paths["validation.json"], json.loads(json.dumps(summary, default=_jsonable)))
    write_json_atomic(paths["metrics.json"], report.metrics())
    tmp = paths["validation.md"].with_name(f".tmp-validation.md.{os.getpid()}")
    tmp.write_text(_markdown(report))
    os.replace(tmp, paths["validation.md"])
    return paths


def _markdown(report: ValidationReport) -> str:
    status = "PASSED" if report.success else "FAILED"
    model = _get(report.manifest, "model", "name") or "?"
    lines = [f"# Activation store validation: {status}", "",
             f"- store: `{report.store}`", f"- model: {model}",
             f"- content digest: `{report.manifest.get('content_digest', '?')}`",
             f"- expectations: {len(report.results)}, failed: {report.n_failed}, failing rows: {len(report.failures)}",
             ""]
    if report.failures:
        lines += ["## Failures", ""]
        lines += [f"- {f['message']}" for f in report.failures[:100]]
        if len(report.failures) > 100:
            lines.append(f"- … and {len(report.failures) - 100} more (validation.json)")
        lines.append("")
    if report.results:
        lines += ["## Expectations", "", "| table | expectation | check | result | unexpected / rows |",
                  "|---|---|---|---|---|"]
        for r in report.results:
            lines.append(f"| {r.check.table} | `{r.check.type_name}` | {r.check.describe} | "
                         f"{'pass' if r.success else '**FAIL**'} | {r.unexpected_count} / {r.element_count} |")
        lines.append("")
    if report.tables is not None:
        lines += ["## Splits", "", "| split | parts | tokens (manifest) | tokens (parts) | sequences | documents |",
                  "|---|---|---|---|---|---|"]
        for _, r in report.tables.splits.iterrows():
            lines.append(f"| {r['split']} | {r['n_parts']} | {_format_value(r['manifest_tokens'])} | "
                         f"{r['observed_tokens']} | {r['observed_sequences']} | {r['observed_documents']} |")
        lines.append("")
        layers = report.tables.layers
        readable = layers[layers["readable"].astype(bool)] if len(layers) else layers
        if len(readable):
            lines += ["## Layers (all splits and parts)", "",
                      "| layer | tokens | NaN | Inf | mean ‖x‖ | max ‖x‖ | max abs | mean | std | zero rows |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for layer, g in readable.groupby("layer"):
                w = g["token_count"].astype(float)
                mean_norm = float((g["mean_norm"].astype(float) * w).sum() / max(w.sum(), 1))
                mean = float((g["mean"].astype(float) * w).sum() / max(w.sum(), 1))
                lines.append(
                    f"| {int(layer)} | {int(w.sum())} | {int(g['nan_count'].sum())} | {int(g['inf_count'].sum())} | "
                    f"{mean_norm:.4g} | {g['max_norm'].astype(float).max():.4g} | {g['max_abs'].astype(float).max():.4g} | "
                    f"{mean:.4g} | {g['std'].astype(float).mean():.4g} | "
                    f"{float((g['zero_row_fraction'].astype(float) * w).sum() / max(w.sum(), 1)):.3g} |")
            lines += ["", "Per-part statistics: `stats.csv`; token-array checks: `parts.csv`.", ""]
    return "\n".join(lines) + "\n"


def _log_mlflow(params: Params, report: ValidationReport, directory: Path) -> None:
    """Summary metrics and the report files on the pipeline run; failures here never change the verdict."""
    try:
        import mlflow

        from ..params import section_dict
        from ..tracking import log_flat_metrics, pipeline_run

        with pipeline_run(params, "validate"):
            log_flat_metrics(report.metrics())
            mlflow.log_params({f"validate.{k}": v for k, v in section_dict(params.validate).items()})
            mlflow.set_tag("ato.validate.success", str(report.success).lower())
            mlflow.log_artifacts(str(directory), artifact_path="validation")
    except Exception as exc:  # noqa: BLE001 - tracking is best-effort here
        log.warning("validate: MLflow logging failed (%s); the validation result stands", _err(exc))


def failure_message(report: ValidationReport, report_dir: Path | None = None) -> str:
    lines = [f"{m['message']}" for m in report.failures[:MAX_MESSAGE_LINES]]
    more = len(report.failures) - len(lines)
    head = (f"activation store {report.store} failed validation ({report.n_failed} expectation(s), "
            f"{len(report.failures)} failing row(s))")
    if report_dir is not None:
        head += f"; report: {Path(report_dir) / 'validation.md'}"
    body = "\n  ".join(lines) + (f"\n  … and {more} more" if more > 0 else "")
    return f"{head}:\n  {body}"


def main(params: Params) -> ValidationReport:
    """Validate `paths.store`, write `<paths.reports>/validation/`, log to MLflow; raise on failure."""
    directory = params.path("reports") / REPORT_SUBDIR
    report = validate_store(params.path("store"), params.validate, chunk_tokens=params.stats.chunk_tokens)
    write_report(report, directory)
    _log_mlflow(params, report, directory)
    status = "passed" if report.success else "FAILED"
    print(f"ato validate: {status}: {len(report.results)} expectations, {report.n_failed} failed; "
          f"report {directory / 'validation.md'}", flush=True)
    if not report.success:
        raise ValidationError(failure_message(report, directory))
    return report
