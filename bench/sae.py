"""Benchmark the `sae` stage's two costs, each against a peer measured in the same run:

- the data pass (`ato.sae.data.model_tokens`: forward up to the deepest target layer, residuals of
  the non-special tokens copied out) against a bare forward of the same batches cut at the same
  layer (no copies), and against a full forward of the body (what stopping early saves);
- SAE training tokens/s (sae-lens `SAETrainer`, the default width / k / batch) against sae-lens'
  own dense `TopKTrainingSAE` step in the same loop.

    .venv/bin/python bench/sae.py [--tokens 8192] [--steps 30] [--repeats 3]

Needs the prepared model (`ato prepare`) and params.yaml's corpus (TRAIN documents only).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]


def _sequences(params, tokenizer, n_tokens: int):
    from ato.corpus import Corpus
    from ato.sae.data import further_sequences

    out, got = [], 0
    for seq in further_sequences(Corpus(params.corpus, params.root), tokenizer, 0):
        out.append(seq)
        got += len(seq.token_ids)
        if got >= n_tokens:
            return out
    return out


def _bare(model, seqs, layers, batch_size: int, stop: bool) -> float:
    """tokens/s of the same length-sorted batches, forward only (cut at the deepest layer if `stop`)."""
    import torch

    from ato.models import base_model, capture_residuals, run_captured

    block = batch_size * 8  # model_tokens sorts by length within blocks of this many sequences
    order = [s for i in range(0, len(seqs), block) for s in sorted(seqs[i : i + block], key=lambda s: len(s.token_ids))]
    n, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            width = max(len(s.token_ids) for s in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(batch):
                ids[j, : len(s.token_ids)] = torch.tensor(s.token_ids)
                mask[j, : len(s.token_ids)] = 1
            if stop:
                with capture_residuals(model, [max(layers)]):
                    run_captured(base_model(model), input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
            n += int(mask.sum())
    return n / (time.perf_counter() - t0)


def _data_pass(model, seqs, layers, batch_size: int, pad_id: int) -> float:
    from ato.sae.data import model_tokens

    n = sum(len(s.token_ids) for s in seqs)  # every token of the same sequences passes the model
    kept = sum(len(s.token_ids) - sum(s.special) for s in seqs)
    _, _, seconds = model_tokens(model, iter(seqs), layers, kept, pad_id, batch_size)
    return n / seconds


def _training(sp, d: int, steps: int, dense: bool) -> float:
    import torch

    import ato.sae.training as training
    from ato.sae.data import shuffled_batches

    data = torch.randn(16384, d) * 3 + 1
    sp = dataclasses.replace(sp, steps=steps)
    real = training.build_training_sae
    if dense:  # sae-lens' own class: the dense decoder product in the training step

        def build(*a, **k):
            from sae_lens import TopKTrainingSAE

            return TopKTrainingSAE(real(*a, **k).cfg)

        training.build_training_sae = build
    try:
        _, info = training.train_sae(shuffled_batches(data, sp.batch_tokens, 0), d, sp, 1.0, progress=False)
    finally:
        training.build_training_sae = real
    return info["train_tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from ato.models import load_prepared
    from ato.params import load_params

    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params(ROOT / "params.yaml")
    sp, layers = params.sae, params.target_layers()
    model, tokenizer, _ = load_prepared(params.path("model_dir"))
    pad_id = tokenizer.pad_token_id or 0
    seqs = _sequences(params, tokenizer, args.tokens)
    _bare(model, seqs[:8], layers, sp.forward_batch_size, True)  # warm-up
    rates: dict[str, list[float]] = {"cut": [], "full": [], "data": [], "train": [], "dense": []}
    for _ in range(args.repeats):
        rates["cut"].append(_bare(model, seqs, layers, sp.forward_batch_size, True))
        rates["data"].append(_data_pass(model, seqs, layers, sp.forward_batch_size, pad_id))
        rates["full"].append(_bare(model, seqs, layers, sp.forward_batch_size, False))
        rates["train"].append(_training(sp, model.config.hidden_size, args.steps, dense=False))
        rates["dense"].append(_training(sp, model.config.hidden_size, args.steps, dense=True))
    m = {k: statistics.median(v) for k, v in rates.items()}
    rows = [
        (f"bare forward cut after layer {max(layers)} (same batches)", f"{m['cut']:,.0f} tok/s"),
        (f"SAE data pass (layers {layers}: forward + copies)", f"{m['data']:,.0f} tok/s"),
        ("  ratio to bare (target ≥ 0.85)", f"{m['data'] / m['cut']:.3f}"),
        ("bare forward of the whole body (no cut)", f"{m['full']:,.0f} tok/s"),
        (f"SAE training, width {sp.width}, k {sp.k}, batch {sp.batch_tokens}", f"{m['train']:,.0f} tok/s"),
        ("  sae-lens dense TopKTrainingSAE step, same loop", f"{m['dense']:,.0f} tok/s"),
        (
            f"default stage estimate: {sp.tokens:,} tokens, {sp.steps} steps × {len(layers)} layers",
            f"data ≤ {sp.tokens / m['data']:,.0f} s + training "
            f"{len(layers) * sp.steps * sp.batch_tokens / m['train']:,.0f} s",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nbench/sae.py  (median of {args.repeats}; {args.tokens:,} tokens; {torch.get_num_threads()} threads)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
