"""The transport atlas: the joint banded pass gives the `stats` stage's statistics to 1e-10, the
shared per-layer factors give what the per-pair functions give, GCV and Procrustes against brute
force, and the stage end to end on a tiny model (every output, maps round trip, Jacobian and causal
numbers present, bad params named)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.linalg

from ato.accumulate import BandedGramAccumulator, accumulate_banded, accumulate_local
from ato.math.atlas import (
    LayerFactors,
    alignment,
    cca_from_factors,
    choose_alpha,
    fit_pair,
    gcv_curve,
    jacobian_map,
    probe_directions,
    ridge_path,
)
from ato.math.cca import CCA
from ato.math.heldout import cca_null
from ato.math.procrustes import orthogonal_score, peer_linearity, procrustes_centred, procrustes_plain
from ato.math.ridge import ridge_fit
from ato.math.stats import FIELDS, PairStats
from ato.store import ActivationStore
from conftest import TINY_PARAMS, TOY_KIND, load_tiny_params
from store_factory import build_store


def _rel(a: np.ndarray | float, b: np.ndarray | float) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# --------------------------------------------------------------------------------------------
# The joint pass


@pytest.mark.parametrize("include_bos", [False, True])
def test_joint_pass_equals_the_stats_stage_per_pair_statistics(tmp_path, include_bos):
    synth = build_store(tmp_path / "store", layers=(0, 1, 2, 3, 5), d_model=12)
    store = ActivationStore.open(synth.root)
    band = 2
    acc = accumulate_banded(store, "train", store.layers, band, chunk_tokens=7, include_bos=include_bos)
    pairs = {f"{L}-{T}": (L, T) for L, T in acc.pairs}
    # the band follows layer indices, not list positions: 3 → 5 is in it, 2 → 5 and 0 → 3 are not
    assert sorted(acc.pairs) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (3, 5)]
    reference = accumulate_local(store, "train", pairs, chunk_tokens=16, include_bos=include_bos)
    for name, (L, T) in pairs.items():
        joint = acc.pair_stats(L, T)
        for f in FIELDS:
            assert _rel(getattr(joint, f), getattr(reference[name], f)) <= 1e-10, (name, f)
    with pytest.raises(KeyError, match="outside the band"):
        acc.pair_stats(0, 3)


def test_token_budget_takes_the_first_kept_tokens(tmp_path):
    synth = build_store(tmp_path / "store", layers=(0, 1, 2), d_model=8)
    store = ActivationStore.open(synth.root)
    acc = accumulate_banded(store, "test", [0, 1, 2], 1, chunk_tokens=5, include_bos=False, max_tokens=23)
    arrays = synth.arrays["test"]
    keep = ~arrays["special"]
    x, y = (arrays[f"resid/layer_{n:02d}"][keep][:23].astype(np.float64) for n in (1, 2))
    expected = PairStats.from_data(x, y)
    assert acc.n == 23
    for f in FIELDS:
        assert _rel(getattr(acc.pair_stats(1, 2), f), getattr(expected, f)) <= 1e-12


def test_banded_accumulators_merge_like_one_pass():
    rng = np.random.default_rng(0)
    chunks = [{n: rng.normal(size=(9, 4)) for n in range(4)} for _ in range(3)]
    one, a, b = (BandedGramAccumulator(list(range(4)), 3, 4) for _ in range(3))
    for c in chunks:
        one.update(c)
    a.update(chunks[0])
    for c in chunks[1:]:
        b.update(c)
    a.merge(b)
    for L, T in one.pairs:
        for f in FIELDS:
            assert _rel(getattr(a.pair_stats(L, T), f), getattr(one.pair_stats(L, T), f)) <= 1e-12


# --------------------------------------------------------------------------------------------
# Shared factors, GCV, Procrustes


@pytest.fixture
def linear_pair():
    """x with correlated, unequal-scale dimensions; y = A x + c + noise (d = 10)."""
    rng = np.random.default_rng(1)
    d, n = 10, 3000
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * np.linspace(0.5, 5, d) + 2.0
    A = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    y = x @ A.T + 1.5 + rng.normal(scale=0.5, size=(n, d))
    return x, y, A


def _factors(x: np.ndarray) -> LayerFactors:
    return LayerFactors.from_moments(len(x), x.sum(0), x.T @ x)


def test_shared_factors_give_the_per_pair_ridge_and_cca(linear_pair):
    x, y, _ = linear_pair
    s = PairStats.from_data(x, y)
    fx, fy = _factors(x), _factors(y)
    for alpha in (1e-3, 10.0, 1e4):
        W, b = ridge_path(fx, fy, s).solve(alpha)
        W_ref, b_ref = ridge_fit(s, alpha)
        assert _rel(W, W_ref) < 1e-9 and _rel(b, b_ref) < 1e-9
    cca, ref = cca_from_factors(fx, fy, s), CCA.from_stats(s)
    assert _rel(cca.rho, ref.rho) < 1e-10
    assert cca.total == pytest.approx(ref.total, rel=1e-12)
    assert _rel(cca.rrr_map(3)[0], ref.rrr_map(3)[0]) < 1e-8


def test_gcv_curve_equals_the_hat_matrix_formula(linear_pair):
    x, y, _ = linear_pair
    x, y = x[:200], y[:200]
    s = PairStats.from_data(x, y)
    path = ridge_path(_factors(x), _factors(y), s)
    alphas = np.logspace(-2, 5, 8)
    n = len(x)
    xc, yc = x - x.mean(0), y - y.mean(0)
    ys = yc / np.sqrt((yc**2).sum(0))  # each output scaled by its scatter: the uniform R²'s loss
    brute = []
    for a in alphas:
        H = np.ones((n, n)) / n + xc @ np.linalg.solve(xc.T @ xc + a * np.eye(x.shape[1]), xc.T)
        brute.append(((ys - H @ ys) ** 2).sum() / n / (1 - np.trace(H) / n) ** 2)
    assert _rel(gcv_curve(path, s, alphas), np.array(brute)) < 1e-8
    alpha, edge = choose_alpha(path, s, alphas)
    assert alpha == alphas[int(np.argmin(brute))] and edge == (alpha in (alphas[0], alphas[-1]))


def test_procrustes_maps_match_scipy_and_the_orthogonal_score(linear_pair):
    x, y, _ = linear_pair
    s = PairStats.from_data(x, y)
    W, b, scale = procrustes_plain(s)
    R, _ = scipy.linalg.orthogonal_procrustes(x, y)  # argmin ‖x R − y‖ over orthogonal R (row convention)
    assert _rel(W, scale * R.T) < 1e-9 and not b.any()
    assert scale == pytest.approx(np.trace(R.T @ x.T @ y) / (x**2).sum(), rel=1e-9)  # least-squares scale
    xc, yc = x - x.mean(0), y - y.mean(0)
    Wc, bc, sc, linearity = procrustes_centred(s)
    Rc, _ = scipy.linalg.orthogonal_procrustes(xc, yc)
    assert _rel(Wc, sc * Rc.T) < 1e-9 and _rel(bc, y.mean(0) - Wc @ x.mean(0)) < 1e-9
    a, bn = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    Rn, _ = scipy.linalg.orthogonal_procrustes(a, bn)
    assert orthogonal_score(s) == pytest.approx(1 - np.linalg.norm(a @ Rn - bn) ** 2, rel=1e-9)
    assert linearity == pytest.approx(orthogonal_score(s), rel=1e-12)


def _peer_functions():
    """llm-microscope's functions module, loaded by file path: the package's `__init__` imports a module
    that does not exist (`from logit_lens import *`), so `import llm_microscope` fails."""
    import importlib.util

    package = importlib.util.find_spec("llm_microscope")
    assert package is not None and package.submodule_search_locations, "llm-microscope: pinned in requirements.txt"
    path = f"{list(package.submodule_search_locations)[0]}/functions.py"
    spec = importlib.util.spec_from_file_location("llm_microscope_functions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [11, 200, 3000])
def test_peer_linearity_is_the_peers_own_number_on_the_same_rows(linear_pair, n):
    """Razzhigaev et al.'s `procrustes_similarity` on the rows equals our statistics-only value; at
    n = d + 1 (centred rows of full rank d) it is 1 however poor the map: an in-sample number."""
    import torch

    x, y, _ = linear_pair
    x, y = x[:n], y[:n]
    theirs = _peer_functions().procrustes_similarity(torch.from_numpy(x), torch.from_numpy(y))
    s = PairStats.from_data(x, y)
    assert peer_linearity(s) == pytest.approx(theirs, abs=1e-9)
    assert (theirs == pytest.approx(1.0, abs=1e-9)) == (n <= x.shape[1] + 1)


def test_the_atlas_reports_the_peers_number_beside_the_orthogonal_score(linear_pair):
    import torch

    x, y, _ = linear_pair
    s = PairStats.from_data(x, y)
    theirs = _peer_functions().procrustes_similarity(torch.from_numpy(x), torch.from_numpy(y))
    null = cca_null(len(x), len(x), 10, 10, replicates=2)
    fit = fit_pair(0, 1, _factors(x), _factors(y), s, s, 1.0, null)
    assert fit.peer_linearity == pytest.approx(theirs, abs=1e-9)
    assert fit.orthogonal_score == pytest.approx(orthogonal_score(s), rel=1e-12)
    assert abs(fit.orthogonal_score - fit.peer_linearity) > 0.01  # y = A x + noise with A far from a rotation


def test_jacobian_map_replaces_the_ridge_action_on_the_probed_subspace(linear_pair):
    x, y, A = linear_pair
    s = PairStats.from_data(x, y)
    W, _ = ridge_fit(s, 1.0)
    V = probe_directions([W, 2 * W], 4)
    np.testing.assert_allclose(V.T @ V, np.eye(4), atol=1e-12)
    W_J, b_J = jacobian_map(W, V, A @ V, s)
    np.testing.assert_allclose(W_J @ V, A @ V, atol=1e-10)  # E[J] on span V
    P = np.eye(len(A)) - V @ V.T
    np.testing.assert_allclose(W_J @ P, W @ P, atol=1e-10)  # the ridge map elsewhere
    np.testing.assert_allclose(b_J, s.mean_y - W_J @ s.mean_x)
    full = probe_directions([W], 100)
    assert np.array_equal(full, np.eye(len(A)))
    assert alignment(W, W @ np.diag(np.linspace(1, 2, len(A))), 3) <= 1.0 + 1e-12
    assert alignment(W, W, 3) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# The stage on a tiny model


ATLAS_TINY = {f"atlas.{key}": value for key, value in TINY_PARAMS["atlas"].items()}  # k ≤ 2 of 4 layers


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory, validated_tiny_project):
    """atlas on (a copy of) the collected and validated tiny project, once for the module's tests."""
    from ato.stages import atlas
    from conftest import copy_project

    root = copy_project(validated_tiny_project, tmp_path_factory.mktemp("atlas") / "project")
    params = load_tiny_params(root, **ATLAS_TINY)
    return params, atlas.main(params)


