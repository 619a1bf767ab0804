"""Causal intervals (ato.math.intervals): the method is chosen by the coverage simulation here.

Per-sequence effects are skewed (lognormal, gamma) or heavy-tailed (t, 3 df), scaled by 1/√m_j
for sequences of m_j ∈ 16..63 scored tokens; the statistic is the token-weighted ratio of sums.
`python tests/test_intervals.py` prints the full table quoted in ato/math/intervals.py.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ato.math.interval_planning import planned_half_width, required_units
from ato.math.intervals import (
    DEFAULT_METHOD,
    METHODS,
    Interval,
    can_change_scored_predictions,
    delta_interval,
    denominator_is_bounded,
    mean_ratio_interval,
    ratio_bounds,
    ratio_estimate,
    ratio_interval,
    ratio_standard_error,
    recovered_interval,
    unscorable_positions,
)
from ato.math.ridge_diagnostics import (
    alpha_edge_warning,
    alpha_flatness,
    alpha_gain,
    alpha_is_immaterial,
    r2_noise,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEQUENCES = 32  # the smallest sequence count the coverage below is proven at (causal.n_sequences ≥ it)
REPLICATES = 2000  # Monte-Carlo standard error of a coverage near 0.95: √(0.95·0.05/2000) ≈ 0.005
RESAMPLES = 999

# --------------------------------------------------------------------------------------------
# The simulation


# The default run's most skewed per-sequence Δ (L03_k3, 144 sequences, fresh-clone run of 2026-12-07:
# sample skewness 2.42, excess kurtosis 13.7; the other five pairs 0.90–1.70 and 2.0–8.5): a Johnson SU
# law with exactly those two moments (a = −1.550, b = 1.436; checked below).
RUN_SHAPE = "johnsonsu:-1.550:1.436"
RUN_SKEWNESS, RUN_EXCESS_KURTOSIS = 2.42, 13.66


def effects(rng: np.random.Generator, dist: str, shape: tuple[int, ...]) -> np.ndarray:
    """Standardised draws (mean 0, variance 1) of a named family: normal, t3, gamma:<shape>,
    lognormal:<σ>, johnsonsu:<a>:<b>."""
    family, _, arg = dist.partition(":")
    if family == "johnsonsu":
        a, b = (float(v) for v in arg.split(":"))
        mean, var = stats.johnsonsu.stats(a, b, moments="mv")
        return (stats.johnsonsu.rvs(a, b, size=shape, random_state=rng) - mean) / math.sqrt(var)
    if family == "normal":
        return rng.standard_normal(shape)
    if family == "t3":
        return rng.standard_t(3, shape) / math.sqrt(3.0)
    if family == "gamma":
        k = float(arg)
        return (rng.gamma(k, 1.0, shape) - k) / math.sqrt(k)
    if family == "lognormal":
        s2 = float(arg) ** 2
        return (rng.lognormal(0.0, math.sqrt(s2), shape) - math.exp(s2 / 2)) / math.sqrt(
            (math.exp(s2) - 1.0) * math.exp(s2)
        )
    raise ValueError(dist)


def delta_data(dist: str, n: int, reps: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`reps` data sets of n sequences: NLL-difference sums num_j = m_j(1 + e_j·√(40/m_j)) and
    token counts m_j; the true token-weighted Δ is 1."""
    rng = np.random.default_rng(seed)
    m = rng.integers(16, 64, size=(reps, n)).astype(np.float64)
    return m * (1.0 + effects(rng, dist, (reps, n)) * np.sqrt(40.0 / m)), m


