"""Stats → tune → fit on a tiny model: operator artifact, exactness, MLflow runs and registry."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ato import tracking
from ato.accumulate import kfold_stats
from ato.artifacts import Layout, TuningResult, read_pair_stats
from ato.operators import OperatorError, load_operator, save_operator
from ato.stages import collect, fit, stats, tune, validate
from ato.store import ActivationStore
from conftest import load_tiny_params


@pytest.fixture
def fitted(validated_copy):
    params = load_tiny_params(validated_copy)
    stats.main(params)
    tune.main(params)
    fit.main(params)
    return params


@pytest.mark.slow
def test_operators_are_exact_tracked_and_registered(fitted):
    import mlflow
    from sklearn.linear_model import Ridge

    params = fitted
    store = ActivationStore.open(params.path("store"))
    op_dir = params.path("operators") / "L01_k2"
    op = load_operator(
        op_dir,
        expect={
            "model_digest": store.manifest.model.weights_digest,
            "d_model": 32,
            "layer_in": 1,
            "layer_out": 3,
            "store_digest": store.digest,
        },
    )
    cfg = op.config
    tuning = TuningResult.read(params.path("reports") / "tuning" / "L01_k2.json")
    assert cfg.alpha == tuning.alpha and cfg.method == "ridge"
    assert len(tuning.curve) == params.tune.curve_points and tuning.n_trials == params.tune.n_trials
    val = read_pair_stats(Layout.from_params(params).pair_stats("val", "L01_k2"), store.digest)
    assert tuning.n_val == int(val.n) == cfg.n_val_tokens > 0  # the noise is priced at the val token count
    assert tuning.alpha_immaterial == (tuning.alpha_gain < tuning.val_r2_noise)
    # The operator equals scikit-learn's Ridge on the same (BOS-free) training tokens.
    chunks = list(store.iter_chunks("train", [1, 3], 10_000))
    X = np.concatenate([c[1] for c in chunks]).astype(np.float64)
    Y = np.concatenate([c[3] for c in chunks]).astype(np.float64)
    assert cfg.n_train_tokens == len(X)
    ref = Ridge(alpha=cfg.alpha).fit(X, Y)
    np.testing.assert_allclose(op.W.numpy(), ref.coef_, rtol=1e-4, atol=1e-5 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(op.b.numpy(), ref.intercept_, rtol=1e-4, atol=1e-5 * np.abs(ref.intercept_).max())

    # MLflow: a pipeline run, one top-level run per pair with params/metrics/inputs, trials nested under it.
    mlflow.set_tracking_uri(params.mlflow_uri())
    runs = mlflow.search_runs(experiment_names=["ato"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("ato.kind") == "pipeline"]
    pairs = {r.data.tags["ato.pair"]: r for r in runs if r.data.tags.get("ato.kind") == "pair"}
    trials = [r for r in runs if r.data.tags.get("ato.kind") == "trial"]
    assert len(parents) == 1 and set(pairs) == {"L00_k1", "L01_k2"}
    child = pairs["L01_k2"]
    assert child.data.tags["ato.pipeline_run_id"] == parents[0].info.run_id
    assert "mlflow.parentRunId" not in child.data.tags
    assert float(child.data.params["alpha"]) == pytest.approx(cfg.alpha)
    assert {"val_r2", "train_r2", "alpha"} <= set(child.data.metrics)
    diagnostics = {"alpha_flatness", "alpha_gain", "val_r2_noise", "alpha_immaterial", "alpha_at_edge", "tune_n_val"}
    assert diagnostics <= set(child.data.metrics)
    assert child.data.metrics["alpha_immaterial"] == float(tuning.alpha_immaterial)
    assert child.data.metrics["val_r2_noise"] == pytest.approx(tuning.val_r2_noise)
    edge_tag = child.data.tags.get("ato.tune.alpha_edge_warning")
    assert edge_tag == tuning.alpha_edge_warning and child.data.metrics["alpha_at_edge"] == float(edge_tag is not None)
    assert child.inputs.dataset_inputs and child.inputs.dataset_inputs[0].dataset.digest
    assert len(trials) == 2 * params.tune.n_trials
    assert all(t.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in pairs.values()} for t in trials)

    # Registry: a fresh process loads models:/<name>@champion and predicts like the safetensors file.
    name = tracking.registry_name("tiny-gemma3", "L01_k2")
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32) * 10
    code = (
        "import sys, json, numpy as np, mlflow, ato\n"
        f"assert ato.load_operator('models:/{name}@champion').config.layer_in == 1  # ./params.yaml's store\n"
        f"mlflow.set_tracking_uri({params.mlflow_uri()!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        "x = np.array(json.loads(sys.stdin.read()), dtype=np.float32)\n"
        "y64 = m.predict(x.astype(np.float64))  # float64 residuals are cast, not refused\n"
        "assert y64.dtype == np.float32 and np.array_equal(y64, m.predict(x))\n"
        "try:\n"
        "    m.predict(np.zeros((3, 31)))\n"
        "    raise SystemExit('a [3, 31] input was accepted')\n"
        "except ValueError as exc:\n"
        "    assert 'got an array of shape (3, 31)' in str(exc) and len(str(exc)) < 200, str(exc)\n"
        "print(json.dumps(np.asarray(m.predict(x)).tolist()))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(x.tolist()),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=params.root,
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (params.root / "mlflow.db").exists()  # the lookup used the project's store and created none
    assert "type hint" not in out.stderr  # predict is typed: MLflow has nothing to warn about
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, op(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-4)
    from ato import load_registered_operator

    reg = load_registered_operator(name, tracking_uri=params.mlflow_uri())
    torch.testing.assert_close(reg.W, op.W)
    info = mlflow.models.get_model_info(f"models:/{name}@champion")
    assert info.saved_input_example_info is not None
    spec = info.signature.outputs.to_dict()[0]["tensor-spec"]
    assert spec["dtype"] == "float32" and list(spec["shape"]) == [-1, 32] and info.signature.inputs is None
    # the embedding fingerprint lets ato.splice recognise the model it was fitted on, in memory
    from ato.models import load_prepared
    from ato.splicing import embedding_fingerprint

    base, _tokenizer, _info = load_prepared(params.path("model_dir"))
    assert op.config.embedding_fingerprint == embedding_fingerprint(base)
    check_variants(params, name, op_dir, op)
    check_export_all(params, op)


def check_export_all(params, op):
    """`ato export --all`: every pair and variant as a hub-style folder; one imports back unchanged."""
    from ato.cli import main as cli
    from ato.export import read_card

    out = params.root / "hub"
    assert cli(["export", "--all", "--params", str(params.root / "params.yaml"), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    expected = [f"ato-tiny-gemma3-{pair}{suffix}" for pair in ("L00_k1", "L01_k2") for suffix in ("", "-identity")]
    assert len(names) == 2 * (1 + len(params.fit.variants)) and set(expected) <= set(names)
    card = read_card(out / "ato-tiny-gemma3-L01_k2")
    values = {m["name"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    assert values["test R² (uniform over dimensions)"] == pytest.approx(op.config.metrics["test_r2"], abs=1e-6)
    dest = params.root / "imported"
    folder = str(out / "ato-tiny-gemma3-L01_k2")
    assert cli(["import", folder, "--to", str(dest), "--digest", card["ato"]["digest"]]) == 0
    torch.testing.assert_close(load_operator(dest).W, op.W, rtol=0, atol=0)


def check_variants(params, name, op_dir, op):
    """fit.variants: saved beside the operator, scored exactly on every split, registered as aliases
    of the pair's model with their metrics, loadable by alias."""
    import mlflow

    from ato.operators import worse_than_identity

    assert params.fit.variants == ["rank64", "update16", "update64", "update256", "procrustes", "identity"]
    assert sorted(p.name for p in (op_dir / "variants").iterdir()) == sorted(params.fit.variants)
    metrics = op.config.metrics
    assert {"train_r2", "val_r2", "test_r2", "test_r2_weighted", "identity_test_r2"} <= set(metrics)
    variants = {v: load_operator(op_dir, variant=v) for v in params.fit.variants}
    for vop in variants.values():  # each variant carries the reference `worse_than_identity` judges it by
        assert vop.config.identity_test_r2_weighted == metrics["identity_test_r2_weighted"]
    assert variants["rank64"].config.rank == 32 and variants["rank64"].config.rank_requested == 64  # capped at d
    assert variants["identity"].config.metrics["test_r2"] == pytest.approx(metrics["identity_test_r2"], abs=1e-6)
    torch.testing.assert_close(variants["identity"].W, torch.eye(32))
    assert variants["update16"].config.rank == 16 and variants["update16"].config.method == "identity_plus_rrr_update"
    # in-sample, full-rank reduced-rank regression is OLS: at least as good as the ridge fit on train;
    # the full-rank update (update64, capped at d = 32) is OLS too
    train_r2w = {v: vop.config.metrics["train_r2_weighted"] for v, vop in variants.items()}
    assert train_r2w["rank64"] >= metrics["train_r2_weighted"] - 1e-9
    assert train_r2w["update64"] == pytest.approx(train_r2w["rank64"], abs=1e-5)
    assert train_r2w["update16"] <= train_r2w["update64"] + 1e-6
    client = mlflow.MlflowClient()
    registered = [
        v
        for v, vop in variants.items()
        if v == "identity"
        or not worse_than_identity(vop.config.metrics["test_r2_weighted"], metrics["identity_test_r2_weighted"])
    ]
    for v, vop in variants.items():
        assert vop.config.parent_weights_sha256 == op.config.weights_sha256
        if v not in registered:  # saved beside the operator, but not offered under an alias
            with pytest.raises(mlflow.exceptions.MlflowException):
                client.get_model_version_by_alias(name, v)
            continue
        version = client.get_model_version_by_alias(name, v)
        assert float(version.tags["metric.test_r2"]) == pytest.approx(vop.config.metrics["test_r2"], rel=1e-5)
        reg = load_operator(f"models:/{name}@{v}")
        torch.testing.assert_close(reg.W, vop.W, rtol=0, atol=0)
    champion = client.get_model_version_by_alias(name, "champion")
    assert float(champion.tags["metric.test_r2"]) == pytest.approx(metrics["test_r2"], rel=1e-5)
    versions = {client.get_model_version_by_alias(name, a).version for a in ["champion", *registered]}
    assert len(versions) == 1 + len(registered)


