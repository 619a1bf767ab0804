"""Stage `select`: score every SAE feature of every target layer, rank, keep the best.

The criteria (activation-rate band, token entropy, vocabulary focus, decoder redundancy, exact causal
effect of the best candidates) and the score are computed by `ato.sae.features.score_layer`; see
README "Feature selection". The SAE's quality gates (SaeInfo.reliable / gate_failures) are copied
into the report and the MLflow tags: features of an SAE that missed its gates are marked, never
silently used.

Outputs per layer n (records in `ato.artifacts.features`): `<paths.features>/layer_NN.json`
(`FeatureSet`: ranked, kept, scores), `<paths.features>/layer_NN_contexts.json` (`FeatureContexts`:
top activating token windows of the kept features), `<paths.reports>/select/layer_NN.json`
(`SelectReport`: summary, exact ablations, SAE reliability). See docs/contracts.md#features.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ato.artifacts import Layout, SaeInfo, SelectReport, atomic_group
from ato.models import load_prepared, resolve_device
from ato.params import Params, SelectParams, section_dict
from ato.sae import FeatureScoreError, load_sae
from ato.sae.features import score_layer
from ato.sae.neuronpedia import fetch_neuronpedia
from ato.store import ActivationStore

log = logging.getLogger(__name__)


def main(params: Params) -> dict[int, SelectReport]:
    sp, layout, layers = params.select, Layout.from_params(params), params.target_layers()
    store = ActivationStore.open(layout.store)
    store.require_layers(layers, what="stage select")
    device = resolve_device(sp.device)
    model, tokenizer, info = load_prepared(layout.model_dir, str(device))
    model.requires_grad_(False)
    require_same_model(store, info.weights_digest, layout)
    reports = {n: select_layer(model, tokenizer, store, n, sp, layout) for n in layers}
    _track(params, layout, reports)
    return reports


def require_same_model(store: ActivationStore, weights_digest: str | None, layout: Layout) -> None:
    """The store's activations must come from the prepared model's weights."""
    store_digest = store.manifest.model.weights_digest
    if store_digest and weights_digest and store_digest != weights_digest:
        raise FeatureScoreError(
            f"{layout.store}: activations come from another model (weights digest {store_digest[:12]} ≠ "
            f"{weights_digest[:12]} of {layout.model_dir}); rerun `ato collect`"
        )


def select_layer(
    model: nn.Module, tokenizer: Any, store: ActivationStore, layer: int, sp: SelectParams, layout: Layout
) -> SelectReport:
    """Score layer `layer`'s SAE features and write its three records."""
    sae_info = SaeInfo.read(layout.sae_info(layer))
    sae = load_sae(layout.sae(layer), next(model.parameters()).device)
    if sae.cfg.d_in != store.d_model:
        raise FeatureScoreError(f"layer {layer}: SAE d_in={sae.cfg.d_in} but the store has d_model={store.d_model}")
    if sp.neuronpedia:  # fail before the expensive part
        fetch_neuronpedia(sae_info.neuronpedia_id, [])
    log.info("layer %d: scoring %d features on ≤%d train tokens", layer, sae.cfg.d_sae, sp.max_tokens)
    features, contexts, report = score_layer(model, tokenizer, store, sae, layer, sp)
    features.sae_store_digest = sae_info.store_digest
    report.sae_reliable, report.sae_gate_failures = sae_info.reliable, list(sae_info.gate_failures)
    if not sae_info.reliable:
        log.warning(
            "layer %d: the SAE missed its quality gates (%s); its feature-level numbers are marked unreliable",
            layer,
            "; ".join(sae_info.gate_failures) or "no gate result",
        )
    if sp.neuronpedia:
        explained = fetch_neuronpedia(sae_info.neuronpedia_id, features.kept)
        for entry in contexts.features:
            entry.neuronpedia_explanations = explained.get(entry.feature, [])
    with atomic_group():  # the feature set, its contexts and the report, or none
        features.write(layout.feature_set(layer))
        contexts.write(layout.feature_contexts(layer))
        report.write(layout.select_report(layer))
    log.info(
        "layer %d: %d eligible, %d in the rate band [%.2g, %.2g]; kept %d (median rate %s vs mean L0/d_sae %.3g); "
        "%d exact ablations; %.0fs",
        layer,
        report.n_eligible,
        report.n_in_band,
        *report.rate_band,
        report.n_kept,
        report.kept_median_activation_rate,
        report.target_rate,
        len(report.exact.features),
        report.seconds.total,
    )
    return report


def _track(params: Params, layout: Layout, reports: dict[int, SelectReport]) -> None:
    import mlflow

    from ato.tracking import RunContext, log_flat_metrics, pipeline_run, sae_reliability_tags

    with pipeline_run(RunContext.from_params(params), "select"):
        flat = {f"select.{k}": v for k, v in section_dict(params.select).items() if k != "weights"}
        flat.update({f"select.weights.{k}": v for k, v in section_dict(params.select.weights).items()})
        mlflow.log_params(flat)
        for n, report in reports.items():
            mlflow.set_tags(sae_reliability_tags(report.sae_reliable, report.sae_gate_failures, layer=n))
        log_flat_metrics(
            {f"select_layer_{n:02d}_{k}": v for n, report in reports.items() for k, v in report.metrics().items()}
        )
        for n in reports:
            mlflow.log_artifact(str(layout.feature_set(n)), artifact_path="features")
