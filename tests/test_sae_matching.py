"""Matching SAE latents across seeds on planted decoders (ato.math.sae_matching)."""

from __future__ import annotations

import numpy as np
import pytest

from ato.math.sae_matching import match_features, verdict_agreement


def _planted(rng: np.random.Generator, n: int = 64, d: int = 32, noise: float = 0.05):
    """Seed b = seed a's decoder permuted, rescaled and slightly perturbed, with its last 8 latents
    replaced by fresh random directions (features one seed has and the other lacks)."""
    a = rng.standard_normal((n, d))
    perm = rng.permutation(n)
    b = a[perm] * rng.uniform(0.5, 2.0, (n, 1)) + noise * rng.standard_normal((n, d))
    fresh = np.isin(perm, np.arange(n - 8, n))  # rows of b that held a's last 8 latents
    b[fresh] = rng.standard_normal((8, d))
    return a, b, np.argsort(perm)


def test_match_recovers_a_planted_permutation_and_counts_the_unmatched():
    rng = np.random.default_rng(0)
    a, b, truth = _planted(rng)
    match = match_features(a, b)
    np.testing.assert_array_equal(match.partner[:-8], truth[:-8])
    assert np.all(match.cosine[:-8] > 0.95)
    assert match.share_above(0.9) == pytest.approx(56 / 64)  # the 8 fresh latents have no true partner
    assert match.share_above(0.9, among=np.arange(56)) == 1.0


def test_match_is_one_to_one_where_best_partner_is_not():
    """Two of a's latents nearly equal one of b's: best-partner matching would give both cosine ≈ 1; the
    one-to-one match gives one of them a different, worse partner."""
    b = np.eye(4)
    a = np.array([[1.0, 0.01, 0, 0], [1.0, -0.01, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    match = match_features(a, b)
    assert sorted(match.partner.tolist()) == [0, 1, 2, 3]
    assert match.share_above(0.99) == pytest.approx(3 / 4)


def test_verdict_agreement_counts_matched_judged_pairs_only():
    rng = np.random.default_rng(1)
    a, b, truth = _planted(rng)
    match = match_features(a, b)
    va = np.array(["transported"] * 32 + ["synthesised"] * 32, dtype=object)
    vb = np.empty(64, dtype=object)
    vb[truth] = va  # each matched latent of b gets its partner's verdict …
    vb[truth[:4]] = "synthesised"  # … except four flipped
    vb[truth[40:44]] = "no_verdict"  # and four not judged (left out)
    share, n = verdict_agreement(va, vb, match, {"transported", "synthesised"}, min_cosine=0.9)
    assert n == 56 - 4 and share == pytest.approx((n - 4) / n)
