"""bench/pipeline.py's floor arithmetic on hand-computed cases (its run on the tiny pipeline:
tests/test_dvc_pipeline.py::test_the_roofline_runs_on_the_tiny_pipeline)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def sizes(bench):
    # 6 blocks, d = 10, layers 0–5 stored; 110 train and 55 test tokens of which 10 and 5 are BOS
    return bench.Sizes(
        n_layers=6,
        d_model=10,
        stored_layers=list(range(6)),
        tokens={"train": 110, "test": 55},
        rows={"train": 100, "test": 50},
    )


def test_floor_seconds_add_each_kind_of_work_at_its_rate(bench):
    rates = bench.Rates(token_layers_per_s=100, head_tokens_per_s=10, flops64_per_s=1e9, flops32_per_s=2e9)
    work = bench.Work(token_layers=300, head_tokens=20, flops64=4e9, flops32=2e9)
    assert rates.seconds(work) == pytest.approx(3 + 2 + 4 + 1)
    assert rates.scaled(2.0).seconds(work) == pytest.approx(5)  # --run-forward: a machine twice as fast


def test_collect_and_stats_floors_by_hand(bench):
    raw = {"pairs": {"a": {"L": 0, "k": 1}, "b": {"L": 1, "k": 2}}, "stats": {"include_bos": False}}
    # collect forwards every stored token through the deepest stored layer: 165 tokens × 6 blocks
    assert bench.stage_work("collect", None, raw, sizes(bench)) == bench.Work(token_layers=990)
    # layers {0, 1, 3}: three Grams + two cross products, each 2 · 150 rows · 10² FLOPs
    assert bench.stage_work("stats", None, raw, sizes(bench)) == bench.Work(flops64=5 * 2 * 150 * 100)
    raw["stats"]["include_bos"] = True
    assert bench.stage_work("stats", None, raw, sizes(bench)).flops64 == 5 * 2 * 165 * 100


def test_a_causal_pair_replays_only_the_blocks_after_its_target(bench):
    from ato.kinds import kinds_for

    conditions = sum(k.causal == "pair" for k in kinds_for("causal"))
    raw = {
        "pairs": {"a": {"L": 1, "k": 1}},
        "causal": {"n_sequences": 2, "seq_len": 5, "position_sets": {"all": "all", "late": [3]}},
    }
    work = bench.stage_work("causal", "a", raw, sizes(bench))
    # clean prefix: 10 tokens × blocks 0–2; each condition × position set: 10 tokens × blocks 3–5 and
    # 2 × 4 predictions through the head
    assert work.token_layers == 10 * 3 + conditions * 2 * 10 * 3
    assert work.head_tokens == conditions * 2 * 8
    assert work.flops64 == work.flops32 == 0


def test_walls_are_gaps_between_the_stages_last_outputs(bench, tmp_path):
    import os

    import yaml

    outs = {"first": ["a"], "second": ["b/x", "b/y"], "third@p": ["c"], "third@gone": ["d"]}
    mtimes = {"a": 100.0, "b/x": 110.0, "b/y": 130.0, "c": 135.5, "d": 50.0}  # d: a pair no longer in params
    for path, mtime in mtimes.items():
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("")
        os.utime(tmp_path / path, (mtime, mtime))
    lock = {"stages": {name: {"outs": [{"path": p.split("/")[0]} for p in paths]} for name, paths in outs.items()}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert bench.stage_walls(tmp_path, ["p"]) == {"first": None, "second": 30.0, "third@p": 5.5}


def test_a_floor_of_milliseconds_prints_its_digits(bench):
    """A tiny run's floor (a few ms) keeps three significant figures instead of rounding to 0.0."""
    rows = [bench.Row("collect", 1, 5.4, 0.0123), bench.Row("report", 1, 7.1, None)]
    lines = bench.table(rows).splitlines()
    cells = {line.split("|")[1].strip(): line.split("|")[2:5] for line in lines[2:]}
    assert float(cells["collect"][1]) == pytest.approx(0.0123)
    assert float(cells["collect"][2].replace(",", "")) == pytest.approx(5.4 / 0.0123, rel=1e-2)
    assert cells["report"][1].strip() == "—"
    assert float(cells["**run** (stages with a known start)"][0]) == pytest.approx(12.5)


def test_the_context_floor_by_hand(bench):
    """One forward of every split to the deepest target; per pair the union Gram's products (upper XᵀX,
    XᵀY, YᵀY) at float32 and two p³ rotations per fitted kind at float64."""
    tokens, rows = {"train": 110, "val": 22, "test": 55}, {"train": 100, "val": 20, "test": 50}
    three = bench.Sizes(n_layers=6, d_model=10, stored_layers=list(range(6)), tokens=tokens, rows=rows)
    raw = {"pairs": {"a": {"L": 0, "k": 1}}, "context": {"tokens": {"train": 0, "val": 0, "test": 0}, "lags": 1}}
    work = bench.stage_work("context", None, raw, three)
    assert work.token_layers == 187 * 2  # every token through blocks 0–1
    # p = 10 · (2 + 1 + 1) = 40 over 170 rows: 40² + 2 · 40 · 10 + 10² per row
    assert work.flops32 == 170 * (1600 + 800 + 100)
    # kinds ato 10, lagged 20, prefix 20, routed 20, context 40, lagged_prefix 30 columns
    assert work.flops64 == 4 * (10**3 + 3 * 20**3 + 40**3 + 30**3)
    raw["context"]["tokens"]["train"] = 50
    assert bench.stage_work("context", None, raw, three).token_layers == (50 + 22 + 55) * 2
