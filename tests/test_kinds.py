"""The registry of map kinds (`ato.kinds`): the built-in roles list exactly the keys earlier runs wrote
(so outputs stay byte-identical), and a kind registered in the test process is fitted, scored and
reported by evaluate, the atlas and the report with no other edit."""

from __future__ import annotations

import json

import pytest

from ato import kinds
from ato.kinds import MapKind, Place, parse_variant
from conftest import TOY_KIND, half_carry


def test_built_in_roles_list_the_historical_keys_in_their_order():
    """Every key below is in files of earlier runs (metrics, CSV columns, causal JSON, markdown)."""
    assert kinds.keys_for("variant") == ("rank", "update", "svd", "procrustes", "identity")
    assert kinds.keys_for("evaluate") == ("ato", "identity", "mean", "ols")
    assert kinds.keys_for("atlas") == ("identity", "procrustes", "procrustes_centred", "ridge", "rrr", "jacobian")
    assert kinds.keys_for("atlas_reference") == ("train_mean",)
    assert kinds.keys_for("causal") == ("ato", "identity", "zero", "bias_only", "train_mean", "mean_update", "context")
    assert kinds.causal_keys("pair") == ("ato", "identity", "bias_only", "mean_update", "context")
    assert kinds.causal_keys("target") == ("zero", "train_mean")
    assert kinds.keys_for("recovered_against") == ("train_mean", "zero", "identity", "mean_update")
    assert kinds.keys_for("languages_features") == ("operator", "own", "identity")
    assert kinds.keys_for("languages_causal") == ("operator", "own", "mean")


def test_one_entry_per_map_whatever_each_place_calls_it():
    assert kinds.by_key("atlas", "ridge") is kinds.by_key("evaluate", "ato") is kinds.get("ato")
    assert kinds.by_key("evaluate", "mean") is kinds.by_key("causal", "train_mean") is kinds.get("train_mean")
    assert kinds.by_key("variant", "rank") is kinds.by_key("atlas", "rrr")
    assert kinds.by_key("variant", "procrustes") is kinds.get("procrustes_centred")


def test_variant_names_parse_from_the_registry():
    assert (parse_variant("rank64").kind, parse_variant("rank64").rank) == ("rank", 64)
    assert (parse_variant("svd3").kind, parse_variant("svd3").rank) == ("svd", 3)
    assert (parse_variant("update16").kind, parse_variant("update16").rank) == ("update", 16)
    assert parse_variant("procrustes").rank is None and parse_variant("identity").kind == "identity"
    for bad in ("rank0", "rank", "svd01", "ridge", "identity2", "Procrustes"):
        with pytest.raises(ValueError, match=r"expected rank<r>, update<r>, svd<r> \(r ≥ 1\), procrustes or identity"):
            parse_variant(bad)
    assert kinds.variant_method("rank") == "rrr" and kinds.variant_method("svd") == "svd_truncated"


def test_register_refuses_a_taken_name_or_key(toy_kind):
    with pytest.raises(ValueError, match=f"{TOY_KIND!r} is already registered"):
        kinds.register(toy_kind)
    clash = MapKind("other", "o", "o", "constant", "recomputed", {"evaluate": Place(11, key="ols")}, "#000000")
    with pytest.raises(ValueError, match="key 'ols' is already taken in role 'evaluate'"):
        kinds.register(clash)
    with pytest.raises(KeyError, match="unknown map kind 'nope'"):
        kinds.get("nope")


def test_metrics_of_a_registered_predictor_are_written_last_and_read_back(tmp_path, toy_kind):
    from ato.artifacts import ArtifactError, BaselineScores, PairMetrics

    counts = ("n_test_tokens", "n_train_tokens", "n_features", "n_transported", "n_synthesised", "n_no_verdict")
    m = PairMetrics(**dict.fromkeys(counts, 1.0), extra={TOY_KIND: BaselineScores(r2=0.25, r2_weighted=0.3)})
    m.write(tmp_path / "m.json")
    keys = list(json.loads((tmp_path / "m.json").read_text()))
    assert keys[-2:] == [f"{TOY_KIND}_r2", f"{TOY_KIND}_r2_weighted"]
    back = PairMetrics.read(tmp_path / "m.json")
    assert back.predictor(TOY_KIND) == BaselineScores(r2=0.25, r2_weighted=0.3)
    kinds.unregister(TOY_KIND)
    try:
        with pytest.raises(ArtifactError, match=f"unknown key '{TOY_KIND}_r2'"):
            PairMetrics.read(tmp_path / "m.json")
    finally:
        kinds.register(toy_kind)


def test_a_registered_kind_is_scored_by_evaluate_and_shown_in_the_report(tmp_path, toy_kind):
    from sklearn.metrics import r2_score

    from ato.artifacts import Layout, PairMetrics, read_pair_stats
    from ato.params import Pair
    from ato.reporting.markdown import _residual, fmt
    from ato.reporting.results import PairResults
    from ato.stages import evaluate
    from test_evaluate import PAIR, _test_xy, build_project

    built = build_project(tmp_path)
    evaluate.main(built["params"], PAIR)
    path = tmp_path / "reports" / "metrics" / f"{PAIR}.json"
    metrics = json.loads(path.read_text())
    x, y = _test_xy(built["data"])
    W, b = half_carry(read_pair_stats(Layout.from_params(built["params"]).pair_stats("train", PAIR)))
    assert metrics[f"{TOY_KIND}_r2"] == pytest.approx(r2_score(y, x @ W.T + b), rel=1e-6)
    assert metrics["identity_r2"] == pytest.approx(r2_score(y, x), rel=1e-6)  # the built-in ones unchanged

    m = PairMetrics.read(path)
    table = "\n".join(_residual([PairResults(PAIR, Pair(L=0, k=1), metrics=m)]))
    header, row = (line.split(" | ") for line in table.splitlines() if line.startswith("| "))
    assert header[-4:] == ["R² half carry", "R²_w half carry", "token cosine", "MSE |"]
    assert row[-4] == fmt(metrics[f"{TOY_KIND}_r2"]) and row[-3] == fmt(metrics[f"{TOY_KIND}_r2_weighted"])
    assert row[-10] == fmt(metrics["identity_r2"]) and row[-9] == fmt(metrics["identity_r2_weighted"])