def ratio_data(dist: str, n: int, reps: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Recovered-share data: num_j = Σ(ato − clean), den_j = Σ(reference − clean), the two
    correlated (ρ = 0.5), the reference noisy (per-sequence CV 0.35, as the identity reference of
    the default run); the true ratio is 0.4, so the true recovered share is 0.6."""
    rng = np.random.default_rng(seed)
    m = rng.integers(16, 64, size=(reps, n)).astype(np.float64)
    scale = np.sqrt(40.0 / m)
    e_ref = effects(rng, dist, (reps, n))
    e_ato = 0.5 * e_ref + math.sqrt(0.75) * effects(rng, dist, (reps, n))
    return m * (0.4 + 0.15 * e_ato * scale), m * (1.0 + 0.35 * e_ref * scale)


def coverage(num: np.ndarray, den: np.ndarray, truth: float, method: str, n_resamples: int = RESAMPLES) -> float:
    _, low, high = ratio_bounds(num, den, method=method, n_resamples=n_resamples, seed=3)
    return float(np.mean((low <= truth) & (truth <= high)))


@functools.cache
def simulated(statistic: str, dist: str, n: int, method: str) -> float:
    """Coverage of `method` over REPLICATES data sets of `statistic` ("delta" or "ratio")."""
    if statistic == "delta":
        return coverage(*delta_data(dist, n, REPLICATES), 1.0, method)
    return coverage(*ratio_data(dist, n, REPLICATES), 0.4, method)


# --------------------------------------------------------------------------------------------
# Coverage: the choice of method and of the default sequence count


@pytest.mark.parametrize("dist", ["normal", "t3", "gamma:1", "lognormal:0.75"])
def test_default_method_keeps_coverage_at_the_default_sequence_count(dist: str):
    """≥ 0.93 at nominal 0.95 for skewed (skewness 2 and 3.3) and heavy-tailed effects."""
    assert simulated("delta", dist, DEFAULT_SEQUENCES, DEFAULT_METHOD) >= 0.93


@pytest.mark.parametrize("dist", ["t3", "lognormal:0.75"])
def test_default_method_keeps_coverage_of_the_recovered_share(dist: str):
    assert simulated("ratio", dist, DEFAULT_SEQUENCES, DEFAULT_METHOD) >= 0.93


def test_the_run_shape_has_the_moments_of_the_default_runs_per_sequence_delta():
    skewness, kurtosis = stats.johnsonsu.stats(*(float(v) for v in RUN_SHAPE.split(":")[1:]), moments="sk")
    assert skewness == pytest.approx(RUN_SKEWNESS, abs=0.01)
    assert kurtosis == pytest.approx(RUN_EXCESS_KURTOSIS, abs=0.05)
    draws = effects(np.random.default_rng(0), RUN_SHAPE, (400_000,))
    assert abs(draws.mean()) < 0.01 and draws.std() == pytest.approx(1.0, abs=0.01)
    assert stats.skew(draws) == pytest.approx(RUN_SKEWNESS, abs=0.3)


@pytest.mark.parametrize(
    "statistic, dist",
    [
        ("delta", "t3"),
        ("delta", "lognormal:0.75"),
        ("ratio", "lognormal:0.75"),
        ("delta", RUN_SHAPE),
        ("ratio", RUN_SHAPE),
    ],
)
def test_default_method_keeps_coverage_at_the_params_default(statistic: str, dist: str):
    """The same at causal.n_sequences itself (1000 data sets: Monte-Carlo standard error ≈ 0.007),
    including the shape of the default run's most skewed per-sequence Δ (measured, seeded: at 144
    sequences 0.961 for Δ and 0.949 for the recovered share, the t-interval 0.946 and 0.940; at 112, 0.952
    for both)."""
    from ato.params import load_params

    n = load_params(ROOT / "params.yaml").causal.n_sequences
    make, truth = (delta_data, 1.0) if statistic == "delta" else (ratio_data, 0.4)
    assert coverage(*make(dist, n, 1000), truth, DEFAULT_METHOD) >= 0.93


def test_percentile_bootstrap_under_covers_at_eight_sequences():
    """Issue 11: at 8 units a nominal 95 % percentile interval covers ≈ 0.88 (normal) and ≈ 0.77
    (skewed: lognormal σ = 1) of the time; the default method does better on both."""
    assert 0.86 <= simulated("delta", "normal", 8, "percentile") <= 0.91
    assert 0.74 <= simulated("delta", "lognormal:1", 8, "percentile") <= 0.80
    assert simulated("delta", "normal", 8, DEFAULT_METHOD) >= 0.94
    assert (
        simulated("delta", "lognormal:1", 8, DEFAULT_METHOD)
        >= simulated("delta", "lognormal:1", 8, "percentile") + 0.08
    )


def test_each_simple_method_fails_where_the_hull_does_not():
    """Why the hull: the t-interval under-covers skewed effects, the bootstrap-t heavy tails
    (≈ 0.92 on t3 at 32 units over seeds). Compared on the same data sets, so the differences
    carry far less Monte-Carlo error than the coverages."""
    n, hull = DEFAULT_SEQUENCES, DEFAULT_METHOD
    assert simulated("delta", "lognormal:0.75", n, "t") < 0.925
    assert simulated("delta", "lognormal:0.75", n, hull) >= simulated("delta", "lognormal:0.75", n, "t") + 0.02
    assert simulated("delta", "t3", n, hull) >= simulated("delta", "t3", n, "studentized") + 0.015


def test_params_default_sequence_count_is_the_one_simulated():
    from ato.params import load_params

    n = load_params(ROOT / "params.yaml").causal.n_sequences
    assert n >= DEFAULT_SEQUENCES, f"causal.n_sequences = {n}: coverage is only shown from {DEFAULT_SEQUENCES} up"


# The default run's k = 1 pairs at 160 pilot sequences (`all` set, `after` scope; fresh-clone run of
# 2026-12-01): the per-sequence mean NLL change of the ATO patch vs clean, 62 scored tokens each
# (reports/causal/<pair>_sequences.json of that run). The hull's half-width at 160 was 0.012 and 0.040 nats;
# at the earlier default of 32 it was 0.041 and 0.101.
PILOT_DELTA = {
    "L05_k1": (
        [-0.0328, 0.1939, 0.1715, -0.0309, -0.0173, -0.0155, -0.003, 0.0028, 0.0745, 0.0302, -0.0007,
         0.1001, 0.019, 0.1259, -0.0617, -0.0164, 0.0533, 0.0499, 0.0688, 0.0514, 0.3999, 0.0472, 0.0686,
         0.0657, -0.0083, 0.0736, 0.0361, 0.0011, 0.305, 0.1276, -0.0035, 0.0189, 0.1166, 0.052, 0.0121,
         0.1551, 0.0774, 0.1106, 0.0528, 0.075, 0.1768, 0.0125, 0.1139, -0.0113, 0.1594, 0.0802, -0.0465,
         0.0312, 0.0682, 0.0207, 0.0986, -0.0758, 0.1903, 0.0112, -0.0671, -0.1241, 0.0028, -0.011, -0.0207,
         0.0208, 0.059, 0.0156, 0.2396, 0.0169, 0.1436, -0.0248, 0.0099, -0.0559, 0.0582, 0.0653, 0.0545,
         0.0106, 0.0456, -0.0203, 0.0768, 0.0132, 0.0029, 0.1067, 0.0837, 0.0531, 0.1529, 0.0948, 0.0727,
         0.01, 0.0989, -0.0032, 0.1168, 0.0569, -0.0822, 0.0728, 0.0402, 0.0633, 0.116, 0.108, 0.2054,
         0.0105, 0.0314, 0.0634, 0.0829, -0.0415, 0.0701, 0.0363, 0.0066, 0.1382, -0.0271, 0.0514, 0.0004,
         0.1295, 0.0922, -0.0837, 0.2188, -0.0038, 0.0931, 0.0949, -0.0016, 0.0421, 0.2132, 0.0849, 0.0303,
         0.0183, 0.2081, 0.107, 0.0615, -0.0632, 0.1519, 0.081, -0.0312, 0.0039, 0.0348, 0.0787, 0.0153,
         -0.0269, 0.1034, -0.026, 0.0035, 0.0915, 0.1013, 0.0814, 0.0407, 0.0378, 0.1525, 0.1117, 0.1108,
         0.0407, 0.0769, -0.041, 0.2118, 0.0873, 0.0187, 0.1082, 0.0986, 0.0598, 0.0093, 0.0517, 0.0785,
         0.076, -0.0162, -0.0074, 0.1253, 0.0954]
    ),
    "L11_k1": (
        [0.5038, 0.5888, 0.5662, 0.5528, 0.638, 0.6341, 0.4787, 0.304, 0.7796, 0.568, 0.8353, 0.3067, 0.559,
         0.5285, 0.2783, 0.5788, 0.5857, 0.4809, 0.6311, 0.4433, 1.4525, 0.3067, 0.442, 0.6263, 0.5427,
         0.2447, 0.3665, 0.5393, 0.8072, 0.9373, 0.2962, 0.0463, 0.5936, 0.3918, 0.5642, 1.0972, 0.5035,
         0.3408, 1.1024, 0.2613, 0.7875, 0.6667, 0.4453, 0.4833, 0.7001, 0.3037, 0.4986, 0.6749, 0.4863,
         0.3312, 0.7338, 0.4187, 0.7921, 0.2919, 0.4566, 0.4165, 0.5851, 0.565, 0.6037, 0.4942, 0.4107,
         0.4589, 0.2726, 0.3709, 0.9512, 0.5611, 0.8952, 0.3073, 0.4741, 0.7324, 0.5848, 0.6758, 0.2899,
         0.8347, 0.1726, 0.5101, 0.5172, 0.4761, 0.4724, 0.5951, 0.1162, 0.6122, 0.7052, 0.4582, 0.6729,
         0.5862, 0.6953, 0.1737, 0.3272, 0.4287, 0.5149, 0.2705, 0.4355, 0.6985, 0.9006, 0.9016, 0.1384,
         0.7194, 0.3533, 0.1663, 1.3916, 0.6374, 0.573, 0.5612, 0.5563, 0.1442, 0.6838, 0.4365, 0.5707,
         0.0276, 0.5426, 0.8604, 0.6954, 0.5321, 0.4661, 0.2777, 0.7562, 0.7166, 0.6028, 0.5957, 0.8815,
         0.578, 0.4223, 0.8561, 1.3832, 0.2703, 0.3847, 0.7218, 0.6149, 0.5952, 0.5079, 0.3165, 0.3239,
         1.0363, 0.6152, 0.4865, 0.4432, 0.6071, 0.1645, 0.5292, 0.4558, 0.4301, 0.5725, 1.001, 0.5877,
         0.3349, 1.1792, 0.4788, 0.8237, 1.2556, 0.7053, 0.5011, 0.3859, 1.3039, 0.5927, 0.48, 0.4756,
         0.1724, 0.4686, 0.4416]
    ),
}  # fmt: skip


@pytest.mark.parametrize("pair", sorted(PILOT_DELTA))
def test_default_sequence_count_meets_the_half_width_target(pair: str):
    """Issue 11: the 95 % half-width of Δ(ATO) on the k = 1 pairs ≤ 0.05 nats at causal.n_sequences.

    Planned with σ at its 80 % upper bound from the pilot, and checked with the default interval
    itself (median over data sets drawn from the pilot's distribution at the default count)."""
    from ato.params import load_params

    n = load_params(ROOT / "params.yaml").causal.n_sequences
    pilot = np.asarray(PILOT_DELTA[pair])
    m = np.full(len(pilot), 62.0)
    assert planned_half_width(pilot * m, m, n, pilot_confidence=0.8) <= 0.05
    assert required_units(pilot * m, m, 0.05, pilot_confidence=0.8) <= n
    rng = np.random.default_rng(0)
    widths = []
    for _ in range(10):
        draw = rng.choice(pilot, n) * 62.0
        widths.append(delta_interval(draw, np.zeros(n), np.full(n, 62.0), n_resamples=1000).half_width)
    assert np.median(widths) <= 0.05, (
        f"{pair}: default-interval half-widths at {n} sequences: median {np.median(widths):.4f}"
    )
    # …and the old default of 32 sequences does not reach it on L11_k1:
    if pair == "L11_k1":
        small = rng.choice(pilot, 32) * 62.0
        assert delta_interval(small, np.zeros(32), np.full(32, 62.0), n_resamples=1000).half_width > 0.05


# --------------------------------------------------------------------------------------------
# The statistics themselves


def test_delta_is_the_token_weighted_mean_and_t_matches_the_textbook():
    rng = np.random.default_rng(0)
    m = rng.integers(10, 60, 12).astype(float)
    clean, patched = rng.gamma(2.0, 3.0, 12) * m, rng.gamma(2.0, 3.2, 12) * m
    iv = delta_interval(patched, clean, m, method="t")
    q = (patched - clean).sum() / m.sum()
    z = (patched - clean - q * m) / m.mean()
    se = math.sqrt((z**2).sum() / (12 * 11))
    crit = stats.t.ppf(0.975, 11)
    assert iv.estimate == pytest.approx(q, rel=1e-12)
    assert (iv.low, iv.high) == pytest.approx((q - crit * se, q + crit * se), rel=1e-12)
    assert iv.half_width == pytest.approx(crit * se, rel=1e-12)
    assert (iv.method, iv.level, iv.n_units) == ("t", 0.95, 12)
    # equal token counts: the ratio is the mean of per-sequence means, se the textbook s/√n
    d = rng.normal(0.3, 0.1, 9)
    iv = delta_interval(d * 50, np.zeros(9), np.full(9, 50.0), method="t")
    assert iv.half_width == pytest.approx(stats.t.ppf(0.975, 8) * d.std(ddof=1) / 3, rel=1e-12)


def test_recovered_share_is_one_minus_the_ratio_and_ignores_token_counts():
    rng = np.random.default_rng(1)
    clean = rng.gamma(3.0, 30.0, 10)
    ato, ref = clean + rng.gamma(2.0, 1.0, 10), clean + rng.gamma(4.0, 5.0, 10)
    for method in METHODS:
        r = recovered_interval(ato, ref, clean, method=method, n_resamples=500, seed=4)
        q = ratio_interval(ato - clean, ref - clean, method=method, n_resamples=500, seed=4)
        assert r.estimate == pytest.approx(1 - (ato - clean).sum() / (ref - clean).sum(), rel=1e-12)
        assert (r.low, r.high) == pytest.approx((1 - q.high, 1 - q.low), rel=1e-12)
        assert r.low <= r.estimate <= r.high


@pytest.mark.parametrize("method", [DEFAULT_METHOD, "t", "studentized"])
def test_exactly_proportional_damage_recovers_a_share_without_spread(method: str):
    """Every sequence keeps exactly a quarter of the reference's damage: the share is 0.75 and the
    interval is that point (paired resampling over sequences leaves the ratio unchanged)."""
    damage = np.array([2.0, 2.2, 1.8, 2.1, 1.9]) * 60
    clean = np.zeros(5)
    iv = recovered_interval(0.25 * damage, damage, clean, method=method, n_resamples=200, seed=0)
    assert (iv.estimate, iv.low, iv.high, iv.half_width) == (0.75, 0.75, 0.75, 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_seeded_equivariant_and_brackets_the_estimate(method: str):
    rng = np.random.default_rng(2)
    num, den = rng.gamma(1.0, 5.0, 15), rng.integers(20, 60, 15).astype(float)
    a = ratio_interval(num, den, method=method, n_resamples=800, seed=7)
    assert a == ratio_interval(num, den, method=method, n_resamples=800, seed=7)
    assert a.low < a.estimate < a.high and a.method == method
    b = ratio_interval(3.0 * num, den, method=method, n_resamples=800, seed=7)
    assert (b.low, b.high) == pytest.approx((3 * a.low, 3 * a.high), rel=1e-9)
    assert ratio_interval(num, den, method=method, level=0.8, n_resamples=800, seed=7).half_width < a.half_width


def test_bca_and_percentile_are_scipys_paired_bootstrap():
    rng = np.random.default_rng(3)
    num, den = rng.gamma(1.0, 5.0, 10), rng.integers(20, 60, 10).astype(float)
    ours = ratio_interval(num, den, method="bca", n_resamples=1000, seed=5)
    ref = stats.bootstrap(
        (num, den),
        lambda x, y, axis=-1: x.sum(axis) / y.sum(axis),
        paired=True,
        vectorized=True,
        n_resamples=1000,
        method="BCa",
        rng=np.random.default_rng(5),
    ).confidence_interval
    assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high), rel=1e-12)


