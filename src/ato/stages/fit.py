"""Stage `fit`: refit each pair at its tuned α on the training statistics, save the operator
artifact (safetensors + config.json, docs/contracts.md#operator), track it in the pair's MLflow run
and register it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import Layout, TuningResult, read_json, read_pair_stats
from ato.math.ridge import RidgePath, r2_from_stats
from ato.math.stats import PairStats
from ato.operators import CONFIG, save_operator
from ato.params import FitParams, Pair, Params
from ato.store import ActivationStore
from ato.tracking import dvc_out_hash, log_flat_metrics, log_store_lineage, pair_run, register_operator, registry_name

log = logging.getLogger(__name__)

# config.json keys logged as MLflow params of the pair's run
LOGGED_CONFIG = (
    "layer_in",
    "layer_out",
    "k",
    "alpha",
    "method",
    "n_train_tokens",
    "n_val_tokens",
    "model",
    "store_digest",
    "d_model",
    "standardize",
)


@dataclass
class FitResult:
    """One fitted operator before it is saved: ŷ = x Wᵀ + b, its config.json and its scores."""

    W: np.ndarray  # [d_out, d_in]
    b: np.ndarray  # [d_out]
    config: dict[str, Any]  # the operator's config.json (ato.operators.CONFIG_KEYS and more)
    metrics: dict[str, float] = field(default_factory=dict)  # alpha, train/val R² (uniform, weighted)


def main(params: Params, pair: str | None = None) -> None:
    layout = Layout.from_params(params)
    for name in [pair] if pair else list(params.pairs):
        fitted = fit_pair(params, name)
        out = save_operator(layout.operator(name), fitted.W, fitted.b, fitted.config)
        with pair_run(params, name, "fit"):
            track(params, name, out, fitted)
        m = fitted.metrics
        log.info(
            "fit %s: α = %.4g, train R² = %.4f, val R² = %.4f → %s", name, m["alpha"], m["train_r2"], m["val_r2"], out
        )


def fit_pair(params: Params, pair_name: str) -> FitResult:
    """The pair's operator by `fit.method`, with its config and train/val scores (from the statistics)."""
    pair = params.pairs[pair_name]
    layout = Layout.from_params(params)
    store = ActivationStore.open(layout.store)
    store.require_layers([pair.L, pair.target], f"pair {pair_name}")
    train = read_pair_stats(layout.pair_stats("train", pair_name), store.digest)
    val = read_pair_stats(layout.pair_stats("val", pair_name), store.digest)
    method = params.fit.method
    if method == "ridge":
        alpha = TuningResult.read(layout.tuning(pair_name)).alpha
        W, b = RidgePath.from_stats(train, params.tune.standardize).solve(alpha)
    elif method == "ols":
        alpha = 0.0
        W, b = RidgePath.from_stats(train).solve(0.0)
    else:
        W, b, alpha = sklearn_fit(store, pair, params.fit, params.stats.chunk_tokens, params.stats.include_bos)
    config = {
        "model": store.manifest.model.name,
        "model_digest": store.manifest.model.weights_digest,
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
        "hook": store.manifest.hook,
        "equation": "y_hat = x @ W.T + b",
    }
    return FitResult(W, b, config, {"alpha": alpha, **scores(W, b, {"train": train, "val": val})})


def scores(W: np.ndarray, b: np.ndarray, splits: dict[str, PairStats]) -> dict[str, float]:
    """`<split>_r2` (uniform average over dimensions) and `<split>_r2_weighted`, exactly."""
    out: dict[str, float] = {}
    for split, s in splits.items():
        r2 = r2_from_stats(s, W, b)
        out[f"{split}_r2"], out[f"{split}_r2_weighted"] = float(r2["r2"]), float(r2["r2_weighted"])
    return out


def sklearn_fit(
    store: ActivationStore, pair: Pair, f: FitParams, chunk_tokens: int, include_bos: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    """Lasso / elastic-net via scikit-learn on a training subsample (parity with the reference)."""
    from sklearn.linear_model import ElasticNet, Lasso

    xs, ys, n = [], [], 0
    for chunk in store.iter_chunks("train", [pair.L, pair.target], chunk_tokens, include_special=include_bos):
        xs.append(chunk[pair.L])
        ys.append(chunk[pair.target])
        n += len(xs[-1])
        if n >= f.sklearn_subsample:
            break
    X = np.concatenate(xs)[: f.sklearn_subsample]
    Y = np.concatenate(ys)[: f.sklearn_subsample]
    model = (
        Lasso(alpha=f.sklearn_alpha) if f.method == "lasso" else ElasticNet(alpha=f.sklearn_alpha, l1_ratio=f.l1_ratio)
    )
    model.fit(X, Y)
    return model.coef_, model.intercept_, f.sklearn_alpha


def track(params: Params, pair_name: str, operator_dir: Path, fitted: FitResult) -> None:
    """In the pair's active run: params, scores, the store as training dataset, config.json, registry."""
    import mlflow

    config = fitted.config
    mlflow.log_params({k: config[k] for k in LOGGED_CONFIG})
    log_flat_metrics(fitted.metrics)
    # lineage: the store's DVC hash when DVC recorded it (dvc.lock names the path as params.yaml writes it)
    digest = dvc_out_hash(params.root, str(Path(params.paths.store))) or config["store_digest"]
    log_store_lineage(params.path("store"), digest)
    mlflow.log_artifact(str(operator_dir / CONFIG))
    if params.fit.register:
        register(params, pair_name, operator_dir)


def register(params: Params, pair_name: str, operator_dir: Path) -> str:
    """Register the saved operator as `ato-<model>-<pair>` with alias `fit.alias`; returns the name."""
    config = read_json(operator_dir / CONFIG, "operator config")
    label = config["model"] if params.prepare.source == "embedded" else params.prepare.source
    name = registry_name(label, pair_name)
    register_operator(operator_dir, name, params.fit.alias)
    return name