def test_operator_mismatch_and_tampering_are_refused(tmp_path):
    W, b = np.eye(4, dtype=np.float32), np.zeros(4, dtype=np.float32)
    cfg = {
        "model": "m",
        "model_digest": "abc",
        "layer_in": 1,
        "layer_out": 2,
        "alpha": 1.0,
        "method": "ridge",
        "d_model": 4,
        "n_train_tokens": 10,
        "store_digest": "s1",
    }
    d = save_operator(tmp_path / "L01_k1", W, b, cfg)
    assert torch.equal(load_operator(d).W, torch.eye(4))
    with pytest.raises(OperatorError, match="model_digest='abc'.*'xyz'"):
        load_operator(d, expect={"model_digest": "xyz"})
    with pytest.raises(OperatorError, match="store_digest"):
        load_operator(d, expect={"store_digest": "s2"})
    raw = bytearray((d / "operator.safetensors").read_bytes())
    original = bytes(raw)
    raw[-3] ^= 0x40  # one bit in a value: the header stays valid, only the checksum notices
    (d / "operator.safetensors").write_bytes(bytes(raw))
    with pytest.raises(OperatorError, match="sha256 differs"):
        load_operator(d)
    raw = bytearray(original)
    raw[10:20] = b"\xff" * 10  # corrupt the header
    (d / "operator.safetensors").write_bytes(bytes(raw))
    with pytest.raises(OperatorError, match="tampered"):
        load_operator(d)
    (d / "operator.safetensors").write_bytes(b"")
    with pytest.raises(OperatorError):
        load_operator(d)


