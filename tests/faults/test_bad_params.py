"""Malformed params are refused before any compute, with the key at fault named.

Protections exercised:
- `params.load_params` / `_build` / `_coerce` / `check_params`: unknown keys, wrong types, impossible
  values and an empty pair list are `ParamsError`s, and `cli.main` turns them into exit code 2 before
  it even imports the stage;
- `params.check_depth`, called by `collect` right after the model is known: a pair or
  layer beyond the model's depth stops the stage before any forward pass and before anything is written.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from ato import residuals
from ato.cli import main as cli_main
from ato.stages import collect

from .conftest import ato_command, fault_params_raw, subprocess_env


def _write(project: Path, edit) -> str:
    raw = copy.deepcopy(fault_params_raw())
    edit(raw)
    path = project / "bad.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return str(path)


def _set(section: str, key: str, value):
    def edit(raw):
        raw.setdefault(section, {})[key] = value

    return edit


def _pairs(value):
    def edit(raw):
        raw["pairs"] = value

    return edit


BAD = {
    "unknown_key": (_set("collect", "part_tokenz", 64), "collect.part_tokenz"),
    "unknown_section": (lambda raw: raw.update(colect={"batch_size": 2}), "colect"),
    "wrong_type_int": (_set("collect", "batch_size", "eight"), "collect.batch_size"),
    "wrong_type_bool": (_set("stats", "include_bos", "no"), "stats.include_bos"),
    "wrong_literal": (_set("collect", "device", "tpu"), "collect.device"),
    "zero_part_tokens": (_set("collect", "part_tokens", 0), "collect.part_tokens"),
    "negative_budget": (_set("corpus", "tokens", {"train": -5, "val": 10, "test": 10}), "corpus.tokens.train"),
    "negative_k": (_pairs({"L00_k1": {"L": 0, "k": -1}}), "pairs.L00_k1.k"),
    "zero_k": (_pairs({"L00_k0": {"L": 0, "k": 0}}), "pairs.L00_k0.k"),
    "negative_L": (_pairs({"L-1_k1": {"L": -1, "k": 1}}), "pairs.L-1_k1.L"),
    "float_k": (_pairs({"L00_k1": {"L": 0, "k": 1.5}}), "pairs.L00_k1.k"),
    "pair_name_mismatch": (_pairs({"L00_k1": {"L": 1, "k": 1}}), "pairs.L00_k1"),
    "unknown_pair_key": (_pairs({"L00_k1": {"L": 0, "k": 1, "stride": 2}}), "pairs.L00_k1.stride"),
    "empty_pairs": (_pairs({}), "pairs"),
    "no_pairs": (lambda raw: raw.pop("pairs"), "pairs"),
    "layers_missing_for_pair": (_set("collect", "layers", [0, 2]), "collect.layers"),
    "alpha_range": (_set("tune", "alpha_min", 1e8), "tune.alpha_min"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_params_exit_2_naming_the_key_before_any_work(fresh_project, case, capsys, monkeypatch):
    edit, key = BAD[case]
    path = _write(fresh_project, edit)
    monkeypatch.setattr(collect, "main", lambda *a, **k: pytest.fail("collect ran on malformed params"))
    assert cli_main(["collect", "--params", path]) == 2
    err = capsys.readouterr().err
    assert "params error" in err and key in err, err
    assert not (fresh_project / "data").exists()


def test_console_script_exit_code_is_2(fresh_project):
    """The installed `ato` entry point propagates the code (what dvc and shells see)."""
    path = _write(fresh_project, _set("collect", "part_tokenz", 64))
    out = subprocess.run(
        ato_command("collect", "--params", path), capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert out.returncode == 2, out.stderr
    assert "collect.part_tokenz" in out.stderr and "Traceback" not in out.stderr


def test_not_yaml_and_not_a_mapping(fresh_project, capsys):
    bad = fresh_project / "bad.yaml"
    bad.write_text("pairs: {L00_k1: [unclosed\n")
    assert cli_main(["collect", "--params", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("- just\n- a list\n")
    assert cli_main(["collect", "--params", str(bad)]) == 2
    assert "mapping" in capsys.readouterr().err
    assert cli_main(["collect", "--params", str(fresh_project / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unknown_pair_on_the_command_line(fresh_project, capsys):
    assert cli_main(["tune", "--params", str(fresh_project / "params.yaml"), "--pair", "L07_k1"]) == 2
    assert "--pair L07_k1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, key",
    [
        (_pairs({"L00_k1": {"L": 0, "k": 1}, "L02_k5": {"L": 2, "k": 5}}), "pairs.L02_k5"),
        (_set("collect", "layers", [0, 1, 3, 9]), "collect.layers"),
    ],
    ids=["pair_too_deep", "layer_too_deep"],
)
def test_too_deep_for_the_model_stops_collect_before_any_forward_pass(fresh_project, edit, key, capsys, monkeypatch):
    # The 4-layer tiny model has layers 0..3; the params alone cannot know that, the model can.
    path = _write(fresh_project, edit)
    forward = {"n": 0}
    real = residuals.capture_batch

    def counting(*args, **kwargs):
        forward["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(residuals, "capture_batch", counting)
    assert cli_main(["collect", "--params", path]) != 0
    err = capsys.readouterr().err
    assert key in err and "last layer 3" in err, err
    assert forward["n"] == 0, "a forward pass ran before the depth check"
    assert not (fresh_project / "data").exists(), "collect wrote before the depth check"


def test_pairs_do_not_concern_prepare_but_stop_collect_before_writing(fresh_project, capsys):
    """prepare's output (the model copy) does not depend on `pairs`, so it neither reads nor checks them
    (dvc.yaml does not rerun it when pairs change); collect, the first stage whose output does, refuses
    a pair too deep for the model before any forward pass and before writing anything."""

    def edit(raw):
        raw["pairs"] = {"L01_k4": {"L": 1, "k": 4}}
        raw["prepare"] = {"source": str(fresh_project / "models" / "base")}
        raw["paths"] = {"model_dir": "models/prepared"}

    path = _write(fresh_project, edit)
    assert cli_main(["prepare", "--params", path]) == 0
    assert (fresh_project / "models" / "prepared" / "ato_model.json").exists()
    assert cli_main(["collect", "--params", path]) == 2
    err = capsys.readouterr().err
    assert "pairs.L01_k4" in err and "last layer 3" in err, err
    assert not (fresh_project / "data").exists()
    assert not list((fresh_project / "models").glob(".tmp-*"))
