"""docs/contracts.md's "Record fields" half, generated from the records in `ato.artifacts`: per
module (in `_LAZY` order), per dataclass (in source order) its docstring and a table of its fields,
each field's meaning being its trailing comment in the source. The prose half above the marker is
written by hand and kept as it is."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import tokenize
from pathlib import Path

MARKER = "# Record fields\n"


def _field_comments(cls: type) -> dict[str, str]:
    """`name: type = …  # meaning` → {name: meaning}, read from the class body's tokens."""
    comments: dict[str, str] = {}
    line_start: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_start:
            line_start[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_start:
            comments.setdefault(line_start[tok.start[0]], tok.string.removeprefix("#").strip())
    return comments


def _record_section(cls: type) -> str:
    fmt = getattr(cls, "FORMAT", "")
    heading = f"### `{cls.__name__}`" + (f" — format `{fmt}`" if fmt else "")
    doc = inspect.cleandoc(cls.__doc__ or "")
    comments = _field_comments(cls)
    rows = [f"| `{f.name}` | `{f.type}` | {comments.get(f.name, '')} |" for f in dataclasses.fields(cls)]
    return "\n".join([heading, "", doc, "", "| field | type | meaning |", "|---|---|---|", *rows]) + "\n"


def _module_dataclasses(module_name: str) -> list[type]:
    module = importlib.import_module(f"ato.artifacts.{module_name}")
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
    ]
    return sorted(found, key=lambda cls: inspect.getsourcelines(cls)[1])


def record_fields() -> str:
    """The generated half: every artifacts module's dataclasses and their fields."""
    from ato import artifacts

    modules = list(dict.fromkeys(artifacts._LAZY.values()))
    chapters = []
    for name in modules:
        sections = "\n".join(_record_section(cls) for cls in _module_dataclasses(name))
        chapters.append(f"## artifacts/{name}.py\n\n{sections}")
    return MARKER + "\n" + "\n\n".join(chapters)


def render(current: str) -> str:
    """docs/contracts.md with its hand-written half from `current` and the generated half fresh."""
    if MARKER not in current:
        raise ValueError(f"docs/contracts.md: no line {MARKER.strip()!r} to generate below")
    return current.split(MARKER, 1)[0] + record_fields()


def generate(root: Path) -> str:
    return render((root / "docs" / "contracts.md").read_text())
