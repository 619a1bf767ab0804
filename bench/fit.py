"""Benchmark tune + fit against the reference procedure, Gram throughput, and fit memory.

    .venv/bin/python bench/fit.py [--pair L05_k1] [--max-train 65536]

On the real activation store (data/activations; `dvc repro collect`):
1. ours: streaming statistics (train + val) → Optuna (tune.n_trials, exact val R²) → refit,
   against scikit-learn's GridSearchCV(Ridge(), 8 alphas, cv=5) + refit on the same training
   tokens (the reference code's procedure), in the same run; val R² of both at their chosen α.
2. Gram accumulation GFLOP/s against one plain torch float64 matmul of the same shapes.
3. Peak RSS of stats + fit at 1× and 4× training tokens (separate processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
ALPHAS = [1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5]


def load_params():
    from ato.params import load_params as load

    return load(ROOT / "params.yaml")


def stream_stats(store, split, L, T, max_parts=None, chunk=8192):
    from ato.math.stats import PairStats
    from ato.store import ActivationStore

    parts = store.parts(split)[:max_parts] if max_parts else store.parts(split)
    info = dataclasses.replace(store.split_info(split), parts=[p.name for p in parts])
    manifest = dataclasses.replace(store.manifest, splits={**store.manifest.splits, split: info})
    view = ActivationStore(store.root, manifest)
    s = PairStats.zeros(store.d_model, store.d_model)
    for c in view.iter_chunks(split, [L, T], chunk):
        s.update(c[L], c[T])
    return s


def ours(params, pair) -> dict:
    import optuna

    from ato.math.ridge import RidgePath, r2_from_stats
    from ato.store import ActivationStore

    store = ActivationStore.open(params.path("store"))
    t0 = time.perf_counter()
    train = stream_stats(store, "train", pair.L, pair.target)
    val = stream_stats(store, "val", pair.L, pair.target)
    t_stats = time.perf_counter() - t0
    path = RidgePath.from_stats(train)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    t = params.tune
    study.optimize(
        lambda tr: r2_from_stats(val, *path.solve(tr.suggest_float("alpha", t.alpha_min, t.alpha_max, log=True)))["r2"],
        n_trials=t.n_trials,
    )
    W, b = path.solve(study.best_params["alpha"])
    total = time.perf_counter() - t0
    return {
        "seconds": total,
        "stats_seconds": t_stats,
        "alpha": study.best_params["alpha"],
        "val_r2": r2_from_stats(val, W, b)["r2"],
        "n_train": int(train.n),
    }


def reference(params, pair, max_train: int) -> dict:
    import numpy as np
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    from ato.math.ridge import r2_from_stats
    from ato.store import ActivationStore

    store = ActivationStore.open(params.path("store"))
    t_load = time.perf_counter()
    xs, ys = [], []
    for c in store.iter_chunks("train", [pair.L, pair.target], 8192):
        xs.append(c[pair.L])
        ys.append(c[pair.target])
    X, Y = np.concatenate(xs)[:max_train], np.concatenate(ys)[:max_train]
    load = time.perf_counter() - t_load
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # small-α folds are ill-conditioned; sklearn warns on each
        warnings.simplefilter("ignore")
        search = GridSearchCV(Ridge(), {"alpha": ALPHAS}, cv=5, n_jobs=1).fit(X, Y)
    seconds = time.perf_counter() - t0
    best = search.best_estimator_
    val = stream_stats(store, "val", pair.L, pair.target)
    return {
        "seconds": seconds,
        "load_seconds": load,
        "alpha": best.alpha,
        "n_train": len(X),
        "val_r2": r2_from_stats(val, best.coef_.astype(np.float64), best.intercept_.astype(np.float64))["r2"],
    }


def gram_throughput(params, pair) -> dict:
    import numpy as np
    import torch

    from ato.accumulate import LayerStatsAccumulator
    from ato.store import ActivationStore

    store = ActivationStore.open(params.path("store"))
    chunks = [c for _, c in zip(range(4), store.iter_chunks("train", [pair.L, pair.target], 8192))]
    n = sum(len(c[pair.L]) for c in chunks)
    d = store.d_model
    acc = LayerStatsAccumulator({"p": (pair.L, pair.target)}, d)
    t0 = time.perf_counter()
    for c in chunks:
        acc.update(c)
    ours_s = time.perf_counter() - t0
    flops = 3 * 2 * n * d * d  # XᵀX, YᵀY, XᵀY
    X = torch.from_numpy(np.concatenate([c[pair.L] for c in chunks])).double()
    t0 = time.perf_counter()
    for _ in range(3):
        X.T @ X
    plain_s = time.perf_counter() - t0
    return {"ours_gflops": flops / ours_s / 1e9, "plain_gflops": flops / plain_s / 1e9, "tokens": n}


def child_rss(parts: int, pair_name: str) -> None:
    from ato.math.ridge import RidgePath
    from ato.store import ActivationStore

    params = load_params()
    pair = params.pairs[pair_name]
    store = ActivationStore.open(params.path("store"))
    s = stream_stats(store, "train", pair.L, pair.target, max_parts=parts)
    RidgePath.from_stats(s).solve(10.0)
    print(json.dumps({"tokens": int(s.n), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="L05_k1")
    ap.add_argument("--max-train", type=int, default=65536)
    ap.add_argument("--child-rss", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        child_rss(args.child_rss, args.pair)
        return
    params = load_params()
    pair = params.pairs[args.pair]
    o = ours(params, pair)
    r = reference(params, pair, args.max_train)
    g = gram_throughput(params, pair)
    rss = []
    for parts in (2, 8):
        out = subprocess.run(
            [sys.executable, __file__, "--child-rss", str(parts), "--pair", args.pair], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rss.append(json.loads(out.stdout.strip().splitlines()[-1]))
    tune_fit = o["seconds"] - o["stats_seconds"]
    rows = [
        (
            "ours: stream stats + Optuna + refit",
            f"{o['seconds']:.1f} s",
            f"α={o['alpha']:.3g}",
            f"val R²={o['val_r2']:.4f}",
        ),
        ("  of which streaming statistics (stage stats)", f"{o['stats_seconds']:.1f} s", "", ""),
        ("  of which Optuna + refit (stages tune + fit)", f"{tune_fit:.2f} s", "", ""),
        ("sklearn: load X, Y into memory", f"{r['load_seconds']:.1f} s", "", ""),
        (
            "sklearn GridSearchCV(Ridge, 8 α, cv=5) + refit",
            f"{r['seconds']:.1f} s",
            f"α={r['alpha']:.3g}",
            f"val R²={r['val_r2']:.4f}",
        ),
        ("speed-up, tune+fit vs GridSearchCV+refit (≥ 20×)", f"{r['seconds'] / tune_fit:.1f}×", "", ""),
        ("speed-up, end to end from the store", f"{(r['seconds'] + r['load_seconds']) / o['seconds']:.1f}×", "", ""),
        ("val R² ours − sklearn (target ≥ −0.002)", f"{o['val_r2'] - r['val_r2']:+.4f}", "", ""),
        ("Gram accumulation (float64)", f"{g['ours_gflops']:.1f} GFLOP/s", "", ""),
        ("plain torch float64 XᵀX, same shapes", f"{g['plain_gflops']:.1f} GFLOP/s", "", ""),
        ("  ratio (target ≥ 0.5)", f"{g['ours_gflops'] / g['plain_gflops']:.2f}", "", ""),
        (f"peak RSS stats+fit, {rss[0]['tokens']:,} tokens", f"{rss[0]['peak_rss_mb']:.0f} MB", "", ""),
        (
            f"peak RSS stats+fit, {rss[1]['tokens']:,} tokens",
            f"{rss[1]['peak_rss_mb']:.0f} MB",
            f"ratio {rss[1]['peak_rss_mb'] / rss[0]['peak_rss_mb']:.2f}",
            "(target ≤ 1.10)",
        ),
    ]
    print(f"\nbench/fit.py  pair {args.pair}, {o['n_train']:,} train tokens (sklearn on {r['n_train']:,})")
    for row in rows:
        print(f"  {row[0]:<48} {row[1]:>16} {row[2]:>12} {row[3]}")


if __name__ == "__main__":
    main()
