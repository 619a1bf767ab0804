"""Benchmark `ato context` on the first `--tokens` tokens of one split (whole sequences), in one run:

(a) the context statistics pass (every kind of every pair: the union Grams of the stacked inputs) against
    the same-position pass of `ato stats` (`LayerStatsAccumulator` over the stored rows of the same
    tokens); target ≤ 3× its time. The context pass's own forward is timed apart and left out of the ratio.
(b) the routed pattern pass (`ato.routed.context_forward`: eager attention, patterns applied to layer
    L's values) against a bare forward of the same batches (the model's own attention, hooks capturing the
    same layers and stopping after the deepest, as collect runs it), interleaved; target ≥ 0.8 of its
    throughput (`routed_throughput`, written with the routed pass).
(c) with --fit, the fits of the stage per pair (α search and fit of every map, learning curves), to scale
    the stage's cost to the default run.

    .venv/bin/python bench/context.py [--project DIR] [--tokens 4096] [--split train] [--repeats 2] [--fit]

Reads DIR's params.yaml, store, train statistics and prepared model (default: this checkout); writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def stats_pass_seconds(store, split: str, n_rows: int, pairs: dict[str, tuple[int, int]]) -> float:
    """`ato stats`' accumulator over the first `n_rows` non-special stored rows (read, then timed)."""
    import numpy as np

    from ato.accumulate import LayerStatsAccumulator

    acc = LayerStatsAccumulator(pairs, store.d_model)
    chunks, got = [], 0
    for chunk in store.iter_chunks(split, acc.layers, 8192):
        take = min(n_rows - got, len(chunk[acc.layers[0]]))
        chunks.append({layer: np.ascontiguousarray(chunk[layer][:take]) for layer in acc.layers})
        got += take
        if got >= n_rows:
            break
    t0 = time.perf_counter()
    for chunk in chunks:
        acc.update(chunk)
    return time.perf_counter() - t0


def routed_throughput(model, batches: list, pairs: list[tuple[int, int]], repeats: int = 3) -> dict[str, float]:
    """Seconds of the bare forward (the model's own attention, hooks capturing every L and L + k and
    stopping after the deepest, as collect runs it) and of the routed pass over `batches` (medians of
    `repeats`, the two interleaved so that load on the machine hits both alike) and their ratio (bare /
    routed: the routed pass's throughput as a share of the bare forward's)."""
    import torch

    from ato.models import base_model, capture_residuals, run_captured
    from ato.routed import context_forward

    layers = sorted({L for L, _ in pairs} | {L + k for L, k in pairs})

    def bare() -> None:
        with torch.no_grad(), capture_residuals(model, layers):
            for ids, mask in batches:
                run_captured(base_model(model), input_ids=ids, attention_mask=mask, use_cache=False)

    def routed() -> None:
        for ids, mask in batches:
            context_forward(model, ids, mask, pairs)

    timings: dict[str, list[float]] = {"bare": [], "routed": []}
    routed()  # warm-up: the eager path's first call
    for _ in range(repeats):
        for name, run in (("bare", bare), ("routed", routed)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT, help="directory of params.yaml, store, stats, model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--split", default="train")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--fit", action="store_true", help="also time the fits and the budget per pair (c)")
    args = ap.parse_args()
    import numpy as np
    import torch

    from ato.artifacts import Layout
    from ato.context_pass import ContextPair, padded_batches, stream_split
    from ato.models import load_prepared
    from ato.params import load_params
    from ato.residuals import pad_id_of
    from ato.stages.context import fill_of
    from ato.store import ActivationStore, token_sequences

    params = load_params(args.project / "params.yaml")
    layout, cp = Layout.from_params(params), params.context
    store = ActivationStore.open(layout.store)
    model, tokenizer, _ = load_prepared(layout.model_dir)
    pairs = [ContextPair(n, p.L, p.k, fill_of(layout, n, store.digest)) for n, p in params.pairs.items()]
    seqs = token_sequences(store, args.split, args.tokens)
    one_slice = np.zeros(len(seqs), np.int64)
    runs: dict[str, list[float]] = {"stats": [], "context": [], "context_forward": []}
    for _ in range(args.repeats):
        result = stream_split(model, tokenizer, seqs, pairs, cp.lags, cp.batch_size, one_slice, desc="bench",
                              product_dtype=getattr(torch, cp.gram_dtype))  # fmt: skip
        runs["context"].append(result.seconds - result.forward_seconds)
        runs["context_forward"].append(result.forward_seconds)
        runs["stats"].append(
            stats_pass_seconds(store, args.split, result.tokens, {p.name: (p.L, p.target) for p in pairs})
        )
    t = {name: statistics.median(v) for name, v in runs.items()}
    batches = [(b.ids, b.mask) for b in padded_batches(seqs, cp.batch_size, pad_id_of(tokenizer))]
    t |= routed_throughput(model, batches, [(p.L, p.k) for p in pairs], args.repeats)
    n = result.tokens
    print(f"context bench: {len(seqs)} {args.split} sequences, {n} target tokens, {len(pairs)} pairs, "
          f"lags {cp.lags}, {torch.get_num_threads()} threads, median of {args.repeats}\n")  # fmt: skip
    print("| pass | seconds | tok/s |\n|---|---:|---:|")
    rows = [
        ("stats: same-position Grams of every pair (stored rows)", t["stats"]),
        (f"context: union Grams of every pair (stacking + {cp.gram_dtype} products)", t["context"]),
        ("context: its forward pass (routed)", t["context_forward"]),
        ("bare forward, same batches, same captures and depth", t["bare"]),
        ("routed pattern pass (context_forward)", t["routed"]),
    ]
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} | {n / seconds:,.0f} |")
    d = store.d_model
    union = sum((d * (2 + cp.lags + p.k)) ** 2 + 2 * d * d * (2 + cp.lags + p.k) + d * d for p in pairs)
    same = d * d * (len({p.L for p in pairs} | {p.target for p in pairs}) + len(pairs))
    print(
        f"\n(a) context Grams / stats Grams: {t['context'] / t['stats']:.2f} (target ≤ 3); the union Grams "
        f"multiply-add {union / same:.1f}× the stats pass's products per row, in {cp.gram_dtype} (stats: float64)"
    )
    print(f"(b) routed pass throughput / bare forward: {t['bare'] / t['routed']:.3f} (target ≥ 0.8)")
    if args.fit:
        fit_table(result, pairs, store.d_model, cp)


def fit_table(result, pairs, d: int, cp) -> None:
    """(c): every map's α search, fit and learning curve per pair, on this pass's statistics (standing in
    for train, val and test alike: the cost depends on p, not on the rows)."""
    from ato.context_budget import fit_kinds

    print("\n| pair | p (context) | fits + curves, s |\n|---|---:|---:|")
    for pair in pairs:
        stats = result.stats[pair.name]
        t0 = time.perf_counter()
        fits = fit_kinds(stats, stats[0], stats[0], d, cp.lags, pair.k, cp)
        print(f"| {pair.name} | {len(fits['context'].columns)} | {time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
    main()
