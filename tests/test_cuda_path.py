"""The CUDA path of collect, stats, sae, causal and context (issue 23, `device: cuda`): each step on a
tiny model on the GPU against the same step on the CPU. Skipped only where no CUDA device exists; no
CUDA device was ever lent to this project's sessions, so here these tests have never run (the skip
reason says so)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ato.corpus import TokenSequence
from conftest import tiny_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the CUDA path (collect, stats, sae, causal, context) is not exercised",
)

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def _models():
    cpu = tiny_model("gemma3")
    gpu = tiny_model("gemma3").to(GPU)  # the same seeded weights
    return cpu, gpu


def _sequences(n: int = 3, length: int = 12) -> list[TokenSequence]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = [2, *torch.randint(3, 128, (length - 1,), generator=gen).tolist()]
        out.append(TokenSequence(ids, [0] * length, list(range(length)), [i == 0 for i in range(length)]))
    return out


def test_collect_captures_the_same_residuals_on_cuda():
    from ato.residuals import capture_batch

    cpu, gpu = _models()
    seqs = _sequences()
    want = capture_batch(cpu, seqs, [1, 3], 0, CPU)
    got = capture_batch(gpu, seqs, [1, 3], 0, GPU)
    for layer in (1, 3):
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-4, atol=1e-4)


def test_stats_grams_agree_on_cuda():
    from ato.accumulate import LayerStatsAccumulator

    rng = np.random.default_rng(0)
    chunk = {1: rng.normal(size=(50, 8)).astype(np.float32), 3: rng.normal(size=(50, 8)).astype(np.float32)}
    stats = {}
    for device in (CPU, GPU):
        acc = LayerStatsAccumulator({"L01_k2": (1, 3)}, 8, device)
        acc.update(chunk)
        stats[device.type] = acc.pair_stats("L01_k2")
    for field in ("sum_x", "xtx", "xty", "yty"):
        np.testing.assert_allclose(getattr(stats["cuda"], field), getattr(stats["cpu"], field), rtol=1e-10)


def test_the_lm_head_nll_agrees_on_cuda():
    from ato.lm_head import chunked_nll, set_lm_head_dtype

    cpu, gpu = _models()
    hidden, targets = torch.randn(20, 32), torch.randint(0, 128, (20,))
    with torch.inference_mode():
        want = chunked_nll(cpu, hidden, targets, 8)
        for dtype in ("float32", "bfloat16"):
            set_lm_head_dtype(gpu, dtype)  # bf16 where the GPU has it, else float32
            got = chunked_nll(gpu, hidden.to(GPU), targets.to(GPU), 8).cpu()
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_causal_conditions_agree_on_cuda():
    from ato import causal as causal_lib

    cpu, gpu = _models()
    n, length, d = 4, 12, 32
    ids = torch.stack([torch.tensor(s.token_ids) for s in _sequences(n, length)])
    held = causal_lib.HeldOut(ids, torch.zeros(n, length, dtype=torch.bool), list(range(n)), [0] * n)
    specs = {"all": "all"}
    masks = causal_lib.check_position_sets(specs, length)
    sums = {}
    for model, device in ((cpu, CPU), (gpu, GPU)):
        eye, zero = torch.eye(d), torch.zeros(d)
        pair = causal_lib.PairPatch("L01_k1", 1, 2, eye * 0.5, zero, zero, zero)
        conditions = causal_lib.pair_conditions(pair, device)
        results, _ = causal_lib.run_conditions(model, held, 2, conditions, masks, specs, 2, 7, progress=False)
        sums[device.type] = {c: np.sum(s["all"]) for c, s in results["all"].nll_sum.items()}
    for condition, value in sums["cpu"].items():
        assert sums["cuda"][condition] == pytest.approx(value, rel=1e-4), condition


def test_context_grams_and_routed_inputs_agree_on_cuda():
    from ato.context_pass import GramAccumulator
    from ato.routed import context_forward

    cpu, gpu = _models()
    ids = torch.stack([torch.tensor(s.token_ids) for s in _sequences()])
    with torch.inference_mode():
        want = context_forward(cpu, ids, None, [(1, 2)])
        got = context_forward(gpu, ids.to(GPU), None, [(1, 2)])
    torch.testing.assert_close(got.routed[(1, 2)].cpu(), want.routed[(1, 2)], rtol=1e-4, atol=1e-4)
    x, y = torch.randn(40, 24) + 5, torch.randn(40, 8)
    stats = {}
    for device in (CPU, GPU):
        acc = GramAccumulator(24, 8, device, torch.float32, stripe=10, flush_rows=16)
        for rows in (slice(0, 10), slice(10, 40)):
            acc.update(x[rows].to(device), y[rows].to(device))
        stats[device.type] = acc.pair_stats()
    np.testing.assert_allclose(stats["cuda"].xtx, stats["cpu"].xtx, rtol=1e-5)


def test_an_sae_encodes_alike_on_cuda():
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=4))
    x = torch.randn(30, 32)
    with torch.no_grad():
        want = sae.encode(x)
        got = sae.to(GPU).encode(x.to(GPU)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