def test_stage_writes_every_output_and_the_numbers_hang_together(atlas_run):
    from ato.artifacts import AtlasResult, Layout, json_clean, read_atlas_maps

    params, result = atlas_run
    layout = Layout.from_params(params)
    store = ActivationStore.open(layout.store)
    assert [p.pair for p in result.pairs] == ["L00_k1", "L00_k2", "L01_k1", "L01_k2", "L02_k1"]
    assert json_clean(AtlasResult.read(layout.atlas_result).to_dict()) == json_clean(result.to_dict())  # NaN → null
    assert result.budget.n_train_tokens == store.n_tokens("train") - store.split_info("train").special_tokens
    for p in result.pairs:
        ops = p.operators
        assert np.isfinite([ops[o].r2 for o in ("identity", "ridge", "rrr", "procrustes", "jacobian")]).all()
        assert p.local is not None and p.local.directions == 4 and p.local.n_probe_tokens == 22
        assert 0 <= p.local.alignment <= 1 + 1e-9 and len(p.local.sv_jacobian) == 4
        assert p.local.n_probe_sequences == 2 and len(p.local.lag_response) == len(p.local.lag_noise) == 2  # ℓ = 1, 2
        assert p.local.sequence_noise > 0 and np.isfinite([*p.local.lag_response, p.local.sequences_for_gap]).all()
        assert p.gain_over_identity == pytest.approx(ops["ridge"].r2 - ops["identity"].r2)
        assert p.eta_expected > 0 and np.isfinite(p.heldout_subspace_size_null)
        assert 0 <= p.transport_directions <= store.d_model and 0 <= p.transport_directions_share <= 1 + 1e-12
    causal = result.pair("L00_k1").operators
    assert all(np.isfinite(causal[o].causal_delta) for o in ("identity", "ridge", "jacobian", "train_mean"))
    assert causal["ridge"].causal_low <= causal["ridge"].causal_delta <= causal["ridge"].causal_high
    assert not np.isfinite(result.pair("L01_k1").operators["ridge"].causal_delta)
    maps, meta = read_atlas_maps(layout.atlas_maps, store.digest)
    assert sorted(maps) == [p.pair for p in result.pairs] and meta.alpha["L00_k1"] == result.pair("L00_k1").alpha
    metrics = json.loads(layout.atlas_metrics.read_text())
    assert set(metrics) >= {"k1", "k2", "seconds", "n_pairs"} and metrics["n_pairs"] == 5
    report = layout.atlas_report.read_text()
    assert all(p.pair in report for p in result.pairs) and "Causal Δ" in report
    assert "sequences for noise ≤ gap/2" in report and "needs both non-Gaussian" not in report
    for kind in ("heatmaps", "operators", "spectra"):
        assert layout.atlas_figure(kind).stat().st_size > 10_000
    assert len(layout.atlas_table.read_text().splitlines()) == 1 + len(result.pairs)


