"""The public splice (`ato.splice`) on tiny random models of every supported architecture: replacing a
residual with its exact target changes nothing, a wrong operator changes the right things, a
mismatched model is refused, the model is restored on exit and after an exception, and the causal
stage's patched forward is the same computation."""

from __future__ import annotations

import pytest
import torch

import ato
from ato import causal
from ato.models import decoder_blocks
from ato.operators import Operator, save_operator
from ato.splicing import SpliceError, check_model, position_mask, spliced
from conftest import save_prepared, tiny_model, tiny_tokenizer

KINDS = ["gemma3", "gemma2", "llama", "gpt2", "gpt_neox"]
L, T = 1, 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(4, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2
    return ids


def _config(d: int, **extra) -> dict:
    base = {"model": "tiny", "model_digest": None, "layer_in": L, "layer_out": T, "alpha": 1.0, "method": "ridge"}
    return {**base, "d_model": d, "n_train_tokens": 1, "store_digest": "x", **extra}


def _identity_blocks(model, blocks: tuple[int, ...]) -> None:
    """Zero every block's output projections (and their biases) so its output equals its input."""
    out_proj = ("o_proj", "down_proj", "c_proj", "attention.dense.", "dense_4h_to_h")
    with torch.no_grad():
        for j in blocks:
            for name, p in decoder_blocks(model)[j].named_parameters():
                if any(k in name for k in out_proj):
                    p.zero_()


def _residuals(model, ids, layers):
    trace = causal.trace_body(model, ids, layers, replay_from=len(decoder_blocks(model)))
    return trace.residuals


def _no_hooks(model) -> bool:
    return all(not b._forward_hooks and not b._forward_pre_hooks for b in decoder_blocks(model))


@pytest.mark.parametrize("kind", KINDS)
def test_replace_with_the_exact_target_gives_identical_logits(kind):
    """Blocks L+1..T made the identity: y_T = x_L exactly, so splicing the identity operator is the
    exact target, and the logits are bit for bit the clean ones; a non-identity operator changes them."""
    model = tiny_model(kind)
    _identity_blocks(model, (2, 3))
    ids = _ids()
    d = int(model.config.hidden_size)
    with torch.inference_mode():
        res = _residuals(model, ids, [L, T])
        assert torch.equal(res[L], res[T])  # the premise: blocks 2 and 3 carry their input unchanged
        clean = model(input_ids=ids).logits
        with ato.splice(model, Operator(torch.eye(d), torch.zeros(d), _config(d))) as state:
            same = model(input_ids=ids).logits
        shift = torch.randn(d, generator=torch.Generator().manual_seed(1))  # not constant: LayerNorm removes that
        with ato.splice(model, Operator(torch.eye(d), shift, _config(d))):
            shifted = model(input_ids=ids).logits
    assert state.forwards == 1 and state.n_patched == ids.numel() - ids.shape[0]  # every position but BOS
    assert torch.equal(same, clean)
    assert (shifted - clean).abs().max() > 1e-3
    assert torch.equal(shifted[:, 0], clean[:, 0])  # BOS is never patched ("all")
    assert _no_hooks(model)


@pytest.mark.parametrize("kind", KINDS)
def test_an_operator_fitted_exactly_to_this_input_reproduces_the_clean_logits(kind):
    """Unmodified model: W with W x_i = y_i for every patched row of this input (minimum-norm least
    squares, rows < d) is the exact target up to float rounding; a shifted one is not."""
    model = tiny_model(kind)
    ids = _ids(2, 8)
    d = int(model.config.hidden_size)
    mask = position_mask("all", *ids.shape)
    with torch.inference_mode():
        res = _residuals(model, ids, [L, T])
        X, Y = res[L][mask].double(), res[T][mask].double()
        W = torch.linalg.lstsq(X, Y, driver="gelsd").solution.T  # [d, d], X Wᵀ = Y (14 rows < 32 dims)
        assert torch.allclose(X @ W.T, Y, atol=1e-6 * Y.abs().max())
        clean = model(input_ids=ids).logits
        with ato.splice(model, Operator(W.float(), torch.zeros(d), _config(d))):
            exact = model(input_ids=ids).logits
        bias = torch.randn(d, generator=torch.Generator().manual_seed(1))  # a scale would be normalised away
        with ato.splice(model, Operator(W.float(), bias, _config(d))):
            off = model(input_ids=ids).logits
    torch.testing.assert_close(exact, clean, rtol=0, atol=1e-4)
    assert (off - clean).abs().max() > 1e-2


def test_positions_and_causality():
    """Only the named positions are patched, and predictions before the first one are untouched."""
    model = tiny_model("gemma3")
    ids = _ids(2, 12)
    d = int(model.config.hidden_size)
    op = Operator(torch.zeros(d, d), torch.ones(d), _config(d))
    with torch.inference_mode():
        clean = model(input_ids=ids).logits
        with ato.splice(model, op, positions=[6, 9]) as state:
            late = model(input_ids=ids).logits
        mask = torch.zeros(12, dtype=torch.bool)
        mask[[6, 9]] = True
        with ato.splice(model, op, positions=mask):
            by_mask = model(input_ids=ids).logits
        with ato.splice(model, op, positions="every") as every:
            model(input_ids=ids)
    assert state.n_patched == 4 and every.n_patched == ids.numel()
    assert torch.equal(late[:, :6], clean[:, :6]) and (late[:, 6:] - clean[:, 6:]).abs().max() > 1e-3
    assert torch.equal(by_mask, late)
    with pytest.raises(SpliceError, match=r"positions \[12\] outside"):
        position_mask([3, 12], 1, 12)
    with pytest.raises(SpliceError, match="expected 'all'"):
        position_mask("most", 1, 12)


def test_add_delta_mode():
    """add-delta: h ← h + (op(x) − x). The identity operator leaves the model exactly as it is; where
    blocks L+1..T are the identity, add-delta equals replace."""
    model = tiny_model("llama")
    ids = _ids()
    d = int(model.config.hidden_size)
    g = torch.Generator().manual_seed(3)
    op = Operator(torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g), _config(d))
    ident = Operator(torch.eye(d), torch.zeros(d), _config(d))
    with torch.inference_mode():
        clean = model(input_ids=ids).logits
        with ato.splice(model, ident, mode="add-delta"):
            unchanged = model(input_ids=ids).logits
        with ato.splice(model, op, mode="add-delta"):
            added = model(input_ids=ids).logits
        _identity_blocks(model, (2, 3))
        with ato.splice(model, op, mode="add-delta"):
            on_identity = model(input_ids=ids).logits
        with ato.splice(model, op, mode="replace"):
            replaced = model(input_ids=ids).logits
    assert torch.equal(unchanged, clean)
    assert (added - clean).abs().max() > 1e-3
    torch.testing.assert_close(on_identity, replaced, rtol=0, atol=1e-4)
    with pytest.raises(SpliceError, match="mode 'swap'"):
        with ato.splice(model, op, mode="swap"):  # type: ignore[arg-type]
            pass


