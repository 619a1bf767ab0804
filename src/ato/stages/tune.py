"""Stage `tune`: one Optuna study per (L, k) over the ridge penalty α.

The objective is the validation R² (uniform average over output dimensions, as the reference
reports), computed exactly from the val split's sufficient statistics; or, with
`tune.objective: kfold`, the mean over K blocked folds of contiguous training documents. One
eigendecomposition per fold prices every α, so a trial costs two d×d products. Studies live in an
Optuna RDB storage (SQLite by default), so an interrupted study resumes and several worker
processes — or machines, with a PostgreSQL URL — can share it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from dataclasses import dataclass

import numpy as np

from ..math.ridge import RidgePath, r2_from_stats
from ..math.stats import PairStats
from ..params import Params, section_dict
from ..tracking import sqlite_init_lock
from ..store import ActivationStore, write_json_atomic
from .stats import load_pair_stats


@dataclass
class Objective:
    """Validation R² as a function of α over one or more (fit stats, held-out stats) folds."""

    folds: list[tuple[RidgePath, PairStats]]

    def __call__(self, alpha: float) -> float:
        return float(np.mean([r2_from_stats(held, *path.solve(alpha))["r2"] for path, held in self.folds]))


def kfold_stats(params: Params, pair_name: str, k: int) -> list[tuple[PairStats, PairStats]]:
    """(train-minus-fold, fold) statistics for K blocks of contiguous training documents."""
    pair = params.pairs[pair_name]
    store = ActivationStore.open(params.path("store"))
    n_docs = int(store.split_info("train")["documents"])
    rank: dict[int, int] = {}  # documents are stored contiguously, so first appearance = stored order
    d = store.d_model
    folds = [PairStats.zeros(d, d) for _ in range(k)]
    for chunk in store.iter_chunks("train", [pair.L, pair.target], params.stats.chunk_tokens,
                                   include_special=params.stats.include_bos, with_tokens=True):
        for doc in chunk["doc_id"].tolist():
            rank.setdefault(doc, len(rank))
        fold_ids = np.array([rank[doc] * k // n_docs for doc in chunk["doc_id"].tolist()])
        for f in np.unique(fold_ids):
            rows = fold_ids == f
            folds[f].update(chunk[pair.L][rows], chunk[pair.target][rows])
    total = folds[0]
    for f in folds[1:]:
        total = total.merge(f)
    minus = lambda a, b: PairStats(*(getattr(a, n) - getattr(b, n) for n in ("n", "sum_x", "sum_y", "xtx", "xty", "yty")))  # noqa: E731
    return [(minus(total, fold), fold) for fold in folds]


def build_objective(params: Params, pair_name: str) -> Objective:
    t = params.tune
    if t.objective == "kfold":
        return Objective([(RidgePath.from_stats(fit, t.standardize), held)
                          for fit, held in kfold_stats(params, pair_name, t.kfold)])
    train = load_pair_stats(params, "train", pair_name)
    val = load_pair_stats(params, "val", pair_name)
    return Objective([(RidgePath.from_stats(train, t.standardize), val)])


def study_name(params: Params, pair_name: str) -> str:
    """Same data and search settings → same study (resumed); anything else → a new study."""
    store = ActivationStore.open(params.path("store"))
    t = section_dict(params.tune)
    for key in ("n_workers", "curve_points"):
        t.pop(key)
    ident = json.dumps({"store": store.digest, "tune": t, "bos": params.stats.include_bos}, sort_keys=True)
    return f"ato-{pair_name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _log_trial(study, trial) -> None:
    """Each Optuna trial as a run nested under the pair's run (what optuna-integration's
    deprecated MLflowCallback did, without its experiment handling)."""
    import mlflow

    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.set_tags({"ato.kind": "trial", "optuna.study": study.study_name})
        mlflow.log_params(trial.params)
        if trial.value is not None:
            mlflow.log_metric("val_r2", trial.value)


def _run_worker(params: Params, pair_name: str, name: str, run_id: str | None, n_trials: int,
                worker: int = 0, share: int | None = None, objective: Objective | None = None) -> None:
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
    study = optuna.load_study(study_name=name, storage=params.optuna_storage(),
                              sampler=optuna.samplers.TPESampler(seed=t.seed + worker))
    callbacks = [MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))]
    remaining = n_trials - len(study.get_trials(states=(TrialState.COMPLETE,)))
    if share is not None:
        remaining = min(remaining, share)
    if remaining <= 0:
        return
    started = False
    if run_id is not None:
        import mlflow

        from ..tracking import setup

        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:  # a spawned worker process
            setup(params)
            mlflow.start_run(run_id=run_id)
            started = True
        callbacks.append(_log_trial)
    try:
        study.optimize(lambda trial: objective(trial.suggest_float("alpha", t.alpha_min, t.alpha_max, log=True)),
                       n_trials=remaining, callbacks=callbacks, show_progress_bar=False)
    finally:
        if started:
            mlflow.end_run()


def tune_pair(params: Params, pair_name: str, run_id: str | None = None) -> dict:
    """Run (or resume) the pair's study; return the chosen α, its R², and the α → R² curve."""
    import optuna

    t = params.tune
    name = study_name(params, pair_name)
    storage = params.optuna_storage()
    if storage.startswith("sqlite:///"):
        params.root.joinpath(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with sqlite_init_lock(storage):
        optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                            sampler=optuna.samplers.TPESampler(seed=t.seed))
    objective = build_objective(params, pair_name)  # serves the in-process trials and the curve
    t0 = time.perf_counter()
    if t.n_workers == 1:
        _run_worker(params, pair_name, name, run_id, t.n_trials, objective=objective)
    else:
        # Split the remaining trials between the workers: with MaxTrialsCallback alone, workers that
        # finish trials at the same moment overshoot `n_trials` by up to n_workers − 1.
        done = len(optuna.load_study(study_name=name, storage=storage).get_trials(
            states=(optuna.trial.TrialState.COMPLETE,)))
        remaining = max(0, t.n_trials - done)
        shares = [remaining // t.n_workers + (i < remaining % t.n_workers) for i in range(t.n_workers)]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_run_worker, args=(params, pair_name, name, run_id, t.n_trials, i, share))
                 for i, share in enumerate(shares) if share > 0]
        for p in procs:
            p.start()
        for p in procs:
            p.join()  # all of them, so a failing worker never leaves the others running unattended
        codes = [p.exitcode for p in procs if p.exitcode != 0]
        if codes:
            raise RuntimeError(f"tune {pair_name}: {len(codes)} worker(s) failed (exit codes {codes})")
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=storage)
    grid = np.geomspace(t.alpha_min, t.alpha_max, t.curve_points)
    trials = sorted((tr.params["alpha"], tr.value) for tr in study.trials if tr.value is not None)
    return {
        "pair": pair_name,
        "study": name,
        "objective": t.objective,
        "alpha": float(study.best_params["alpha"]),
        "val_r2": float(study.best_value),
        "n_trials": len(trials),
        "tune_seconds": seconds,
        "curve": [{"alpha": float(a), "val_r2": objective(float(a))} for a in grid],
        "trials": [{"alpha": a, "val_r2": v} for a, v in trials],
    }


