"""`ato ui`: a real MLflow server on the project's SQLite store lists the pipeline's runs over its REST
API, and stopping `ato ui` (SIGTERM, as a service manager would; Ctrl-C sends SIGINT) leaves no server
process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

PAIRS = {"L00_k1": {"L": 0, "k": 1}, "L01_k2": {"L": 1, "k": 2}}
START_TIMEOUT = 90.0  # the first start builds MLflow's SQLite schema; ~10 s alone on 2 shared cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def children(pid: int) -> list[int]:
    """All descendants of `pid` (from /proc), so the test can check none outlives `ato ui`."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def logged_project(tmp_path: Path):
    """A project whose MLflow store holds a parent run and one child run per pair with a metric."""
    from ato import tracking
    from ato.params import load_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pairs": PAIRS}))
    params = load_params(tmp_path / "params.yaml")
    for i, name in enumerate(PAIRS):
        with tracking.pair_run(tracking.RunContext.from_params(params), name, "evaluate"):
            tracking.log_flat_metrics({"r2": 0.5 + 0.1 * i})
    return tmp_path, params


@pytest.mark.slow
def wait_for_health(proc: subprocess.Popen, base: str, output: Callable[[], str]) -> None:
    """Poll the server's /health until it answers OK; fail with the server's `output()` if the process
    exits, or after START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert proc.poll() is None, f"ato ui exited with {proc.returncode}:\n{output()[-3000:]}"
        try:
            if http(f"{base}/health", timeout=2.0) == (200, b"OK"):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        assert time.monotonic() < deadline, f"no /health answer within {START_TIMEOUT:.0f} s"
        time.sleep(0.5)


def test_ui_serves_the_runs_and_stops_cleanly(logged_project):
    from ato import tracking

    project, params = logged_project
    exp_id = tracking.setup(tracking.RunContext.from_params(params))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ato.cli", "ui", "--params", str(project / "params.yaml"), "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    descendants: list[int] = []
    try:
        wait_for_health(proc, base, lambda: proc.stdout.read())

        status, raw = http(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100})
        assert status == 200
        runs = json.loads(raw)["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        by_pair = {t["ato.pair"]: r for t, r in zip(tags, runs) if t.get("ato.kind") == "pair"}
        assert set(by_pair) == set(PAIRS)
        assert {r["info"]["run_name"] for r in by_pair.values()} == set(PAIRS)
        assert sum(t.get("ato.kind") == "pipeline" for t in tags) == 1
        r2 = {name: {m["key"]: m["value"] for m in r["data"]["metrics"]}["r2"] for name, r in by_pair.items()}
        assert r2 == pytest.approx({"L00_k1": 0.5, "L01_k2": 0.6})
        # the same search the README suggests for the UI's filter box
        status, raw = http(
            f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "filter": "tags.`ato.pair` = 'L01_k2'"}
        )
        assert [r["info"]["run_name"] for r in json.loads(raw)["runs"]] == ["L01_k2"]
        descendants = children(proc.pid)
        assert descendants, "ato ui should run the MLflow server as a child process"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail("ato ui did not stop within 30 s of SIGTERM")
    assert proc.returncode == 0, out[-3000:]
    assert f"MLflow UI: {base}" in out
    deadline = time.monotonic() + 15
    while any(alive(p) for p in descendants) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in descendants if alive(p)]
    for pid in left:  # clean up what this test started before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind by ato ui: {left}"
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        http(f"{base}/health", timeout=2.0)
