"""Malformed params fail before any compute, naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ato.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_parse_and_cover_every_section():
    params = load_params(ROOT / "params.yaml", n_layers=18)
    assert params.pairs and all(p.L + p.k <= 17 for p in params.pairs.values())
    assert params.collect.layers == "all"
    # params.yaml spells out every field, so the defaults a user sees are the defaults that run
    raw = default_raw()
    from dataclasses import fields

    for section in (
        "prepare",
        "corpus",
        "collect",
        "validate",
        "stats",
        "tune",
        "fit",
        "sae",
        "select",
        "evaluate",
        "causal",
        "report",
        "paths",
    ):
        declared = {f.name for f in fields(type(getattr(params, section)))}
        assert set(raw[section]) == declared, section


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda r: r["tune"].__setitem__("n_trails", 3), "tune.n_trails"),
        (lambda r: r.__setitem__("bogus", {}), "bogus"),
        (lambda r: r["tune"].__setitem__("n_trials", "many"), "tune.n_trials"),
        (lambda r: r["collect"].__setitem__("device", "tpu"), "collect.device"),
        (lambda r: r["pairs"].__setitem__("L05_k1", {"L": 5, "k": -1}), "pairs.L05_k1.k"),
        (lambda r: r["pairs"].__setitem__("L05_k1", {"L": 5, "k": 0}), "pairs.L05_k1.k"),
        (lambda r: r["pairs"].__setitem__("L05_k9", {"L": 5, "k": 1}), "pairs.L05_k9"),
        (lambda r: r.__setitem__("pairs", {}), "pairs"),
        (lambda r: r["corpus"]["tokens"].__setitem__("val", 0), "corpus.tokens.val"),
        (
            lambda r: r["corpus"].__setitem__("split_fractions", {"train": 0.5, "val": 0.2, "test": 0.2}),
            "corpus.split_fractions",
        ),
        (lambda r: r["tune"].__setitem__("alpha_min", 1e9), "tune.alpha_min"),
        (lambda r: r["collect"].__setitem__("layers", [5, 6]), "collect.layers"),
        (lambda r: r["causal"]["position_sets"].__setitem__("bad", [0]), "causal.position_sets.bad"),
        (lambda r: r["causal"]["position_sets"].__setitem__("bad", [500]), "causal.position_sets.bad"),
    ],
)
def test_bad_params_name_the_key(mutate, key):
    raw = copy.deepcopy(default_raw())
    mutate(raw)
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(raw)


def test_pair_beyond_model_depth_is_refused():
    raw = default_raw()
    raw["pairs"] = {"L15_k3": {"L": 15, "k": 3}}
    parse_params(raw)  # fine without knowing the model
    with pytest.raises(ParamsError, match="pairs.L15_k3: L \\+ k = 18 is beyond the model's last layer 17"):
        parse_params(raw, n_layers=18)


def test_cli_reports_params_errors_before_compute(tmp_path, capsys):
    from ato.cli import main

    raw = default_raw()
    raw["fit"]["methd"] = "ridge"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["fit", "--params", str(tmp_path / "params.yaml")]) == 2
    assert "fit.methd" in capsys.readouterr().err


@pytest.mark.parametrize(("positions", "bad"), [([40, 48, 56, 63], "63"), ([0, 5], "0"), ([64], "64")])
def test_position_set_that_cannot_change_a_scored_prediction_is_refused(positions, bad):
    """Patching the last position (its own prediction is not scored) or BOS changes nothing: a set
    holding such a position would report a causal effect of exactly zero, so it is refused by name."""
    raw = default_raw()
    raw["causal"]["position_sets"] = {"all": "all", "late": positions}
    with pytest.raises(ParamsError, match=rf"causal\.position_sets\.late: position\(s\) \[{bad}\]"):
        parse_params(raw)
    raw["causal"]["position_sets"] = {"all": "all", "late": [40, 48, 56, 62]}
    parse_params(raw)  # 62 predicts token 63, which is scored


@pytest.mark.parametrize(
    ("written", "expected"), [("1e-3", 1e-3), ("5E+2", 500.0), (" 0.25 ", 0.25), ("1_000", 1000.0)]
)
def test_numbers_written_as_yaml_leaves_them_are_accepted(written, expected):
    """PyYAML (YAML 1.1) reads `1e-3` as the string '1e-3'; a person wrote a number, so it is one."""
    raw = default_raw()
    raw["tune"]["alpha_min"] = written
    raw["tune"]["n_trials"] = "40"
    params = parse_params(raw)
    assert params.tune.alpha_min == expected and isinstance(params.tune.alpha_min, float)
    assert params.tune.n_trials == 40 and isinstance(params.tune.n_trials, int)


def test_yaml_1e_minus_3_in_params_file_parses(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("alpha_min:", "alpha_min: 1e-3 #", 1))
    assert load_params(tmp_path / "params.yaml").tune.alpha_min == 1e-3


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("alpha_min", "small", "tune.alpha_min: expected a number, got 'small'"),
        ("alpha_min", "nan", "tune.alpha_min: expected a number"),
        ("alpha_min", True, "tune.alpha_min: expected a number"),
        ("n_trials", "2.5", "tune.n_trials: expected an integer, got '2.5'"),
        ("n_trials", "many", "tune.n_trials: expected an integer"),
    ],
)
def test_words_where_numbers_belong_are_still_refused_by_key(key, value, message):
    raw = default_raw()
    raw["tune"][key] = value
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)
