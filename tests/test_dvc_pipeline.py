"""The DVC pipeline itself on a tiny project: `dvc repro` twice does nothing the second time, a
param change reruns only its dependants, and adding a pair fits only that pair; what a user compares
(`dvc exp show`, `dvc metrics diff`, `dvc plots show`) stays readable and follows `pairs:`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_PARAMS, make_corpus, tiny_model, tiny_tokenizer
from dvc_truth import covered, declared_params, load_pipeline, stage_entries, templated_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


TRACE = "params-trace.jsonl"  # every `ato` stage appends the params keys it read (ATO_PARAMS_TRACE)


def dvc(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "ATO_PARAMS_TRACE": str(project / TRACE),
        **(env or {}),
    }
    out = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    return make_dvc_project(tmp_path)


def make_dvc_project(tmp_path: Path, pairs: dict | None = None) -> Path:
    """A git + DVC project of the tiny pipeline (pairs L00_k1, L01_k2 unless `pairs`: not the
    default's), not yet run."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    source = tmp_path / "tiny-source"
    tiny_model("gemma3").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    make_corpus(project / "corpus.jsonl")
    for seed, name in enumerate(("fr.jsonl", "es.jsonl"), start=1):  # the languages stage's sources
        make_corpus(project / name, n_docs=200, seed=seed)
    # DVC requires every declared param to exist: start from the full default params.yaml.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section] = values if section == "pairs" else {**params[section], **values}
    params["pairs"] = pairs or params["pairs"]
    params["prepare"]["source"] = str(source)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")  # the project's remote + settings
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")  # the project's plot templates
    return project


FIRST_PAIR, ADDED_PAIR = sorted(TINY_PARAMS["pairs"])  # the project starts with one, the second is added


@pytest.fixture(scope="module")
def incremental_run(tmp_path_factory) -> tuple[Path, dict[str, str], float]:
    """The tiny project driven as a user would: repro to validate twice, a validate param changed, fit,
    a pair added, then the rest. Returns the project (every stage run once, both tiny pairs: what the
    comparison tests below start from), each step's DVC log and the no-op repro's seconds. One full
    tiny pipeline serves every test of this module that needs one (~200 s)."""
    project = make_dvc_project(
        tmp_path_factory.mktemp("incremental"), pairs={FIRST_PAIR: TINY_PARAMS["pairs"][FIRST_PAIR]}
    )
    logs = {"first": dvc(project, "repro", "validate")}
    t0 = time.perf_counter()
    logs["second"] = dvc(project, "repro", "validate")
    noop_seconds = time.perf_counter() - t0
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["validate"]["max_abs_value"] = 1e9
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    logs["validate_param"] = dvc(project, "repro", "validate")
    logs["fit"] = dvc(project, "repro", "fit")
    raw["pairs"][ADDED_PAIR] = TINY_PARAMS["pairs"][ADDED_PAIR]
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    logs["added_pair"] = dvc(project, "repro", "fit")
    logs["rest"] = dvc(project, "repro")
    return project, logs, noop_seconds


def test_repro_is_incremental(incremental_run):
    project, logs, noop_seconds = incremental_run
    assert ran(logs["first"]) == {"prepare", "collect", "validate"}
    assert ran(logs["second"]) == set() and noop_seconds < 60
    assert ran(logs["validate_param"]) == {"validate"}
    assert ran(logs["fit"]) == {"stats", f"tune@{FIRST_PAIR}", f"fit@{FIRST_PAIR}"}
    # stats reads every pair in one pass; the existing pair's statistics are byte-identical, so its
    # tune/fit stages are skipped and only the new pair is fitted.
    # collect reads `pairs` (it refuses a pair too deep for the model before any forward pass), so it
    # reruns — as a no-op on the complete store, whose bytes do not change, so validate does not.
    assert ran(logs["added_pair"]) == {"collect", "stats", f"tune@{ADDED_PAIR}", f"fit@{ADDED_PAIR}"}
    assert "nothing to do" in logs["added_pair"]
    assert (project / "models" / "operators" / ADDED_PAIR / "operator.safetensors").exists()
    assert ran(logs["rest"]) == {
        "context",
        "sae",
        "select",
        "causal_reference",
        "atlas",
        "languages",
        "report",
        *(f"{s}@{p}" for s in ("evaluate", "causal") for p in TINY_PARAMS["pairs"]),
    }
    assert_params_declared(project)


def test_the_roofline_runs_on_the_tiny_pipeline(incremental_run):
    """bench/pipeline.py reads a finished run: one row per stage of its dvc.lock, a floor for every stage
    with a forward pass, and the run's time / floor (its arithmetic: tests/test_bench_pipeline.py)."""
    project = incremental_run[0]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline.py"), str(project), "--tokens", "256", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")][1:]
    rows = {cells[1].strip().split(" ×")[0]: cells[2:5] for cells in table}
    stages = {name.split("@")[0] for name in yaml.safe_load((project / "dvc.lock").read_text())["stages"]}
    assert stages | {"**run** (stages with a known start)"} == set(rows), out.stdout
    for stage in ("collect", "sae", "causal_reference", "causal", "languages", "atlas"):
        assert float(rows[stage][1].replace(",", "")) > 0, out.stdout
    assert float(rows["**run** (stages with a known start)"][2].replace(",", "")) > 0, out.stdout


