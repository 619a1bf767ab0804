"""Stage `sae`: one sparse autoencoder per target layer, in sae-lens disk format, with its quality
report and gates.

`sae.source: train` (default) trains a TopK (or JumpReLU) SAE per target layer with sae-lens'
`SAETrainer` on `sae.tokens` TRAIN-split residuals: the store's TRAIN split first, the rest streamed
from the model over further TRAIN documents, one forward pass up to the deepest target layer for all
target layers (`ato.sae.data`, `ato.sae.training`). `sae.source: pretrained` loads
`SAE.from_pretrained(sae.release, sae.sae_id_template.format(n=n))` (`ato.sae.loading`).

Either way, each SAE is then measured on VAL (`ato.sae.quality`): FVE, mean L0, dead and dense
fractions on the residuals; CE-loss recovered and KL with its reconstruction spliced into the model,
against zero and mean ablation (ȳ_train from the train pair statistics, the value `causal_reference`
ablates with: `ato.artifacts.read_train_means`); the gates `sae.gates` give `reliable` and
`gate_failures`.

Output per layer n: `<paths.sae_dir>/layer_NN/` (`cfg.json` + `sae_weights.safetensors`, read by
`ato.sae.load_sae`, and `ato_sae.json`, an `ato.artifacts.SaeInfo`), written all at once; the same
record in `<paths.reports>/sae/layer_NN.json`; MLflow metrics `sae_layer_NN_*` and the tags
`sae_reliable.layer_NN` / `sae_gate_failures.layer_NN` on the pipeline run. See docs/contracts.md#sae.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ato.artifacts import Layout, SaeInfo, atomic_group, atomic_path, read_train_means
from ato.corpus import Corpus
from ato.models import load_prepared
from ato.params import Params, SaeParams, section_dict
from ato.sae import SaeError, hook_name, load_pretrained, resolve_pretrained
from ato.sae.data import SaeData, gather, shuffled_batches
from ato.sae.quality import SpliceQuality, check_roundtrip, evaluate_sae, gate_failures, splice_quality, val_sequences
from ato.sae.training import SCALE_SAMPLE_TOKENS, input_scale, train_sae
from ato.store import ActivationStore, require_validated

log = logging.getLogger(__name__)

EVAL_CHUNK_TOKENS = 4096
PROBE_TOKENS = 256  # VAL tokens the save → reload check encodes
TRAIN_PARAMS = ("width", "k", "l1_coefficient", "steps", "batch_tokens", "lr", "seed", "tokens")


def main(params: Params) -> dict[int, SaeInfo]:
    t0 = time.perf_counter()
    sp, layout, layers = params.sae, Layout.from_params(params), params.target_layers()
    if sp.source == "pretrained":  # fail fast for every layer before any work
        for n in layers:
            resolve_pretrained(sp.release, sp.sae_id_template.format(n=n))
    store = ActivationStore.open(layout.store)
    require_validated(store, layout.validation)
    store.require_layers(layers, what="stage sae")
    means = _train_means(params, layout, store)  # before any work: refuses missing train statistics
    model, tokenizer = _model(params, store)
    device = next(model.parameters()).device
    if sp.source == "pretrained":
        saes, extras = _pretrained(sp, layers, store.d_model, device)
    else:
        saes, extras = _trained(params, store, layers, model, tokenizer, device)
    downstream = _downstream(sp, store, model, saes, means)
    results = {}
    for n in layers:
        with atomic_group():  # the SAE directory and its report copy, or neither
            results[n] = save_sae(saes[n], store, n, extras[n], downstream.get(n), sp, layout, device, t0)
        _log_quality(results[n], layout)
    _track(params, layout, results)
    return results


Built = tuple[dict[int, Any], dict[int, dict[str, Any]]]  # SAEs, record fields


def _pretrained(sp: SaeParams, layers: list[int], d_model: int, device: torch.device) -> Built:
    saes, extras = {}, {}
    for n in layers:
        saes[n], extras[n] = pretrained_sae(sp, sp.sae_id_template.format(n=n), n, d_model, device)
    return saes, extras


def _trained(
    params: Params, store: ActivationStore, layers: list[int], model: Any, tokenizer: Any, device: torch.device
) -> Built:
    sp = params.sae
    corpus = Corpus(params.corpus, params.root)
    data = gather(store, layers, sp.tokens, model, tokenizer, corpus, sp.forward_batch_size)
    saes, extras = {}, {}
    for n in layers:
        saes[n], extras[n] = trained_sae(sp, data, n, store, device)
    return saes, extras


def _train_means(params: Params, layout: Layout, store: ActivationStore) -> dict[int, torch.Tensor]:
    """ȳ_train of each target layer, the mean-ablation value the CE gate compares against: the one
    `causal_reference` uses too (`ato.artifacts.read_train_means`), not a mean over the SAE's own tokens."""
    means = read_train_means(layout.pair_stats, params.pairs, store.d_model, store.digest)
    return {layer: torch.from_numpy(mean_y) for layer, (_pair, mean_y) in means.items()}