def test_bad_input_is_caught_before_fitting(tiny_project):
    import yaml

    from ato.errors import AtoError
    from ato.params import load_params

    raw = yaml.safe_load((tiny_project / "params.yaml").read_text())
    raw["collect"]["layers"] = [0, 1]
    raw["pairs"] = {"L00_k1": {"L": 0, "k": 1}}
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tiny_project / "params.yaml")
    collect.main(params)
    validate.main(params)
    stats.main(params)
    params = load_tiny_params(tiny_project)  # same store; the pairs now need layers it lacks
    params.pairs["L01_k2"] = type(params.pairs["L00_k1"])(1, 2)
    params.collect.layers = "all"
    with pytest.raises(AtoError, match=r"layer\(s\) \[3\].*not in the store"):
        stats.main(params)
    with pytest.raises(AtoError, match="L01_k2"):
        fit.fit_pair(params, "L01_k2")


def test_stats_refuse_an_unvalidated_or_failed_store(tiny_project):
    import json

    from ato.errors import AtoError

    params = load_tiny_params(tiny_project)
    collect.main(params)
    with pytest.raises(AtoError, match="run `ato validate` first"):
        stats.main(params)
    validate.main(params)
    report = params.path("reports") / "validation" / "validation.json"
    data = json.loads(report.read_text())
    report.write_text(json.dumps({**data, "success": False}))
    with pytest.raises(AtoError, match="failed validation"):
        stats.main(params)
    report.write_text(json.dumps({**data, "store_digest": "other"}))
    with pytest.raises(AtoError, match="different store state"):
        stats.main(params)