# --------------------------------------------------------------------------------------------
# Checks and restoration


def test_a_mismatched_model_is_refused_before_any_hook(tmp_path):
    model = tiny_model("gemma3")  # 4 layers, hidden size 32
    cases = [
        (_config(64), r"d_model=64, the model's hidden size is 32"),
        (_config(32, layer_out=5), r"layers 1→5 do not exist in a model of 4 layers"),
        (_config(32, n_layers=18), r"fitted on a model of 18 layers, this one has 4"),
    ]
    for config, message in cases:
        d = config["d_model"]
        with pytest.raises(SpliceError, match=message):
            with ato.splice(model, Operator(torch.eye(d), torch.zeros(d), config)):
                pytest.fail("the block must not run")
        assert _no_hooks(model)
    # The weights digest: known for a model loaded from a prepared directory, or given explicitly.
    from transformers import AutoModelForCausalLM

    from ato.artifacts import ModelInfo

    directory = save_prepared(model, tiny_tokenizer(), tmp_path / "base", "tiny-gemma3")
    digest = ModelInfo.read(directory / "ato_model.json").weights_digest
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    wrong = Operator(torch.eye(32), torch.zeros(32), _config(32, model_digest="0" * 64))
    message = r"fitted on model weights 000000000000…, but this model's are " + digest[:12]
    with pytest.raises(SpliceError, match=message):
        with ato.splice(loaded, wrong):
            pass
    with pytest.raises(SpliceError, match="fitted on model weights"):
        check_model(model, wrong.config, model_digest=digest)
    with ato.splice(loaded, wrong, model_digest=None):  # the digest check can be switched off
        pass
    right = Operator(torch.eye(32), torch.zeros(32), _config(32, model_digest=digest))
    with ato.splice(loaded, right) as state:
        loaded(input_ids=_ids())
    assert state.forwards == 1 and _no_hooks(loaded)


def test_the_model_is_restored_after_an_exception():
    model = tiny_model("gpt2")
    ids = _ids()
    d = int(model.config.hidden_size)
    op = Operator(torch.zeros(d, d), torch.ones(d), _config(d))
    with torch.inference_mode():
        clean = model(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="user code failed"):
            with ato.splice(model, op):
                assert (model(input_ids=ids).logits - clean).abs().max() > 1e-3
                raise RuntimeError("user code failed")
        assert _no_hooks(model)
        assert torch.equal(model(input_ids=ids).logits, clean)
        # an error inside the hook itself (positions beyond this input) also leaves no hook behind
        with pytest.raises(SpliceError, match="outside an input of 10 tokens"):
            with ato.splice(model, op, positions=[3, 11]):
                model(input_ids=ids)
        assert _no_hooks(model)
        assert torch.equal(model(input_ids=ids).logits, clean)