def plot_curve(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.plot([c["alpha"] for c in result["curve"]], [c["val_r2"] for c in result["curve"]], label="exact curve")
    ax.scatter([c["alpha"] for c in result["trials"]], [c["val_r2"] for c in result["trials"]], s=12,
               color="C1", label="Optuna trials", zorder=3)
    ax.axvline(result["alpha"], color="C2", ls="--", label=f"chosen α = {result['alpha']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("ridge penalty α")
    ax.set_ylabel("validation R² (uniform average)")
    ax.set_title(f"{result['pair']}: α → validation R²")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(params: Params, pair: str | None = None) -> None:
    import mlflow

    from ..tracking import log_flat_metrics, pair_run

    out_dir = params.path("reports") / "tuning"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [pair] if pair else list(params.pairs):
        with pair_run(params, name, "tune") as run:
            result = tune_pair(params, name, run.info.run_id)
            write_json_atomic(out_dir / f"{name}.json", result)
            with open(out_dir / f"{name}_curve.csv", "w") as fh:
                fh.write("alpha,val_r2\n")
                fh.writelines(f"{c['alpha']:.6g},{c['val_r2']:.6f}\n" for c in result["curve"])
            plot_curve(result, out_dir / f"{name}_alpha.png")
            mlflow.log_params({"tune_objective": result["objective"], "tune_n_trials": result["n_trials"],
                               "optuna_study": result["study"]})
            log_flat_metrics({"chosen_alpha": result["alpha"], "val_r2_tuned": result["val_r2"]})
            mlflow.log_artifact(str(out_dir / f"{name}_alpha.png"))
            mlflow.log_artifact(str(out_dir / f"{name}.json"))
        print(f"tune {name}: α = {result['alpha']:.4g}, val R² = {result['val_r2']:.4f} "
              f"({result['n_trials']} trials, {result['tune_seconds']:.1f}s)")
