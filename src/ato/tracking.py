"""MLflow on a SQLite backend: one run per (L, k) pair at the top level of the experiment, one
pipeline run for the whole-pipeline stages.

DVC runs every stage as its own process, so runs are found again by tags rather than held open:
every run carries `ato.pipeline_key` (a digest of the params file and the git commit), the pipeline
run `ato.kind = pipeline`, each pair run `ato.kind = pair`, `ato.pair` and `ato.pipeline_run_id`. A
stage that logs for a pair reopens that pair's run, so tune, fit, evaluate and causal all land on the
same run; Optuna's trials are nested under it, so the runs page opens on the pairs, not on trials.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .params import Pair, Params, PrepareParams, sqlite_file

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@contextmanager
def sqlite_init_lock(url: str) -> Iterator[None]:
    """Make a SQLite database's directory and hold an exclusive lock while opening the database,
    which may not exist yet. `url` is resolved (`Params.mlflow_uri()` / `Params.optuna_storage()`).

    Why: the first connection to a fresh SQLite storage creates its tables and stamps the alembic
    version; two processes that start together (`ato tune --pair A` and `ato tune --pair B`) both find
    no schema, both migrate, and one dies with `UNIQUE constraint failed: alembic_version`. Only SQLite
    files are locked (creating a server database's schema is a deployment step). The lock file lives
    in the temp directory, keyed by the database path, so the project tree stays clean.
    """
    database = sqlite_file(url)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    key = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:16]
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


def pipeline_key(root: Path, commit: str) -> str:
    """A digest of the project's params.yaml and the git commit: the runs of one pipeline share it."""
    text = (root / "params.yaml").read_bytes() if (root / "params.yaml").exists() else b""
    return hashlib.sha256(text + commit.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunContext:
    """What the tracking functions use, built once per stage (`from_params`). `pairs` and `prepare`
    are the params' own sections, read only where a run is created, so a stage that only reopens runs
    does not depend on them (dvc.yaml declares the params each stage reads)."""

    tracking_uri: str  # the MLflow store (`paths.mlflow_uri`, a SQLite path resolved)
    experiment: str  # `paths.mlflow_experiment`
    artifact_root: Path  # `paths.mlflow_artifacts`, absolute: the artifact location of a new experiment
    git_commit: str  # HEAD of the project's repository, or "unknown"
    pipeline_key: str  # `pipeline_key`: ties a pipeline's runs together
    pairs: Mapping[str, Pair]  # `pairs`: the layers of a pair run
    prepare: PrepareParams  # `prepare`: the model label of a new run

    @classmethod
    def from_params(cls, params: Params) -> RunContext:
        commit = git_commit(params.root)
        return cls(
            tracking_uri=params.mlflow_uri(),
            experiment=params.paths.mlflow_experiment,
            artifact_root=params.path("mlflow_artifacts").resolve(),
            git_commit=commit,
            pipeline_key=pipeline_key(params.root, commit),
            pairs=params.pairs,
            prepare=params.prepare,
        )


def setup(context: RunContext) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    uri = context.tracking_uri
    mlflow.set_tracking_uri(uri)
    name = context.experiment
    with sqlite_init_lock(uri):  # the first connection migrates a fresh database: one process at a time
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(name)
    if exp is None:
        artifacts = context.artifact_root
        artifacts.mkdir(parents=True, exist_ok=True)
        try:
            exp_id = client.create_experiment(name, artifact_location=artifacts.as_uri())
        except Exception:  # another process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _find_run(exp_id: str, filter_string: str) -> str | None:
    import mlflow

    runs = mlflow.search_runs(
        [exp_id],
        filter_string=filter_string,
        max_results=1,
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def _base_tags(context: RunContext) -> dict[str, str]:
    from .artifacts.model import model_label

    return {
        "ato.pipeline_key": context.pipeline_key,
        "ato.model": model_label(context.prepare),
        "mlflow.source.git.commit": context.git_commit,
        "ato.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
    }


def parent_run_id(context: RunContext) -> str:
    """The pipeline's parent run, created on first use."""
    import mlflow

    exp_id = setup(context)
    key = context.pipeline_key
    found = _find_run(exp_id, f"tags.`ato.pipeline_key` = '{key}' and tags.`ato.kind` = 'pipeline'")
    if found:
        return found
    client = mlflow.MlflowClient()
    run = client.create_run(
        exp_id, run_name=f"pipeline-{key[:8]}", tags={**_base_tags(context), "ato.kind": "pipeline"}
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextmanager
def pipeline_run(context: RunContext, stage: str) -> Iterator[Any]:
    """Reopen the parent run for a whole-pipeline stage (sae, select, report, …)."""
    import mlflow

    run_id = parent_run_id(context)
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tag(f"ato.stage.{stage}", "done")
        yield run


@contextmanager
def child_run(context: RunContext, kind: str) -> Iterator[Any]:
    """Reopen (or create) the one child run of a whole-pipeline analysis under the parent run, tagged
    `ato.kind = kind` and named after it (e.g. `languages`: one run per pipeline run)."""
    import mlflow

    parent = parent_run_id(context)
    exp_id = setup(context)
    found = _find_run(exp_id, f"tags.`mlflow.parentRunId` = '{parent}' and tags.`ato.kind` = '{kind}'")
    if found is None:
        tags = {**_base_tags(context), "ato.kind": kind, "mlflow.parentRunId": parent}
        found = mlflow.MlflowClient().create_run(exp_id, run_name=kind, tags=tags).info.run_id
    with mlflow.start_run(run_id=found) as run:
        mlflow.set_tag(f"ato.stage.{kind}", "done")
        yield run


@contextmanager
def pair_run(context: RunContext, pair_name: str, stage: str) -> Iterator[Any]:
    """Reopen (or create) the run of one (L, k) pair: a top-level run of the experiment (the pairs are
    what a reader compares), tied to the pipeline run by the tags `ato.pipeline_key` and
    `ato.pipeline_run_id` rather than nested under it."""
    import mlflow

    parent = parent_run_id(context)
    exp_id = setup(context)
    pair = context.pairs[pair_name]
    found = _find_run(
        exp_id,
        f"tags.`ato.pipeline_key` = '{context.pipeline_key}' and tags.`ato.kind` = 'pair'"
        f" and tags.`ato.pair` = '{pair_name}'",
    )
    tags = {
        **_base_tags(context),
        "ato.kind": "pair",
        "ato.pair": pair_name,
        "ato.layer_in": str(pair.L),
        "ato.k": str(pair.k),
        "ato.layer_out": str(pair.target),
        "ato.pipeline_run_id": parent,
    }
    if found is None:
        run = mlflow.MlflowClient().create_run(exp_id, run_name=pair_name, tags=tags)
        found = run.info.run_id
    with mlflow.start_run(run_id=found) as run:
        mlflow.set_tag(f"ato.stage.{stage}", "done")
        yield run


def sae_reliability_tags(reliable: bool | None, failures: list[str], layer: int | None = None) -> dict[str, str]:
    """Tags that mark feature-level numbers resting on an SAE that missed its quality gates:
    `sae_reliable` = true | false and `sae_gate_failures` (`; `-joined, "none" when reliable), with a
    `.layer_NN` suffix when a run covers several layers. Unknown reliability counts as false."""
    suffix = f".layer_{layer:02d}" if layer is not None else ""
    text = "; ".join(failures) or ("none" if reliable else "no gate result")
    return {f"sae_reliable{suffix}": "true" if reliable else "false", f"sae_gate_failures{suffix}": text[:4000]}


def log_flat_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of `metrics` in the active run (others are skipped)."""
    import math

    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


# The numbers of a pair run a reader compares first (of the ~270 its stages log), as evaluate and
# causal log them: R² and its references, η and the ceiling, the held-out subspace beside its null,
# the feature verdicts, and the causal Δ (scope `after`, the report's default) with its half-width.
PAIR_HEADLINE = (
    "r2",
    "r2_weighted",
    "identity_r2",
    "identity_r2_weighted",
    "ols_r2",
    "val_r2",
    "alpha",
    "ceiling_full",
    "eta_test",
    "eta_expected",
    "eta_ratio",
    "heldout_subspace_size",
    "heldout_subspace_size_null",
    "feature_r2_median",
    "transported_fraction",
    "sae_reliable",
    "causal_ato_delta_after",
    "causal_ato_delta_after_half_width",
    "causal_identity_delta_after",
    "causal_recovered_after",
    "causal_recovered_after_half_width",
    "causal_recovered_vs_train_mean_after",
    "causal_recovered_vs_identity_after",
    "causal_recovered_vs_zero_after",
)
HEADLINE_PREFIX = "headline."


def log_pair_metrics(metrics: dict[str, Any]) -> None:
    """`log_flat_metrics` in a pair run, with the `PAIR_HEADLINE` entries logged again as
    `headline.<key>`: typing `headline.` in the UI's column picker or search finds them together."""
    headline = {f"{HEADLINE_PREFIX}{k}": metrics[k] for k in PAIR_HEADLINE if k in metrics}
    log_flat_metrics({**metrics, **headline})


# --------------------------------------------------------------------------------------------
# Lineage and registry


def dvc_out_hash(root: Path, out: str) -> str | None:
    """The hash DVC recorded in `root/dvc.lock` for the stage output `out` (a path as dvc.yaml writes
    it, relative to `root`), or None when there is no lock or DVC has not recorded that output."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError as exc:
        log.warning("%s: unreadable (%s); no DVC hash for %s", lock, exc, out)
        return None
    for stage in stages.values():
        for entry in stage.get("outs", []):
            if entry.get("path") == out:
                return entry.get("md5")
    return None


def log_store_lineage(store: Path, digest: str) -> None:
    """Record the activation store as the training dataset of the active run (MLflow dataset
    lineage), identified by `digest` (its DVC hash when DVC recorded one), and tag the run with it."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.set_tag("ato.store_dvc_hash", digest)
    source = resolve_dataset_source(store.resolve().as_uri())
    # MetaDataset is concrete at run time; mlflow's annotations leave `profile` abstract
    dataset = MetaDataset(source, name="activation-store", digest=digest[:36])  # type: ignore[abstract]
    mlflow.log_input(dataset, context="training")


def registry_name(model_label: str, pair_name: str) -> str:
    """`ato-<model>-<pair>`, e.g. ato-gemma-3-270m-L05_k1 (registry names allow [A-Za-z0-9_.-]): the
    model's name is the label's part before " (" (`ato.artifacts.model.model_label`), without its hub
    organisation."""
    slug = model_label.split(" (")[0].split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"ato-{slug}-{pair_name}")


def operator_signature(d: int) -> Any:
    """The pyfunc model's signature: float32 [-1, d] out, and no input schema, because MLflow enforces a
    tensor input's dtype exactly (float64 residuals would be refused, the whole array printed in the
    error); `ato.pyfunc_model` checks the input's shape itself and casts it to float32."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, d))]))


def register_operator(
    operator_dir: Path,
    name: str,
    alias: str,
    *,
    d_model: int,
    artifact_name: str = "operator",
    metrics: dict[str, float] | None = None,
    metric_prefix: str = "",
    description: str = "",
    tags: dict[str, str] | None = None,
) -> str:
    """Log the operator directory (maps of width `d_model`) as a pyfunc model in the active run (MLflow
    "model from code": `pyfunc_model.py`, no pickle; `operator_signature` and an input example),
    register it as `name`, point `alias` at the new version and tag the run with it. The version gets
    `description` and `tags`. `metrics` go on the logged model as `<metric_prefix><key>` and on the
    model version as `metric.<key>` tags. Returns `models:/<name>@<alias>`.

    MLflow records a logged model's metrics in its run too, under the same keys: a variant's scores
    therefore need a `metric_prefix`, or they overwrite the run's own (`test_r2` …)."""
    import mlflow
    import numpy as np
    import safetensors
    import torch

    package = Path(__file__).resolve().parent
    example = np.zeros((2, d_model), dtype=np.float32)
    info = mlflow.pyfunc.log_model(
        name=artifact_name,
        python_model=str(package / "pyfunc_model.py"),
        artifacts={"operator": str(operator_dir)},
        input_example=example,
        signature=operator_signature(d_model),
        code_paths=[str(package)],
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}",
            f"numpy=={np.__version__}",
            f"mlflow=={mlflow.__version__}",
        ],
        registered_model_name=name,
    )
    client, version = mlflow.MlflowClient(), str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    if description:
        client.update_model_version(name, version, description=description)
    for key, text in (tags or {}).items():
        client.set_model_version_tag(name, version, key, text)
    if metrics:
        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        mlflow.log_metrics({f"{metric_prefix}{k}": v for k, v in finite.items()}, model_id=info.model_id)
        for key, value in finite.items():
            client.set_model_version_tag(name, version, f"metric.{key}", f"{value:.6g}")
    uri = f"models:/{name}@{alias}"
    mlflow.set_tag("ato.registered_model" if artifact_name == "operator" else f"ato.registered_model.{alias}", uri)
    return uri
