"""The routed pass (`ato.routed.context_forward`): block L+j's clean attention pattern applied to layer
L's values, from one forward (docs/method.md#context)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ato.corpus import TokenSequence
from ato.math.ridge import r2_from_stats, ridge_fit
from ato.math.stats import PairStats
from ato.models import base_model, layer_block, load_prepared
from ato.residuals import capture_batch, pad_id_of
from ato.routed import context_forward
from conftest import tiny_model


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def attention_only(model: nn.Module) -> nn.Module:
    """Every block reduced to x + attention(x): MLPs output zero, every norm is the identity. Values and
    outputs scaled ×10: at the init's std 0.02 a block moves ~1% of x, too little to tell maps apart."""
    for layer in base_model(model).layers:
        with torch.no_grad():
            layer.self_attn.v_proj.weight.mul_(10)
            layer.self_attn.o_proj.weight.mul_(10)
        layer.mlp = _Zero()
        layer.input_layernorm = nn.Identity()
        layer.post_attention_layernorm = nn.Identity()
    return model


def self_attention_output(model: nn.Module, block: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Block `block`'s own self-attention output in a plain forward (the model's own attention kernel)."""
    captured = {}

    def keep(_module, _inputs, output) -> None:
        captured["z"] = output[0].detach()

    handle = layer_block(model, block).self_attn.register_forward_hook(keep)
    try:
        with torch.no_grad():
            base_model(model)(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    return captured["z"]


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(4, 120, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2  # BOS
    return ids


def stats_of(forward, L: int, with_routed: bool) -> PairStats:
    x, y = forward.hidden[L][:, 1:], forward.hidden[L + 1][:, 1:]  # BOS is never a target
    if with_routed:
        x = torch.cat([x, forward.routed[(L, 1)][:, 1:, 0]], dim=-1)
    return PairStats.from_data(x.reshape(-1, x.shape[-1]).double().numpy(), y.reshape(-1, y.shape[-1]).double().numpy())


def test_routed_map_is_exact_on_an_attention_only_model_where_the_same_position_map_falls_short():
    model = attention_only(tiny_model("llama"))
    fit_pass = context_forward(model, random_ids(24, 20, seed=1), None, [(1, 1)])
    test_pass = context_forward(model, random_ids(12, 20, seed=2), None, [(1, 1)])
    scores = {}
    for with_routed in (False, True):
        W, b = ridge_fit(stats_of(fit_pass, 1, with_routed), alpha=1e-12)
        scores[with_routed] = r2_from_stats(stats_of(test_pass, 1, with_routed), W, b)["r2_weighted"]
    assert scores[True] > 1 - 1e-6  # y_{L+1} = x_L + z_1: the routed map is exact
    assert scores[False] < 0.95  # what attention moved from other positions is beyond x_t


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_first_routed_input_is_the_blocks_own_attention_output_on_tiny_models(kind):
    model = tiny_model(kind)  # sliding window 8 (Gemma-3) over 20 tokens; 2 heads share 1 kv head
    ids = random_ids(3, 20)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding in one row
    before = model.config._attn_implementation
    forward = context_forward(model, ids, mask, [(1, 1), (0, 3)])
    assert model.config._attn_implementation == before != "eager"  # restored
    assert forward.routed[(0, 3)].shape == (3, 20, 3, 32) and forward.routed[(1, 1)].shape == (3, 20, 1, 32)
    expected = self_attention_output(model, 2, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(forward.routed[(1, 1)][:, :, 0][real], expected[real], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        states = base_model(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in (0, 1, 2):  # HF's last hidden state is after the final norm
        torch.testing.assert_close(forward.hidden[layer][real], states[layer + 1][real], rtol=1e-4, atol=1e-6)
    # a padded row's real tokens get what they get alone
    alone = context_forward(model, ids[1:2, :14], None, [(0, 3)])
    torch.testing.assert_close(forward.routed[(0, 3)][1, :14], alone.routed[(0, 3)][0], rtol=1e-4, atol=1e-6)


def test_routed_inputs_are_causal():
    model = tiny_model("gemma3")
    ids = random_ids(2, 16)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 7) % 120 + 4
    before = context_forward(model, ids, None, [(0, 2)])
    after = context_forward(model, changed, None, [(0, 2)])
    torch.testing.assert_close(after.routed[(0, 2)][:, :9], before.routed[(0, 2)][:, :9], rtol=0, atol=1e-6)
    assert (after.routed[(0, 2)][:, 9:] - before.routed[(0, 2)][:, 9:]).abs().amax() > 1e-4  # it does read them


@pytest.mark.integration
def test_routed_pass_on_the_real_model_matches_its_attention_and_the_store(real_model_dir):
    model, tokenizer, _ = load_prepared(real_model_dir)
    texts = ["The river flows through the old city to the sea.", "Music was first called science by the king."]
    seqs = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        n = len(ids)
        seqs.append(TokenSequence(ids, [0] * n, list(range(n)), [i == 0 for i in range(n)]))
    width = max(len(s.token_ids) for s in seqs)
    ids = torch.full((2, width), pad_id_of(tokenizer))
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.token_ids)], mask[i, : len(s.token_ids)] = torch.tensor(s.token_ids), 1
    forward = context_forward(model, ids, mask, [(5, 1), (4, 2)])
    real = mask.bool()
    expected = self_attention_output(model, 6, ids, mask)[real]
    got = forward.routed[(5, 1)][:, :, 0][real]
    assert (got - expected).norm(dim=-1).max() <= 1e-4 * expected.norm(dim=-1).max()
    recorded = capture_batch(model, seqs, [4, 5, 6], pad_id_of(tokenizer), torch.device("cpu"))
    for layer in (4, 5, 6):
        np.testing.assert_allclose(
            forward.hidden[layer][real].numpy(), recorded[layer], rtol=1e-4, atol=1e-4 * np.abs(recorded[layer]).max()
        )


def test_the_spliced_context_map_reproduces_an_attention_only_block_where_the_identity_does_not():
    """Condition `context` of `ato causal` on an attention-only model: the map [x_t, lags, prefix, z_1] →
    x_t + z_1 is block L+1 itself, so the patched forward is the clean one; the identity (x_t) is not."""
    from ato import causal as causal_lib
    from ato.causal.context import ContextPatch

    model = attention_only(tiny_model("llama"))
    d, n = 32, 4
    held = causal_lib.HeldOut(random_ids(n, 12, seed=3), torch.zeros(n, 12, dtype=torch.bool), list(range(n)), [0] * n)
    specs = {"all": "all"}
    eye, zero, none = torch.eye(d), torch.zeros(d, d), torch.zeros(d)
    exact = ContextPatch(1, 1, 2, torch.cat([eye, zero, zero, zero, eye], dim=1), none, none)  # x_t + z_1
    pair = causal_lib.PairPatch("L01_k1", 1, 2, eye, none, none, none, exact)
    conditions, masks = causal_lib.pair_conditions(pair), causal_lib.check_position_sets(specs, 12)
    results = {
        share: causal_lib.run_conditions(model, held, 2, conditions, masks, specs, 2, 7, share_prefix=share,
                                         progress=False)[0]["all"].nll_sum
        for share in (True, False)  # replayed from the traced forward, or full forwards with a hook
    }  # fmt: skip
    assert results[True]["context"] == results[False]["context"]
    sums = {c: np.sum(s["all"]) for c, s in results[True].items()}
    assert abs(sums["identity"] - sums["clean"]) > 1e-3
    assert abs(sums["context"] - sums["clean"]) < 1e-3 * abs(sums["identity"] - sums["clean"])


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_context_inputs_from_the_traced_residual_equal_the_full_forwards(kind, caplog):
    """The causal condition's stacked inputs from the clean trace's layer-L residual (blocks 0 … L
    skipped, `ato.routed.skipped_blocks`) equal those of the full eager forward; a residual of other
    tokens fails the first batch's check, and every batch then takes the full forward, with a warning."""
    from ato.causal.context import ContextPatch
    from ato.causal.forward import trace_body

    model = tiny_model(kind)  # Gemma-3: sliding window 8 over 20 tokens
    d, L, k = 32, 1, 2
    ids, other = random_ids(3, 20), random_ids(3, 20, seed=9)
    fill = torch.randn(d)

    def patch() -> ContextPatch:
        return ContextPatch(L, k, 2, torch.zeros(d, d * (4 + k)), torch.zeros(d), fill)

    with torch.inference_mode():
        x_L = trace_body(model, ids, [L, L + k], L + k + 1).residuals[L]
        x_other = trace_body(model, other, [L, L + k], L + k + 1).residuals[L]
        good, bad = patch(), patch()
        full = good.inputs(model, ids)
        from_trace = good.inputs(model, ids, x_L)
        assert good.skip_checked is True
        torch.testing.assert_close(from_trace, full, rtol=1e-5, atol=1e-5)
        assert torch.equal(good.inputs(model, ids, x_L), from_trace)  # checked once, then skipped
        assert torch.equal(bad.inputs(model, ids, x_other), full)
    assert bad.skip_checked is False
    assert "every batch runs the full forward" in caplog.text
    assert [type(b).forward for b in base_model(model).layers] == [b.forward.__func__ for b in base_model(model).layers]