def _log_quality(info: SaeInfo, layout: Layout) -> None:
    recovered = (
        f"{info.ce_recovered_zero:.3f} (zero) / {info.ce_recovered_mean:.3f} (mean)"
        if info.ce_recovered_zero is not None and info.ce_recovered_mean is not None
        else "not measured"
    )
    log.info(
        "layer %d: FVE(val) %.3f, mean L0 %.1f, dead %.1f%%, dense %.1f%%, CE recovered %s → %s%s",
        info.layer,
        info.fve_val,
        info.mean_l0,
        100 * info.dead_fraction,
        100 * (info.dense_fraction or 0.0),
        recovered,
        layout.sae(info.layer),
        "" if info.reliable else f"; UNRELIABLE: {'; '.join(info.gate_failures)}",
    )


def _model(params: Params, store: ActivationStore) -> tuple[Any, Any]:
    """The prepared model (SAE tokens, downstream check), checked against the store's weights."""
    model, tokenizer, info = load_prepared(params.path("model_dir"), params.sae.device)
    recorded = store.manifest.model.weights_digest
    if recorded is not None and recorded != info.weights_digest:
        raise SaeError(
            f"{store.root}: collected with model weights {str(recorded)[:12]}…, but {params.path('model_dir')} "
            f"has {info.weights_digest[:12]}…; rerun `ato collect`"
        )
    return model, tokenizer


def pretrained_sae(sp: SaeParams, sae_id: str, layer: int, d_model: int, device: torch.device) -> tuple[Any, dict]:
    """A sae-lens pretrained SAE for `layer`, checked against the store's width, and its provenance."""
    sae, where = load_pretrained(sp.release, sae_id, device=str(device))
    if sae.cfg.d_in != d_model:
        raise SaeError(
            f"pretrained SAE {sp.release}/{sae_id} has d_in={sae.cfg.d_in}, but layer {layer} "
            f"of the store has d_model={d_model}: wrong release for this model"
        )
    return sae, {"source": sp.source, "release": sp.release, "sae_id": sae_id, **where}


def trained_sae(
    sp: SaeParams, data: SaeData, layer: int, store: ActivationStore, device: torch.device
) -> tuple[Any, dict]:
    """Train `layer`'s SAE on the gathered TRAIN tokens; returns it (metadata set) and its record fields."""
    x = data.tokens[layer]
    log.info(
        "layer %d: training %s SAE, width %d, k %d, %d steps × %d tokens over %d distinct TRAIN tokens on %s",
        layer,
        sp.architecture,
        sp.width,
        sp.k,
        sp.steps,
        sp.batch_tokens,
        len(x),
        device,
    )
    sample = x[:SCALE_SAMPLE_TOKENS]
    scale = input_scale(sample)
    batches = shuffled_batches(x, sp.batch_tokens, seed=sp.seed + 1000 * layer)
    sae, info = train_sae(
        batches, x.shape[1], sp, scale, b_dec_init=sample.mean(0), device=device, desc=f"sae layer {layer}"
    )
    metadata = {
        "hook_name": hook_name(layer),
        "model_name": store.manifest.model.name,
        "ato_store_digest": store.digest,
        "ato_input_scale": scale,
    }
    for key, value in metadata.items():
        sae.cfg.metadata[key] = value
    return sae, {"source": sp.source, **info, **data.cost(), **{k: getattr(sp, k) for k in TRAIN_PARAMS}}


