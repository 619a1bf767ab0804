"""Stage `fit`: refit each pair at its tuned α on the training statistics, save the operator
artifact (safetensors + config.json, docs/contracts.md#operator) with its variants (`fit.variants`:
reduced-rank, identity + rank-r update, Procrustes, identity; `<dir>/variants/<name>/`), track it in
the pair's MLflow run and register it (`@champion`) and each variant (`@<variant>`) as versions of the pair's
registered model, every one with its train/val/test R² from the pair statistics. The champion is
registered last, so the registry list's "latest version" is the champion; each version's description
says which map it is. A variant whose test R²_w is below the identity map's is saved but not
registered, with a warning naming both numbers (`fit.register_below_identity: true` registers it, its
description then saying so in a WARNING)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import ArtifactError, Layout, TuningResult, read_pair_stats
from ato.artifacts.operator import OperatorConfig
from ato.fitting import SCORED, TUNED_METHODS, FitResult, fit_map, make_variants, scores
from ato.kinds import parse_variant, variant_forms
from ato.model_card import model_description, version_description
from ato.operators import CONFIG, WEIGHTS, below_identity_warning, save_operator, variant_dir
from ato.params import FitParams, Params, ParamsError
from ato.store import ActivationStore
from ato.tracking import (
    RunContext,
    dvc_out_hash,
    log_flat_metrics,
    log_store_lineage,
    pair_run,
    register_operator,
    registry_name,
)

log = logging.getLogger(__name__)


def main(params: Params, pair: str | None = None) -> None:
    layout = Layout.from_params(params)
    check_variants(params.fit)
    runs = RunContext.from_params(params)
    for name in [pair] if pair else list(params.pairs):
        fitted = fit_pair(params, name)
        out = save_operator(layout.operator(name), fitted.W, fitted.b, fitted.config, variants=fitted.variants)
        with pair_run(runs, name, "fit"):
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
            log.info("  variant %s: test R² = %.4f", v, (op.config.metrics or {})["test_r2"])


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
    tuned_alpha = TuningResult.read(layout.tuning(pair_name)).alpha if method in TUNED_METHODS else None
    W, b, alpha = fit_map(
        params.fit,
        train,
        tuned_alpha=tuned_alpha,
        standardize=params.tune.standardize,
        store=store,
        pair=pair,
        stats=params.stats,
    )
    metrics = {"alpha": alpha, **scores(W, b, splits)}
    identity = scores(np.eye(store.d_model), np.zeros(store.d_model), {"test": splits["test"]})  # the baseline
    metrics |= {f"identity_{k}": v for k, v in identity.items()}
    config = OperatorConfig(
        model=store.manifest.model.name,
        model_digest=store.manifest.model.weights_digest,
        layer_in=pair.L,
        layer_out=pair.target,
        k=pair.k,
        alpha=alpha,
        method=method,
        standardize=params.tune.standardize if method in TUNED_METHODS else False,
        d_model=store.d_model,
        n_layers=store.manifest.model.n_layers,
        n_train_tokens=int(train.n),
        n_val_tokens=int(val.n),
        include_bos=params.stats.include_bos,
        store_digest=store.digest,
        hook=store.manifest.hook,
        equation="y_hat = x @ W.T + b",
        variants=list(params.fit.variants),
        embedding_fingerprint=fitted_model_fingerprint(params, store),
        metrics={k: v for k, v in metrics.items() if k != "alpha"},
        # top level, so each variant's config inherits the reference it is judged against (worse_than_identity)
        identity_test_r2_weighted=identity["test_r2_weighted"],
    )
    fitted = FitResult(W, b, config, metrics)
    fitted.variants = make_variants(fitted, splits, params.fit.variants)
    return fitted


def fitted_model_fingerprint(params: Params, store: ActivationStore) -> dict[str, Any]:
    """The prepared model's embedding fingerprint (`ato.splicing.embedding_fingerprint`), which lets
    `ato.splice` recognise the model in memory; the model must be the one the store was collected from.
    Read from the weights file without building the model, unless its tensor names say nothing."""
    from ato.artifacts import ModelInfo, model_info_path
    from ato.models import load_prepared, prepared_input_embedding
    from ato.splicing import embedding_fingerprint, weight_fingerprint

    model_dir = params.path("model_dir")
    info = ModelInfo.read(model_info_path(model_dir))
    recorded = store.manifest.model.weights_digest
    if recorded is not None and recorded != info.weights_digest:
        raise ArtifactError(
            f"{model_dir}: weights {info.weights_digest[:12]}… are not those the store was collected from "
            f"({recorded[:12]}…); rerun `ato collect`"
        )
    embedding = prepared_input_embedding(model_dir)
    if embedding is not None:
        return weight_fingerprint(embedding)
    return embedding_fingerprint(load_prepared(model_dir)[0])


def track(params: Params, pair_name: str, operator_dir: Path, fitted: FitResult) -> None:
    """In the pair's active run: params, scores, the store as training dataset, config.json, registry."""
    import mlflow

    config = fitted.config
    mlflow.log_params(logged_params(config))
    log_flat_metrics(fitted.metrics)
    for v, op in fitted.variants.items():
        log_flat_metrics({f"{variant_prefix(v)}{k}": x for k, x in (op.config.metrics or {}).items()})
    # lineage: the store's DVC hash when DVC recorded it (dvc.lock names the path as params.yaml writes it)
    digest = dvc_out_hash(params.root, str(Path(params.paths.store))) or config.store_digest
    log_store_lineage(params.path("store"), digest)
    mlflow.log_artifact(str(operator_dir / CONFIG))
    if params.fit.register:
        registered = variants_to_register(pair_name, fitted, params.fit.register_below_identity)
        for v in registered:  # the champion last: the registry list shows the newest version
            register(params, pair_name, operator_dir, variant=v)
        name = register(params, pair_name, operator_dir)
        text = model_description(pair_name, config, params.fit.alias, registered)
        mlflow.MlflowClient().update_registered_model(name, description=text)


