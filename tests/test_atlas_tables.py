"""The atlas's tables on planted numbers: uniform R² and variance-weighted R²_w side by side wherever an
R² is shown (planted so that they disagree in sign), and every aggregate over L a median with its
range, which one extreme layer cannot move."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ato.artifacts import AtlasBudget, AtlasPair, AtlasResult, OperatorScore
from ato.atlas import atlas_markdown, atlas_metrics, readme_table, table, table_columns
from ato.atlas.fitting import operators
from ato.math.atlas import score
from ato.math.stats import PairStats


def planted_disagreement() -> tuple[float, float]:
    """The identity map on y whose one high-variance dimension is x's (predicted almost exactly) and
    whose 19 low-variance dimensions are noise independent of x (predicted worse than by their mean):
    (uniform R², weighted R²) from the atlas's scorer, checked against the rows themselves."""
    rng = np.random.default_rng(3)
    n, d = 4000, 20
    x = rng.normal(size=(n, d)) * np.r_[100.0, np.ones(d - 1)]
    y = np.c_[x[:, :1] + rng.normal(size=(n, 1)), rng.normal(size=(n, d - 1))]
    scores = score(PairStats.from_data(x, y), np.eye(d), np.zeros(d))
    sse, sst = ((y - x) ** 2).sum(0), ((y - y.mean(0)) ** 2).sum(0)
    assert scores.r2 == pytest.approx(np.mean(1 - sse / sst), abs=1e-9)
    assert scores.r2_weighted == pytest.approx(1 - sse.sum() / sst.sum(), abs=1e-9)
    return scores.r2, scores.r2_weighted


def _pair(L: int, k: int, identity: OperatorScore) -> AtlasPair:
    """A pair whose identity scores are given and every other operator's are a plain function of L."""
    ops = {op: OperatorScore(r2=0.6 - 0.01 * L, r2_weighted=0.7 - 0.01 * L) for op in operators()}
    ops["identity"] = identity
    return AtlasPair(
        pair=f"L{L:02d}_k{k}", L=L, k=k, T=L + k, alpha=10.0, alpha_at_edge=False, operators=ops,
        gain_over_identity=ops["ridge"].r2 - identity.r2, procrustes_scale=1.0, procrustes_centred_scale=1.0,
        orthogonal_procrustes_score=0.5, peer_linearity=0.8, ceiling=0.6, eta_test=0.9, eta_expected=0.95,
        eta_expected_std=math.nan,
        eta_ratio=0.9 / 0.95, heldout_subspace_size=10.0, heldout_subspace_size_null=15.0,
        heldout_subspace_size_null_std=1.0, heldout_subspace_size_excess=-5.0, rrr_rank=10,
        transport_directions=float(20 - L), transport_directions_share=1.0 - 0.01 * L,
    )  # fmt: skip


def _atlas(identity_r2: list[float], planted: tuple[float, float]) -> AtlasResult:
    """k = 1 from L = 0, 1, …: identity R² as given (R²_w = R² + 0.1), L = 1 carries the planted scores."""
    identities = [OperatorScore(r2=v, r2_weighted=v + 0.1) for v in identity_r2]
    identities[1] = OperatorScore(*planted)
    budget = AtlasBudget(
        k_max=1, n_train_tokens=4000.0, n_test_tokens=4000.0, alpha_choice="fixed", subspace_fraction=0.9,
        null_replicates=0, jacobian_layers=[], jacobian_tokens=0, jacobian_directions=0, causal_pairs=[],
        causal_sequences=0, causal_seq_len=0,
    )  # fmt: skip
    return AtlasResult(
        model="planted",
        store_digest="-",
        d_model=20,
        layers=list(range(len(identity_r2) + 1)),
        budget=budget,
        seconds={},
        pairs=[_pair(L, 1, s) for L, s in enumerate(identities)],
    )


def _row(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_uniform_and_weighted_r2_disagreeing_in_sign_stand_side_by_side_in_every_table():
    r2, r2w = planted_disagreement()
    assert r2 < -0.5 and r2w > 0.9  # the one well-predicted dimension carries almost all the variance
    result = _atlas([-12.8, 0.0, 0.45, 0.50, 0.55], (r2, r2w))
    md = atlas_markdown(result)
    # every pair: R² / R²_w in one cell, for every operator
    assert f"| L01_k1 | 10 | {r2:.3f} / {r2w:.3f} | 0.590 / 0.690 |" in _row(md, "| L01_k1 |")
    # the CSV has both for every operator, and the weighted gain over the identity
    columns = table_columns()
    row = dict(zip(columns, table(result)[1]))
    assert all(f"r2_{op}" in columns and f"r2_weighted_{op}" in columns for op in operators())
    assert row["r2_identity"] == r2 and row["r2_weighted_identity"] == r2w
    assert row["gain_over_identity_weighted"] == pytest.approx(0.69 - r2w)
    # per k: a uniform row and a weighted row, each median (min … max)
    assert "| 1 | 5 | uniform | 0.450 (-12.800 … 0.550) |" in md
    assert f"| 1 | 5 | weighted | 0.600 (-12.700 … {r2w:.3f}) |" in md  # the planted R²_w is the highest
    # the README table: R² / R²_w medians
    assert readme_table(result)[2].startswith("| 1 | 0.450 / 0.600 | 0.580 / 0.680 |")
    assert "| k: R² / R²_w | identity |" in readme_table(result)[0]


def test_aggregates_over_l_are_medians_that_one_extreme_layer_cannot_move():
    planted = planted_disagreement()
    tame = atlas_metrics(_atlas([0.40, 0.0, 0.45, 0.50, 0.55], planted))["k1"]
    extreme = atlas_metrics(_atlas([-12.8, 0.0, 0.45, 0.50, 0.55], planted))["k1"]
    assert tame["r2_identity_median"] == extreme["r2_identity_median"] == pytest.approx(0.45)
    assert extreme["r2_identity_min"] == -12.8 and extreme["r2_identity_max"] == 0.55
    assert tame["r2_identity_min"] == pytest.approx(planted[0])  # the planted L = 1 is then the lowest
    # a mean would have moved by 13.2 / 5: the median does not, and no mean key is left to read
    assert not any(key.endswith("_mean") or key == "r2_identity" for key in extreme)
    assert extreme["r2_weighted_ridge_median"] == pytest.approx(0.68)
    assert extreme["gain_over_identity_median"] == pytest.approx(0.58 - 0.45)
    md = atlas_markdown(_atlas([-12.8, 0.0, 0.45, 0.50, 0.55], planted))
    assert "## Per k: median over L (min … max)" in md and "## Medians over L" in md


def test_the_count_of_directions_that_carry_transport_is_in_every_atlas_output():
    """Per k the median count over L with its range (and the ceiling share), in metrics.json, the README
    table and pairs.csv; the subspace size's excess over its null is no longer read as a count."""
    result = _atlas([0.40, 0.0, 0.45, 0.50, 0.55], planted_disagreement())  # counts 20, 19, …, 16
    md = atlas_markdown(result)
    assert "| 1 | 0.947 (0.947 … 0.947) | 18 (16 … 20) | 0.9800 (0.9600 … 1.0000) |" in md
    assert "size − null" not in md and "no count" in md
    assert atlas_metrics(result)["k1"]["transport_directions_median"] == 18
    assert "directions carrying transport" in readme_table(result)[0]
    assert readme_table(result)[2].split(" | ")[-2] == "18"
    row = dict(zip(table_columns(), table(result)[3]))
    assert row["transport_directions"] == 17 and row["transport_directions_share"] == pytest.approx(0.97)
