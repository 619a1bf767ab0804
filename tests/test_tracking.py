"""What a user reads in MLflow after the tiny pipeline (collect → … → fit → sae → select → evaluate →
causal): each pair run's own R² (not the last registered variant's), pair runs at the top level with
the Optuna trials under them and ~20 `headline.` metrics, registry versions that say which map they
are (a WARNING on a variant registered although it scores below the identity map), and the runs page in headless
Chromium, served by `ato ui`, listing every pair with its own R²."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import yaml

from conftest import TINY_PARAMS, load_tiny_params, make_corpus, make_prepared_model
from test_feature_cards import _browser
from test_ui import children, free_port, http, wait_for_health

# rank1 scores below the identity map on the tiny model: it is registered (fit.register_below_identity)
# and the registry must warn about it
VARIANTS = ["rank1", "rank64", "update8", "procrustes", "identity"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny project, every stage a pair run reads from, run once for the module."""
    from ato.stages import causal, causal_reference, collect, context, evaluate, fit, sae, select, stats, tune, validate

    root = tmp_path_factory.mktemp("tracking")
    make_prepared_model(root / "models" / "base")
    make_corpus(root / "corpus.jsonl")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    params = load_tiny_params(root, **{"fit.variants": VARIANTS, "fit.register_below_identity": True})
    for stage in (collect, validate, stats, tune, fit, sae, select, evaluate, context, causal_reference, causal):
        stage.main(params)
    return params


def _runs(params) -> list:
    import mlflow

    mlflow.set_tracking_uri(params.mlflow_uri())
    return mlflow.search_runs(experiment_names=[params.paths.mlflow_experiment], output_format="list")


def _pair_runs(params) -> dict:
    return {r.data.tags["ato.pair"]: r for r in _runs(params) if r.data.tags.get("ato.kind") == "pair"}


def _metrics_file(params, pair: str) -> dict[str, float]:
    return json.loads((params.path("reports") / "metrics" / f"{pair}.json").read_text())


@pytest.mark.slow
def test_pair_run_keeps_its_own_r2(pipeline):
    """Registering the variants (identity last of them) must not overwrite the run's `test_r2`."""
    from ato.operators import load_operator

    for pair, run in _pair_runs(pipeline).items():
        metrics, file = run.data.metrics, _metrics_file(pipeline, pair)
        op = load_operator(pipeline.path("operators") / pair)
        assert metrics["test_r2"] == pytest.approx(file["r2"], rel=1e-6), pair
        assert metrics["test_r2_weighted"] == pytest.approx(file["r2_weighted"], rel=1e-6), pair
        assert metrics["train_r2"] == pytest.approx(op.config.metrics["train_r2"], rel=1e-9), pair
        assert metrics["r2"] == pytest.approx(file["r2"], rel=1e-9), pair
        assert abs(metrics["test_r2"] - file["identity_r2"]) > 0.05, pair  # the map the old code showed
        identity = load_operator(pipeline.path("operators") / pair, variant="identity").config.metrics
        assert metrics["variant_identity_test_r2"] == pytest.approx(identity["test_r2"], rel=1e-9)