def assert_params_declared(project: Path) -> None:
    """Every params key a stage read while dvc ran it is declared in (or templated into) its dvc.yaml entry."""
    stages, params = load_pipeline(project)
    entries = stage_entries(stages, params)
    seen = set()
    for line in (project / TRACE).read_text().splitlines():
        record = json.loads(line)
        name = record["stage"] + (f"@{record['pair']}" if record["pair"] else "")
        spec, key = entries[name]
        declared = declared_params(spec, key) | templated_params(spec)
        undeclared = sorted(k for k in record["params"] if not covered(k, declared))
        assert undeclared == [], f"{name} reads params dvc.yaml does not declare: {undeclared}"
        seen.add(name)
    assert seen == set(entries), f"stages never traced: {sorted(set(entries) - seen)}"


def test_push_and_pull_through_the_default_local_remote(dvc_project: Path):
    dvc(dvc_project, "repro", "collect")
    pushed = dvc(dvc_project, "push")
    assert "pushed" in pushed
    shutil.rmtree(dvc_project / "data" / "activations")
    shutil.rmtree(dvc_project / ".dvc" / "cache")
    dvc(dvc_project, "pull", "collect")
    assert (dvc_project / "data" / "activations" / "manifest.json").exists()
    assert "up to date" in dvc(dvc_project, "status", "collect").lower()


@pytest.fixture(scope="module")
def experiment(incremental_run) -> Path:
    """The tiny project run through once and committed, then one experiment changing one param (the
    README's `evaluate.transported_r2`): what a user compares after `dvc exp run`."""
    project = incremental_run[0]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=project, check=True, capture_output=True)
    # named: DVC's random names vary in length, and so would the table's width
    dvc(project, "exp", "run", "-n", "transported-0", "-S", f"evaluate.transported_r2={CHANGED_TRANSPORTED_R2}")
    return project


CHANGED_TRANSPORTED_R2 = 0.0  # from 0.5: the tiny pairs' transported fractions change
TERMINAL = {"COLUMNS": "200"}


def widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_a_one_param_experiment_fits_a_200_column_terminal(experiment: Path):
    """`dvc metrics diff` and `dvc exp show --only-changed` compare reports/headline.json only: a few
    short columns (and the changed param and dep hashes), not every number of every report file."""
    diff = dvc(experiment, "metrics", "diff", env=TERMINAL)
    rows = [line.split() for line in diff.splitlines()[1:] if line.strip()]
    assert rows and {row[0] for row in rows} == {"reports/headline.json"}, diff
    assert {row[1] for row in rows} >= {f"{pair}.transported" for pair in TINY_PARAMS["pairs"]}, diff
    assert widest(diff) <= 200, diff
    show = dvc(experiment, "exp", "show", "--only-changed", env=TERMINAL)
    header = next(line for line in show.splitlines() if "Experiment" in line)
    assert "evaluate.transported_r2" in header and f"{next(iter(TINY_PARAMS['pairs']))}.transported" in header
    assert widest(show) <= 200, f"{widest(show)} columns:\n{show}"


def test_plots_follow_the_pairs(experiment: Path):
    """Every comparison plot of dvc.yaml renders every pair of params.yaml (here not the default's
    pairs), without an error or a warning."""
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json"],
        cwd=experiment,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        timeout=600,
    )
    assert out.returncode == 0 and "WARNING" not in out.stderr and "ERROR" not in out.stderr, out.stderr
    shown = json.loads(out.stdout)
    assert "errors" not in shown, shown.get("errors")
    pairs = set(TINY_PARAMS["pairs"])
    top_level = [next(iter(item)) for item in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]]
    for plot in top_level:
        (rendered,) = shown["data"][plot]
        values = rendered["content"]["data"]["values"]
        encoding = rendered["content"]["encoding"]
        x, y = encoding["x"]["field"], encoding["y"]["field"]
        drawn = {row["pair"] for row in values if row.get(x) not in (None, "") and row.get(y) not in (None, "")}
        assert drawn == pairs, (plot, drawn)
