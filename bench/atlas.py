"""Benchmark the transport atlas (`ato atlas`): the joint banded Gram against the number of pairs,
compared in the same run with the `stats` stage's path; the fits with shared per-layer factors against
per-pair decompositions; the mean-Jacobian estimator's cost per token per direction; peak RSS.

    .venv/bin/python bench/atlas.py                              # the project's store and model
    .venv/bin/python bench/atlas.py --parts 1 --k 1,2,4 --separate 4 --directions 4,16

Statistics (float64, the first `--parts` parts of the train split, read through a manifest view):

* joint    — `accumulate_banded`: one pass; per layer one matmul X_Lᵀ[X_L, X_{L+1}, …, X_{L+k}]
* stats    — `accumulate_local` (the `stats` stage's engine) over the same pairs in one pass: one Gram
             per layer plus one cross product per pair, separate matmuls
* separate — `accumulate_local` for one pair at a time (a pass per pair, 3 d² blocks per token): the
             cost a per-pair pipeline pays; measured on `--separate` pairs, per pair

FLOPs per token of a shared pass: 2·d²·(layers + pairs), so the per-pair cost falls towards one d²
block as pairs share Grams; a separate pass costs 3 blocks per pair. Fits: `fit_atlas` (each layer
decomposed once) against `CCA.from_stats` + `RidgePath.from_stats` per pair. Jacobian: one probe of
layer `--layer` through the next k_max blocks on `--sequences` × `--seq-len` train tokens, for each
`--directions` r (3r + 3 tangents); cost per token per direction = seconds / (tokens · r).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
for _k, _v in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ato.accumulate import accumulate_banded, accumulate_local  # noqa: E402
from ato.atlas import fit_atlas, load_model, plan, torch_threads  # noqa: E402
from ato.causal import load_sequences, trace_body  # noqa: E402
from ato.math.cca import CCA  # noqa: E402
from ato.math.jacobian import probe  # noqa: E402
from ato.math.ridge import RidgePath  # noqa: E402
from ato.params import AtlasParams, pair_name  # noqa: E402
from ato.store import ActivationStore  # noqa: E402


def prefix_view(store: ActivationStore, split: str, n_parts: int) -> ActivationStore:
    """The same store with `split` cut to its first `n_parts` parts (manifest only; nothing copied)."""
    info = store.split_info(split)
    sizes = info.part_tokens[:n_parts]
    cut = dataclasses.replace(info, parts=info.parts[:n_parts], part_tokens=sizes, tokens=int(sum(sizes)))
    manifest = dataclasses.replace(store.manifest, splits={**store.manifest.splits, split: cut})
    return ActivationStore(store.root, manifest)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def bench_statistics(store: ActivationStore, ks: list[int], n_separate: int, chunk: int) -> None:
    layers, d = store.layers, store.d_model
    print(f"\nstatistics: {store.n_tokens('train')} train tokens (BOS included in the count), d = {d}, float64")
    print(f"{'k_max':>5} {'pairs':>5} {'joint s':>8} {'s/pair':>7} {'stats s':>8} {'s/pair':>7} "
          f"{'separate s/pair':>15} {'joint GFLOP/s':>13} {'RSS GB':>7}")  # fmt: skip
    for k in ks:
        pairs = plan(layers, k)
        acc, t_joint = timed(accumulate_banded, store, "train", layers, k, chunk, False)
        named = {pair_name(L, T - L): (L, T) for L, T in pairs}
        _, t_stats = timed(accumulate_local, store, "train", named, chunk, False)
        some = dict(list(named.items())[:n_separate])
        t0 = time.perf_counter()
        for name, lt in some.items():
            accumulate_local(store, "train", {name: lt}, chunk, False)
        t_sep = (time.perf_counter() - t0) / max(1, len(some))
        gflops = 2 * d * d * (len(layers) + len(pairs)) * acc.n / t_joint / 1e9
        print(f"{k:>5} {len(pairs):>5} {t_joint:>8.1f} {t_joint / len(pairs):>7.2f} {t_stats:>8.1f} "
              f"{t_stats / len(pairs):>7.2f} {t_sep:>15.2f} {gflops:>13.1f} {peak_rss_gb():>7.2f}")  # fmt: skip


def bench_fits(store: ActivationStore, k: int, chunk: int, n_separate: int) -> None:
    grams = {s: accumulate_banded(store, s, store.layers, k, chunk, False) for s in ("train", "test")}
    ap = AtlasParams(k_max=k, null_replicates=1)
    fits, t_shared = timed(fit_atlas, grams, ap)
    pairs = grams["train"].pairs[:n_separate]
    t0 = time.perf_counter()
    for L, T in pairs:  # what each pair costs without shared factors (decompositions only)
        st = grams["train"].pair_stats(L, T)
        CCA.from_stats(st)
        RidgePath.from_stats(st)
    t_sep = (time.perf_counter() - t0) / max(1, len(pairs))
    print(f"\nfits (k ≤ {k}): {len(fits)} pairs in {t_shared:.1f} s with shared layer factors "
          f"({t_shared / len(fits):.2f} s/pair, every operator and score included; null 1 replicate); "
          f"per-pair decompositions alone: {t_sep:.2f} s/pair")  # fmt: skip


def bench_jacobian(store: ActivationStore, model_dir: Path, layer: int, k: int, args: argparse.Namespace) -> None:
    model = load_model(model_dir, torch.device("cpu"))
    held = load_sequences(store, args.sequences, args.seq_len, split="train")
    mask = ~held.special
    mask[:, 0] = False
    targets = [t for t in store.layers if layer < t <= layer + k]
    with torch.no_grad():
        trace = trace_body(model, held.tokens, [layer, *targets], layer + 1)
    from ato.atlas import block_stack

    f = block_stack(model, trace.calls, layer, targets)
    x = trace.residuals[layer]
    n = int(mask.sum())
    with torch_threads(args.threads), torch.no_grad():
        _, t_fwd = timed(lambda: [f(x) for _ in range(3)])
    print(f"\nJacobian: layer {layer} → {targets}, {n} tokens; forward of the {len(targets)} blocks: {t_fwd / 3:.2f} s")
    print(f"{'r':>4} {'tangents':>8} {'seconds':>8} {'ms/token/direction':>18} {'× forward':>9} {'RSS GB':>7}")
    for r in args.directions:
        V = torch.linalg.qr(torch.randn(x.shape[-1], r))[0]
        with torch_threads(args.threads):
            _, t = timed(probe, f, x, V, mask, torch.Generator().manual_seed(0), args.jvp_chunk)
        per = 1e3 * t / (n * r)
        print(f"{r:>4} {3 * r + 3:>8} {t:>8.1f} {per:>18.2f} {t / (t_fwd / 3):>9.1f} {peak_rss_gb():>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=str(ROOT / "data" / "activations"))
    parser.add_argument("--model", default=str(ROOT / "models" / "base"))
    parser.add_argument("--parts", type=int, default=1, help="train parts (8192 tokens each in the default store)")
    parser.add_argument("--k", default="1,2,4", help="k_max values (pairs: every stored L, k ≤ k_max)")
    parser.add_argument("--separate", type=int, default=3, help="pairs timed with one pass each")
    parser.add_argument("--chunk", type=int, default=2048, help="rows per streamed chunk")
    parser.add_argument("--jvp-chunk", type=int, default=32, help="tangents per vmapped jvp")
    parser.add_argument("--layer", type=int, default=4, help="input layer of the Jacobian probe")
    parser.add_argument("--directions", default="4,16", help="probed directions r")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the Jacobian (atlas.threads)")
    parser.add_argument("--skip-jacobian", action="store_true")
    args = parser.parse_args()
    args.directions = [int(r) for r in args.directions.split(",")]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    store = prefix_view(ActivationStore.open(args.store), "train", args.parts)
    store = prefix_view(store, "test", 1)
    ks = [int(k) for k in args.k.split(",")]
    bench_statistics(store, ks, args.separate, args.chunk)
    bench_fits(store, max(ks), args.chunk, args.separate)
    if not args.skip_jacobian:
        bench_jacobian(store, Path(args.model), args.layer, max(ks), args)
    versions = f"numpy {np.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    print(f"\npeak RSS {peak_rss_gb():.2f} GB; {versions}")


if __name__ == "__main__":
    main()
