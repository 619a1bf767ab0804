"""Benchmark of stage `causal` on the real prepared model (models/base).

1. Patched vs clean forward on the same batches in the same run (target: patched ≤ 1.15× clean),
   median of several interleaved repeats, both for the full loss pass (body + chunked LM head) and
   for the body alone (where the hook cost is least diluted by the 262k-vocab head).
2. Tokens/s of the whole stage (`ato.stages.causal.main`) on a throw-away project built from the
   embedded corpus: test-split token store, ridge operator + train statistics from a few documents.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/causal.py [--model-dir models/base] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _docs(n: int) -> list[str]:
    from ato.corpus import Corpus
    from ato.params import CorpusParams

    return [d.text for d, _ in zip(Corpus(CorpusParams()), range(n))]


def _batches(tok, docs: list[str], seq_len: int, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    from ato.corpus import tokenize_document

    seqs = [ids for ids in (tokenize_document(tok, t, seq_len) for t in docs) if len(ids) == seq_len]
    need = batch_size * n_batches
    if len(seqs) < need:
        raise SystemExit(f"only {len(seqs)} corpus documents reach {seq_len} tokens; need {need}")
    ids = torch.tensor(seqs[:need])
    return list(ids.split(batch_size))


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_overhead(model, batches, L: int, target: int, chunk: int, repeats: int) -> dict[str, float]:
    from ato import patching
    from ato.models import final_hidden

    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, d, generator=g) / d**0.5
    b = torch.randn(d, generator=g)
    value = patching.condition_values(W, b, b)["ato"]
    res: dict[str, list[float]] = {"clean_full": [], "patched_full": [], "clean_body": [], "patched_body": []}
    with torch.inference_mode():
        # warm-up (allocator, kernels)
        patch = torch.ones_like(batches[0], dtype=torch.bool)
        patch[:, 0] = False
        patching.patched_token_nll(model, batches[0], L, target, patch, value, chunk)
        for _ in range(repeats):  # interleaved so drift in machine load hits both alike
            for ids in batches:
                patch = torch.ones_like(ids, dtype=torch.bool)
                patch[:, 0] = False
                res["clean_full"] += _timed(lambda ids=ids: patching.token_nll(model, ids, chunk), 1)
                res["patched_full"] += _timed(
                    lambda ids=ids, patch=patch: patching.patched_token_nll(model, ids, L, target, patch, value, chunk),
                    1,
                )
                res["clean_body"] += _timed(lambda ids=ids: final_hidden(model, ids), 1)
                res["patched_body"] += _timed(
                    lambda ids=ids, patch=patch: _patched_body(model, ids, L, target, patch, value), 1
                )
    return {**{k: statistics.median(v) for k, v in res.items()}, **{f"{k}_min": min(v) for k, v in res.items()}}


def _patched_body(model, ids, L, target, patch, value):
    from ato.models import capture_residuals, final_hidden, patch_residual

    rows = patch.nonzero(as_tuple=True)
    with capture_residuals(model, [L], stop_early=False) as cap:
        with patch_residual(model, target, lambda h: h.index_put(rows, value(cap[L][rows]))):
            return final_hidden(model, ids)


def build_project(
    root: Path,
    model,
    tok,
    info,
    model_dir: Path,
    L: int,
    k: int,
    docs: list[str],
    n_sequences: int,
    seq_len: int,
    batch_size: int,
) -> Path:
    """A minimal project the stage can run on: test-split tokens, train stats and a ridge operator."""
    import yaml

    from ato.artifacts import Layout, PairStatsMeta, write_json_atomic, write_pair_stats
    from ato.corpus import tokenize_document
    from ato.math.ridge import ridge_fit
    from ato.math.stats import PairStats
    from ato.models import base_model, capture_residuals, run_captured
    from ato.operators import save_operator
    from ato.params import load_params, pair_name
    from ato.store import write_part

    name = pair_name(L, k)
    test = [
        ids for ids in (tokenize_document(tok, t, seq_len) for t in docs[: 4 * n_sequences]) if len(ids) == seq_len
    ][:n_sequences]
    train = docs[4 * n_sequences : 4 * n_sequences + 24]
    arrays = {
        "token_id": np.concatenate(test).astype(np.int32),
        "doc_id": np.repeat(np.arange(len(test)), seq_len).astype(np.int32),
        "position": np.tile(np.arange(seq_len), len(test)).astype(np.int32),
    }
    arrays["special"] = np.isin(arrays["token_id"], tok.all_special_ids)
    store = root / "data" / "activations"
    write_part(store / "test", 0, arrays, 1024)
    n = len(arrays["token_id"])
    write_json_atomic(
        store / "manifest.json",
        {
            "format": "ato-activation-store/1",
            "model": {
                "name": info.name,
                "source": info.source,
                "model_type": info.model_type,
                "weights_digest": info.weights_digest,
                "n_layers": info.n_layers,
                "d_model": info.d_model,
            },
            "tokenizer": {
                "bos_token_id": tok.bos_token_id,
                "pad_token_id": tok.pad_token_id,
                "vocab_size": len(tok),
                "special_ids": sorted(tok.all_special_ids),
            },
            "layers": [L, L + k],
            "d_model": info.d_model,
            "dtype": "float32",
            "hook": "bench",
            "corpus": {},
            "fingerprint": "bench",
            "content_digest": "bench",
            "splits": {
                "test": {
                    "tokens": n,
                    "special_tokens": int(arrays["special"].sum()),
                    "sequences": len(test),
                    "documents": len(test),
                    "parts": ["part-00000.zarr"],
                    "part_tokens": [n],
                }
            },
        },
    )
    stats = PairStats.zeros(info.d_model, info.d_model)
    with torch.inference_mode():
        for text in train:
            ids = tokenize_document(tok, text, 128)
            with capture_residuals(model, [L, L + k]) as cap:
                run_captured(base_model(model), input_ids=torch.tensor([ids]))
            stats.update(cap[L][0, 1:], cap[L + k][0, 1:])  # BOS excluded, as in the stats stage
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "paths": {"model_dir": str(model_dir)},
                "pairs": {name: {"L": L, "k": k}},
                "causal": {"n_sequences": n_sequences, "seq_len": seq_len, "batch_size": batch_size, "device": "cpu"},
            }
        )
    )
    layout = Layout.from_params(load_params(root / "params.yaml"))
    meta = PairStatsMeta(store_digest="bench", include_bos=False, split="train", pair=name, layer_in=L, layer_out=L + k)
    write_pair_stats(layout.pair_stats("train", name), stats, meta)
    W, b = ridge_fit(stats, alpha=1e3)
    save_operator(
        layout.operator(name),
        W,
        b,
        {
            "model": info.name,
            "model_digest": info.weights_digest,
            "layer_in": L,
            "layer_out": L + k,
            "alpha": 1e3,
            "method": "ridge",
            "d_model": info.d_model,
            "n_train_tokens": int(stats.n),
            "store_digest": "bench",
        },
    )
    return root / "params.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "base"))
    ap.add_argument("--L", type=int, default=5)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256, help="causal.loss_chunk_tokens")
    ap.add_argument("--stage-sequences", type=int, default=16, help="sequences for the whole-stage run (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ato.artifacts.causal import PATCHED
    from ato.models import load_prepared
    from ato.params import load_params, pair_name
    from ato.stages import causal

    model_dir = Path(args.model_dir)
    model, tok, info = load_prepared(model_dir, "cpu")
    docs = _docs(400)
    batches = _batches(tok, docs, args.seq_len, args.batch_size, args.batches)
    L, target = args.L, args.L + args.k
    t = bench_overhead(model, batches, L, target, args.chunk, args.repeats)
    tokens = args.batch_size * args.seq_len
    rows = [
        ("full loss pass (body + LM head)", t["clean_full"], t["patched_full"]),
        ("body only (no LM head)", t["clean_body"], t["patched_body"]),
    ]
    print(
        f"\ncausal bench: {info.name}, threads={torch.get_num_threads()}, batch {args.batch_size}×"
        f"{args.seq_len} tokens, pair L={L}→{target}, all non-BOS positions patched, "
        f"median of {args.repeats}×{args.batches} timings"
    )
    print(f"{'pass':34s} {'clean s':>9s} {'patched s':>10s} {'ratio':>7s} {'clean tok/s':>12s} {'patched tok/s':>14s}")
    for label, c, p in rows:
        print(f"{label:34s} {c:9.3f} {p:10.3f} {p / c:7.3f} {tokens / c:12.0f} {tokens / p:14.0f}")
    print(
        f"(fastest single timing, robust to a shared machine: full {t['patched_full_min'] / t['clean_full_min']:.3f}×, "
        f"body {t['patched_body_min'] / t['clean_body_min']:.3f}×)"
    )
    result = {
        "overhead_full": t["patched_full"] / t["clean_full"],
        "overhead_body": t["patched_body"] / t["clean_body"],
        **{f"{k}_s": v for k, v in t.items()},
    }

    if args.stage_sequences:
        with tempfile.TemporaryDirectory() as tmp:
            params_path = build_project(
                Path(tmp),
                model,
                tok,
                info,
                model_dir,
                args.L,
                args.k,
                docs,
                args.stage_sequences,
                args.seq_len,
                args.batch_size,
            )
            params = load_params(params_path)
            t0 = time.perf_counter()
            out = causal.main(params)
            wall = time.perf_counter() - t0
            report = json.loads((Path(tmp) / "reports" / "causal" / f"{pair_name(args.L, args.k)}.json").read_text())
        n_sets = len(params.causal.position_sets)
        fwd_tokens = args.stage_sequences * args.seq_len * (1 + n_sets * len(PATCHED))
        print(
            f"\nwhole stage (main, 1 pair, {args.stage_sequences} seq × {args.seq_len} tok, {n_sets} position "
            f"sets × {len(PATCHED)} conditions + clean, incl. model load, bootstrap, plot, MLflow):"
        )
        print(
            f"  wall {wall:.1f} s; compute loop {report['seconds']:.1f} s; "
            f"{fwd_tokens / wall:.0f} forward tokens/s (whole stage), {report['tokens_per_second']:.0f} (loop); "
            f"{args.stage_sequences * args.seq_len / wall:.1f} held-out tokens/s"
        )
        flat = out[pair_name(args.L, args.k)].headline_metrics()
        shown = ("clean_logppl_all", "ato_delta_all", "zero_delta_all", "recovered_all")
        print(f"  headline: {json.dumps({k: round(flat[k], 4) for k in shown})}")
        result |= {"stage_wall_s": wall, "stage_forward_tokens_per_s": fwd_tokens / wall}
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()
