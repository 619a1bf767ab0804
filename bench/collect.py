"""Benchmark `collect`: tokens/s against a bare forward pass of the same base model on the same
batches (same run), and peak RSS at two corpus sizes (must not grow with the corpus).

    .venv/bin/python bench/collect.py [--tokens 4096] [--repeats 3] [--rss-tokens 16384 49152]

Needs the prepared model (`dvc repro prepare`, or `ato prepare`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]


def make_params(workdir: Path, tokens: int, layers: str | list[int] = "all"):
    import yaml

    from ato.params import load_params

    raw = {
        "paths": {"model_dir": str(ROOT / "models" / "base"), "store": str(workdir / "store")},
        "pairs": {"L05_k1": {"L": 5, "k": 1}},
        "corpus": {"tokens": {"train": tokens, "val": 256, "test": 256}},
        "collect": {"layers": layers, "device": "cpu"},
    }
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(workdir / "params.yaml")


def bare_forward_seconds(params) -> tuple[float, int]:
    """Forward the exact batches collect forms (length-sorted within parts), no hooks, no writes."""
    import torch

    from ato.corpus import Corpus, sequences_for_split
    from ato.models import base_model, load_prepared
    from ato.stages.collect import plan_parts

    model, tok, _ = load_prepared(params.path("model_dir"))
    seqs = list(sequences_for_split(Corpus(params.corpus, params.root), tok, "train"))
    body = base_model(model)
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for part in plan_parts(seqs, params.collect.part_tokens):
            order = sorted(part, key=lambda s: len(s.token_ids))
            for i in range(0, len(order), params.collect.batch_size):
                batch = order[i : i + params.collect.batch_size]
                width = max(len(s.token_ids) for s in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, s in enumerate(batch):
                    ids[j, : len(s.token_ids)] = torch.tensor(s.token_ids)
                    mask[j, : len(s.token_ids)] = 1
                body(input_ids=ids, attention_mask=mask, use_cache=False)
                n += int(mask.sum())
    return time.perf_counter() - t0, n


def collect_seconds(params) -> tuple[float, float, int]:
    """Run the real stage; return (end-to-end seconds, seconds from the first part's forward to the
    end — forward with hooks, reordering, zarr writes overlapped in the writer thread, manifest —
    and tokens). The second excludes model loading and tokenising."""
    import shutil

    from ato.stages import collect

    shutil.rmtree(params.path("store"), ignore_errors=True)
    first = []
    real_part = collect.collect_part

    def marked(*a, **k):
        first.append(time.perf_counter())
        return real_part(*a, **k)

    collect.collect_part = marked
    try:
        t0 = time.perf_counter()
        collect.main(params)
        end = time.perf_counter()
    finally:
        collect.collect_part = real_part
    return end - t0, end - first[0], sum(params.corpus.tokens.values())


def child_rss(tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        params = make_params(Path(tmp), tokens)
        from ato.stages import collect

        collect.main(params)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-tokens", type=int, nargs=2, default=[16384, 49152])
    ap.add_argument("--child-rss", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        child_rss(args.child_rss)
        return
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        params = make_params(Path(tmp), args.tokens)
        bare_forward_seconds(params)  # warm-up: load, allocator, kernels
        bare, ours, steady = [], [], []
        for _ in range(args.repeats):
            s, n_bare = bare_forward_seconds(params)
            bare.append(n_bare / s)
            total, inside, n_ours = collect_seconds(params)
            ours.append(n_ours / total)
            steady.append(n_ours / inside)
    b, o, st = statistics.median(bare), statistics.median(ours), statistics.median(steady)
    rows.append(("bare forward of the same batches (no hooks)", f"{b:,.0f} tok/s"))
    rows.append(("collect, from first forward to done (hooks, copies, writes)", f"{st:,.0f} tok/s"))
    rows.append(("  ratio to bare (target ≥ 0.85)", f"{st / b:.3f}"))
    rows.append(("collect, whole stage incl. model load + tokenising", f"{o:,.0f} tok/s"))
    rows.append(("  ratio to bare", f"{o / b:.3f}"))
    for tokens in args.rss_tokens:
        out = subprocess.run([sys.executable, __file__, "--child-rss", str(tokens)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rss = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        rows.append((f"peak RSS, train corpus of {tokens:,} tokens", f"{rss:,.0f} MB"))
    width = max(len(r[0]) for r in rows)
    print(
        f"\nbench/collect.py  (median of {args.repeats}; {args.tokens:,} train tokens + 512 val/test; "
        f"{torch.get_num_threads()} threads)"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
