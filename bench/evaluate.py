"""Benchmark `ato evaluate` for one pair, and the rank sweep: one decomposition vs per-rank re-estimation.

    .venv/bin/python bench/evaluate.py --params params.yaml --pair L05_k1
    .venv/bin/python bench/evaluate.py --synthetic [--d 640] [--train-tokens 65536] [--test-tokens 16384]

Prints a table with
* wall time and peak RSS of the evaluate stage for one pair (run in a child process, so the peak
  belongs to evaluate alone), on the project's store or on a synthetic project built in a temp dir;
* the cost of the references of issue 11 per pair: held-out CCA, the Wishart null and η's linear
  reference at `evaluate.null_replicates`;
* the η(r) sweep (SVD truncation and RRR, train and test) computed the pipeline's way — one CCA,
  one SVD of W, one set of moments per split, every rank from cumulative sums — against the naive
  way the reference code works: for every rank re-estimate the covariances and whitening, redo the
  SVDs, build W_r explicitly and score it; both in the same run, with their agreement and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
for _k, _v in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}.items():
    os.environ.setdefault(_k, _v)

from ato.math.cca import CCA, efficiency_table, rank_grid  # noqa: E402
from ato.math.stats import PairStats  # noqa: E402

# --------------------------------------------------------------------------------------------
# Naive per-rank sweep (what the reference code does: everything re-estimated for every rank)


def _inv_sqrt(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric pseudo-inverse square root and square root (eigenvalues ≤ d·eps·λ_max dropped)."""
    lam, vec = np.linalg.eigh((cov + cov.T) / 2)
    lam = np.clip(lam, 0, None)
    ok = lam > lam.max() * len(lam) * np.finfo(float).eps
    safe = np.where(ok, lam, 1.0)
    return (vec * np.where(ok, 1 / np.sqrt(safe), 0.0)) @ vec.T, (vec * np.where(ok, np.sqrt(safe), 0.0)) @ vec.T


def _naive_r2w(stats: PairStats, A: np.ndarray, mx: np.ndarray, my: np.ndarray, W: np.ndarray) -> float:
    """Whitened R² of (W_r, b_r = ȳ − W_r x̄) on a split by explicit matrix algebra."""
    b = my - W @ mx
    n = stats.n
    # Σ (y − Wx − b)(…)ᵀ from the raw sums, then whiten and trace
    e = (
        stats.yty
        - W @ stats.xty
        - stats.xty.T @ W.T
        + W @ stats.xtx @ W.T
        - np.outer(stats.sum_y - W @ stats.sum_x, b)
        - np.outer(b, stats.sum_y - W @ stats.sum_x)
        + n * np.outer(b, b)
    )
    _, _, cyy = stats.centred()
    return 1.0 - np.trace(A @ e @ A) / np.trace(A @ cyy @ A)


def naive_sweep(train: PairStats, test: PairStats, W: np.ndarray, ranks: list[int]) -> dict:
    out = {k: [] for k in ("ceiling", "eta_svd_train", "eta_svd_test", "eta_rrr_train", "eta_rrr_test")}
    for r in ranks:
        cxx, cxy, cyy = (m / train.n for m in train.centred())  # re-estimated for every rank
        A, A_inv = _inv_sqrt(cyy)
        B, _ = _inv_sqrt(cxx)
        U, rho, Vt = np.linalg.svd(A @ cxy.T @ B)
        total = float(np.trace(A @ cyy @ A))
        ceiling = float((rho[:r] ** 2).sum() / total)
        Uw, s, Vwt = np.linalg.svd(W)
        W_svd = (Uw[:, :r] * s[:r]) @ Vwt[:r]
        W_rrr = A_inv @ (U[:, :r] * rho[:r]) @ Vt[:r] @ B
        mx, my = train.mean_x, train.mean_y
        out["ceiling"].append(ceiling)
        for name, Wr in (("svd", W_svd), ("rrr", W_rrr)):
            out[f"eta_{name}_train"].append(_naive_r2w(train, A, mx, my, Wr) / ceiling)
            out[f"eta_{name}_test"].append(_naive_r2w(test, A, mx, my, Wr) / ceiling)
    return {k: np.asarray(v) for k, v in out.items()}


