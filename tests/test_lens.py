"""Splicing where researchers work (`ato.lens`): a TransformerLens HookedTransformer and an nnsight
trace patch exactly what `ato.splice` patches, refuse a model that does not match, and leave nothing
behind; on the real Gemma-3-270M, TransformerLens's `hook_resid_post` is our layer and a spliced
forward gives `ato.splice`'s logits."""

from __future__ import annotations

import warnings

import nnsight
import pytest
import torch
from nnsight import LanguageModel, TransformersModel
from transformer_lens import HookedTransformer, HookedTransformerConfig

import ato
from ato.lens import check_hooked, refuse_centred, splice_hooked, splice_trace
from ato.models import capture_residuals, load_prepared
from ato.operators import Operator
from ato.splicing import SpliceError, weight_fingerprint
from conftest import tiny_model, tiny_tokenizer

L, T, D = 1, 3, 32


def _hooked(normalization: str = "RMS", seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=4, d_model=D, d_head=8, n_heads=4, d_mlp=64, d_vocab=128, n_ctx=32, act_fn="gelu",
        normalization_type=normalization,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def _operator(model_embedding: torch.Tensor, d: int = D, layers: tuple[int, int] = (L, T), seed: int = 1) -> Operator:
    g = torch.Generator().manual_seed(seed)
    W, b = torch.eye(d) + torch.randn(d, d, generator=g) / (4 * d**0.5), torch.randn(d, generator=g) / 4
    config = {
        "model": "tiny", "model_digest": None, "layer_in": layers[0], "layer_out": layers[1], "alpha": 1.0,
        "method": "ridge", "d_model": d, "n_train_tokens": 1, "store_digest": "x",
        "embedding_fingerprint": weight_fingerprint(model_embedding),
    }  # fmt: skip
    return Operator(W, b, config)


def _tokens(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(4, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def _no_hooks(model: HookedTransformer) -> bool:
    return all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_hooked_patches_resid_post_with_the_operator_at_the_named_positions():
    """Inside the block, blocks.T.hook_resid_post = op(blocks.L.hook_resid_post) at every position
    but 0 ("all"), the model's own residual at position 0; add-delta adds op(x) − x."""
    model, tokens = _hooked(), _tokens()
    op = _operator(model.W_E.detach())
    names = [f"blocks.{L}.hook_resid_post", f"blocks.{T}.hook_resid_post"]
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=names)
        with splice_hooked(model, op) as state:
            _, cache = model.run_with_cache(tokens, names_filter=names)
        with splice_hooked(model, op, positions=[4], mode="add-delta"):
            _, delta = model.run_with_cache(tokens, names_filter=names)
    x, expected = cache[names[0]], op(cache[names[0]])
    torch.testing.assert_close(cache[names[1]][:, 1:], expected[:, 1:])
    assert torch.equal(cache[names[1]][:, 0], clean[names[1]][:, 0])
    assert state.forwards == 1 and state.n_patched == tokens.numel() - tokens.shape[0]
    torch.testing.assert_close(delta[names[1]][:, 4], clean[names[1]][:, 4] + expected[:, 4] - x[:, 4])
    assert torch.equal(delta[names[1]][:, 5], clean[names[1]][:, 5])  # position 5 unpatched, earlier blocks clean
    assert _no_hooks(model)


def test_hooked_restores_the_model_after_an_exception():
    model, tokens = _hooked(), _tokens()
    with torch.no_grad():
        clean = model(tokens)
        with pytest.raises(RuntimeError, match="boom"), splice_hooked(model, _operator(model.W_E.detach())):
            model(tokens)
            raise RuntimeError("boom")
        assert _no_hooks(model)
        assert torch.equal(model(tokens), clean)


def test_hooked_refuses_a_model_that_does_not_match():
    model = _hooked()
    mine = model.W_E.detach()
    with pytest.raises(SpliceError, match="d_model=48"):
        check_hooked(model, _operator(mine[:, :1].repeat(1, 48), d=48).config)
    with pytest.raises(SpliceError, match="do not exist"):
        check_hooked(model, _operator(mine, layers=(2, 4)).config)
    other = _hooked(seed=7).W_E.detach() * 3
    with pytest.raises(SpliceError, match="input embedding"):
        check_hooked(model, _operator(other).config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_hooked(model, _operator(other).config, strict=False)
    assert any("strict=False" in str(w.message) for w in caught)
    with pytest.raises(SpliceError, match="from_pretrained_no_processing"):
        check_hooked(_hooked("RMSPre"), _operator(mine).config)


def test_a_centred_residual_is_refused_and_a_raw_one_is_not():
    raw = torch.randn(2, 5, D) + 0.5
    refuse_centred(raw, "raw")
    with pytest.raises(SpliceError, match="centred"):
        refuse_centred(raw - raw.mean(dim=-1, keepdim=True), "centred")


def test_nnsight_trace_gives_the_logits_of_ato_splice_and_leaves_nothing_behind():
    model = tiny_model("gemma3")
    d = int(model.config.hidden_size)
    op = _operator(model.get_input_embeddings().weight.detach(), d=d)
    ids = _tokens()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with ato.splice(model, op, model_digest=None):
            expected = model(input_ids=ids).logits
    lm = TransformersModel(model, tokenizer=tiny_tokenizer(), task="text-generation")
    with torch.no_grad(), lm.trace(ids):
        state = nnsight.save(splice_trace(lm, op, model_digest=None))  # what the trace body keeps
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert (expected - clean).abs().max() > 1e-3 and state.n_patched == ids.numel() - ids.shape[0]
    with pytest.warns(Warning, match="deprecated"), torch.no_grad():  # the older name, a subclass: the same splice
        old = LanguageModel(model, tokenizer=tiny_tokenizer())
    with torch.no_grad(), old.trace(ids):
        splice_trace(old, op, model_digest=None)
        again = old.output.logits.save()
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, clean)


def test_nnsight_refuses_a_model_that_does_not_match():
    model = tiny_model("gemma3")
    op = _operator(torch.randn(300, 48), d=48)
    lm = TransformersModel(model, tokenizer=tiny_tokenizer(), task="text-generation")
    with pytest.raises(SpliceError, match="hidden size"), torch.no_grad(), lm.trace(_tokens()):
        splice_trace(lm, op, model_digest=None)


@pytest.fixture(scope="module")
def real_hooked(real_model_dir):
    model, tokenizer, _ = load_prepared(real_model_dir)
    tl = HookedTransformer.from_pretrained_no_processing(
        "google/gemma-3-270m", hf_model=model, tokenizer=tokenizer, device="cpu", dtype=torch.float32
    )
    return model, tokenizer, tl


@pytest.mark.integration
@pytest.mark.slow
def test_real_model_resid_post_is_our_layer_and_splices_alike(real_hooked):
    """TransformerLens loads the embedded Gemma-3-270M offline; its hook_resid_post at n is the
    residual `ato collect` stores as layer n (same capture code), and an operator spliced through
    TransformerLens gives `ato.splice`'s logits on the HF model."""
    model, tokenizer, tl = real_hooked
    ids = tokenizer("The river runs through the old city, and the bridge is older still.", return_tensors="pt")
    ids = ids.input_ids
    layers = [0, 5, 11, 17]
    with torch.no_grad():
        with capture_residuals(model, layers, stop_early=False) as ours:
            model(input_ids=ids)
        _, cache = tl.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_post"))
        for n in layers:
            theirs = cache[f"blocks.{n}.hook_resid_post"]
            assert (theirs - ours[n]).abs().max() <= 1e-6 * ours[n].abs().max(), n
        op = _operator(model.get_input_embeddings().weight.detach(), d=640, layers=(5, 6))
        with ato.splice(model, op, model_digest=None):
            expected = model(input_ids=ids).logits
        with splice_hooked(tl, op):
            spliced = tl(ids)
        clean = model(input_ids=ids).logits
    assert (expected - clean).abs().max() > 0.1  # the splice does something
    assert (spliced - expected).abs().max() <= 1e-4 * expected.abs().max()