def test_kfold_statistics_partition_the_training_split(validated_copy):
    params = load_tiny_params(validated_copy, **{"tune.objective": "kfold", "tune.kfold": 3})
    stats.main(params)
    store = ActivationStore.open(params.path("store"))
    folds = kfold_stats(store, 1, 3, 3, params.stats.chunk_tokens, params.stats.include_bos)
    full = read_pair_stats(Layout.from_params(params).pair_stats("train", "L01_k2"), store.digest)
    assert len(folds) == 3 and all(held.n > 0 for _, held in folds)
    for fit_part, held in folds:  # each fold plus its complement is the whole training split
        np.testing.assert_allclose(fit_part.merge(held).xty, full.xty, rtol=1e-9, atol=1e-6)
        assert fit_part.n + held.n == full.n
    assert sum(held.n for _, held in folds) == full.n
    alpha_r2 = tune.build_objective(params, "L01_k2")(10.0)
    assert np.isfinite(alpha_r2) and alpha_r2 < 1


def test_a_variant_below_the_identity_is_not_registered_unless_asked(caplog):
    """`fit.register_below_identity`: false refuses the planted bad variant, naming it and both R²_w; true keeps it."""
    from ato.artifacts.operator import OperatorConfig
    from ato.fitting import FitResult
    from ato.operators import Operator
    from ato.stages.fit import variants_to_register

    base = {"model": "m", "model_digest": None, "layer_in": 1, "layer_out": 2, "alpha": 0.0, "d_model": 4}
    base |= {"n_train_tokens": 100, "store_digest": "s"}

    def variant(name: str, r2w: float) -> Operator:
        config = {**base, "method": "rrr", "variant": name, "metrics": {"test_r2_weighted": r2w}}
        return Operator(torch.eye(4), torch.zeros(4), OperatorConfig.from_dict(config, name))

    fitted = FitResult(np.eye(4), np.zeros(4), OperatorConfig.from_dict({**base, "method": "ridge"}, "op"))
    fitted.metrics = {"identity_test_r2_weighted": 0.35}
    fitted.variants = {"svd64": variant("svd64", 0.24), "update16": variant("update16", 0.6)}
    fitted.variants["identity"] = variant("identity", 0.35)
    with caplog.at_level("WARNING", logger="ato.stages.fit"):
        assert variants_to_register("L01_k1", fitted, below_identity=False) == ["update16", "identity"]
    (refused,) = caplog.messages
    assert "L01_k1: @svd64 not registered" in refused and "test R²_w 0.240 < 0.350" in refused
    assert "fit.register_below_identity: true" in refused
    caplog.clear()
    assert variants_to_register("L01_k1", fitted, below_identity=True) == ["svd64", "update16", "identity"]
    assert not caplog.messages