def bench_sweep(
    train: PairStats, test: PairStats, W: np.ndarray, n_ranks: int, naive_ranks: int | None
) -> list[tuple[str, str]]:
    d = min(W.shape)
    ranks = rank_grid(d, n_ranks)
    t0 = time.perf_counter()
    cca = CCA.from_stats(train)
    fast = efficiency_table(cca, W, train, test, ranks)
    t_fast = time.perf_counter() - t0
    sub = (
        ranks
        if not naive_ranks or naive_ranks >= len(ranks)
        else [ranks[i] for i in np.unique(np.linspace(0, len(ranks) - 1, naive_ranks).round().astype(int))]
    )
    t0 = time.perf_counter()
    slow = naive_sweep(train, test, W, sub)
    t_slow = time.perf_counter() - t0
    idx = [ranks.index(r) for r in sub]
    diff = max(float(np.nanmax(np.abs(fast[k][idx] - slow[k]))) for k in slow)
    t_slow_all = t_slow * len(ranks) / len(sub)  # extrapolated to the full sweep when subsampled
    return [
        ("rank sweep: d, ranks", f"{d}, {len(ranks)} ({ranks[0]}…{ranks[-1]})"),
        ("sweep, one decomposition", f"{t_fast:.3f} s"),
        (
            "sweep, naive per-rank",
            f"{t_slow:.3f} s over {len(sub)} ranks"
            + (f" (≈{t_slow_all:.1f} s for all {len(ranks)})" if len(sub) < len(ranks) else ""),
        ),
        ("speed-up (naive / one decomposition)", f"{t_slow_all / t_fast:.1f}×"),
        ("max |η difference| fast vs naive", f"{diff:.2e}"),
    ]


def bench_references(train: PairStats, test: PairStats, replicates: int) -> list[tuple[str, str]]:
    """Cost of what issue 11 added per pair: held-out CCA, the Wishart null, η's linear reference."""
    from threadpoolctl import threadpool_limits

    from ato.math.heldout import cca_null, heldout_from_cca
    from ato.math.linear_reference import linear_reference

    cca = CCA.from_stats(train)
    sizes = (int(train.n), int(test.n), cca.d_in, cca.d_out)
    t0 = time.perf_counter()
    heldout_from_cca(cca, test)
    t_heldout = time.perf_counter() - t0
    with threadpool_limits(limits=1, user_api="blas"):  # as the stage runs them (ato.evaluate.references.transport)
        t0 = time.perf_counter()
        cca_null(*sizes, 0.9, replicates, 0)
        t_null = time.perf_counter() - t0
        t0 = time.perf_counter()
        linear_reference(1.0, cca.rho, *sizes, replicates=replicates, seed=0)
        t_linear = time.perf_counter() - t0
    return [
        ("held-out CCA (train directions on test)", f"{t_heldout:.3f} s"),
        (f"Wishart null, {replicates} replicates, 1 thread", f"{t_null:.2f} s ({t_null / replicates:.2f} s each)"),
        (f"linear ref., {replicates} replicates, 1 thread", f"{t_linear:.2f} s ({t_linear / replicates:.2f} s each)"),
    ]


# --------------------------------------------------------------------------------------------
# The stage for one pair, in a child process (clean peak RSS)


def _child(params_path: str, pair: str) -> None:
    """Runs in the child: the stage body for one pair, timing MLflow logging and figures apart."""
    from ato.evaluate import scores
    from ato.params import load_params
    from ato.stages import evaluate

    timed = {"mlflow": 0.0, "figures": 0.0, "references": 0.0}

    def wrap(fn, key):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timed[key] += time.perf_counter() - t

        return inner

    evaluate._log_mlflow = wrap(evaluate._log_mlflow, "mlflow")
    scores.transport = wrap(scores.transport, "references")
    for name in ("plot_efficiency", "plot_feature_r2", "plot_dim_r2"):
        setattr(evaluate, name, wrap(getattr(evaluate, name), "figures"))
    params = load_params(params_path)
    t0 = time.perf_counter()
    evaluate.evaluate_pair(params, pair)
    print("__TIMES__", json.dumps({"wall": time.perf_counter() - t0, **timed}))


