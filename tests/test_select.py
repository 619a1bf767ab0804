"""Stage `select`: the criteria and their signs on hand-made cases, the exact single-feature ablation
(fast path vs a plain full forward), and the stage's outputs on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ato.math.features import (
    METRICS,
    FeatureActivationStats,
    composite_score,
    exact_candidates,
    excess_kurtosis,
    n_keep,
    select_ranking,
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


def test_token_entropy_ratio_does_not_reward_rarity():
    """A feature firing at random positions scores ≈ 1 whether it fires 10 or 1000 times (its raw
    entropy differs by a factor ~2); one firing on a single token scores 0."""
    rng = np.random.default_rng(0)
    n = 4000
    tokens = rng.integers(0, 300, n)
    acts = torch.zeros(n, 4)
    acts[rng.choice(n, 10, replace=False), 0] = 1.0  # rare, random positions
    acts[rng.choice(n, 1000, replace=False), 1] = 1.0  # frequent, random positions
    acts[np.flatnonzero(tokens == 7), 2] = 1.0  # one token
    acc = FeatureActivationStats(4, top_k=0)
    for i in range(0, n, 1000):
        acc.update(acts[i : i + 1000], tokens[i : i + 1000])
    raw, ratio = acc.token_entropy(), acc.token_entropy_ratio()
    assert raw[1] > 2 * raw[0]  # the raw entropy would rank the rare feature as far more coherent
    assert ratio[0] == pytest.approx(1.0, abs=0.1) and ratio[1] == pytest.approx(1.0, abs=0.05)
    assert ratio[2] == 0.0 and math.isnan(ratio[3])


def test_decoder_redundancy_excludes_self_and_dead_rows():
    from ato.math.features import decoder_redundancy

    e = torch.eye(4, dtype=torch.float64)
    rows = torch.stack([e[0], -3.0 * e[0], e[1], (e[1] + e[2]) / 2**0.5, e[3], torch.zeros(4)])
    live = np.array([True, True, True, True, False, True])
    red = decoder_redundancy(rows, live, chunk=4)  # chunking crosses the diagonal blocks
    assert red[0] == pytest.approx(1.0) and red[1] == pytest.approx(1.0)  # anti-parallel copies, any scale
    assert red[2] == pytest.approx(2**-0.5) and red[3] == pytest.approx(2**-0.5)
    assert red[4] == pytest.approx(0.0)  # its only twin would be itself; dead rows are never compared
    assert math.isnan(red[5])  # a zero row has no direction
    assert decoder_redundancy(rows[:1], np.array([True]))[0] == 0.0  # alone: never compared with itself


def test_rate_band_score_rewards_the_sparse_regime():
    from ato.math.features import rate_band_score

    target = 32 / 2560  # k / width
    rates = np.array([0.0, 0.1 * target, target, 10 * target, 0.15, 0.01 * target])
    score = rate_band_score(rates, target, (0.1, 10.0))
    assert math.isnan(score[0])
    np.testing.assert_allclose(score[1:4], 0.0, atol=1e-12)  # inside the band (edges included)
    assert score[4] == pytest.approx(-math.log10(0.15 / (10 * target)))  # dense: a decade-ish outside
    assert score[5] == pytest.approx(-1.0)  # ten times below the lower edge


def test_vocab_focus_kurtosis():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(1, 20000, generator=g)
    peaked = gauss.clone()
    peaked[0, :5] = 40.0
    k = excess_kurtosis(torch.cat([gauss, peaked]))
    assert abs(float(k[0])) < 0.2 and float(k[1]) > 50
    # invariant to the scale and shift of the logits (so no softmax temperature is involved)
    torch.testing.assert_close(excess_kurtosis(peaked * 7.0 + 3.0), excess_kurtosis(peaked))


def test_composite_signs_are_fixed():
    """Low entropy and low redundancy win, whatever the weights; weights are importances ≥ 0."""
    metrics = {
        "rate_band": np.array([0.0, 0.0, -1.0, 0.0, 0.0]),
        "token_entropy": np.array([0.5, 4.0, 0.5, 0.5, np.nan]),
        "redundancy": np.array([0.1, 0.1, 0.1, 0.9, 0.1]),
    }
    eligible = np.array([True, True, True, True, False])
    comp = composite_score(metrics, {"rate_band": 1.0, "token_entropy": 1.0, "redundancy": 1.0}, eligible)
    assert math.isnan(comp[4])
    assert comp[0] == max(comp[:4])  # in band, coherent, not redundant
    assert comp[1] < comp[0] and comp[2] < comp[0] and comp[3] < comp[0]  # each loses on one criterion
    with pytest.raises(ValueError, match="≥ 0"):
        composite_score(metrics, {"token_entropy": -1.0}, eligible)
    with pytest.raises(KeyError, match="activation_rate"):
        composite_score(metrics, {"activation_rate": 1.0}, eligible)


def test_ranking_puts_measured_candidates_first_and_uses_the_causal_effect():
    pre = np.array([3.0, 2.0, 1.0, 0.5, np.nan])
    eligible = np.array([True, True, True, True, False])
    rate = np.array([0.01, 0.01, 0.01, 0.01, 0.5])
    cands = exact_candidates(pre, eligible, budget=3)
    assert cands == [0, 1, 2]
    causal = np.full(5, np.nan)
    causal[cands] = [0.0, 0.0, 5.0]  # feature 2 matters most to the loss
    r = select_ranking(pre, causal, cands, 1.0, [eligible], rate)
    assert r.ranked[0] == 2 and set(r.ranked[:3]) == {0, 1, 2} and r.ranked[3:] == [3, 4]
    assert math.isnan(r.composite[4]) and r.composite[3] == 0.5  # outside the candidates: pre-score
    off = select_ranking(pre, causal, cands, 0.0, [eligible], rate)  # weight 0: the pre-score order
    assert off.ranked == [0, 1, 2, 3, 4]
    # a candidate that never fired in the causal sequences (NaN) is neither rewarded nor punished
    causal[1] = np.nan
    assert select_ranking(pre, causal, cands, 1.0, [eligible], rate).composite[1] == pytest.approx(2.0)
    assert n_keep(0.5, 5, 4) == 2 and n_keep(0.01, 5, 4) == 1


def _pool(model, layer: int, n: int = 5, seed: int = 0):
    """Random sequences with the model's own layer residual (what the store holds)."""
    from ato.models import capture_residuals, final_hidden
    from ato.sae.effects import PoolSequence

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        ids = np.concatenate([[2], rng.integers(4, 44, int(rng.integers(8, 14)) - 1)])
        with torch.no_grad(), capture_residuals(model, [layer], stop_early=False) as cap:
            final_hidden(model, torch.as_tensor(ids)[None])
        pool.append(PoolSequence(ids, ids == 2, cap[layer][0].numpy()))
    return pool


