"""Stage `fit`: refit each pair at its tuned α on the training statistics, save the operator
artifact (safetensors + config.json, docs/contracts.md#operator) with its variants (`fit.variants`:
reduced-rank, SVD-truncated, Procrustes, identity; `<dir>/variants/<name>/`), track it in the pair's
MLflow run and register it (`@champion`) and each variant (`@<variant>`) as versions of the pair's
registered model, every one with its train/val/test R² from the pair statistics. The champion is
registered last, so the registry list's "latest version" is the champion; each version's description
says which map it is, and a variant whose test R²_w is below the identity map's says so in a WARNING."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ato.artifacts import ArtifactError, Layout, TuningResult, read_json, read_pair_stats
from ato.kinds import parse_variant, variant_forms
from ato.math.cca import CCA
from ato.math.ridge import RidgePath, r2_from_stats
from ato.math.stats import PairStats
from ato.operators import (
    CONFIG,
    WEIGHTS,
    Operator,
    below_identity_warning,
    operator_variant,
    save_operator,
    variant_dir,
)
from ato.params import FitParams, Pair, Params, ParamsError
from ato.store import ActivationStore
from ato.tracking import (
    dvc_out_hash,
    log_flat_metrics,
    log_store_lineage,
    pair_run,
    register_operator,
    registry_name,
)

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
    metrics: dict[str, float] = field(default_factory=dict)  # alpha, train/val/test R² (uniform, weighted)
    variants: dict[str, Operator] = field(default_factory=dict)  # fit.variants, each with config["metrics"]


def main(params: Params, pair: str | None = None) -> None:
    layout = Layout.from_params(params)
    check_variants(params.fit)
    for name in [pair] if pair else list(params.pairs):
        fitted = fit_pair(params, name)
        out = save_operator(layout.operator(name), fitted.W, fitted.b, fitted.config, variants=fitted.variants)
        with pair_run(params, name, "fit"):
            track(params, name, out, fitted)
        m = fitted.metrics
        log.info(
            "fit %s: α = %.4g, train R² = %.4f, val R² = %.4f, test R² = %.4f (identity map %.4f) → %s",
            name,
            m["alpha"],
            m["train_r2"],
            m["val_r2"],
            m["test_r2"],
            m["identity_test_r2"],
            out,
        )
        for v, op in fitted.variants.items():
            log.info("  variant %s: test R² = %.4f", v, op.config["metrics"]["test_r2"])


def check_variants(f: FitParams) -> None:
    """`fit.variants`: known, distinct names (before anything is fitted)."""
    for name in f.variants:
        try:
            parse_variant(name)
        except ValueError:
            raise ParamsError(f"fit.variants: {name!r} is not {variant_forms()}") from None
    if len(set(f.variants)) != len(f.variants):
        raise ParamsError(f"fit.variants: names repeat in {f.variants}")


def fit_pair(params: Params, pair_name: str) -> FitResult:
    """The pair's operator by `fit.method` and its `fit.variants`, with config and train/val/test scores
    (exact, from the statistics; the identity map's test R² beside them)."""
    pair = params.pairs[pair_name]
    layout = Layout.from_params(params)
    store = ActivationStore.open(layout.store)
    store.require_layers([pair.L, pair.target], f"pair {pair_name}")
    splits = {split: read_pair_stats(layout.pair_stats(split, pair_name), store.digest) for split in SCORED}
    train, val = splits["train"], splits["val"]
    method = params.fit.method
    if method == "ridge":
        alpha = TuningResult.read(layout.tuning(pair_name)).alpha
        W, b = RidgePath.from_stats(train, params.tune.standardize).solve(alpha)
    elif method == "ols":
        alpha = 0.0
        W, b = RidgePath.from_stats(train).solve(0.0)
    else:
        W, b, alpha = sklearn_fit(store, pair, params.fit, params.stats.chunk_tokens, params.stats.include_bos)
    config: dict[str, Any] = {
        "model": store.manifest.model.name,
        "model_digest": store.manifest.model.weights_digest,
        "layer_in": pair.L,
        "layer_out": pair.target,
        "k": pair.k,
        "alpha": alpha,
        "method": method,
        "standardize": params.tune.standardize if method == "ridge" else False,
        "d_model": store.d_model,
        "n_layers": store.manifest.model.n_layers,
        "n_train_tokens": int(train.n),
        "n_val_tokens": int(val.n),
        "include_bos": params.stats.include_bos,
        "store_digest": store.digest,
        "hook": store.manifest.hook,
        "equation": "y_hat = x @ W.T + b",
        "variants": list(params.fit.variants),
        "embedding_fingerprint": fitted_model_fingerprint(params, store),
    }
    metrics = {"alpha": alpha, **scores(W, b, splits)}
    identity = scores(np.eye(store.d_model), np.zeros(store.d_model), {"test": splits["test"]})  # the baseline
    metrics |= {f"identity_{k}": v for k, v in identity.items()}
    config["metrics"] = {k: v for k, v in metrics.items() if k != "alpha"}
    # top level, so each variant's config inherits the reference it is judged against (worse_than_identity)
    config["identity_test_r2_weighted"] = identity["test_r2_weighted"]
    fitted = FitResult(W, b, config, metrics)
    fitted.variants = make_variants(fitted, splits, params.fit.variants)
    return fitted


def fitted_model_fingerprint(params: Params, store: ActivationStore) -> dict[str, Any]:
    """The prepared model's embedding fingerprint (`ato.splicing.embedding_fingerprint`), which lets
    `ato.splice` recognise the model in memory; the model must be the one the store was collected from."""
    from ato.models import load_prepared
    from ato.splicing import embedding_fingerprint

    model_dir = params.path("model_dir")
    model, _tokenizer, info = load_prepared(model_dir)
    recorded = store.manifest.model.weights_digest
    if recorded is not None and recorded != info.weights_digest:
        raise ArtifactError(
            f"{model_dir}: weights {info.weights_digest[:12]}… are not those the store was collected from "
            f"({recorded[:12]}…); rerun `ato collect`"
        )
    return embedding_fingerprint(model)


SCORED = ("train", "val", "test")  # splits every operator and variant is scored on (exactly, from the statistics)


def make_variants(fitted: FitResult, splits: dict[str, PairStats], names: list[str]) -> dict[str, Operator]:
    """Each variant of the fitted map (`ato.operators.operator_variant`), scored on every split as saved (float32)."""
    if not names:
        return {}
    parent = Operator(torch.as_tensor(fitted.W), torch.as_tensor(fitted.b), fitted.config)
    cca = CCA.from_stats(splits["train"]) if any(n.startswith(("rank", "svd")) for n in names) else None
    out: dict[str, Operator] = {}
    for name in names:
        op = operator_variant(parent, splits["train"], name, cca)
        op.config["metrics"] = scores(op.W.double().numpy(), op.b.double().numpy(), splits)
        out[name] = op
    return out


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
    for v, op in fitted.variants.items():
        log_flat_metrics({f"{variant_prefix(v)}{k}": x for k, x in op.config["metrics"].items()})
    # lineage: the store's DVC hash when DVC recorded it (dvc.lock names the path as params.yaml writes it)
    digest = dvc_out_hash(params.root, str(Path(params.paths.store))) or config["store_digest"]
    log_store_lineage(params.path("store"), digest)
    mlflow.log_artifact(str(operator_dir / CONFIG))
    if params.fit.register:
        for v in fitted.variants:  # the champion last: the registry list shows the newest version
            register(params, pair_name, operator_dir, variant=v)
        name = register(params, pair_name, operator_dir)
        text = model_description(pair_name, config, params.fit.alias, list(fitted.variants))
        mlflow.MlflowClient().update_registered_model(name, description=text)


def variant_prefix(variant: str) -> str:
    """The pair run's metric names of a variant's scores (`variant_rank64_test_r2`, …)."""
    return f"variant_{variant}_"


def register(params: Params, pair_name: str, operator_dir: Path, variant: str | None = None) -> str:
    """Register the saved operator as `ato-<model>-<pair>` with alias `fit.alias`, or one of its
    variants as a version of the same model with alias `<variant>`; returns the name. Only the two
    files of that operator are logged (not the variants beside it). The version's description says
    which map it is (`version_description`); its tag `ato.variant` names it ("champion" for the operator)."""
    source = operator_dir if variant is None else variant_dir(operator_dir, variant)
    config = read_json(source / CONFIG, "operator config")
    parent = config if variant is None else read_json(operator_dir / CONFIG, "operator config")
    name = registry_name(config["model"], pair_name)  # the model label the operator was fitted on
    metrics = config.get("metrics") or {}
    alias = params.fit.alias if variant is None else variant
    identity_r2w = (parent.get("metrics") or {}).get("identity_test_r2_weighted")
    description = version_description(pair_name, config, alias, identity_r2w)
    tags = {"ato.variant": variant or "champion", "ato.pair": pair_name, "ato.method": str(config.get("method"))}
    with _only_operator_files(source) as staged:
        register_operator(
            staged,
            name,
            alias,
            artifact_name="operator" if variant is None else f"operator-{variant}",
            metrics=metrics,
            metric_prefix="" if variant is None else variant_prefix(variant),
            description=description,
            tags=tags,
        )
    return name


VARIANT_TEXT = {
    "rrr": "reduced-rank regression at rank {rank}",
    "svd_truncated": "the champion's SVD truncated to rank {rank}",
    "procrustes": "similarity Procrustes (a rotation plus a global gain)",
    "identity": "the identity map ŷ = x (pure carry-over: the baseline, not a fitted map)",
}


def version_description(pair_name: str, config: dict[str, Any], alias: str, identity_r2w: float | None) -> str:
    """What a registry version is, in one paragraph: which map, its test R² and R²_w beside the
    identity map's R²_w, and a WARNING when a map other than the identity scores below it."""
    m = config.get("metrics") or {}
    where = f"{pair_name} (layer {config['layer_in']} → {config['layer_out']})"
    variant = config.get("variant")
    if variant is None:
        what = f"@{alias}: the operator fitted for {where}, {config['method']} with α = {config['alpha']:.4g}."
    else:
        kind = VARIANT_TEXT.get(config["method"], config["method"]).format(rank=config.get("rank"))
        what = f"@{alias}: a variant of the fitted operator for {where}, for comparison: {kind}."
    r2, r2w = m.get("test_r2", float("nan")), m.get("test_r2_weighted", float("nan"))
    text = f"{what} Test R² {r2:.3f}, variance-weighted R²_w {r2w:.3f}"
    if identity_r2w is None:
        return text + "."
    text += f" (identity map: R²_w {identity_r2w:.3f})."
    warning = below_identity_warning(r2w, identity_r2w, f"variant {variant!r}") if variant != "identity" else None
    return f"{text} {warning}" if warning else text


def model_description(pair_name: str, config: dict[str, Any], alias: str, variants: list[str]) -> str:
    """The registered model's description: what it maps, which alias to load, what the other versions are."""
    text = (
        f"Activation transport operator of {config['model']}, pair {pair_name}: residual after block "
        f"{config['layer_in']} → residual after block {config['layer_out']}. Load @{alias}: the fitted "
        f"{config['method']} operator (the newest version)."
    )
    if variants:
        aliases = ", ".join(f"@{v}" for v in variants)
        text += (
            f" The other versions are its variants, registered for comparison under their own aliases "
            f"({aliases}); each version's description says which map it is and its test R²."
        )
    return text


@contextmanager
def _only_operator_files(directory: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ato-register-") as tmp:
        staged = Path(tmp) / directory.name
        staged.mkdir()
        for f in (WEIGHTS, CONFIG):
            shutil.copy2(directory / f, staged / f)
        yield staged
