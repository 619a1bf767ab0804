"""Stage `fit`: refit each pair at its tuned α on the training statistics, save the operator
artifact (safetensors + config.json), track it in the pair's MLflow run and register it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import AtoError
from ..math.ridge import RidgePath, r2_from_stats
from ..operators import save_operator
from ..params import Params
from ..store import ActivationStore
from .stats import load_pair_stats


def registry_name(model_label: str, pair_name: str) -> str:
    """`ato-<model>-<pair>`, e.g. ato-gemma-3-270m-L05_k1 (registry names allow [A-Za-z0-9_.-])."""
    slug = model_label.split(" ")[0].split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"ato-{slug}-{pair_name}")


def dvc_store_hash(params: Params) -> str | None:
    """The DVC hash of the activation store from dvc.lock, when DVC has recorded it."""
    import yaml

    lock = params.root / "dvc.lock"
    if not lock.exists():
        return None
    store = str(Path(params.paths.store))
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == store:
                return out.get("md5")
    return None


def sklearn_fit(params: Params, pair_name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Lasso / elastic-net via scikit-learn on a training subsample (parity with the reference)."""
    from sklearn.linear_model import ElasticNet, Lasso

    pair = params.pairs[pair_name]
    store = ActivationStore.open(params.path("store"))
    xs, ys, n = [], [], 0
    for chunk in store.iter_chunks("train", [pair.L, pair.target], params.stats.chunk_tokens,
                                   include_special=params.stats.include_bos):
        xs.append(chunk[pair.L])
        ys.append(chunk[pair.target])
        n += len(xs[-1])
        if n >= params.fit.sklearn_subsample:
            break
    X = np.concatenate(xs)[: params.fit.sklearn_subsample]
    Y = np.concatenate(ys)[: params.fit.sklearn_subsample]
    alpha = params.fit.sklearn_alpha
    model = (Lasso(alpha=alpha) if params.fit.method == "lasso"
             else ElasticNet(alpha=alpha, l1_ratio=params.fit.l1_ratio))
    model.fit(X, Y)
    return model.coef_, model.intercept_, alpha


def fit_pair(params: Params, pair_name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    pair = params.pairs[pair_name]
    store = ActivationStore.open(params.path("store"))
    store.require_layers([pair.L, pair.target], f"pair {pair_name}")
    train = load_pair_stats(params, "train", pair_name, store.digest)
    val = load_pair_stats(params, "val", pair_name, store.digest)
    method = params.fit.method
    if method == "ridge":
        tuning = params.path("reports") / "tuning" / f"{pair_name}.json"
        if not tuning.exists():
            raise AtoError(f"{tuning}: no tuning result for {pair_name}; run `ato tune --pair {pair_name}`")
        alpha = float(json.loads(tuning.read_text())["alpha"])
        W, b = RidgePath.from_stats(train, params.tune.standardize).solve(alpha)
    elif method == "ols":
        alpha = 0.0
        W, b = RidgePath.from_stats(train).solve(0.0)
    else:
        W, b, alpha = sklearn_fit(params, pair_name)
    model = store.manifest["model"]
    config = {
        "model": model["name"],
        "model_digest": model["weights_digest"],
        "layer_in": pair.L,
        "layer_out": pair.target,
        "k": pair.k,
        "alpha": alpha,
        "method": method,
        "standardize": params.tune.standardize if method == "ridge" else False,
        "d_model": store.d_model,
        "n_train_tokens": int(train.n),
        "n_val_tokens": int(val.n),
        "include_bos": params.stats.include_bos,
        "store_digest": store.digest,
        "hook": store.manifest["hook"],
        "equation": "y_hat = x @ W.T + b",
    }
    metrics: dict[str, float] = {"alpha": alpha}
    for split, s in (("train", train), ("val", val)):
        scores = r2_from_stats(s, W, b)
        metrics[f"{split}_r2"], metrics[f"{split}_r2_weighted"] = scores["r2"], scores["r2_weighted"]
    return W, b, {"config": config, "metrics": metrics}


def main(params: Params, pair: str | None = None) -> None:
    import mlflow

    from ..tracking import log_flat_metrics, pair_run

    for name in [pair] if pair else list(params.pairs):
        W, b, result = fit_pair(params, name)
        out = save_operator(params.path("operators") / name, W, b, result["config"])
        config, metrics = result["config"], result["metrics"]
        with pair_run(params, name, "fit"):
            mlflow.log_params({k: config[k] for k in ("layer_in", "layer_out", "k", "alpha", "method",
                                                      "n_train_tokens", "n_val_tokens", "model",
                                                      "store_digest", "d_model", "standardize")})
            log_flat_metrics(metrics)
            digest = dvc_store_hash(params) or config["store_digest"]
            mlflow.set_tag("ato.store_dvc_hash", digest)
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            source = resolve_dataset_source(params.path("store").resolve().as_uri())
            mlflow.log_input(MetaDataset(source, name="activation-store", digest=digest[:36]),
                             context="training")
            mlflow.log_artifact(str(out / "config.json"))
            if params.fit.register:
                register(params, name, out)
        print(f"fit {name}: α = {metrics['alpha']:.4g}, train R² = {metrics['train_r2']:.4f}, "
              f"val R² = {metrics['val_r2']:.4f} → {out}")


def register(params: Params, pair_name: str, operator_dir: Path) -> str:
    """Log the operator as a pyfunc (model from code, no pickle) and alias the new version."""
    import mlflow
    import safetensors
    import torch

    config = json.loads((operator_dir / "config.json").read_text())
    name = registry_name(config["model"] if params.prepare.source == "embedded" else params.prepare.source,
                         pair_name)
    info = mlflow.pyfunc.log_model(
        name="operator",
        python_model=str(Path(__file__).resolve().parents[1] / "pyfunc_model.py"),
        artifacts={"operator": str(operator_dir)},
        code_paths=[str(Path(__file__).resolve().parents[1])],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"safetensors=={safetensors.__version__}",
                          f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"],
        registered_model_name=name,
    )
    version = info.registered_model_version
    mlflow.MlflowClient().set_registered_model_alias(name, params.fit.alias, str(version))
    mlflow.set_tag("ato.registered_model", f"models:/{name}@{params.fit.alias}")
    return name
