"""Stage `tune`: one Optuna study per (L, k) over the ridge penalty α.

The objective is the validation R² (uniform average over output dimensions, as the reference
reports), computed exactly from the val split's sufficient statistics; or, with
`tune.objective: kfold`, the mean over K blocked folds of contiguous training documents. One
eigendecomposition per fold prices every α, so a trial costs two d×d products (docs/method.md#ridge).
Studies live in an Optuna RDB storage (SQLite by default), so an interrupted study resumes and
several worker processes — or machines, with a PostgreSQL URL — can share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ato.accumulate import kfold_stats
from ato.artifacts import AlphaPoint, Layout, TuningResult, atomic_group, read_pair_stats, write_text_atomic
from ato.math.ridge import HeldOutR2, RidgePath, alpha_trial
from ato.math.ridge_diagnostics import diagnose_alpha
from ato.params import Params, TuneParams, section_dict
from ato.plotting.tuning import plot_alpha_curve
from ato.store import ActivationStore
from ato.tracking import RunContext, log_flat_metrics, pair_run, setup, sqlite_init_lock

log = logging.getLogger(__name__)


def main(params: Params, pair: str | None = None) -> None:
    layout = Layout.from_params(params)
    runs = RunContext.from_params(params)
    for name in [pair] if pair else list(params.pairs):
        with pair_run(runs, name, "tune") as run:
            result = tune_pair(params, name, run.info.run_id)
            with atomic_group():  # the record, its curve and its figure, or none
                write_outputs(layout, result)
            track(layout, result)
        log.info(
            "tune %s: α = %.4g, val R² = %.4f (%d trials, %.1fs); curve flat to %.2g, gain %.2g vs noise %.2g%s",
            name,
            result.alpha,
            result.val_r2,
            result.n_trials,
            result.tune_seconds,
            result.alpha_flatness,
            result.alpha_gain,
            result.val_r2_noise,
            " (α immaterial)" if result.alpha_immaterial else "",
        )


def track(layout: Layout, result: TuningResult) -> None:
    """The pair's MLflow run: search settings, chosen α and its diagnostics, the edge warning as a tag."""
    import mlflow

    mlflow.log_params(
        {"tune_objective": result.objective, "tune_n_trials": result.n_trials, "optuna_study": result.study}
    )
    log_flat_metrics(
        {
            "chosen_alpha": result.alpha,
            "val_r2_tuned": result.val_r2,
            "alpha_flatness": result.alpha_flatness,
            "alpha_gain": result.alpha_gain,
            "val_r2_noise": result.val_r2_noise,
            "alpha_immaterial": int(result.alpha_immaterial),
            "alpha_at_edge": int(result.alpha_edge_warning is not None),
            "tune_n_val": result.n_val,
        }
    )
    if result.alpha_edge_warning is not None:
        mlflow.set_tag("ato.tune.alpha_edge_warning", result.alpha_edge_warning)
    mlflow.log_artifact(str(layout.tuning_figure(result.pair)))
    mlflow.log_artifact(str(layout.tuning(result.pair)))


def write_outputs(layout: Layout, result: TuningResult) -> None:
    """reports/tuning/<pair>.json, the curve as CSV (for `dvc plots`) and the α figure."""
    result.write(layout.tuning(result.pair))
    rows = "".join(f"{c.alpha:.6g},{c.val_r2:.6f}\n" for c in result.curve)
    write_text_atomic(layout.tuning_curve(result.pair), "alpha,val_r2\n" + rows)
    plot_alpha_curve(result, layout.tuning_figure(result.pair))


def build_objective(params: Params, pair_name: str) -> HeldOutR2:
    """Validation R² as a function of α: on the val split's statistics, or over K training folds."""
    t = params.tune
    layout = Layout.from_params(params)
    store = ActivationStore.open(layout.store)
    if t.objective == "kfold":
        pair = params.pairs[pair_name]
        folds = kfold_stats(store, pair.L, pair.target, t.kfold, params.stats.chunk_tokens, params.stats.include_bos)
        return HeldOutR2([(RidgePath.from_stats(fit, t.standardize), held) for fit, held in folds])
    train = read_pair_stats(layout.pair_stats("train", pair_name), store.digest)
    val = read_pair_stats(layout.pair_stats("val", pair_name), store.digest)
    return HeldOutR2([(RidgePath.from_stats(train, t.standardize), val)])


def study_name(pair_name: str, store_digest: str, t: TuneParams, include_bos: bool) -> str:
    """Same data and search settings → same study (resumed); anything else → a new study."""
    search = section_dict(t)
    for key in ("n_workers", "curve_points"):  # how to search, not what: the same study
        search.pop(key)
    ident = json.dumps({"store": store_digest, "tune": search, "bos": include_bos}, sort_keys=True)
    return f"ato-{pair_name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def tune_pair(params: Params, pair_name: str, run_id: str | None = None) -> TuningResult:
    """Run (or resume) the pair's study; return the chosen α, its R², and the α → R² curve."""
    import optuna

    t = params.tune
    store = ActivationStore.open(params.path("store"))
    name = study_name(pair_name, store.digest, t, params.stats.include_bos)
    storage = params.optuna_storage()
    with sqlite_init_lock(storage):
        optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=t.seed),
        )
    objective = build_objective(params, pair_name)  # serves the in-process trials and the curve
    n_val = int(sum(held.n for _, held in objective.folds))  # val split's PairStats.n, or all K folds
    t0 = time.perf_counter()
    if t.n_workers == 1:
        _run_worker(params, pair_name, name, run_id, t.n_trials, objective=objective)
    else:
        _run_workers(params, pair_name, name, run_id)
    seconds = time.perf_counter() - t0
    return summarise(optuna.load_study(study_name=name, storage=storage), pair_name, t, objective, seconds, n_val)


