"""One atomic writer and one typed-record base for every file that passes between stages.

Every inter-stage file is written through `atomic_path` (temporary name in the same directory, fsync,
rename), so a crash never leaves a half-written file that a later stage could mistake for good.
Every JSON record is a dataclass deriving from `Record`: a format version, to/from dict with
unknown or missing keys reported by name, and one `read`/`write` pair. See docs/contracts.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Self

from ..errors import AtoError

TMP_PREFIX = ".tmp-"

# (temporary, final) renames held back by the open `atomic_group`; None outside one.
_PENDING: ContextVar[list[tuple[Path, Path]] | None] = ContextVar("ato_atomic_group", default=None)


class ArtifactError(AtoError):
    """An inter-stage file is missing, truncated, foreign or of another format; names the file."""


# --------------------------------------------------------------------------------------------
# Atomic writes


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file or a directory); on success it replaces
    `path` in one rename, on any exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    _remove(tmp)
    _remove_orphans(path)
    try:
        yield tmp
        pending = _PENDING.get()
        if pending is None:
            _publish(tmp, path)
        elif (tmp, path) not in pending:  # written again in the group: the same temporary, the last write
            pending.append((tmp, path))
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_group() -> Iterator[None]:
    """Every `atomic_path` write inside the block is published together when the block ends, in the
    order the writes finished; on any exception none is, and every temporary is removed. For a stage
    whose outputs lie in several directories (one directory is published by one `atomic_path`).
    A group opened inside another joins it: the outermost one publishes."""
    if _PENDING.get() is not None:
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            _remove(tmp)
        raise
    finally:
        _PENDING.reset(token)
    for tmp, path in pending:
        _publish(tmp, path)


def _publish(tmp: Path, path: Path) -> None:
    if path.is_dir() and tmp.is_dir():
        _remove(path)  # os.replace cannot replace a non-empty directory
    os.replace(tmp, path)


def _remove_orphans(path: Path) -> None:
    """Delete temporaries of `path` left by processes that no longer exist (a `kill -9` mid-write)."""
    for orphan in path.parent.glob(f"{TMP_PREFIX}{path.name}.*"):
        pid = orphan.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(orphan)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def json_clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null, numpy scalars/arrays become Python values."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar or array
        return json_clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Sorted, indented JSON (identical runs give identical bytes), NaN/Inf written as null."""
    write_text_atomic(path, json.dumps(json_clean(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_numbers_atomic(path: str | Path, numbers: dict[str, Any]) -> None:
    """Indented JSON in the caller's key order (not sorted: a DVC metrics file keeps its headline keys
    on top), finite numbers only: a non-finite one is an error, so `dvc metrics diff` compares numbers."""
    write_text_atomic(path, json.dumps(numbers, indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str = "") -> Any:
    """Parse a JSON file; a missing or unreadable file is an ArtifactError naming it."""
    path = Path(path)
    hint = f" ({what})" if what else ""
    if not path.exists():
        raise ArtifactError(f"{path}: missing{hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable or truncated JSON{hint}: {exc}") from None


def read_safetensors(path: str | Path, what: str, framework: str = "pt") -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor of a safetensors file and its string metadata. A missing, empty, truncated or
    foreign file is an ArtifactError naming it and `what` it should hold (e.g. "pair statistics; rerun
    `ato stats`"): safetensors raises its own `SafetensorError` (no OSError/ValueError subclass) on a bad
    header, so callers must not each guess which exceptions to catch."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing ({what})")
    if path.stat().st_size == 0:
        raise ArtifactError(f"{path}: empty file ({what})")
    try:
        with safe_open(str(path), framework=framework) as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({what}): {exc}") from None
    return tensors, metadata


def check_safetensors(path: str | Path, what: str) -> None:
    """Refuse a missing, empty, truncated or foreign safetensors file before a library reads it, by
    its header alone: 8 bytes of header length, the JSON header, then exactly the data its tensors'
    offsets cover. One ArtifactError naming the file and `what` it should hold."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing ({what})")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise ArtifactError(f"{path}: not a safetensors file or cut short ({size} bytes; {what})")
        try:
            header = json.loads(fh.read(header_len))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: unreadable safetensors header ({what})") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise ArtifactError(f"{path}: {size} bytes, its header describes {expected}: truncated or padded ({what})")


def read_safetensors_metadata(path: str | Path, what: str, key: str) -> Any:
    """The JSON record stored under metadata `key` of a safetensors file, checked like
    `read_safetensors`; reads the header only."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing ({what})")
    try:
        with safe_open(str(path), framework="np") as fh:
            raw = (fh.metadata() or {}).get(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({what}): {exc}") from None
    if raw is None:
        raise ArtifactError(f"{path}: no `{key}` metadata ({what})")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: unreadable `{key}` metadata ({what}): {exc}") from None


# --------------------------------------------------------------------------------------------
# Typed records


@dataclasses.dataclass
class Record:
    """Base of every JSON record passed between stages.

    Subclasses are dataclasses with a comment per field and a `FORMAT` string such as
    `"ato-tuning/1"`; the format is written under the key `format` and checked on read.
    Field types may be nested records, lists and dicts of them, and plain JSON values.
    """

    FORMAT: ClassVar[str] = ""
    PRODUCER: ClassVar[str] = ""  # the `ato` stage that writes this record (for error messages)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["format"] = self.FORMAT
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Self:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: expected a JSON object for {cls.__name__}")
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != cls.FORMAT:
            raise ArtifactError(f"{where}: format {fmt!r}, expected {cls.FORMAT!r}{cls._rerun()}")
        return _build(cls, data, where)

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> Self:
        return cls.from_dict(read_json(path, f"{cls.__name__}{cls._rerun()}"), str(path))

    @classmethod
    def _rerun(cls) -> str:
        return f"; rerun `ato {cls.PRODUCER}`" if cls.PRODUCER else ""


def _to_plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if _written(value, f)}
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# A record field's metadata: the field is left out of the file while it is empty (a field added later
# leaves the files of runs that do not use it as they were).
OMIT_EMPTY = {"omit_empty": True}


def _written(value: Any, f: dataclasses.Field[Any]) -> bool:
    return not (f.metadata.get("omit_empty") and not getattr(value, f.name))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ArtifactError(f"{where}: unknown key {unknown[0]!r} for {cls.__name__}")
    required = {
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise ArtifactError(f"{where}: missing key {missing[0]!r} for {cls.__name__}")
    kwargs = {name: _from_plain(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _from_plain(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:  # JSON null: a non-finite float was written, or an optional field is unset
        return math.nan if annotation is float else None
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is not type(None):
                return _from_plain(value, option, where)
    if isinstance(annotation, type) and issubclass(annotation, Record):
        return annotation.from_dict(value, where)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, dict):
            raise ArtifactError(f"{where}: expected an object")
        return _build(annotation, value, where)
    if origin is list and args:
        return [_from_plain(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and len(args) == 2:
        key_type = args[0] if args[0] in (int, str) else str
        return {key_type(k): _from_plain(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