def test_batched_bounds_equal_one_at_a_time_for_the_t_interval():
    num, den = delta_data("gamma:1", 10, 5)
    q, low, high = ratio_bounds(num, den, method="t")
    for i in range(5):
        iv = ratio_interval(num[i], den[i], method="t")
        assert (iv.estimate, iv.low, iv.high) == pytest.approx((q[i], low[i], high[i]), rel=1e-12)
    assert ratio_estimate(num, den) == pytest.approx(num.sum(1) / den.sum(1))
    assert ratio_standard_error(num, den).shape == (5,)


def test_degenerate_inputs():
    # one unit: an estimate, no interval
    iv = delta_interval([5.0], [3.0], [4.0])
    assert iv.estimate == 0.5 and math.isnan(iv.low) and math.isnan(iv.high) and math.isnan(iv.half_width)
    # every sequence exactly the same per-token effect: the interval is the point
    m = np.array([10.0, 20.0, 30.0])
    iv = delta_interval(0.25 * m, np.zeros(3), m)
    assert (iv.low, iv.estimate, iv.high, iv.half_width) == (0.25, 0.25, 0.25, 0.0)
    # a reference whose damage cannot be told from zero: the recovered share is unbounded
    iv = recovered_interval([1.0, 2.0, 1.5, 1.2], [1.0, -1.0, 2.0, -1.5], [0.0] * 4)
    assert (iv.low, iv.high) == (-math.inf, math.inf)
    assert not denominator_is_bounded([1.0, -1.0, 2.0, -1.5]) and denominator_is_bounded([10.0, 20.0, 30.0, 25.0])
    with pytest.raises(ValueError, match="differ in shape"):
        delta_interval([1.0, 2.0], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown interval method"):
        delta_interval([1.0, 2.0], [0.0, 0.0], [1.0, 1.0], method="wald")
    with pytest.raises(ValueError, match="finite"):
        delta_interval([1.0, np.nan], [0.0, 0.0], [1.0, 1.0])
    assert isinstance(iv, Interval)


def test_planning_the_number_of_sequences():
    rng = np.random.default_rng(4)
    m = np.full(8, 62.0)
    num = rng.normal(0.5, 0.1, 8) * m
    n = required_units(num, m, 0.05)
    assert planned_half_width(num, m, n) <= 0.05 < planned_half_width(num, m, n - 1)
    sigma = np.std(num / m, ddof=1)
    assert planned_half_width(num, m, 40) == pytest.approx(stats.t.ppf(0.975, 39) * sigma / math.sqrt(40))
    cautious = required_units(num, m, 0.05, pilot_confidence=0.8)
    assert cautious > required_units(num, m, 0.05, pilot_confidence=0.5) > n - 2
    with pytest.raises(ValueError, match="more than"):
        required_units(num, m, 1e-9, max_units=1000)


# --------------------------------------------------------------------------------------------
# Position sets and α


def test_a_position_that_changes_no_scored_prediction_is_named():
    assert unscorable_positions([40, 48, 56, 63], 64) == [63]  # the default `late` set
    assert not can_change_scored_predictions([40, 48, 56, 63], 64)
    assert can_change_scored_predictions([40, 48, 56, 62], 64)
    assert can_change_scored_predictions([1], 3) and not can_change_scored_predictions([2], 3)
    assert unscorable_positions([0, 5], 64) == [0]  # BOS is never patched
    assert can_change_scored_predictions("all", 64) and not can_change_scored_predictions("all", 2)
    assert not can_change_scored_predictions([], 64)


def test_alpha_diagnostics_on_a_flat_curve_then_a_peaked_one():
    alphas = np.geomspace(1e-3, 1e7, 31)
    flat = 0.785149 + 1.2e-5 * np.exp(-((np.log10(alphas) - 3.5) ** 2)) - 0.2 * (alphas / (alphas + 1e7))
    assert alpha_flatness(alphas, flat) == pytest.approx(flat.max() - flat.min())
    assert alpha_flatness(alphas, flat) > 0.09  # the full range runs into over-regularisation…
    assert alpha_gain(alphas, flat) < 2e-5  # …but the best α buys nothing over the smallest
    assert alpha_is_immaterial(alphas, flat, n_val=16_000)
    assert r2_noise(0.785, 16_000) == pytest.approx(0.215 * math.sqrt(2 / 16_000))
    peaked = 0.70 + 0.05 * np.exp(-((np.log10(alphas) - 2) ** 2))
    assert not alpha_is_immaterial(alphas, peaked, n_val=16_000)
    assert alpha_is_immaterial(alphas, [np.nan] + list(flat[1:]), n_val=16_000)  # NaN points ignored
    assert alpha_edge_warning(alphas, 3e3) is None
    low, high = alpha_edge_warning(alphas, 1e-3, "L05_k1"), alpha_edge_warning(alphas, 9e6)
    assert low is not None and "L05_k1" in low and "lowest" in low
    assert high is not None and "highest" in high and "alpha_max" in high


# --------------------------------------------------------------------------------------------
# The table in ato/math/intervals.py


def coverage_table(reps: int = 4000, n_resamples: int = 1000) -> None:
    print(
        f"{'effects':16s} {'n':>3s} "
        + " ".join(f"{m:>16s}" for m in ("percentile", "bca", "t", "studentized", DEFAULT_METHOD))
    )
    for dist in ("normal", "t3", "gamma:1", "lognormal:0.75", "lognormal:1"):
        for n in (8, DEFAULT_SEQUENCES):
            num, den = delta_data(dist, n, reps)
            row = [
                coverage(num, den, 1.0, m, n_resamples)
                for m in ("percentile", "bca", "t", "studentized", DEFAULT_METHOD)
            ]
            print(f"{dist:16s} {n:3d} " + " ".join(f"{c:16.3f}" for c in row), flush=True)
    for dist in ("normal", "t3", "gamma:1", "lognormal:0.75"):
        for n in (8, DEFAULT_SEQUENCES):
            num, den = ratio_data(dist, n, reps)
            row = [
                coverage(num, den, 0.4, m, n_resamples)
                for m in ("percentile", "bca", "t", "studentized", DEFAULT_METHOD)
            ]
            print(f"R {dist:14s} {n:3d} " + " ".join(f"{c:16.3f}" for c in row), flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    coverage_table(*(int(a) for a in sys.argv[1:3]))
    print(f"{time.perf_counter() - t0:.0f} s")


def test_an_r2_interval_never_exceeds_one():
    """R² = 1 − Σ SSE / Σ SST: on a few skewed documents the linear-scale interval of the ratio reaches
    below 0 (an R² bound above 1, as `ato score` printed [0.04, 2.07]); the log-scale one cannot."""
    sse = np.array([0.02, 0.03, 0.01, 4.0])  # one document the map fits badly
    sst = np.array([1.0, 1.2, 0.8, 1.0])
    linear = ratio_interval(sse, sst)
    assert linear.low < 0  # the defect: 1 − low > 1
    for method in ("studentized_hull", "studentized", "t"):
        logged = ratio_interval(sse, sst, method=method, log_scale=True)
        assert 0 < logged.low <= logged.estimate <= logged.high
        assert logged.estimate == linear.estimate
    # on many well-behaved units the two scales agree closely
    rng = np.random.default_rng(0)
    a, b = rng.gamma(20, 0.02, 400), rng.gamma(20, 0.05, 400)
    wide, narrow = ratio_interval(a, b, log_scale=True), ratio_interval(a, b)
    assert wide.low == pytest.approx(narrow.low, rel=0.01) and wide.high == pytest.approx(narrow.high, rel=0.01)
    with pytest.raises(ValueError, match="≥ 0"):
        ratio_interval(-sse, sst, log_scale=True)


def test_the_uniform_r2_interval_is_a_mean_of_ratios_kept_below_one():
    rng = np.random.default_rng(1)
    sst = rng.gamma(4.0, 1.0, size=(30, 5))
    sse = sst * rng.uniform(0.1, 0.6, size=(30, 5))
    sse[:, 4] = 0.0  # a column fitted exactly
    sst[:, 3] = 0.0  # a column without variance is left out, as in the uniform R²
    iv = mean_ratio_interval(sse, sst)
    expected = np.mean(sse[:, [0, 1, 2, 4]].sum(0) / sst[:, [0, 1, 2, 4]].sum(0))
    assert iv.estimate == pytest.approx(expected, rel=1e-12)
    assert 0 < iv.low < iv.estimate < iv.high and iv.method == "studentized_hull (log scale)"
    assert mean_ratio_interval(sse, sst) == iv  # seeded
    few = mean_ratio_interval(sse[:3] * [[1], [1], [40]], sst[:3])  # three documents, one very bad
    assert 0 <= few.low < few.estimate < few.high  # at worst the bound itself: R² ≤ 1
    one = mean_ratio_interval(sse[:1], sst[:1])
    assert math.isnan(one.low) and math.isnan(one.high)


def score_r2_data(n: int, reps: int, sigma: float, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """`ato score`'s units: per document, SST_j (tokens × a skewed per-document variance) and SSE_j =
    0.3 · SST_j · a mean-1 lognormal(σ) factor, so the true Σ SSE / Σ SST is 0.3 (R² = 0.7)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(32, 256, size=(reps, n)).astype(np.float64)
    sst = tokens * rng.gamma(4.0, 0.25, size=(reps, n))
    return 0.3 * sst * rng.lognormal(-(sigma**2) / 2, sigma, size=(reps, n)), sst


@pytest.mark.parametrize(
    "n, sigma, floor",
    [(10, 1.0, 0.88), (10, 0.5, 0.91), (40, 1.0, 0.91), (40, 0.5, 0.935)],
)
def test_log_scale_r2_interval_coverage_from_the_few_document_threshold(n: int, sigma: float, floor: float):
    """Coverage of `ato score`'s R² interval (studentized hull on log Σ SSE / Σ SST) at nominal 0.95 over
    REPLICATES simulated texts: n = 10 documents is where `ato score` stops warning that intervals are
    unreliable; σ = 1 is a heavily skewed per-document error (skewness ≈ 6). Measured (seeded): 0.894 /
    0.927 at n = 10 and 0.921 / 0.951 at n = 40 (σ = 1 / 0.5): under heavy skew and few documents the
    interval is somewhat short (docs/statistics.md says so); the floors sit ~2 Monte-Carlo s.e. below."""
    sse, sst = score_r2_data(n, REPLICATES, sigma)
    _, low, high = ratio_bounds(sse, sst, n_resamples=RESAMPLES, seed=3, log_scale=True)
    assert np.all(low > 0)  # R² = 1 − ratio stays below 1
    assert float(np.mean((low <= 0.3) & (0.3 <= high))) >= floor
