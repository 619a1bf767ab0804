"""MLflow on a SQLite backend: one parent run per pipeline run, one child run per (L, k).

DVC runs every stage as its own process, so runs are found again by tags rather than held open:
the parent carries `ato.pipeline_key` (a digest of the params file and the git commit), each child
`ato.pair`. A stage that logs for a pair reopens that pair's child run, so tune, fit, evaluate and
causal all land on the same run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .params import Params

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@contextmanager
def sqlite_init_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock while opening a SQLite database that may not exist yet.

    Why: the first connection to a fresh SQLite storage creates its tables and stamps the alembic
    version; two processes that start together (`ato tune --pair A` and `ato tune --pair B`) both find
    no schema, both migrate, and one dies with `UNIQUE constraint failed: alembic_version`. Only SQLite
    files are locked (creating a server database's schema is a deployment step). The lock file lives
    in the temp directory, keyed by the database path, so the project tree stays clean.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    key = hashlib.sha256(str(Path(url[len(prefix):]).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ato-sqlite-{key}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_key(params: Params) -> str:
    text = (params.root / "params.yaml").read_bytes() if (params.root / "params.yaml").exists() else b""
    return hashlib.sha256(text + git_commit(params.root).encode()).hexdigest()[:16]


def setup(params: Params) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    uri = params.mlflow_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = params.paths.mlflow_experiment
    with sqlite_init_lock(uri):  # the first connection migrates a fresh database: one process at a time
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(name)
    if exp is None:
        artifacts = params.path("mlflow_artifacts").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        try:
            exp_id = client.create_experiment(name, artifact_location=artifacts.as_uri())
        except Exception:  # another process created it first
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _find_run(exp_id: str, filter_string: str) -> str | None:
    import mlflow

    runs = mlflow.search_runs([exp_id], filter_string=filter_string, max_results=1,
                              order_by=["attributes.start_time DESC"], output_format="list")
    return runs[0].info.run_id if runs else None


def _base_tags(params: Params) -> dict[str, str]:
    from .models import EMBEDDED_MODEL_NAME

    model = EMBEDDED_MODEL_NAME if params.prepare.source == "embedded" else params.prepare.source
    return {
        "ato.pipeline_key": pipeline_key(params),
        "ato.model": model,
        "mlflow.source.git.commit": git_commit(params.root),
        "ato.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
    }


def parent_run_id(params: Params) -> str:
    """The pipeline's parent run, created on first use."""
    import mlflow

    exp_id = setup(params)
    key = pipeline_key(params)
    found = _find_run(exp_id, f"tags.`ato.pipeline_key` = '{key}' and tags.`ato.kind` = 'pipeline'")
    if found:
        return found
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id, run_name=f"pipeline-{key[:8]}",
                            tags={**_base_tags(params), "ato.kind": "pipeline"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextmanager
def pipeline_run(params: Params, stage: str) -> Iterator[Any]:
    """Reopen the parent run for a whole-pipeline stage (sae, select, report, …)."""
    import mlflow

    run_id = parent_run_id(params)
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tag(f"ato.stage.{stage}", "done")
        yield run


@contextmanager
def pair_run(params: Params, pair_name: str, stage: str) -> Iterator[Any]:
    """Reopen (or create) the child run of one (L, k) pair under the parent run."""
    import mlflow

    parent = parent_run_id(params)
    exp_id = setup(params)
    pair = params.pairs[pair_name]
    found = _find_run(exp_id, f"tags.`mlflow.parentRunId` = '{parent}' and tags.`ato.pair` = '{pair_name}'")
    tags = {**_base_tags(params), "ato.kind": "pair", "ato.pair": pair_name,
            "ato.layer_in": str(pair.L), "ato.k": str(pair.k), "ato.layer_out": str(pair.target),
            "mlflow.parentRunId": parent}
    if found is None:
        run = mlflow.MlflowClient().create_run(exp_id, run_name=pair_name, tags=tags)
        found = run.info.run_id
    with mlflow.start_run(run_id=found) as run:
        mlflow.set_tag(f"ato.stage.{stage}", "done")
        yield run


def log_flat_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import math

    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def serve_ui(params: Params, port: int = 5000) -> int:
    """Run the MLflow UI on 127.0.0.1 against the project's store until Ctrl-C or SIGTERM.

    MLflow's GenAI job runner is switched off: the UI does not need it, it adds seven worker
    processes and ~25 s of start-up, and its workers outlive a terminated server. The server runs
    in its own process group; SIGINT/SIGTERM are forwarded to it and, should it not stop within
    10 s, the whole group is killed, so stopping `ato ui` never leaves a server behind.
    """
    import signal
    import time

    setup(params)
    uri = params.mlflow_uri()
    artifacts = params.path("mlflow_artifacts").resolve()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifacts.as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stop_requested: list[float] = []  # monotonic time of the first SIGINT/SIGTERM

    def forward(signum: int, _frame: Any) -> None:
        if not stop_requested:
            stop_requested.append(time.monotonic())
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"MLflow UI: http://127.0.0.1:{port}  (store {uri}; Ctrl-C to stop)", flush=True)
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop_requested and time.monotonic() - stop_requested[0] > 10:  # asked to stop, still up
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:  # nothing of the server's group outlives `ato ui`
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return 0 if stop_requested else code
