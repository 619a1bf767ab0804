"""A damaged artifact (truncated, empty, of another format) is one error line naming the file, never
a library traceback: safetensors raises its own `SafetensorError`, which no caller caught before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ato.artifacts import ArtifactError, Layout
from ato.artifacts.atlas import AtlasMapsMeta, read_atlas_maps, write_atlas_maps
from ato.artifacts.stats import read_pair_stats, read_pair_stats_meta
from ato.params import load_params
from ato.stages import stats

PAIR = "L01_k2"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path) -> None:
    path.write_text('{"format": "something else"}\n')


def _header_only(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:8])


DAMAGES = {"truncated": _truncate, "empty": _empty, "foreign": _foreign, "header_only": _header_only}


@pytest.fixture
def stats_project(project):
    params = load_params(project / "params.yaml")
    stats.main(params)
    return params


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_pair_stats_name_the_file(stats_project, damage):
    path = Layout.from_params(stats_project).pair_stats("train", PAIR)
    read_pair_stats(path)  # intact: reads
    DAMAGES[damage](path)
    for reader in (read_pair_stats, read_pair_stats_meta):
        with pytest.raises(ArtifactError) as info:
            reader(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message and "ato stats" in message


def test_tune_on_truncated_stats_is_one_line_naming_the_file(stats_project, capsys):
    """The reported case: `ato tune --pair …` on a truncated statistics file."""
    from ato.cli import main

    path = Layout.from_params(stats_project).pair_stats("train", PAIR)
    _truncate(path)
    code = main(["tune", "--pair", PAIR, "--params", str(stats_project.root / "params.yaml")])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("ato tune:")]
    assert code == 1
    assert len(ours) == 1 and str(path) in ours[0], err
    assert "Traceback" not in err and "SafetensorError" not in err, err


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_atlas_maps_name_the_file(tmp_path, damage):
    path = tmp_path / "maps.safetensors"
    maps = {"L00_k1": (np.eye(3, dtype=np.float32), np.zeros(3, dtype=np.float32))}
    meta = AtlasMapsMeta(store_digest="abc", n_train_tokens=10.0, include_bos=False, alpha={"L00_k1": 1.0})
    write_atlas_maps(path, maps, meta)
    assert read_atlas_maps(path)[0]["L00_k1"][0].shape == (3, 3)
    DAMAGES[damage](path)
    with pytest.raises(ArtifactError) as info:
        read_atlas_maps(path)
    assert str(path) in str(info.value) and "ato atlas" in str(info.value)
