"""Which params a stage reads: read-through views that record every key read (the CLI writes them
where `ATO_PARAMS_TRACE` says; tests/test_dvc_truth.py compares them with dvc.yaml)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .sections import Pair, Params

TRACE_ENV = "ATO_PARAMS_TRACE"  # file the CLI appends each stage's params reads to, when set


class _TracedSection:
    """Read-through view of a params section that records every key read as `section.key`."""

    def __init__(self, target: Any, prefix: str, log: set[str]):
        self._target, self._prefix, self._log = target, prefix, log

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or callable(value):
            return value
        self._log.add(f"{self._prefix}.{name}")
        return value


class _TracedPairs(dict[str, Pair]):
    """`pairs` that records `pairs.<name>` for one pair looked up and `pairs` for the whole set."""

    def __init__(self, pairs: dict[str, Pair], log: set[str]):
        super().__init__(pairs)
        self._log = log

    def __getitem__(self, name: str) -> Pair:
        self._log.add(f"pairs.{name}")
        return super().__getitem__(name)

    def _all(self) -> None:
        self._log.add("pairs")

    def __iter__(self):
        self._all()
        return super().__iter__()

    def __len__(self) -> int:
        self._all()
        return super().__len__()

    def __contains__(self, name: object) -> bool:
        self._log.add(f"pairs.{name}")
        return super().__contains__(name)

    def keys(self):
        self._all()
        return super().keys()

    def values(self):
        self._all()
        return super().values()

    def items(self):
        self._all()
        return super().items()


def traced(params: Params) -> tuple[Params, set[str]]:
    """A copy of `params` whose sections record every key read, and the set they record into."""
    log: set[str] = set()
    view = dataclasses.replace(params)
    for f in dataclasses.fields(Params):
        if f.name == "pairs":
            view.pairs = _TracedPairs(params.pairs, log)
        elif f.name != "root":
            setattr(view, f.name, _TracedSection(getattr(params, f.name), f.name, log))
    return view, log


def section_dict(section: Any) -> dict[str, Any]:
    """A params section as a plain dict (for logging and fingerprints); reads every key of it."""
    if isinstance(section, _TracedSection):
        section._log.add(section._prefix)
        section = section._target
    return dataclasses.asdict(section)
