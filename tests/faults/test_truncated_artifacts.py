"""A damaged artifact (truncated, empty, of another format) is one error line naming the file, never
a library traceback: safetensors raises its own `SafetensorError`, which no caller caught before.
Every artifact kind is tried as a user meets it: damaged on disk, then the `ato` command that reads it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ato.artifacts import ArtifactError, Layout
from ato.artifacts.atlas import AtlasMapsMeta, read_atlas_maps, write_atlas_maps
from ato.artifacts.stats import read_pair_stats, read_pair_stats_meta
from ato.cli import main as ato
from ato.operators import save_operator
from ato.params import load_params
from ato.stages import fit, stats

PAIR = "L01_k2"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path) -> None:
    path.write_text('{"format": "something else"}\n')


def _header_only(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:8])


def _binary(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


DAMAGES = {
    "truncated": _truncate,
    "empty": _empty,
    "foreign": _foreign,
    "header_only": _header_only,
    "binary": _binary,
}


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


@pytest.fixture(scope="module")
def built(reference_project, tmp_path_factory) -> Path:
    """The collected tiny project with every artifact the commands below read: pair statistics, a
    tuning record, an OLS operator (no MLflow), trained SAEs and a text to score. Each test damages
    one file and puts its bytes back."""
    project = Path(shutil.copytree(reference_project, tmp_path_factory.mktemp("built") / "proj"))
    params = load_params(project / "params.yaml")
    stats.main(params)
    params.fit.method = "ols"
    fitted = fit.fit_pair(params, PAIR)
    save_operator(params.path("operators") / PAIR, fitted.W, fitted.b, fitted.config)
    for stage in (["tune", "--pair", PAIR], ["sae"]):
        assert ato([*stage, "--params", str(project / "params.yaml")]) == 0
    (project / "doc.txt").write_text("the cat sat on the mat.\n\nanother short document about dogs.\n")
    return project


STAGE = ["--params", "{p}/params.yaml"]
SCORE = ["score", "--operator", "{p}/models/operators/L01_k2", "--text", "{p}/doc.txt", "--model", "{p}/models/base"]
# artifact kind → (the file damaged, relative to the project; the command that reads it)
KINDS = {
    "pair statistics": ("data/stats/train/L01_k2.safetensors", ["tune", "--pair", PAIR, *STAGE]),
    "store manifest": ("data/activations/manifest.json", ["stats", *STAGE]),
    "store part": ("data/activations/train/part-00000.zarr/zarr.json", ["stats", *STAGE]),
    "validation record": ("reports/validation/validation.json", ["stats", *STAGE]),
    "tuning record": ("reports/tuning/L01_k2.json", ["report", *STAGE]),
    "operator weights": ("models/operators/L01_k2/operator.safetensors", SCORE),
    "operator config": ("models/operators/L01_k2/config.json", SCORE),
    "SAE weights": ("models/sae/layer_01/sae_weights.safetensors", ["select", *STAGE]),
    "SAE config": ("models/sae/layer_01/cfg.json", ["select", *STAGE]),
    "SAE record": ("models/sae/layer_01/ato_sae.json", ["select", *STAGE]),
    "prepared model": ("models/base/model.safetensors", ["collect", *STAGE]),
}
CLI_DAMAGES = ("truncated", "empty", "foreign", "binary")


@pytest.mark.parametrize("damage", CLI_DAMAGES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_damaged_artifact_is_one_line_naming_it(built, kind, damage, capsys):
    relative, argv = KINDS[kind]
    path = built / relative
    intact = path.read_bytes()
    DAMAGES[damage](path)
    try:
        capsys.readouterr()
        code = ato([arg.format(p=built) for arg in argv])
    finally:
        path.write_bytes(intact)
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith(f"ato {argv[0]}:")]
    # a part is named by the store and its folder: the validation binding refuses it as a whole
    named = "train/part-00000.zarr" if kind == "store part" else str(path)
    assert code == 1, err[-3000:]
    assert len(ours) == 1 and named in ours[0], err[-3000:]
    assert "Traceback" not in err and "SafetensorError" not in err, err[-3000:]


@pytest.mark.parametrize("damage", ["cut_in_a_row", "binary"])
def test_damaged_csv_table_names_the_file(tmp_path, damage):
    """A CSV cut inside its last row still parses as rows; the writer's final line break tells."""
    from ato.artifacts import EfficiencyTable, write_csv_atomic

    path = tmp_path / "efficiency.csv"
    write_csv_atomic(path, EfficiencyTable.COLUMNS, [[1.5] * len(EfficiencyTable.COLUMNS)] * 2)
    assert len(EfficiencyTable.read(path).rank) == 2
    if damage == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ArtifactError) as info:
        EfficiencyTable.read(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