def test_fit_refuses_a_variant_name_no_kind_has():
    from ato.params import FitParams, ParamsError
    from ato.stages.fit import check_variants

    check_variants(FitParams(variants=["rank4", "svd2", "procrustes", "identity"]))
    with pytest.raises(ParamsError, match=r"fit.variants: 'rank0' is not rank<r>, update<r>, svd<r> \(r ≥ 1\), proc"):
        check_variants(FitParams(variants=["rank4", "rank0"]))
    with pytest.raises(ParamsError, match="names repeat"):
        check_variants(FitParams(variants=["identity", "identity"]))


def test_variant_descriptions_come_from_the_registry():
    """The words earlier runs' MLflow version descriptions use for each variant method."""
    assert kinds.variant_text("rrr").format(rank=8) == "reduced-rank regression at rank 8"
    assert kinds.variant_text("svd_truncated").format(rank=8) == "the champion's SVD truncated to rank 8"
    update = "the identity plus the best rank-16 update (reduced-rank regression of y − x on x)"
    assert kinds.variant_text("identity_plus_rrr_update").format(rank=16) == update
    assert kinds.variant_text("procrustes") == "similarity Procrustes (a rotation plus a global gain)"
    assert kinds.variant_text("identity") == "the identity map ŷ = x (pure carry-over: the baseline, not a fitted map)"
    assert kinds.variant_text("ridge") == "ridge"  # a method no variant kind has names itself


def test_built_in_causal_patches_build_the_documented_values():
    import torch

    x, W, b, mean_y = torch.randn(3, 4), torch.randn(4, 4), torch.randn(4), torch.randn(4)
    mean_x, W_context, b_context = torch.randn(4), torch.randn(4, 4), torch.randn(4)
    per_pair = kinds.PatchInputs(W=W, b=b, mean_x=mean_x, mean_y=mean_y, W_context=W_context, b_context=b_context)
    per_target = kinds.PatchInputs(mean_y=mean_y)
    value = {
        k.name: k.patch_value(per_pair if k.causal == "pair" else per_target)(x) for k in kinds.kinds_for("causal")
    }
    assert torch.equal(value["ato"], torch.nn.functional.linear(x, W, b))
    assert torch.equal(value["identity"], x) and torch.equal(value["zero"], torch.zeros(3, 4))
    assert torch.equal(value["bias_only"], b.expand(3, -1)) and torch.equal(value["train_mean"], mean_y.expand(3, -1))
    assert torch.equal(value["mean_update"], x + (mean_y - mean_x))
    assert torch.equal(value["context"], torch.nn.functional.linear(x, W_context, b_context))  # x: stacked rows
    assert kinds.get("context").reads == "context" and kinds.get("ato").reads == "x_L"
    with pytest.raises(ValueError, match="'W' is not given in this scope"):
        kinds.get("ato").patch_value(per_target)


def test_the_mean_update_adds_the_train_means_difference_exactly():
    """Planted: integer means and residuals (exact in float32), so x + (ȳ − x̄) has one right answer."""
    import torch

    x = torch.tensor([[1.0, -2.0, 3.0], [0.0, 5.0, -7.0]])
    mean_x, mean_y = torch.tensor([2.0, 1.0, -1.0]), torch.tensor([10.0, -4.0, 6.0])
    patch = kinds.get("mean_update").patch_value(kinds.PatchInputs(mean_x=mean_x, mean_y=mean_y))
    assert torch.equal(patch(x), torch.tensor([[9.0, -7.0, 10.0], [8.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="'mean_x' is not given in this scope"):
        kinds.get("mean_update").patch_value(kinds.PatchInputs(mean_y=mean_y))


def test_a_causal_kind_needs_its_scope_and_its_patch():
    no_patch = MapKind("other", "o", "o", "constant", "recomputed", {"causal": Place(11)}, "#000000", causal="pair")
    with pytest.raises(ValueError, match="needs its scope .* and its `patch`"):
        kinds.register(no_patch)
    assert "other" not in kinds.keys_for("causal")


def test_the_languages_roles_are_asked_at_use_time():
    from ato.languages import causal_conditions, feature_predictors

    extra = MapKind(
        "extra",
        "e",
        "e",
        "pair_stats",
        "recomputed",
        {"languages_features": Place(9), "languages_causal": Place(9)},
        "#000",
    )
    kinds.register(extra)
    try:
        assert feature_predictors() == ("operator", "own", "identity", "extra")
        assert causal_conditions() == ("operator", "own", "mean", "extra")
    finally:
        kinds.unregister("extra")
    assert feature_predictors() == ("operator", "own", "identity")
