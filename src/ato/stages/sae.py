"""Stage `sae`: one sparse autoencoder per target layer, in sae-lens disk format.

`sae.source: train` (default) trains a TopK or JumpReLU SAE per target layer on the store's TRAIN
split (`ato.sae.training`: sae-lens training classes, input scale folded back so the saved SAE works
on raw residuals). `sae.source: pretrained` loads `SAE.from_pretrained(sae.release,
sae.sae_id_template.format(n=n))` and saves it locally.

Output per layer n: `<paths.sae_dir>/layer_NN/` (`cfg.json` + `sae_weights.safetensors`, read by
`ato.sae.load_sae`, and `ato_sae.json`, an `ato.artifacts.SaeInfo`), written all at once; the same
record in `<paths.reports>/sae/layer_NN.json`; MLflow metrics `sae_layer_NN_*` on the pipeline run.
See docs/contracts.md#sae.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ato.artifacts import Layout, SaeInfo, atomic_path
from ato.models import resolve_device
from ato.params import Params, SaeParams, section_dict
from ato.sae import SaeError, hook_name, load_pretrained, resolve_pretrained
from ato.sae.quality import check_roundtrip, evaluate_sae
from ato.sae.training import SCALE_SAMPLE_TOKENS, input_scale, sample_tokens, token_batches, train_sae
from ato.store import ActivationStore, require_validated

log = logging.getLogger(__name__)

EVAL_CHUNK_TOKENS = 4096
PROBE_TOKENS = 256  # VAL tokens the save → reload check encodes
TRAIN_PARAMS = ("width", "k", "l1_coefficient", "steps", "batch_tokens", "lr", "seed")


def main(params: Params) -> dict[int, SaeInfo]:
    sp, layout, layers = params.sae, Layout.from_params(params), params.target_layers()
    ids = {n: sp.sae_id_template.format(n=n) for n in layers}
    if sp.source == "pretrained":  # fail fast for every layer before any work
        for n in layers:
            resolve_pretrained(sp.release, ids[n])
    store = ActivationStore.open(layout.store)
    require_validated(store, layout.validation)
    store.require_layers(layers, what="stage sae")
    device = resolve_device(sp.device)
    results: dict[int, SaeInfo] = {}
    for n in layers:
        if sp.source == "pretrained":
            sae, extra = pretrained_sae(sp, ids[n], n, store.d_model, device)
        else:
            sae, extra = trained_sae(sp, store, n, device)
        info = save_sae(sae.to("cpu").eval(), store, n, extra, layout, device)
        log.info(
            "layer %d: FVE(val) %.3f, mean L0 %.1f, dead %.1f%% → %s",
            n,
            info.fve_val,
            info.mean_l0,
            100 * info.dead_fraction,
            layout.sae(n),
        )
        results[n] = info
    _track(params, layout, results)
    return results


def pretrained_sae(sp: SaeParams, sae_id: str, layer: int, d_model: int, device: torch.device) -> tuple[Any, dict]:
    """A sae-lens pretrained SAE for `layer`, checked against the store's width, and its provenance."""
    sae, where = load_pretrained(sp.release, sae_id, device=str(device))
    if sae.cfg.d_in != d_model:
        raise SaeError(
            f"pretrained SAE {sp.release}/{sae_id} has d_in={sae.cfg.d_in}, but layer {layer} "
            f"of the store has d_model={d_model}: wrong release for this model"
        )
    return sae, {"source": sp.source, "release": sp.release, "sae_id": sae_id, **where}


def trained_sae(sp: SaeParams, store: ActivationStore, layer: int, device: torch.device) -> tuple[Any, dict]:
    """Train `layer`'s SAE on the TRAIN split; returns it (metadata set) and its training record fields."""
    log.info(
        "layer %d: training %s SAE, width %d, %d steps × %d tokens on %s",
        layer,
        sp.architecture,
        sp.width,
        sp.steps,
        sp.batch_tokens,
        device,
    )
    sample = torch.from_numpy(sample_tokens(store, "train", layer, SCALE_SAMPLE_TOKENS))
    scale = input_scale(sample)
    batches = token_batches(store, "train", layer, sp.batch_tokens, seed=sp.seed + 1000 * layer)
    sae, info = train_sae(
        batches, store.d_model, sp, scale, b_dec_init=sample.mean(0), device=device, desc=f"sae layer {layer}"
    )
    metadata = {
        "hook_name": hook_name(layer),
        "model_name": store.manifest.model.name,
        "ato_store_digest": store.digest,
        "ato_input_scale": scale,
    }
    for key, value in metadata.items():
        sae.cfg.metadata[key] = value
    return sae, {"source": sp.source, **info, **{k: getattr(sp, k) for k in TRAIN_PARAMS}}


def save_sae(
    sae: Any, store: ActivationStore, layer: int, extra: dict[str, Any], layout: Layout, device: torch.device
) -> SaeInfo:
    """Write `layer`'s SAE directory (weights, cfg, SaeInfo) in one rename after checking that it
    reloads identically and measuring its quality on VAL; then the report copy."""
    out_dir = layout.sae(layer)
    with atomic_path(out_dir) as tmp:
        sae.save_model(tmp)
        probe = torch.from_numpy(sample_tokens(store, "val", layer, PROBE_TOKENS))
        check_roundtrip(sae, tmp, probe)
        chunks = (c[layer] for c in store.iter_chunks("val", [layer], EVAL_CHUNK_TOKENS))
        quality = evaluate_sae(sae.to(device), chunks, device)
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
            **extra,
        )
        info.write(tmp / layout.sae_info(layer).name)
    info.write(layout.sae_report(layer))
    return info


def _track(params: Params, layout: Layout, results: dict[int, SaeInfo]) -> None:
    import mlflow

    from ato.tracking import log_flat_metrics, pipeline_run

    with pipeline_run(params, "sae"):
        mlflow.log_params({f"sae.{k}": v for k, v in section_dict(params.sae).items()})
        metrics = {f"sae_layer_{n:02d}_{k}": v for n, info in results.items() for k, v in info.metrics().items()}
        log_flat_metrics(metrics)
        for n in results:
            mlflow.log_artifact(str(layout.sae_info(n)), artifact_path=f"sae/layer_{n:02d}")
