"""Benchmark sufficient-statistics accumulation (`ato stats`) against the number of tokens and the
number of Dask workers.

    .venv/bin/python bench/scale.py                       # the project's store (data/activations)
    .venv/bin/python bench/scale.py --parts 1,2,4,8 --dask-parts 2 --workers 1,2
    .venv/bin/python bench/scale.py --synthetic           # a synthetic d=640 store in a temp dir

Token counts are growing prefixes of the training split (the first 1, 2, 4, … parts of the store,
read through a manifest view; nothing is copied), so the cost per token is measured on real data.
Every pair of `params.yaml` is accumulated in one pass, as `ato stats` does: one Gram per layer that
is an input or target (shared by the pairs using it) and one cross product per pair, in float64.

FLOPs per token = 2·d²·(layers with a Gram + pairs) (+ O(d) sums, ignored). Printed per run: tokens,
seconds, µs per token, GFLOP/s and GB of float32 residuals read. The local engine's cost per token
must stay flat as tokens grow (streaming, memory ∝ chunk_tokens); the last line says whether it does.
Dask rows exclude the cluster start-up, which is printed on its own (a fixed cost per `ato stats`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

from ato.accumulate import accumulate_dask, accumulate_local, dask_client  # noqa: E402
from ato.params import load_params  # noqa: E402
from ato.store import ActivationStore  # noqa: E402


def prefix_view(store: ActivationStore, split: str, n_parts: int) -> ActivationStore:
    """The same store with `split` cut to its first `n_parts` parts (manifest only; no data copied)."""
    info = store.split_info(split)
    part_tokens = info.part_tokens[:n_parts]
    cut = dataclasses.replace(info, parts=info.parts[:n_parts], part_tokens=part_tokens, tokens=int(sum(part_tokens)))
    manifest = dataclasses.replace(store.manifest, splits={**store.manifest.splits, split: cut})
    return ActivationStore(store.root, manifest)


def synthetic_store(directory: Path, d_model: int, n_parts: int, part_tokens: int) -> ActivationStore:
    """A store in `collect`'s exact layout with d=640 residuals (tests/store_factory.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from store_factory import build_store

    max_length = 128
    docs = n_parts * part_tokens // ((4 + max_length) // 2) + 1
    print(
        f"building a synthetic store (d={d_model}, ~{n_parts * part_tokens} train tokens) in {directory} …", flush=True
    )
    build_store(
        directory,
        layers=(0, 1, 2, 3),
        d_model=d_model,
        max_length=max_length,
        part_tokens=part_tokens,
        chunk_tokens=2048,
        split_docs={"train": docs, "val": 2, "test": 2},
    )
    return ActivationStore.open(directory)


def flops_per_token(pairs: dict[str, tuple[int, int]], d: int) -> float:
    gram_layers = {layer for pair in pairs.values() for layer in pair}
    return 2.0 * d * d * (len(gram_layers) + len(pairs))


def row(engine: str, workers: str, tokens: int, seconds: float, fpt: float, n_layers: int, d: int) -> dict:
    return {
        "engine": engine,
        "workers": workers,
        "tokens": tokens,
        "seconds": seconds,
        "us_per_token": seconds / tokens * 1e6,
        "gflops": fpt * tokens / seconds / 1e9,
        "gb_read": tokens * n_layers * d * 4 / 1e9,
    }