@pytest.mark.slow
def test_pairs_top_level_trials_nested_headline_metrics(pipeline):
    from ato.tracking import HEADLINE_PREFIX, PAIR_HEADLINE

    runs = _runs(pipeline)
    kinds = [r.data.tags.get("ato.kind") for r in runs]
    pipelines = [r for r, kind in zip(runs, kinds) if kind == "pipeline"]
    pairs = _pair_runs(pipeline)
    trials = [r for r, kind in zip(runs, kinds) if kind == "trial"]
    assert len(pipelines) == 1 and set(pairs) == set(pipeline.pairs)
    for run in pairs.values():  # top level, tied to the pipeline run by tags
        assert "mlflow.parentRunId" not in run.data.tags
        assert run.data.tags["ato.pipeline_run_id"] == pipelines[0].info.run_id
        assert run.data.tags["ato.pipeline_key"] == pipelines[0].data.tags["ato.pipeline_key"]
    assert len(trials) == len(pairs) * pipeline.tune.n_trials
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {r.info.run_id for r in pairs.values()}
    assert 15 <= len(PAIR_HEADLINE) <= 25
    for pair, run in pairs.items():
        file = _metrics_file(pipeline, pair)
        causal = json.loads((pipeline.path("reports") / "causal" / f"{pair}.json").read_text())
        headline = {k[len(HEADLINE_PREFIX) :]: v for k, v in run.data.metrics.items() if k.startswith(HEADLINE_PREFIX)}
        sources = {k: causal[k.removeprefix("causal_")] if k.startswith("causal_") else file[k] for k in PAIR_HEADLINE}
        # every headline name whose value is a finite number is logged (a non-finite one, e.g. the
        # half-width of a share whose reference damage cannot be told from 0, is skipped by design)
        finite = {k for k, v in sources.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        assert set(headline) == finite and len(finite) >= len(PAIR_HEADLINE) - 3, pair
        assert len(run.data.metrics) > 10 * len(headline)  # what the prefix is for
        for key, value in headline.items():
            assert value == pytest.approx(sources[key], rel=1e-9, abs=1e-12), (pair, key)


@pytest.mark.slow
def test_registry_versions_say_which_map_they_are(pipeline):
    import mlflow

    from ato.operators import load_operator
    from ato.tracking import registry_name

    client = mlflow.MlflowClient(tracking_uri=pipeline.mlflow_uri())
    warned = []
    for pair in pipeline.pairs:
        name = registry_name("tiny-gemma3", pair)
        model = client.get_registered_model(name)
        assert "@champion" in model.description and all(f"@{v}" in model.description for v in VARIANTS)
        versions = {v.version: v for v in client.search_model_versions(f"name = '{name}'")}
        champion = client.get_model_version_by_alias(name, "champion")
        assert max(versions, key=int) == champion.version  # the list's "latest version" is the champion
        identity_r2w = load_operator(pipeline.path("operators") / pair).config.metrics["identity_test_r2_weighted"]
        for alias in ["champion", *VARIANTS]:
            version = client.get_model_version_by_alias(name, alias)
            variant = None if alias == "champion" else alias
            metrics = load_operator(pipeline.path("operators") / pair, variant=variant).config.metrics
            assert version.tags["ato.variant"] == alias
            assert version.description.startswith(f"@{alias}: ")
            assert f"{metrics['test_r2_weighted']:.3f}" in version.description
            below = alias != "identity" and metrics["test_r2_weighted"] < identity_r2w
            assert ("WARNING" in version.description) == below, (pair, alias, version.description)
            if below:
                warned.append((pair, alias))
            # the version's scores live on its logged model, prefixed for a variant
            model_id = version.source.removeprefix("models:/")  # the version's model_id field is not filled in
            logged = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
            prefix = "" if variant is None else f"variant_{variant}_"
            assert logged[f"{prefix}test_r2"] == pytest.approx(metrics["test_r2"], rel=1e-9)
    assert {alias for _, alias in warned} == {"rank1"}, warned


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class RunsTable(HTMLParser):
    """The runs table of the MLflow UI's DOM (ag-grid): cell text by row id (the run id) and column id."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, dict[str, str]] = {}
        self.row: str | None = None
        self.open: list[tuple[str, str | None]] = []  # (tag, column id of a cell opened here)
        self.text: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("row-id"):
            self.row = a["row-id"]
        column = a.get("col-id") if self.row is not None and "ag-cell" in (a.get("class") or "") else None
        if column is not None:
            self.text[column] = []
        if tag not in VOID:
            self.open.append((tag, column))

    def handle_endtag(self, tag: str) -> None:
        while self.open:
            name, column = self.open.pop()
            if column is not None and self.row is not None:
                self.cells.setdefault(self.row, {})[column] = "".join(self.text.pop(column)).strip()
            if name == tag:
                break

    def handle_data(self, data: str) -> None:
        for parts in self.text.values():
            parts.append(data)


def _number(text: str) -> float:
    return float(text) if re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", text) else math.nan


@pytest.mark.slow
def test_ui_runs_page_shows_each_pair_with_its_own_r2(pipeline):
    """`ato ui` on the tiny pipeline's store; the page it links to, rendered by headless Chromium, lists
    the pipeline run and the pair runs at the top level (trials folded) with each pair's own R²."""
    project, pairs = pipeline.root, _pair_runs(pipeline)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = project / "ato-ui.log"  # a file, not a pipe: the server's output never blocks it
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ato.cli", "ui", "--params", str(project / "params.yaml"), "--port", str(port)],
            cwd=project,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_health(proc, base, log.read_text)
        # the REST call the page makes: top-level runs are the pipeline and the pairs, each with its R²
        exp_id = pairs[next(iter(pairs))].info.experiment_id
        status, raw = http(f"{base}/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 500})
        assert status == 200
        api = {r["info"]["run_id"]: r for r in json.loads(raw)["runs"]}
        top = [r for r in api.values() if "mlflow.parentRunId" not in {t["key"] for t in r["data"]["tags"]}]
        assert sorted(r["info"]["run_name"] for r in top)[:-1] == sorted(pairs)  # and one pipeline-<key>

        view = f"/#/experiments/{exp_id}/runs?viewStateShareKey="
        found = re.search(re.escape(f"{base}{view}") + r"(\S+)", log.read_text())
        assert found, f"ato ui logged no address of the pairs view:\n{log.read_text()[-2000:]}"
        page = found.group(0)
        dump = _browser("--window-size=4000,1600", "--virtual-time-budget=30000", "--dump-dom", page).stdout
        table = RunsTable()
        table.feed(dump)
        # the name cell starts with the run's colour chip ("#277c43")
        names = {row: re.sub("^#[0-9a-f]{6}", "", cells["attributes.`Run Name`"]) for row, cells in table.cells.items()}
        assert sorted(names.values())[:-1] == sorted(pairs) and sorted(names.values())[-1].startswith("pipeline-"), (
            f"the runs page lists {sorted(names.values())}, not the pairs at the top level"
        )
        for pair, run in pairs.items():
            cells, file = table.cells[run.info.run_id], _metrics_file(pipeline, pair)
            assert _number(cells["metrics.`test_r2`"]) == pytest.approx(file["r2"], rel=1e-6), (pair, cells)
            assert _number(cells["metrics.`headline.r2`"]) == pytest.approx(file["r2"], rel=1e-9), pair
            assert _number(cells["metrics.`headline.identity_r2`"]) == pytest.approx(file["identity_r2"], rel=1e-9)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
