"""The LM-head loss (ato.lm_head): the in-place NLL of the reused buffer against cross_entropy."""

from __future__ import annotations

import pytest
import torch

from ato.lm_head import chunked_nll
from conftest import tiny_model


@pytest.mark.parametrize("cap", [None, 5.0])
def test_the_in_place_nll_equals_cross_entropy_across_chunk_shapes_and_modes(cap):
    """Without autograd the NLL reuses one buffer (rows of several sizes, in and out of inference mode:
    a buffer made in one must stay writable in the other); with autograd it is the plain cross_entropy
    path. Both equal cross_entropy of the softcapped logits."""
    model = tiny_model("llama")
    model.config.final_logit_softcapping = cap
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 32, generator=gen) * 4
    targets = torch.randint(0, 128, (23,), generator=gen)
    logits = model.lm_head(hidden)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="none").detach()
    with torch.inference_mode():
        first = chunked_nll(model, hidden, targets, chunk_rows=10)  # chunks of 10, 10, 3
    with torch.no_grad():
        second = chunked_nll(model, hidden, targets, chunk_rows=16)
    grad = chunked_nll(model, hidden.requires_grad_(), targets, chunk_rows=7)
    for got in (first, second, grad.detach()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
