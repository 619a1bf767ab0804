"""`context.gram_dtype: float32` on real residual streams: the products formed in float32 about a shift
and summed in float64 give the float64 path's fits (src/ato/context_pass.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ato.context_pass import ContextPair, stream_split
from ato.corpus import embedded_corpus_file, tokenize_document
from ato.math.ridge import HeldOutR2Weighted, RidgePath
from ato.models import load_prepared
from ato.store import StoredSequence


def _real_sequences(tokenizer, n: int) -> list[StoredSequence]:
    docs = json.loads(embedded_corpus_file().read_text())  # title → {"title", "extract", …}
    seqs = []
    for doc in list(docs.values())[:n]:
        ids = np.asarray(tokenize_document(tokenizer, doc["extract"], 128), dtype=np.int64)
        special = np.zeros(len(ids), dtype=bool)
        special[0] = True
        seqs.append(StoredSequence(ids, special, len(seqs)))
    return seqs


@pytest.mark.integration
def test_float32_products_give_the_float64_fits(real_model_dir):
    """Layer 5 → 6 of the embedded Gemma with its prefix and routed inputs (p = 3·640): the validation
    R²_w of the ridge path agrees to 1e-6 at the best α of the search range (1e-4 at every α), the sums
    to float64 rounding."""
    model, tokenizer, _ = load_prepared(real_model_dir)
    seqs = _real_sequences(tokenizer, 96)
    d = int(model.config.hidden_size)
    pair = ContextPair("L05_k1", 5, 1, torch.zeros(d))
    halves = np.repeat([0, 1], [64, len(seqs) - 64])  # slice 0 fits, slice 1 is held out
    got = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float64):
            stats = stream_split(model, tokenizer, seqs, [pair], 0, 8, halves, product_dtype=dtype).stats["L05_k1"]
            path = RidgePath.from_stats(stats[0])
            score = HeldOutR2Weighted.of(path, stats[1])
            got[dtype] = (stats, [score(a) for a in np.logspace(-3, 7, 11)])
    (s32, r32), (s64, r64) = got[torch.float32], got[torch.float64]
    assert s32[0].n == s64[0].n > 2 * 3 * d  # n > 2p
    np.testing.assert_allclose(s32[0].sum_x, s64[0].sum_x, rtol=1e-9, atol=1e-6)
    best = int(np.argmax(r64))
    assert int(np.argmax(r32)) == best and 0.3 < r64[best] < 1  # the same α wins; a real fit
    assert abs(r32[best] - r64[best]) < 1e-6, (r32, r64)  # where the stage fits: at the tuned α
    # near OLS (α → 0, n ≈ 2p here) the Gram's conditioning shows: ~1e-5, still far below any interval
    assert np.max(np.abs(np.subtract(r32, r64))) < 1e-4, (r32, r64)