def _downstream(
    sp: SaeParams, store: ActivationStore, model: Any, saes: dict[int, Any], means: dict[int, torch.Tensor]
) -> dict[int, SpliceQuality]:
    if sp.eval_sequences <= 0:
        return {}
    ids, special = val_sequences(store, sp.eval_sequences, sp.eval_seq_len)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    out = splice_quality(model, {n: s.to(device).eval() for n, s in saes.items()}, means, ids, special)
    log.info("downstream check: %d VAL sequences × %d tokens in %.0fs", *ids.shape, time.perf_counter() - t0)
    return out


def save_sae(
    sae: Any,
    store: ActivationStore,
    layer: int,
    extra: dict[str, Any],
    splice: SpliceQuality | None,
    sp: SaeParams,
    layout: Layout,
    device: torch.device,
    t0: float,
) -> SaeInfo:
    """Write `layer`'s SAE directory (weights, cfg, SaeInfo) in one rename after checking that it
    reloads identically and measuring its quality on VAL; then the report copy."""
    out_dir = layout.sae(layer)
    with atomic_path(out_dir) as tmp:
        sae = sae.to("cpu").eval()
        sae.save_model(tmp)
        probe = next(store.iter_chunks("val", [layer], PROBE_TOKENS))[layer]
        check_roundtrip(sae, tmp, torch.from_numpy(probe))
        chunks = (c[layer] for c in store.iter_chunks("val", [layer], EVAL_CHUNK_TOKENS))
        quality = evaluate_sae(sae.to(device), chunks, device, dense_threshold=sp.dense_threshold)
        down = vars(splice).copy() if splice is not None else {}
        n_seq, n_tok = down.pop("n_sequences", None), down.pop("n_scored_tokens", None)
        recovered = down.get(f"ce_recovered_{sp.gates.ce_reference}")
        failures = gate_failures(sp.gates, quality.fve, quality.dead_fraction, recovered)
        info = SaeInfo(
            layer=layer,
            architecture=sae.cfg.architecture(),
            d_in=int(sae.cfg.d_in),
            d_sae=int(sae.cfg.d_sae),
            store_digest=store.digest,
            fve_val=quality.fve,
            mean_l0=quality.mean_l0,
            dead_fraction=quality.dead_fraction,
            n_val_tokens=quality.n_tokens,
            hook=hook_name(layer),
            reliable=not failures,
            gate_failures=failures,
            gates=section_dict(sp.gates),
            dense_fraction=quality.dense_fraction,
            dense_threshold=sp.dense_threshold,
            n_eval_sequences=n_seq,
            n_eval_tokens=n_tok,
            stage_seconds=time.perf_counter() - t0,
            **down,
            **extra,
        )
        info.write(tmp / layout.sae_info(layer).name)
    info.write(layout.sae_report(layer))
    return info


def _track(params: Params, layout: Layout, results: dict[int, SaeInfo]) -> None:
    import mlflow

    from ato.tracking import RunContext, log_flat_metrics, pipeline_run, sae_reliability_tags

    with pipeline_run(RunContext.from_params(params), "sae"):
        flat = section_dict(params.sae)
        gates = flat.pop("gates")
        mlflow.log_params(
            {**{f"sae.{k}": v for k, v in flat.items()}, **{f"sae.gates.{k}": v for k, v in gates.items()}}
        )
        metrics = {f"sae_layer_{n:02d}_{k}": v for n, info in results.items() for k, v in info.metrics().items()}
        log_flat_metrics(metrics)
        for n, info in results.items():
            mlflow.set_tags(sae_reliability_tags(info.reliable, info.gate_failures, layer=n))
            mlflow.log_artifact(str(layout.sae_info(n)), artifact_path=f"sae/layer_{n:02d}")
