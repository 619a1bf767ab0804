"""Stage `select`: the feature scores on hand-made cases, the causal effect (first order vs exact
ablation), and the stage's outputs on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ato.math.features import (
    FeatureActivationStats,
    composite_score,
    excess_kurtosis,
    rank_features,
    redundancy_from_correlation,
)
from conftest import load_tiny_params, tiny_model


def random_topk_sae(d_in: int = 32, d_sae: int = 16, k: int = 4, scale: float = 1.0, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0 / math.sqrt(d_in))
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=-1) * scale)
    return sae.eval()


def test_entropy_counts_only_active_positions():
    acts = torch.zeros(8, 3)
    tokens = np.array([5, 5, 5, 5, 6, 7, 8, 9])
    acts[:4, 0] = 1.0  # feature 0: active only on token 5 (inactive positions hold 4 other tokens)
    acts[[0, 4], 1] = 2.0  # feature 1: active on tokens 5 and 6 once each
    acc = FeatureActivationStats(3, top_k=2)
    acc.update(acts[:5], tokens[:5])
    acc.update(acts[5:], tokens[5:])
    h = acc.token_entropy()
    assert h[0] == 0.0
    assert h[1] == pytest.approx(math.log(2))
    assert math.isnan(h[2])  # never active
    np.testing.assert_allclose(acc.activation_rate(), [0.5, 0.25, 0.0])
    assert acc.top_contexts(1) == [(2.0, 0), (2.0, 4)] or acc.top_contexts(1) == [(2.0, 4), (2.0, 0)]
    assert acc.top_contexts(2) == []


def test_redundancy_excludes_self():
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(size=(500, 1))) * (rng.random((500, 1)) < 0.3)
    lone = np.abs(rng.normal(size=(500, 1))) * (rng.random((500, 1)) < 0.3)
    acts = torch.as_tensor(np.concatenate([a, a, lone, np.zeros((500, 1))], axis=1), dtype=torch.float32)
    acc = FeatureActivationStats(4, top_k=0)
    for i in range(0, 500, 128):  # chunked accumulation
        acc.update(acts[i : i + 128], np.zeros(len(acts[i : i + 128]), dtype=np.int64))
    red = acc.redundancy()
    assert red[0] == pytest.approx(1.0, abs=1e-9) and red[1] == pytest.approx(1.0, abs=1e-9)
    assert red[2] < 0.5
    assert red[3] == 0.0  # a dead feature correlates with nothing
    # a single lone feature is never compared with itself
    assert redundancy_from_correlation(torch.ones(1, 1, dtype=torch.float64))[0] == 0.0


def test_vocab_focus_kurtosis():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(1, 20000, generator=g)
    peaked = gauss.clone()
    peaked[0, :5] = 40.0
    k = excess_kurtosis(torch.cat([gauss, peaked]))
    assert abs(float(k[0])) < 0.2 and float(k[1]) > 50
    # invariant to the scale and shift of the logits (so no softmax temperature is involved)
    torch.testing.assert_close(excess_kurtosis(peaked * 7.0 + 3.0), excess_kurtosis(peaked))


def test_composite_and_ranking():
    metrics = {"activation_rate": np.array([0.1, 0.2, 0.3, 0.0]), "redundancy": np.array([0.9, 0.1, 0.5, 0.0])}
    eligible = np.array([True, True, True, False])
    comp = composite_score(metrics, {"activation_rate": 1.0, "redundancy": -1.0}, eligible)
    assert math.isnan(comp[3])
    assert rank_features(comp, eligible, metrics["activation_rate"])[:3] == [1, 2, 0]
    assert rank_features(comp, eligible, metrics["activation_rate"])[3] == 3
    with pytest.raises(KeyError):
        composite_score(metrics, {"nope": 1.0}, eligible)


def _sequences(n: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(8, 14))
        ids = np.concatenate([[2], rng.integers(4, 44, length - 1)])
        out.append((ids, ids == 2))
    return out


def test_causal_effect_zero_direction_and_first_order_vs_exact():
    from ato.sae.effects import exact_effects, first_order_effects

    model = tiny_model().requires_grad_(False)
    sae = random_topk_sae(scale=0.05)  # small contributions: the regime of real SAE features
    with torch.no_grad():
        sae.W_dec[3] = 0.0
    seqs = _sequences()
    approx, clean_loss, n_tok = first_order_effects(model, sae, 1, seqs, batch_size=2, progress=False)
    assert n_tok == sum(len(s[0]) - 1 for s in seqs) and math.isfinite(clean_loss)
    strongest = [int(f) for f in np.argsort(-np.abs(approx))[:3]]
    feats = [3, *strongest]
    exact = exact_effects(model, sae, 1, seqs, feats, batch_size=3)
    assert approx[3] == 0.0 and exact[0] == 0.0  # zero decoder direction → no effect, both ways
    a, e = approx[strongest], exact[1:]
    assert np.all(np.abs(e) > 1e-6)
    np.testing.assert_allclose(a, e, rtol=0.1)  # first order agrees with exact ablation


def test_loss_equals_chunked_cross_entropy_sum():
    """The loss of the causal score (ato.models.chunked_nll) equals the per-chunk
    cross_entropy(reduction="sum") total it replaced, with Gemma's softcapping, in value and gradient."""
    from ato.models import base_model, patch_residual
    from ato.sae import effects

    model = tiny_model().requires_grad_(False)
    model.config.final_logit_softcapping = 3.0  # make the cap bite on the tiny model's logits
    ids, attn, _ = effects.pad_sequences(_sequences(3), torch.device("cpu"))

    def old_loss(h_in: torch.Tensor | None = None) -> torch.Tensor:
        hidden = base_model(model)(input_ids=ids, attention_mask=attn).last_hidden_state
        valid = attn[:, 1:].bool() & attn[:, :-1].bool()
        h, targets = hidden[:, :-1][valid], ids[:, 1:][valid]
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, len(h), 5):
            logits = model.get_output_embeddings()(h[i : i + 5]).float()
            logits = torch.tanh(logits / 3.0) * 3.0
            total = total + torch.nn.functional.cross_entropy(logits, targets[i : i + 5], reduction="sum")
        return total

    old_total = old_loss()
    grads = []
    for fn in (old_loss, lambda: effects.sum_next_token_loss(model, ids, attn)[0]):
        held = {}

        def grab(h, held=held):
            held["h"] = h.detach().requires_grad_(True)
            return held["h"]

        with torch.enable_grad(), patch_residual(model, 1, grab):
            fn().backward()
        grads.append(held["h"].grad)
    effects_chunk = effects.LOSS_CHUNK_TOKENS
    try:
        effects.LOSS_CHUNK_TOKENS = 5
        new_total, n = effects.sum_next_token_loss(model, ids, attn)
    finally:
        effects.LOSS_CHUNK_TOKENS = effects_chunk
    assert n == sum(len(s[0]) - 1 for s in _sequences(3))
    torch.testing.assert_close(new_total, old_total, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_feature_records_round_trip(tmp_path):
    from ato.artifacts import ArtifactError, FeatureContext, FeatureContexts, FeatureScores, FeatureSet, TokenContext

    scores = FeatureScores(*([[0.5, None, 1.0]] * 6))
    fs = FeatureSet(layer=6, ranked=[2, 0, 1], kept=[2], scores=scores, sae_store_digest="abc")
    fs.write(tmp_path / "layer_06.json")
    raw = json.loads((tmp_path / "layer_06.json").read_text())
    assert set(raw) == {"format", "layer", "ranked", "kept", "scores", "sae_store_digest"}
    back = FeatureSet.read(tmp_path / "layer_06.json")
    assert back == fs and back.layer == 6 and back.kept == [2]
    ctx = FeatureContexts(layer=6, features=[FeatureContext(2, [TokenContext(1.5, 3, 4, ["a", "b"], 1, "a«b»")])])
    ctx.write(tmp_path / "ctx.json")
    entry = json.loads((tmp_path / "ctx.json").read_text())["features"][0]
    assert "neuronpedia_explanations" not in entry and entry["top_logit_tokens"] == []
    assert FeatureContexts.read(tmp_path / "ctx.json") == ctx
    (tmp_path / "cut.json").write_text(json.dumps(raw)[:40])
    with pytest.raises(ArtifactError, match="cut.json"):
        FeatureSet.read(tmp_path / "cut.json")
    with pytest.raises(ArtifactError, match="select"):
        FeatureSet.read(tmp_path / "missing.json")


def test_select_stage_outputs(tiny_project):
    from ato.stages import sae as sae_stage
    from ato.stages import select as stage
    from test_sae import TARGETS, make_model_store

    params = load_tiny_params(
        tiny_project,
        **{
            "sae.steps": 30,
            "sae.lr": 0.01,
            "select.exact_check": 2,
            "select.top_contexts": 3,
            "select.context_window": 2,
        },
    )
    make_model_store(tiny_project)
    sae_stage.main(params)
    reports = stage.main(params)
    for n in TARGETS:
        out = json.loads((params.path("features") / f"layer_{n:02d}.json").read_text())
        d_sae = params.sae.width
        assert out["layer"] == n and sorted(out["ranked"]) == list(range(d_sae))
        assert set(out["scores"]) == {
            "activation_rate",
            "token_entropy",
            "vocab_focus",
            "redundancy",
            "causal_effect",
            "composite",
        }
        assert all(len(v) == d_sae for v in out["scores"].values())
        kept = out["kept"]
        assert kept == out["ranked"][: len(kept)] and len(kept) == round(0.25 * d_sae)
        comp = out["scores"]["composite"]
        assert all(comp[f] is not None for f in kept)
        assert [comp[f] for f in kept] == sorted((comp[f] for f in kept), reverse=True)
        ctx = json.loads((params.path("features") / f"layer_{n:02d}_contexts.json").read_text())
        assert [c["feature"] for c in ctx["features"]] == kept
        for entry in ctx["features"]:
            assert 1 <= len(entry["contexts"]) <= 3
            acts = [c["activation"] for c in entry["contexts"]]
            assert acts == sorted(acts, reverse=True) and acts[0] > 0
            for c in entry["contexts"]:
                assert len(c["tokens"]) <= 5 and "«" in c["text"] and c["position"] >= 1
        rep = reports[n]
        assert rep.n_tokens_scored <= params.select.max_tokens and len(rep.causal_check.exact) == 2
        assert json.loads((params.path("reports") / "select" / f"layer_{n:02d}.json").read_text())["layer"] == n


def test_neuronpedia_fails_clearly_offline(monkeypatch):
    from ato.errors import AtoError
    from ato.sae.neuronpedia import fetch_neuronpedia

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AtoError, match="offline"):
        fetch_neuronpedia("gemma-2-2b/20-gemmascope-res-16k", [1])
    with pytest.raises(AtoError, match="no Neuronpedia id"):
        fetch_neuronpedia(None, [1])
