"""The contract between stages: the Record base (format, unknown/missing keys, truncated files), the
one atomic writer, lazy exports, and docs/contracts.md in sync with every record."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from ato import artifacts
from ato.artifacts import ArtifactError, Record, atomic_path, read_json, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    value: float  # a number


@dataclass
class Example(Record):
    FORMAT: ClassVar[str] = "ato-example/1"
    PRODUCER: ClassVar[str] = "example"

    name: str  # required
    inner: Inner  # nested dataclass
    series: list[Inner] = field(default_factory=list)
    by_key: dict[str, float] = field(default_factory=dict)
    missing_value: float = float("nan")  # written as null, read back as NaN


def test_record_round_trip_with_nesting_and_nan(tmp_path: Path):
    rec = Example("a", Inner(1.5), [Inner(2.0)], {"k": 3.0})
    rec.write(tmp_path / "x.json")
    text = (tmp_path / "x.json").read_text()
    assert '"format": "ato-example/1"' in text and "NaN" not in text and "null" in text
    back = Example.read(tmp_path / "x.json")
    assert back.name == "a" and back.inner == Inner(1.5) and back.series == [Inner(2.0)] and back.by_key == {"k": 3.0}
    assert back.missing_value != back.missing_value  # NaN


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "ato-example/1", "name": "a", "inner": {"value": 1}, "extra": 1}', "unknown key 'extra'"),
        ('{"format": "ato-example/1", "inner": {"value": 1}}', "missing key 'name'"),
        ('{"format": "ato-other/1", "name": "a", "inner": {"value": 1}}', "format 'ato-other/1'"),
        ('{"format": "ato-example/1", "name": "a", "inn', "truncated"),
    ],
)
def test_bad_files_name_the_file_and_the_fix(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=re.escape(message)) as info:
        Example.read(path)
    assert str(path) in str(info.value)
    if "format" in message:
        assert "rerun `ato example`" in str(info.value)


def test_missing_file_is_an_artifact_error(tmp_path: Path):
    with pytest.raises(ArtifactError, match="missing"):
        read_json(tmp_path / "nope.json")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("crash mid-write")
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_directory_replaces_the_old_one(tmp_path: Path):
    target = tmp_path / "d"
    for content in ("one", "two"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text(content)
    assert (target / "f.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_orphaned_temporaries_of_dead_processes_are_removed(tmp_path: Path):
    """A `kill -9` mid-write leaves `.tmp-<name>.<pid>`; the next write of that path removes it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".tmp-out.json.{int(dead.stdout)}"
    orphan.write_text("{")
    alive = tmp_path / f".tmp-out.json.{os.getpid() + 0}"  # our own pid: replaced by this very write
    write_json_atomic(tmp_path / "out.json", {"ok": True})
    assert not orphan.exists() and not alive.exists()


def test_every_lazy_export_resolves():
    for name, module in artifacts._LAZY.items():
        assert getattr(artifacts, name) is getattr(importlib.import_module(f"ato.artifacts.{module}"), name)
    assert sorted(artifacts.__all__) == sorted(set(artifacts.__all__))


def _records() -> list[type]:
    found = []
    for module in sorted(set(artifacts._LAZY.values())):
        for obj in vars(importlib.import_module(f"ato.artifacts.{module}")).values():
            if isinstance(obj, type) and issubclass(obj, Record) and obj is not Record and obj.FORMAT:
                found.append(obj)
    return found


@pytest.mark.parametrize("record", _records(), ids=lambda r: r.__name__)
def test_contracts_doc_lists_every_record_and_field(record: type):
    """docs/contracts.md is generated from the records; a new record or field must reach it."""
    doc = (ROOT / "docs" / "contracts.md").read_text()
    heading = f"### `{record.__name__}` — format `{record.FORMAT}`"
    assert heading in doc, f"docs/contracts.md lacks {heading!r}"
    section = doc.split(heading, 1)[1].split("\n### ", 1)[0]
    for f in dataclasses.fields(record):
        assert f"| `{f.name}` |" in section, f"docs/contracts.md: {record.__name__}.{f.name} is not documented"


def test_an_atomic_group_publishes_every_file_or_none(tmp_path: Path):
    from ato.artifacts import atomic_group, write_text_atomic

    old, new = tmp_path / "a" / "old.json", tmp_path / "b" / "new.txt"
    write_json_atomic(old, {"run": 1})
    with pytest.raises(RuntimeError), atomic_group():
        write_json_atomic(old, {"run": 2})
        write_text_atomic(new, "run 2")
        raise RuntimeError("crash before the group ends")
    assert read_json(old) == {"run": 1} and not new.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "old.json"]

    with atomic_group():
        write_json_atomic(old, {"run": 0})
        write_json_atomic(old, {"run": 3})  # written twice: the last write is published
        with atomic_group():  # joins the outer group
            write_text_atomic(new, "run 3")
        assert read_json(old) == {"run": 1} and not new.exists()  # nothing published before the end
    assert read_json(old) == {"run": 3} and new.read_text() == "run 3"