def test_the_ridge_maps_written_are_the_fits_of_the_joint_statistics(atlas_run):
    from ato.artifacts import Layout, read_atlas_maps

    params, result = atlas_run
    layout = Layout.from_params(params)
    store = ActivationStore.open(layout.store)
    maps, _ = read_atlas_maps(layout.atlas_maps)
    train = accumulate_local(store, "train", {"p": (1, 2)}, 64, include_bos=False)["p"]
    W, b = ridge_fit(train, result.pair("L01_k1").alpha)
    np.testing.assert_allclose(maps["L01_k1"][0], W, rtol=1e-4, atol=1e-5 * np.abs(W).max())
    np.testing.assert_allclose(maps["L01_k1"][1], b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_bad_atlas_params_are_named(atlas_run, tmp_path):
    from ato.atlas import AtlasError
    from ato.params import ParamsError
    from ato.stages import atlas

    params, _ = atlas_run
    project = tmp_path / "p"  # a copy: the bad params written below must not reach the module's other tests
    shutil.copytree(params.root, project, symlinks=True)
    with pytest.raises(AtlasError, match="L00_k3"):
        atlas.main(load_tiny_params(project, **{**ATLAS_TINY, "atlas.causal_pairs": ["L00_k3"]}))
    with pytest.raises(AtlasError, match="jacobian_layers"):
        atlas.main(load_tiny_params(project, **{**ATLAS_TINY, "atlas.jacobian_layers": [3]}))
    with pytest.raises(ParamsError, match="atlas.tokens"):
        load_tiny_params(project, **{**ATLAS_TINY, "atlas.tokens": {"train": 10}})


def test_a_registered_kind_is_fitted_scored_and_reported_by_the_atlas(atlas_run, tmp_path, toy_kind):
    """The atlas on a copy of the tiny atlas project, with the toy kind registered."""
    from ato.atlas import table_columns
    from ato.stages import atlas

    params, _ = atlas_run
    shutil.copytree(params.root, tmp_path / "p", symlinks=True)
    result = atlas.main(load_tiny_params(tmp_path / "p"))
    for p in result.pairs:
        assert np.isfinite(p.operators[TOY_KIND].r2)
        # halfway between the identity and the train mean cannot beat the least-squares ridge map by much
        assert p.operators[TOY_KIND].r2 <= p.operators["ridge"].r2 + 0.05
    causal = [p for p in result.pairs if np.isfinite(p.operators["ridge"].causal_delta)]
    assert causal and all(np.isfinite(p.operators[TOY_KIND].causal_delta) for p in causal)  # patched too
    assert table_columns()[4 + 6] == f"r2_{TOY_KIND}"
    reports = tmp_path / "p" / "reports" / "atlas"
    assert f"r2_{TOY_KIND}" in (reports / "pairs.csv").read_text().splitlines()[0]
    markdown = (reports / "atlas.md").read_text()
    assert markdown.count(f"| {TOY_KIND} |") == 3  # per-k, every-pair and causal tables; the README's by column
    assert "| half carry |" in markdown
