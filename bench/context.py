"""Benchmark the context maps' passes (issue 22). The routed pattern pass (`ato.routed.context_forward`:
eager attention, every block-between's pattern applied to layer L's values) against a bare forward of
the same batches (the model's own attention, hooks that stop after the same deepest block, as collect
runs it), same run, interleaved: target ≥ 0.8 of the bare forward's throughput.

    .venv/bin/python bench/context.py [--store data/activations] [--model models/base]
                                      [--sequences 32] [--batch-size 8] [--repeats 3]

Reads the store's TEST token ids (so the batches are the pipeline's own sequences) and the pairs of
params.yaml. Needs the prepared model and a collected store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def store_batches(store_root: Path, n_sequences: int, batch_size: int) -> list[tuple[Any, Any]]:
    """(input ids, attention mask) right-padded batches of the first `n_sequences` TEST sequences of the
    store, length-sorted as collect forms them."""
    import numpy as np
    import torch

    from ato.store import ActivationStore

    store = ActivationStore.open(store_root)
    seqs: list[np.ndarray] = []
    for index in range(len(store.parts("test"))):
        group = store.open_part("test", index)
        ids, starts = np.asarray(group["token_id"][:]), np.flatnonzero(np.asarray(group["position"][:]) == 0)
        seqs += np.split(ids, starts[1:])
        if len(seqs) >= n_sequences:
            break
    seqs = sorted(seqs[:n_sequences], key=len)
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids = torch.zeros((len(chunk), max(map(len, chunk))), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = torch.from_numpy(s.astype(np.int64)), 1
        batches.append((ids, mask))
    return batches


def routed_throughput(model: Any, batches: list[tuple[Any, Any]], pairs: list[tuple[int, int]], repeats: int = 3):
    """Seconds of the bare forward and of the routed pass over `batches` (medians of `repeats`, the two
    interleaved so that load on the machine hits both alike) and their ratio (bare / routed: the routed
    pass's throughput as a share of the bare forward's)."""
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

    timings: dict[str, list[float]] = {"bare_s": [], "routed_s": []}
    routed()  # warm-up: the eager path's first call
    for _ in range(repeats):
        for name, run in (("bare_s", bare), ("routed_s", routed)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    bare_s, routed_s = statistics.median(timings["bare_s"]), statistics.median(timings["routed_s"])
    tokens = int(sum(int(mask.sum()) for _, mask in batches))
    return {
        "tokens": tokens,
        "pairs": [list(p) for p in pairs],
        "bare_s": round(bare_s, 3),
        "routed_s": round(routed_s, 3),
        "throughput_ratio": round(bare_s / routed_s, 3),
        "runs": {name: [round(t, 3) for t in ts] for name, ts in timings.items()},
    }


def main() -> None:
    import torch
    import yaml

    from ato.models import load_prepared

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "activations")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [(int(p["L"]), int(p["k"])) for p in yaml.safe_load((ROOT / "params.yaml").read_text())["pairs"].values()]
    model, _tokenizer, _info = load_prepared(args.model)
    batches = store_batches(args.store, args.sequences, args.batch_size)
    print(json.dumps(routed_throughput(model, batches, pairs, args.repeats), indent=2))


if __name__ == "__main__":
    main()
