"""Outputs left by an earlier run: per-pair files of pairs no longer in `pairs:` and per-layer files of
layers that are no longer a target layer (another model's pairs, a removed pair). No stage reads them,
DVC does not delete them, and beside the current outputs they read like current results: the summary
lists them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from ato.artifacts import Layout
from ato.params import SPLITS, Pair

_PAIR_OUTPUT = re.compile(r"^(L\d{2,}_k\d+)(?:[._].*)?$")  # L05_k1.json, L05_k1_causal.png, L05_k1/
_LAYER_OUTPUT = re.compile(r"^layer_(\d{2,})(?:[._].*)?$")  # layer_06.json, layer_06_contexts.json, layer_06/


def _pair_dirs(layout: Layout) -> list[Path]:
    """The folders whose entries are named after a pair, from the layout's own file names."""
    probe = "L00_k1"
    dirs = [layout.metrics(probe), layout.causal(probe), layout.tuning(probe), layout.evaluate_dir(probe)]
    dirs += [layout.context(probe)]
    dirs += [layout.pair_figure(probe, "causal"), layout.operator(probe)]
    dirs += [layout.pair_stats(split, probe) for split in SPLITS]
    return [p.parent for p in dirs]


def _layer_dirs(layout: Layout) -> list[Path]:
    """The folders whose entries are named after a target layer (SAEs, selected features, references)."""
    files = [layout.sae(0), layout.sae_report(0), layout.feature_set(0), layout.select_report(0)]
    return [p.parent for p in [*files, layout.causal_reference(0)]]


def _entries(directories: list[Path], pattern: re.Pattern[str]) -> Iterator[tuple[str, Path]]:
    """(owner, entry) for every entry of `directories` whose name `pattern` matches."""
    for directory in directories:
        if directory.is_dir():
            for entry in directory.iterdir():
                if match := pattern.match(entry.name):
                    yield match.group(1), entry


def stale_outputs(layout: Layout, pairs: dict[str, Pair]) -> dict[str, list[Path]]:
    """{"L02_k1" or "layer 14": [its outputs]} for every pair not in `pairs` and every layer that is
    not one of their target layers, in name order."""
    targets = {pair.target for pair in pairs.values()}
    found: dict[str, list[Path]] = {}
    for name, entry in _entries(_pair_dirs(layout), _PAIR_OUTPUT):
        if name not in pairs:
            found.setdefault(name, []).append(entry)
    for layer, entry in _entries(_layer_dirs(layout), _LAYER_OUTPUT):
        if int(layer) not in targets:
            found.setdefault(f"layer {int(layer)}", []).append(entry)
    return {owner: sorted(found[owner]) for owner in sorted(found)}
