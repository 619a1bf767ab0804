"""SAE quality: dead/dense fractions, and the downstream check (CE-loss recovered, KL) against an
independent computation and against SAEs whose answer is known (identity, zero, mean)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_model


class FixedSae:
    """An 'SAE' with a given reconstruction: encode → x, decode → f(x)."""

    def __init__(self, recon):
        self.recon = recon

    def encode(self, x):
        return x

    def decode(self, acts):
        return self.recon(acts)

    def to(self, _device):
        return self

    def eval(self):
        return self


def _sequences(n=6, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 120, (n, T), generator=g)
    ids[:, 0] = 2  # BOS
    return ids, ids == 2


def _reference_ce(model, ids):
    """Mean next-token CE over predictions made at positions ≥ 1, from the model's own logits."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = logits[:, 1:-1].log_softmax(-1)
    return float(-logp.gather(-1, ids[:, 2:, None]).mean())


def test_identity_zero_and_mean_saes_give_their_known_answers():
    from ato.sae.quality import splice_quality

    model = tiny_model()
    ids, special = _sequences()
    mean = torch.randn(32)
    saes = {
        1: FixedSae(lambda h: h),  # perfect reconstruction
        2: FixedSae(torch.zeros_like),  # reconstruction = zero ablation
        3: FixedSae(lambda h: mean.expand_as(h)),  # reconstruction = mean ablation
    }
    out = splice_quality(model, saes, {n: mean for n in saes}, ids, special, batch_size=4)
    ref = _reference_ce(model, ids)
    for q in out.values():
        assert q.ce_clean == pytest.approx(ref, rel=1e-5)  # the chunked LM head == the model's logits
        assert q.n_sequences == 6 and q.n_scored_tokens == 6 * 8  # BOS's prediction not scored
        assert q.kl_zero > 0 and q.kl_mean > 0
    perfect = out[1]
    assert perfect.ce_sae == pytest.approx(perfect.ce_clean, abs=1e-6) and abs(perfect.kl_sae) < 1e-6
    assert perfect.ce_recovered_zero == pytest.approx(1.0) and perfect.ce_recovered_mean == pytest.approx(1.0)
    assert perfect.ce_recovered_zero_se == pytest.approx(0.0, abs=1e-9)
    assert perfect.delta_sae == pytest.approx(0.0, abs=1e-6)  # a perfect reconstruction costs nothing
    zero = out[2]
    assert zero.ce_sae == pytest.approx(zero.ce_zero) and zero.kl_sae == pytest.approx(zero.kl_zero)
    assert zero.ce_recovered_zero == pytest.approx(0.0, abs=1e-9)
    assert zero.delta_sae == pytest.approx(zero.ce_zero - zero.ce_clean)
    as_mean = out[3]
    assert as_mean.ce_recovered_mean == pytest.approx(0.0, abs=1e-9) and as_mean.kl_sae == pytest.approx(
        as_mean.kl_mean
    )


def test_splice_leaves_bos_and_earlier_layers_alone():
    """Replacing layer 3 by garbage changes nothing at BOS, and only positions ≥ 1 downstream."""
    from ato.models import final_hidden
    from ato.sae.quality import _spliced_hidden

    model = tiny_model()
    ids, special = _sequences(n=2, T=6)
    with torch.no_grad():
        clean = final_hidden(model, ids)
        spliced = _spliced_hidden(model, ids, 3, ~special, lambda h: torch.full_like(h, 7.0))
    torch.testing.assert_close(spliced[:, 0], clean[:, 0])
    assert (spliced[:, 1:] - clean[:, 1:]).abs().amax() > 1e-3


def test_recovered_share_and_its_jackknife():
    from ato.sae.quality import _recovered

    count = np.full(4, 10.0)
    clean = np.array([10.0, 11.0, 9.0, 10.0])
    abl = clean + 20.0
    sae = clean + np.array([1.0, 3.0, 2.0, 2.0])  # 8 of 80 nats of damage left → 0.9 recovered
    value, se = _recovered(clean, sae, abl, count)
    assert value == pytest.approx(0.9)
    loo = np.array([1 - (8 - d) / 60 for d in (1.0, 3.0, 2.0, 2.0)])
    assert se == pytest.approx(math.sqrt(3 / 4 * ((loo - loo.mean()) ** 2).sum()))
    assert math.isnan(_recovered(clean[:1], sae[:1], abl[:1], count[:1])[1])


def test_dead_and_dense_fractions():
    from ato.sae.quality import evaluate_sae

    class Sae:
        # latent 0 fires on every token, latent 1 on 5 %, latent 2 never, latent 3 on 20 %
        def encode(self, x):
            n = x.shape[0]
            acts = torch.zeros(n, 4)
            acts[:, 0] = 1.0
            acts[: n // 20, 1] = 1.0
            acts[: n // 5, 3] = 1.0
            return acts

        def decode(self, acts):
            return torch.zeros(acts.shape[0], 8)

    q = evaluate_sae(Sae(), [torch.randn(100, 8)], dense_threshold=0.1)
    assert q.dead_fraction == 0.25 and q.dense_fraction == 0.5
    assert q.mean_l0 == pytest.approx(1 + 0.05 + 0.2) and q.fve < 0.01


def test_val_sequences_cut_and_refuse(tmp_path):
    from ato.sae import SaeError
    from ato.sae.quality import val_sequences
    from ato.store import ActivationStore
    from store_factory import build_store

    store = ActivationStore.open(build_store(tmp_path / "store", layers=[0, 1]).root)
    ids, special = val_sequences(store, 2, 5)
    assert ids.shape == (2, 5) and special[:, 0].all() and not special[:, 1:].any()
    with pytest.raises(SaeError, match="sae.eval_sequences=50"):
        val_sequences(store, 50, 5)
