"""`ato ui`: the MLflow UI on the project's store, opening on a runs page view of the pairs and their
headline numbers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

from .tracking import HEADLINE_PREFIX, PAIR_HEADLINE, RunContext, setup

log = logging.getLogger(__name__)

# The runs page view `ato ui` links to, stored in the experiment as the MLflow UI's own "shared view"
# (tag `mlflow.sharedViewState.<key>`, the page state as JSON; opened by `?viewStateShareKey=<key>`):
# the fit's test R² of each run, then the headline columns, sorted by start time (which keeps the
# Optuna trials folded under their pair).
PAIRS_VIEW = "ato-pairs"
VIEW_COLUMNS = ("test_r2", "test_r2_weighted", *(f"{HEADLINE_PREFIX}{k}" for k in PAIR_HEADLINE))


def write_pairs_view(exp_id: str) -> str:
    """Store the `PAIRS_VIEW` view in the experiment; returns the runs page path that opens it."""
    import json

    import mlflow

    columns = ["attributes.`Run Name`", *(f"metrics.`{k}`" for k in VIEW_COLUMNS)]
    state = {"selectedColumns": columns[1:], "columnOrder": columns}
    mlflow.MlflowClient().set_experiment_tag(exp_id, f"mlflow.sharedViewState.{PAIRS_VIEW}", json.dumps(state))
    return f"#/experiments/{exp_id}/runs?viewStateShareKey={PAIRS_VIEW}"


def serve_ui(context: RunContext, port: int = 5000) -> int:
    """Run the MLflow UI on 127.0.0.1 against the project's store until Ctrl-C or SIGTERM; log the
    address of the runs page view of the pairs and their headline numbers (`write_pairs_view`).

    MLflow's GenAI job runner is switched off: the UI does not need it, it adds seven worker
    processes and ~25 s of start-up, and its workers outlive a terminated server. The server runs
    in its own process group; SIGINT/SIGTERM are forwarded to it and, should it not stop within
    10 s, the whole group is killed, so stopping `ato ui` never leaves a server behind.
    """
    import signal
    import time

    view = write_pairs_view(setup(context))
    uri = context.tracking_uri
    artifacts = context.artifact_root
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifacts.as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stop_requested: list[float] = []  # monotonic time of the first SIGINT/SIGTERM

    def forward(signum: int, _frame: Any) -> None:
        if not stop_requested:
            stop_requested.append(time.monotonic())
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    log.info("MLflow UI: http://127.0.0.1:%d  (store %s; Ctrl-C to stop)", port, uri)
    log.info("the pair runs with their headline numbers: http://127.0.0.1:%d/%s", port, view)
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