def summarise(
    study: Any, pair_name: str, t: TuneParams, objective: Callable[[float], float], seconds: float, n_val: int
) -> TuningResult:
    """The study's best trial, every completed trial, the exact objective on the α grid, and what that
    curve says about α at `n_val` held-out tokens (docs/method.md#ridge). An edge warning is logged."""
    grid = np.geomspace(t.alpha_min, t.alpha_max, t.curve_points)
    curve = [AlphaPoint(alpha=float(a), val_r2=objective(float(a))) for a in grid]
    trials = sorted((tr.params["alpha"], tr.value) for tr in study.trials if tr.value is not None)
    best = float(study.best_params["alpha"])
    diag = diagnose_alpha([c.alpha for c in curve], [c.val_r2 for c in curve], best, n_val, pair_name)
    if diag.edge_warning is not None:  # on a curve flat within its noise the edge is itself noise: say so
        flat = f" (α is immaterial at n_val = {n_val}: gain {diag.gain:.2g} < noise {diag.noise:.2g})"
        log.warning("tune %s%s", diag.edge_warning, flat if diag.immaterial else "")
    return TuningResult(
        pair=pair_name,
        study=study.study_name,
        objective=t.objective,
        alpha=best,
        val_r2=float(study.best_value),
        n_trials=len(trials),
        tune_seconds=seconds,
        curve=curve,
        trials=[AlphaPoint(alpha=a, val_r2=v) for a, v in trials],
        n_val=diag.n_val,
        alpha_flatness=diag.flatness,
        alpha_gain=diag.gain,
        val_r2_noise=diag.noise,
        alpha_immaterial=diag.immaterial,
        alpha_edge_warning=diag.edge_warning,
    )


def _run_workers(params: Params, pair_name: str, name: str, run_id: str | None) -> None:
    """`tune.n_workers` spawned processes share the study. The remaining trials are split between
    them: with MaxTrialsCallback alone, workers that finish trials at the same moment overshoot
    `n_trials` by up to n_workers − 1."""
    import optuna

    t = params.tune
    study = optuna.load_study(study_name=name, storage=params.optuna_storage())
    done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    remaining = max(0, t.n_trials - done)
    shares = [remaining // t.n_workers + (i < remaining % t.n_workers) for i in range(t.n_workers)]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_run_worker, args=(params, pair_name, name, run_id, t.n_trials, i, share))
        for i, share in enumerate(shares)
        if share > 0
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()  # all of them, so a failing worker never leaves the others running unattended
    codes = [p.exitcode for p in procs if p.exitcode != 0]
    if codes:
        raise RuntimeError(f"tune {pair_name}: {len(codes)} worker(s) failed (exit codes {codes})")


def _run_worker(
    params: Params,
    pair_name: str,
    name: str,
    run_id: str | None,
    n_trials: int,
    worker: int = 0,
    share: int | None = None,
    objective: HeldOutR2 | None = None,
) -> None:
    """Optimise in this process until the study holds `n_trials` complete trials, running at most
    `share` of them here. Worker `i` seeds its sampler with `tune.seed + i`: with one shared seed every
    worker's sampler draws the same α sequence (TPE's random start-up draws depend on the seed alone),
    so n workers would mostly evaluate duplicate trials."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t = params.tune
    objective = objective or build_objective(params, pair_name)  # spawned workers build their own
    study = optuna.load_study(
        study_name=name, storage=params.optuna_storage(), sampler=optuna.samplers.TPESampler(seed=t.seed + worker)
    )
    callbacks: list[Any] = [MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))]
    remaining = n_trials - len(study.get_trials(states=(TrialState.COMPLETE,)))
    if share is not None:
        remaining = min(remaining, share)
    if remaining <= 0:
        return
    if run_id is not None:
        callbacks.append(_log_trial)
    with _in_run(params, run_id):
        study.optimize(
            alpha_trial(objective, t.alpha_min, t.alpha_max),
            n_trials=remaining,
            callbacks=callbacks,
            show_progress_bar=False,
        )


@contextmanager
def _in_run(params: Params, run_id: str | None) -> Iterator[None]:
    """Make `run_id` the active MLflow run: already so in the stage's process; a spawned worker
    process reopens it (and closes it after). No run: nothing to do."""
    if run_id is None:
        yield
        return
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    setup(RunContext.from_params(params))
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run()


def _log_trial(study: Any, trial: Any) -> None:
    """Each Optuna trial as a run nested under the pair's run (what optuna-integration's
    deprecated MLflowCallback did, without its experiment handling)."""
    import mlflow

    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.set_tags({"ato.kind": "trial", "optuna.study": study.study_name})
        mlflow.log_params(trial.params)
        if trial.value is not None:
            mlflow.log_metric("val_r2", trial.value)
