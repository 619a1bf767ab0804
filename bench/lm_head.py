"""Benchmark of the causal stages' LM head (issue 23): float32 against bf16 (`causal.lm_head_dtype`) on the
real prepared model, beside the body forward of the same batch, in the same run.

One default batch (`causal.batch_size` 8 × `causal.seq_len` 64 TEST-like tokens): the body forward to the
final norm, then the per-token NLL of its 8 × 63 predictions through the LM head (rows × 640 × 262144, in
`causal.loss_chunk_tokens` chunks) in each dtype; interleaved repeats, medians. Prints the head's share of
a pass and the float32 / bf16 ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/lm_head.py --model-dir models/base [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch

log = logging.getLogger("bench.lm_head")


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    from ato.causal import token_nll
    from ato.lm_head import set_lm_head_dtype
    from ato.models import final_hidden, load_prepared

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="models/base")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, _tok, _info = load_prepared(args.model_dir, "cpu")
    ids = torch.randint(3, model.config.vocab_size, (8, 64))
    times: dict[str, list[float]] = {"body": [], "float32": [], "bfloat16": []}
    with torch.no_grad():
        hidden = final_hidden(model, ids)
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            times["body"].append(_seconds(lambda: final_hidden(model, ids)))
            for dtype in ("float32", "bfloat16"):
                if set_lm_head_dtype(model, dtype) != dtype:
                    raise SystemExit("this machine has no native bf16: nothing to compare")
                times[dtype].append(_seconds(lambda: token_nll(model, ids, 256, hidden=hidden)))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    log.info("threads %d, %d repeats, medians over one 8 × 64 batch:", args.threads, args.repeats)
    log.info("  body forward          %.3f s", med["body"])
    for dtype in ("float32", "bfloat16"):
        share = med[dtype] / (med[dtype] + med["body"])
        log.info("  LM head %-9s     %.3f s  (%.0f %% of body + head)", dtype, med[dtype], 100 * share)
    log.info("  float32 / bf16 head   %.2f×", med["float32"] / med["bfloat16"])


if __name__ == "__main__":
    main()