def _log_probs(model, t: torch.Tensor, p0: int, cut: int) -> torch.Tensor:
    """float64 next-token log-probabilities of predictions p0..cut-2, softcapped like the model."""
    from ato.models import final_hidden

    logits = model.get_output_embeddings()(final_hidden(model, t)[0, p0 : cut - 1]).double()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.log_softmax(torch.tanh(logits / cap) * cap if cap else logits, -1)


def _naive_ablation(model, sae, layer, pool, feature, per_feature, horizon):
    """Reference: full forwards of the whole model, clean and with a_f·d_f removed (patched at block n),
    on the `per_feature` sequences where f first fires earliest (before the last token), cut after the
    `horizon` predictions from its first activation; returns (Σ KL, Δ summed loss, activations)."""
    from ato.models import patch_residual
    from ato.sae.effects import decoder_directions

    d = decoder_directions(sae)[feature]
    firsts = []
    for s, seq in enumerate(pool):
        active = (sae.encode(torch.as_tensor(seq.h))[:, feature] > 0).numpy() & ~seq.special
        if active[:-1].any():
            firsts.append((int(np.flatnonzero(active[:-1])[0]), s, active))
    kl, delta, n_active = 0.0, 0.0, 0
    for p0, s, active in sorted(firsts, key=lambda x: x[:2])[:per_feature]:
        seq = pool[s]
        cut = len(seq.ids) if horizon is None else min(len(seq.ids), p0 + horizon + 1)
        t, keep = torch.as_tensor(seq.ids[:cut])[None], torch.as_tensor(~seq.special[:cut])[None]

        def remove(h, keep=keep):
            return h - (sae.encode(h)[..., feature] * keep)[..., None] * d

        with torch.no_grad():
            clean = _log_probs(model, t, p0, cut)
            with patch_residual(model, layer, remove):
                ablated = _log_probs(model, t, p0, cut)
        target = t[0, p0 + 1 : cut, None]
        delta += float(clean.gather(1, target).sum() - ablated.gather(1, target).sum())
        kl += float((clean.exp() * (clean - ablated)).sum())
        n_active += int(active[:cut].sum())
    return kl, delta, n_active


