"""Two `ato` processes for different pairs, started at the same moment on one project, log to the
same MLflow SQLite store (and create the Optuna SQLite storage together): both must finish and both
pairs' runs must be recorded, tied to one pipeline run.

Protections exercised: `tracking.setup` tolerating a concurrent experiment creation, MLflow's and
Optuna's SQLite handling of concurrent writers (locking, retries), and `tracking.parent_run_id`
finding (not duplicating) the pipeline run that the other process created.
The first connection to a fresh database is serialised by `tracking.sqlite_init_lock` (tested below).
"""

from __future__ import annotations

import subprocess
import time

import pytest

from ato.params import load_params
from ato.stages import stats

from .conftest import ato_command, subprocess_env

PAIRS = ("L00_k1", "L01_k2")


def _start_together(project, stage: str) -> list[tuple[str, int, str]]:
    """Start `ato <stage> --pair P` for every pair at once; return (pair, rc, output)."""
    procs = []
    for pair in PAIRS:
        procs.append(
            (
                pair,
                subprocess.Popen(
                    ato_command(stage, "--params", str(project / "params.yaml"), "--pair", pair),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=subprocess_env(),
                ),
            )
        )
    out = []
    for pair, proc in procs:
        text, _ = proc.communicate(timeout=300)
        out.append((pair, proc.returncode, text[-3000:]))
    return out


@pytest.mark.slow
def test_two_processes_log_to_one_mlflow_store(project):
    import mlflow

    params = load_params(project / "params.yaml")
    stats.main(params)
    from ato.tracking import RunContext, setup

    setup(
        RunContext.from_params(params)
    )  # the MLflow database exists (first creation: `sqlite_init_lock`); Optuna's does not
    t0 = time.perf_counter()
    results = _start_together(project, "tune")
    for pair, rc, text in results:
        assert rc == 0, f"ato tune --pair {pair} failed:\n{text}"
    print(f"two concurrent `ato tune` processes: {time.perf_counter() - t0:.1f}s")

    mlflow.set_tracking_uri(params.mlflow_uri())
    runs = mlflow.search_runs(experiment_names=[params.paths.mlflow_experiment], output_format="list")
    parents = [r for r in runs if r.data.tags.get("ato.kind") == "pipeline"]
    pairs = {r.data.tags["ato.pair"]: r for r in runs if r.data.tags.get("ato.kind") == "pair"}
    trials = [r for r in runs if r.data.tags.get("ato.kind") == "trial"]
    assert set(pairs) == set(PAIRS)
    for pair, run in pairs.items():
        assert "val_r2_tuned" in run.data.metrics and "chosen_alpha" in run.data.metrics, pair
        assert run.data.tags["ato.stage.tune"] == "done"
        assert (project / "reports" / "tuning" / f"{pair}.json").exists()
    assert len(trials) == len(PAIRS) * params.tune.n_trials
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {r.info.run_id for r in pairs.values()}
    # One pipeline run, both pairs tied to it (a race here would split the pipeline's runs in two).
    assert len(parents) == 1, f"{len(parents)} pipeline runs for one pipeline key"
    assert {r.data.tags["ato.pipeline_run_id"] for r in pairs.values()} == {parents[0].info.run_id}


SETUP = (
    "import sys; from ato.params import load_params; from ato.tracking import RunContext, setup; "
    "setup(RunContext.from_params(load_params(sys.argv[1])))"
)


@pytest.mark.slow
def test_two_processes_create_a_fresh_mlflow_store_together(project):
    import sys

    params = load_params(project / "params.yaml")
    assert not (project / "mlruns").exists()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SETUP, str(project / "params.yaml")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
        )
        for _ in range(2)
    ]
    outs = [(p.communicate(timeout=300)[0], p.returncode) for p in procs]
    for text, rc in outs:
        assert rc == 0, text[-3000:]
    import mlflow

    mlflow.set_tracking_uri(params.mlflow_uri())
    assert mlflow.get_experiment_by_name(params.paths.mlflow_experiment) is not None