def bench_stage(params_path: Path, pair: str) -> list[tuple[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(params_path), "--pair", pair], env=env, capture_output=True, text=True
    )
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"evaluate failed for {pair} (exit {proc.returncode})")
    times = json.loads(next(line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("__TIMES__")))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    timed_parts = ("mlflow", "figures", "references")
    return [
        ("evaluate wall (stage body)", f"{times['wall']:.2f} s"),
        ("  of which MLflow logging", f"{times['mlflow']:.2f} s"),
        ("  of which figures", f"{times['figures']:.2f} s"),
        ("  of which ceiling, sweep, held-out CCA, null, linear ref.", f"{times['references']:.2f} s"),
        ("  data pass + scores (rest)", f"{times['wall'] - sum(times[k] for k in timed_parts):.2f} s"),
        ("evaluate wall (process, incl. imports)", f"{total:.2f} s"),
        ("evaluate peak RSS (process)", f"{peak_mb:.0f} MiB"),
    ]


# --------------------------------------------------------------------------------------------
# Synthetic project


def build_synthetic(root: Path, d: int, n_train: int, n_test: int, rank: int, seed: int = 0) -> Path:
    """A project with a synthetic store (test split streamed by evaluate), stats, operator, TopK SAE
    and features, laid out exactly as the pipeline leaves them. Returns the params path."""
    import yaml
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from ato.artifacts import FeatureScores, FeatureSet, Layout, PairStatsMeta, write_json_atomic, write_pair_stats
    from ato.math.ridge import ridge_fit
    from ato.operators import save_operator
    from ato.params import load_params
    from ato.store import STORE_FORMAT, layer_key, write_part

    pair, L, T = "L05_k1", 5, 6
    (root / "params.yaml").write_text(yaml.safe_dump({"pairs": {pair: {"L": L, "k": 1}}}))
    params = load_params(root / "params.yaml")
    layout = Layout.from_params(params)
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) * np.logspace(0, -1.5, d)
    W_true = 0.6 * np.eye(d) + rng.normal(size=(d, rank)) @ rng.normal(size=(rank, d)) / d
    offset = rng.normal(size=d) * 5

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, d)) @ mix * 10 + offset
        return x, x @ W_true.T + rng.normal(size=(n, d)) * 0.5 + 1.0

    digest = f"synthetic-{d}-{seed}"
    chunk = 8192
    stats = {}
    for split, n in (("train", n_train), ("val", max(chunk, n_test)), ("test", n_test)):
        s = PairStats.zeros(d, d)
        parts, part_tokens = [], []
        for i, start in enumerate(range(0, n, chunk)):
            m = min(chunk, n - start)
            x, y = draw(m)
            s.update(x, y)
            if split == "test":
                pos = (np.arange(m) % 128 + 1).astype(np.int32)  # no BOS rows in the synthetic store
                write_part(
                    params.path("store") / split,
                    i,
                    {
                        layer_key(L): x.astype(np.float32),
                        layer_key(T): y.astype(np.float32),
                        "token_id": np.zeros(m, np.int32),
                        "doc_id": np.zeros(m, np.int32),
                        "position": pos,
                        "special": np.zeros(m, bool),
                    },
                    chunk_tokens=2048,
                )
                parts.append(f"part-{i:05d}.zarr")
                part_tokens.append(m)
        stats[split] = s
        meta = PairStatsMeta(store_digest=digest, include_bos=False, split=split, pair=pair, layer_in=L, layer_out=T)
        write_pair_stats(layout.pair_stats(split, pair), s, meta)
        stats[split + "_parts"] = (parts, part_tokens)
    splits = {
        split: {
            "tokens": int(stats[split].n),
            "special_tokens": 0,
            "sequences": 0,
            "documents": 0,
            "parts": stats[split + "_parts"][0],
            "part_tokens": stats[split + "_parts"][1],
        }
        for split in ("train", "val", "test")
    }
    write_json_atomic(
        params.path("store") / "manifest.json",
        {
            "format": STORE_FORMAT,
            "model": {
                "name": "synthetic",
                "source": "synthetic",
                "model_type": "none",
                "weights_digest": "synthetic",
                "n_layers": T + 1,
                "d_model": d,
            },
            "tokenizer": {"bos_token_id": None, "pad_token_id": None, "vocab_size": 1, "special_ids": []},
            "layers": [L, T],
            "d_model": d,
            "dtype": "float32",
            "hook": "synthetic",
            "corpus": {},
            "splits": splits,
            "fingerprint": digest,
            "content_digest": digest,
        },
    )
    W, b = ridge_fit(stats["train"], 1.0)
    save_operator(
        params.path("operators") / pair,
        W,
        b,
        {
            "model": "synthetic",
            "model_digest": "synthetic",
            "layer_in": L,
            "layer_out": T,
            "alpha": 1.0,
            "method": "ridge",
            "d_model": d,
            "n_train_tokens": int(stats["train"].n),
            "store_digest": digest,
        },
    )
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=params.sae.width, k=params.sae.k, dtype="float32", device="cpu"))
    sae.save_model(params.path("sae_dir") / f"layer_{T:02d}")
    kept = sorted(
        rng.choice(
            params.sae.width, size=max(1, int(params.select.keep_fraction * params.sae.width)), replace=False
        ).tolist()
    )
    no_scores = FeatureScores(*([] for _ in range(6)))
    FeatureSet(layer=T, ranked=kept, kept=kept, scores=no_scores).write(layout.feature_set(T))
    return root / "params.yaml"


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--pair", default="L05_k1")
    ap.add_argument("--synthetic", action="store_true", help="build a synthetic project in a temp dir")
    ap.add_argument("--d", type=int, default=640, help="synthetic d_model")
    ap.add_argument("--train-tokens", type=int, default=65536)
    ap.add_argument("--test-tokens", type=int, default=16384)
    ap.add_argument("--rank", type=int, default=64, help="planted low-rank part of the synthetic operator")
    ap.add_argument(
        "--naive-ranks",
        type=int,
        default=0,
        help="time the naive sweep on this many of the ranks only (0: all) and extrapolate",
    )
    ap.add_argument("--skip-stage", action="store_true", help="only the rank-sweep comparison")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.pair)
        return 0

    from ato.artifacts import Layout, read_pair_stats
    from ato.params import load_params

    tmp = None
    if args.synthetic:
        tmp = tempfile.TemporaryDirectory(prefix="ato-bench-evaluate-")
        t0 = time.perf_counter()
        params_path = build_synthetic(Path(tmp.name), args.d, args.train_tokens, args.test_tokens, args.rank)
        print(f"synthetic project built in {time.perf_counter() - t0:.1f} s at {tmp.name}", file=sys.stderr)
        pair = "L05_k1"
    else:
        params_path = Path(args.params).resolve()
        pair = args.pair
        store = load_params(params_path).path("store") / "manifest.json"
        if not store.exists():
            raise SystemExit(f"{store} not found: run the pipeline up to `ato fit`, or use --synthetic")
    params = load_params(params_path)
    if pair not in params.pairs:
        raise SystemExit(f"--pair {pair}: not in {params_path} ({', '.join(params.pairs)})")

    rows: list[tuple[str, str]] = [
        ("mode", "synthetic" if args.synthetic else str(params.path("store"))),
        ("pair", pair),
    ]
    if not args.skip_stage:
        rows += bench_stage(params_path, pair)
    from ato.operators import load_operator

    layout = Layout.from_params(params)
    train = read_pair_stats(layout.pair_stats("train", pair))
    test = read_pair_stats(layout.pair_stats("test", pair))
    W = load_operator(params.path("operators") / pair).W.double().numpy()
    rows += bench_sweep(train, test, W, params.evaluate.n_ranks, args.naive_ranks)
    rows += bench_references(train, test, params.evaluate.null_replicates)

    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