@pytest.mark.parametrize(("kind", "per_feature", "horizon"), [("gemma3", 2, None), ("gemma3", 1, 3), ("gpt2", 2, 4)])
def test_exact_effects_match_a_full_forward_ablation(kind, per_feature, horizon):
    """The fast path (runs start at block n + 1 from the stored residual, sequences cut after the last
    scored prediction, runs batched across features) gives the exact ablation of plain full forwards."""
    from ato.sae.effects import exact_effects

    model = tiny_model(kind).requires_grad_(False)
    sae = random_topk_sae(k=3, scale=3.0)  # large directions: effects well above float32 rounding
    with torch.no_grad():
        sae.W_dec[3] = 0.0
    pool = _pool(model, 1)
    feats = [3, 0, 2, 6, 10]
    fast = exact_effects(model, sae, 1, pool, feats, per_feature, horizon, batch_rows=3, progress=False)
    ref = np.array([_naive_ablation(model, sae, 1, pool, f, per_feature, horizon) for f in feats])
    kl, delta, n_active = ref[:, 0], ref[:, 1], ref[:, 2].astype(int)
    assert abs(fast.delta_loss[0]) < 1e-5 and fast.kl[0] < 1e-6  # zero decoder row: nothing changes
    assert kl[1:].min() > 1e-4 and (n_active[1:] > 0).all(), kl  # the others have effects to compare
    np.testing.assert_allclose(fast.kl, kl, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(fast.delta_loss, delta, rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(fast.n_active, n_active)
    assert (fast.n_sequences[1:] <= per_feature).all() and math.isfinite(fast.clean_loss)
    if horizon is not None:
        assert (fast.n_predictions <= horizon * fast.n_sequences).all()
    np.testing.assert_allclose(fast.per_activation(fast.kl)[1:], fast.kl[1:] / fast.n_active[1:])


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
    """Every feature scored and ranked; the kept ones are exact-ablation candidates in final-score
    order, with contexts; the report carries the SAE's gate result and the rate band."""
    import mlflow

    from ato.stages import sae as sae_stage
    from ato.stages import select as stage
    from test_sae import TARGETS, make_model_store

    params = load_tiny_params(
        tiny_project,
        **{
            "sae.steps": 30,
            "sae.lr": 0.01,
            "select.exact_budget": 24,
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
        assert out["format"] == "ato-features/2" and out["layer"] == n and sorted(out["ranked"]) == list(range(d_sae))
        assert set(out["scores"]) == {*METRICS, "activation_rate", "composite", "token_entropy_ratio"}
        assert all(len(v) == d_sae for v in out["scores"].values())
        kept, rep = out["kept"], reports[n]
        assert kept == out["ranked"][: len(kept)] and len(kept) == round(0.25 * d_sae)
        assert set(kept) <= set(rep.exact.features) and len(rep.exact.features) == 24 and rep.n_kept_without_exact == 0
        comp, ce = out["scores"]["composite"], out["scores"]["causal_effect"]
        assert [comp[f] for f in kept] == sorted((comp[f] for f in kept), reverse=True)
        assert all(ce[f] is None or ce[f] >= 0 for f in range(d_sae))  # KL per activation
        assert sum(ce[f] is not None for f in rep.exact.features) == sum(a > 0 for a in rep.exact.n_active) > 0
        assert all(ce[f] is None for f in set(range(d_sae)) - set(rep.exact.features))  # only candidates measured
        ctx = json.loads((params.path("features") / f"layer_{n:02d}_contexts.json").read_text())
        assert [c["feature"] for c in ctx["features"]] == kept
        for entry in ctx["features"]:
            assert 1 <= len(entry["contexts"]) <= 3
            acts = [c["activation"] for c in entry["contexts"]]
            assert acts == sorted(acts, reverse=True) and acts[0] > 0
            for c in entry["contexts"]:
                assert len(c["tokens"]) <= 5 and "«" in c["text"] and c["position"] >= 1
        assert rep.n_tokens_scored <= params.select.max_tokens
        assert rep.target_rate == pytest.approx(params.sae.k / d_sae, rel=0.05)  # mean L0 / d_sae of a TopK SAE
        assert rep.rate_band == pytest.approx([0.1 * rep.target_rate, 10 * rep.target_rate])
        saved = json.loads((params.path("reports") / "select" / f"layer_{n:02d}.json").read_text())
        assert saved["layer"] == n and saved["sae_reliable"] is rep.sae_reliable
    # the gate result reaches the MLflow tags of the select run, one per layer
    mlflow.set_tracking_uri(params.mlflow_uri())
    run = mlflow.search_runs(experiment_names=[params.paths.mlflow_experiment], output_format="list")[0]
    for n in TARGETS:
        assert run.data.tags[f"sae_reliable.layer_{n:02d}"] == str(reports[n].sae_reliable).lower()


def test_neuronpedia_fails_clearly_offline(monkeypatch):
    from ato.errors import AtoError
    from ato.sae.neuronpedia import fetch_neuronpedia

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AtoError, match="offline"):
        fetch_neuronpedia("gemma-2-2b/20-gemmascope-res-16k", [1])
    with pytest.raises(AtoError, match="no Neuronpedia id"):
        fetch_neuronpedia(None, [1])