def print_table(rows: list[dict]) -> None:
    head = f"{'engine':<7} {'workers':>7} {'tokens':>8} {'seconds':>8} {'µs/token':>9} {'GFLOP/s':>8} {'GB read':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['engine']:<7} {r['workers']:>7} {r['tokens']:>8} {r['seconds']:>8.2f} {r['us_per_token']:>9.1f} "
            f"{r['gflops']:>8.2f} {r['gb_read']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="pairs and the store path come from here")
    ap.add_argument("--synthetic", action="store_true", help="use a synthetic d=640 store, not the project's")
    ap.add_argument("--parts", default="1,2,4", help="training-split prefixes, in parts (default 1,2,4)")
    ap.add_argument("--dask-parts", type=int, default=2, help="prefix (in parts) for the Dask worker sweep")
    ap.add_argument("--workers", default="1,2", help="Dask worker counts (default 1,2; empty: skip Dask)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="default: stats.chunk_tokens")
    ap.add_argument("--max-pairs", type=int, default=None, help="use only the first N pairs of params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    chunk = args.chunk_tokens or params.stats.chunk_tokens
    sizes = sorted({int(s) for s in args.parts.split(",") if s})
    workers = [int(w) for w in args.workers.split(",") if w]
    tmp = None
    if args.synthetic or not (params.path("store") / "manifest.json").exists():
        tmp = tempfile.TemporaryDirectory(prefix="ato-bench-scale-")
        store = synthetic_store(Path(tmp.name) / "store", 640, max(sizes + [args.dask_parts]), 8192)
        pairs = {"L00_k1": (0, 1), "L01_k2": (1, 3), "L00_k3": (0, 3)}
    else:
        store = ActivationStore.open(params.path("store"))
        pairs = {name: (p.L, p.target) for name, p in params.pairs.items()}
        if args.max_pairs:
            pairs = dict(list(pairs.items())[: args.max_pairs])
        store.require_layers(sorted({layer for pair in pairs.values() for layer in pair}), "the benchmark pairs")
    available = len(store.parts("train"))
    sizes = [s for s in sizes if s <= available] or [available]
    d = store.d_model
    n_layers = len({layer for pair in pairs.values() for layer in pair})
    fpt = flops_per_token(pairs, d)
    print(
        f"store {store.root}: d={d}, train parts of {store.split_info('train').part_tokens[0]} tokens; "
        f"{len(pairs)} pairs over {n_layers} layers; {fpt / 1e6:.2f} MFLOP/token; chunk_tokens={chunk}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes share them); "
        f"local engine: {torch.get_num_threads()} torch threads, dask: 1 thread per worker",
        flush=True,
    )

    rows = []
    # Warm the page cache with the largest prefix once, so every timed run reads from memory alike.
    t0 = time.perf_counter()
    view = prefix_view(store, "train", max(sizes + [args.dask_parts]))
    for _ in view.iter_chunks(
        "train", sorted({layer for pair in pairs.values() for layer in pair}), chunk, include_special=True
    ):
        pass
    print(f"warm-up read: {time.perf_counter() - t0:.1f}s", flush=True)

    for n_parts in sizes:
        view = prefix_view(store, "train", n_parts)
        t0 = time.perf_counter()
        accumulate_local(view, "train", pairs, chunk, include_bos=False)
        rows.append(row("local", "-", view.n_tokens("train"), time.perf_counter() - t0, fpt, n_layers, d))
        print_row_progress(rows[-1])

    startup = {}
    if workers:
        view = prefix_view(store, "train", min(args.dask_parts, available))
        for w in workers:
            t0 = time.perf_counter()
            with dask_client(w) as client:
                startup[w] = time.perf_counter() - t0
                t0 = time.perf_counter()
                accumulate_dask(view, "train", pairs, chunk, include_bos=False, client=client)
                rows.append(row("dask", str(w), view.n_tokens("train"), time.perf_counter() - t0, fpt, n_layers, d))
            print_row_progress(rows[-1])

    print()
    print_table(rows)
    if startup:
        print(
            "dask LocalCluster start-up (not in the rows): "
            + ", ".join(f"{w} worker(s) {s:.1f}s" for w, s in startup.items())
        )
    local = [r for r in rows if r["engine"] == "local"]
    if len(local) >= 2:
        spread = max(r["us_per_token"] for r in local) / min(r["us_per_token"] for r in local)
        growth = local[-1]["us_per_token"] / local[0]["us_per_token"]
        verdict = "flat" if spread < 1.25 else "NOT flat"
        print(
            f"local cost per token: {local[0]['tokens']} → {local[-1]['tokens']} tokens changes it ×{growth:.2f} "
            f"(max/min ×{spread:.2f}): {verdict} (threshold ×1.25)"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


def print_row_progress(r: dict) -> None:
    print(
        f"  {r['engine']} workers={r['workers']} tokens={r['tokens']}: {r['seconds']:.2f}s "
        f"({r['us_per_token']:.1f} µs/token, {r['gflops']:.2f} GFLOP/s)",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
