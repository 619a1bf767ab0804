"""Layer n is the output of decoder block n, captured by hooks, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from ato.models import (
    UnsupportedArchitectureError,
    base_model,
    capture_residuals,
    decoder_blocks,
    layer_block,
    patch_residual,
    run_captured,
)
from conftest import tiny_model

ARCHS = ["gemma3", "gemma2", "llama", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_capture_equals_the_models_own_block_outputs(arch):
    model = tiny_model(arch)
    ids = torch.randint(4, 100, (2, 9))
    mask = torch.ones_like(ids)
    n = len(decoder_blocks(model))
    with torch.no_grad():
        out = base_model(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with capture_residuals(model, list(range(n)), stop_early=False) as captured:
            base_model(model)(input_ids=ids, attention_mask=mask)
    hidden = out.hidden_states
    for layer in range(n - 1):
        torch.testing.assert_close(captured[layer], hidden[layer + 1], rtol=0, atol=0)
    # The last entry of hidden_states has the final norm applied; the captured one must not.
    assert not torch.allclose(captured[n - 1], hidden[n])
    final_norm = (
        getattr(base_model(model), "norm", None)
        or getattr(base_model(model), "ln_f", None)
        or base_model(model).final_layer_norm
    )
    torch.testing.assert_close(final_norm(captured[n - 1]), hidden[n], rtol=1e-5, atol=1e-5)


def test_early_stop_gives_the_same_capture():
    model = tiny_model("gemma3")
    ids = torch.randint(4, 100, (1, 7))
    with torch.no_grad():
        with capture_residuals(model, [0, 1, 2, 3], stop_early=False) as full:
            base_model(model)(input_ids=ids)
        with capture_residuals(model, [1], stop_early=True) as cut:
            run_captured(base_model(model), input_ids=ids)
    torch.testing.assert_close(cut[1], full[1], rtol=0, atol=0)


def test_patching_with_the_same_value_is_a_no_op_and_zeroing_changes_logits():
    model = tiny_model("llama")
    ids = torch.randint(4, 100, (1, 8))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with patch_residual(model, 1, lambda h: h):
            same = model(input_ids=ids).logits
        with patch_residual(model, 1, torch.zeros_like):
            zeroed = model(input_ids=ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert not torch.allclose(zeroed, clean)


def test_unknown_architecture_and_layer_are_clear_errors():
    model = tiny_model("gpt2")
    with pytest.raises(IndexError, match="layers 0..3"):
        layer_block(model, 4)
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedArchitectureError, match="mystery"):
        decoder_blocks(model)


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    import time

    from ato.models import ModelLoadError, load_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_source("google/gemma-2-2b")
    assert time.perf_counter() - t0 < 10