def variants_to_register(pair_name: str, fitted: FitResult, below_identity: bool) -> list[str]:
    """The variants to register: all with `below_identity` (`fit.register_below_identity`), else those
    not `worse_than_identity` on test R²_w; each one refused is logged with both numbers. A refused
    variant is still saved beside the operator and its scores logged: only the registry alias, which
    offers it for splicing, is withheld."""
    identity_r2w = fitted.metrics["identity_test_r2_weighted"]
    keep = []
    for v, op in fitted.variants.items():
        r2w = (op.config.metrics or {})["test_r2_weighted"]
        warning = below_identity_warning(r2w, identity_r2w, f"variant {v!r}") if v != "identity" else None
        if warning and not below_identity:
            reason = warning.removeprefix("WARNING: ")
            log.warning(
                "fit %s: @%s not registered (fit.register_below_identity: true would): %s", pair_name, v, reason
            )
        else:
            keep.append(v)
    return keep


def logged_params(config: OperatorConfig) -> dict[str, Any]:
    """The config values logged as MLflow params of the pair's run."""
    return {
        "layer_in": config.layer_in,
        "layer_out": config.layer_out,
        "k": config.k,
        "alpha": config.alpha,
        "method": config.method,
        "n_train_tokens": config.n_train_tokens,
        "n_val_tokens": config.n_val_tokens,
        "model": config.model,
        "store_digest": config.store_digest,
        "d_model": config.d_model,
        "standardize": config.standardize,
    }


def variant_prefix(variant: str) -> str:
    """The pair run's metric names of a variant's scores (`variant_rank64_test_r2`, …)."""
    return f"variant_{variant}_"


def register(params: Params, pair_name: str, operator_dir: Path, variant: str | None = None) -> str:
    """Register the saved operator as `ato-<model>-<pair>` with alias `fit.alias`, or one of its
    variants as a version of the same model with alias `<variant>`; returns the name. Only the two
    files of that operator are logged (not the variants beside it). The version's description says
    which map it is (`version_description`); its tag `ato.variant` names it ("champion" for the operator)."""
    source = operator_dir if variant is None else variant_dir(operator_dir, variant)
    config = OperatorConfig.read(source / CONFIG)
    parent = config if variant is None else OperatorConfig.read(operator_dir / CONFIG)
    name = registry_name(config.model, pair_name)  # the model label the operator was fitted on
    metrics = config.metrics or {}
    alias = params.fit.alias if variant is None else variant
    identity_r2w = (parent.metrics or {}).get("identity_test_r2_weighted")
    description = version_description(pair_name, config, alias, identity_r2w)
    tags = {"ato.variant": variant or "champion", "ato.pair": pair_name, "ato.method": str(config.method)}
    with _only_operator_files(source) as staged:
        register_operator(
            staged,
            name,
            alias,
            d_model=config.d_model,
            artifact_name="operator" if variant is None else f"operator-{variant}",
            metrics=metrics,
            metric_prefix="" if variant is None else variant_prefix(variant),
            description=description,
            tags=tags,
        )
    return name


@contextmanager
def _only_operator_files(directory: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ato-register-") as tmp:
        staged = Path(tmp) / directory.name
        staged.mkdir()
        for f in (WEIGHTS, CONFIG):
            shutil.copy2(directory / f, staged / f)
        yield staged