def test_splice_loads_an_operator_directory_and_its_variant(tmp_path):
    model = tiny_model("gemma3")
    ids = _ids()
    d = 32
    g = torch.Generator().manual_seed(5)
    W, b = torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g)
    variant = Operator(torch.eye(d), torch.zeros(d), _config(d, variant="identity", method="identity"))
    directory = save_operator(tmp_path / "op", W, b, _config(d), variants={"identity": variant})
    with torch.inference_mode():
        with ato.splice(model, Operator(W, b, _config(d))):
            direct = model(input_ids=ids).logits
        with ato.splice(model, directory):
            from_dir = model(input_ids=ids).logits
        with ato.splice(model, directory, variant="identity"):
            ident = model(input_ids=ids).logits
        with ato.splice(model, variant):
            ident_direct = model(input_ids=ids).logits
    assert torch.equal(direct, from_dir) and torch.equal(ident, ident_direct)
    assert not torch.equal(ident, from_dir)


def test_the_causal_patched_forward_is_the_public_splice():
    """`causal.patched_token_nll` (the causal stage's hook path) gives the NLL of a forward under
    `ato.splice` with the same operator and positions, bit for bit."""
    model = tiny_model("gemma3")
    ids = _ids(3, 12)
    d = 32
    g = torch.Generator().manual_seed(7)
    W, b = torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g)
    patch = position_mask("all", 3, 12).clone()
    patch[1, 4] = False  # a special token in the causal stage: not patched
    with torch.inference_mode():
        internal = causal.patched_token_nll(model, ids, L, T, patch, lambda x: torch.nn.functional.linear(x, W, b), 5)
        with ato.splice(model, Operator(W, b, _config(d)), positions=patch):
            public = causal.token_nll(model, ids, 5)
        with spliced(model, T, lambda x: torch.nn.functional.linear(x, W, b), patch.nonzero(as_tuple=True), L):
            rows = causal.token_nll(model, ids, 5)
    assert torch.equal(internal, public) and torch.equal(public, rows)


def test_another_model_of_the_same_shape_is_refused_by_its_embedding_fingerprint():
    """Without a prepared directory there is no weights digest; the embedding fingerprint recorded at fit
    time still tells the fitted model (in any dtype) from another one of the same width and depth."""
    from transformers import AutoModelForCausalLM

    from ato.splicing import embedding_fingerprint
    from conftest import tiny_config

    fitted_on = tiny_model("gemma3")
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(tiny_config("gemma3"), dtype=torch.float32).eval()
    config = _config(32, embedding_fingerprint=embedding_fingerprint(fitted_on))
    op = Operator(torch.eye(32), torch.zeros(32), config)
    with pytest.raises(SpliceError, match="input embedding .* differs from the fitted model's"):
        with ato.splice(other, op):
            pytest.fail("the block must not run")
    assert _no_hooks(other)
    with pytest.warns(UserWarning, match="strict=False: splicing anyway"), ato.splice(other, op, strict=False):
        other(input_ids=_ids())
    with ato.splice(fitted_on, op):  # the model itself, and a bfloat16 copy of it, pass
        fitted_on(input_ids=_ids())
    with ato.splice(tiny_model("gemma3").to(torch.bfloat16), op):
        pass
    # an operator saved before the fingerprint existed still splices, with a warning
    older = Operator(torch.eye(32), torch.zeros(32), _config(32))
    with pytest.warns(UserWarning, match="records no embedding fingerprint"), ato.splice(other, older):
        other(input_ids=_ids())


@pytest.mark.parametrize("kind", ["gemma3", "llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_the_fingerprint_read_from_the_weights_file_equals_the_loaded_models(tmp_path, kind, stored):
    """`ato fit` fingerprints the prepared model from its safetensors file without building the model:
    the same values as the model `load_prepared` builds (float32, whatever dtype the file stores), and
    the input embedding, not the (untied, in GPT-NeoX) output one."""
    from ato.models import load_prepared, prepared_input_embedding
    from ato.splicing import embedding_fingerprint, weight_fingerprint

    directory = save_prepared(tiny_model(kind).to(stored), tiny_tokenizer(), tmp_path / kind, f"tiny-{kind}")
    embedding = prepared_input_embedding(directory)
    assert embedding is not None and embedding.dtype == stored
    assert weight_fingerprint(embedding) == embedding_fingerprint(load_prepared(directory)[0])


def test_a_checkpoint_whose_names_say_no_embedding_reads_none(tmp_path):
    from safetensors.torch import save_file

    from ato.models import prepared_input_embedding

    save_file({"encoder.tokens.weight": torch.ones(4, 2)}, str(tmp_path / "model.safetensors"))
    assert prepared_input_embedding(tmp_path) is None
