"""Stage `causal_reference`: the pair-independent conditions of the causal check, once per target layer.

Clean, zero ablation and mean ablation (ȳ_train at T, BOS excluded like every fit) depend only on the
target layer T = L+k, so they are computed here once for every T among `pairs` and shared by each pair
with that target (`ato causal`; docs/method.md#causal). The clean loss is also computed once in all.

Outputs: one `CausalReference` per target layer (reports/causal/reference/layer_NN.json), the
directory written all at once.
"""

from __future__ import annotations

import logging
import time

import torch

from ato.artifacts import CausalReference, Layout, atomic_path, read_train_means
from ato.causal import (
    CausalError,
    check_model,
    check_position_sets,
    load_sequences,
    reference_conditions,
    reference_record,
    run_conditions,
)
from ato.params import Pair, Params
from ato.store import ActivationStore

log = logging.getLogger(__name__)

__all__ = ["main", "target_means"]


def main(params: Params) -> dict[int, CausalReference]:
    """Compute and write the reference record of every target layer; returns them by layer."""
    from ato.lm_head import set_lm_head_dtype
    from ato.models import load_prepared, resolve_device

    cp, layout = params.causal, Layout.from_params(params)
    if not params.pairs:
        raise CausalError("pairs: empty; the causal reference needs at least one pair")
    masks = check_position_sets(cp.position_sets, cp.seq_len)
    store = ActivationStore.open(layout.store)
    held = load_sequences(store, cp.n_sequences, cp.seq_len)
    model, _tok, info = load_prepared(layout.model_dir, device=str(resolve_device(cp.device)))
    check_model(store, held, model, info, layout.model_dir)
    set_lm_head_dtype(model, cp.lm_head_dtype)
    means = target_means(layout, params.pairs, info.n_layers, info.d_model, store.digest)

    records: dict[int, CausalReference] = {}
    clean = None  # the clean loss does not depend on T: computed for the first, reused after
    device = next(model.parameters()).device
    for layer, (source, mean_y) in means.items():
        t0 = time.perf_counter()
        conditions = reference_conditions(mean_y, device)
        specs = dict(cp.position_sets)
        sums, clean = run_conditions(
            model, held, layer, conditions, masks, specs, cp.batch_size, cp.loss_chunk_tokens, clean_nll=clean
        )
        records[layer] = reference_record(
            layer,
            held,
            sums,
            clean,
            model_digest=info.weights_digest,
            store_digest=store.digest,
            batch_size=cp.batch_size,
            mean_source=source,
            seconds=time.perf_counter() - t0,
        )
        log.info("causal reference: layer %d (ȳ from %s) in %.1f s", layer, source, records[layer].seconds)
    with atomic_path(layout.causal_reference_dir) as tmp:  # every layer's file or none
        for layer, record in records.items():
            record.write(tmp / layout.causal_reference(layer).name)
    log.info("causal reference: %d target layer(s) → %s", len(records), layout.causal_reference_dir)
    return records


def target_means(
    layout: Layout, pairs: dict[str, Pair], n_layers: int, d_model: int, store_digest: str | None
) -> dict[int, tuple[str, torch.Tensor]]:
    """Target layer → (pair, ȳ_train [d]) as `ato.artifacts.read_train_means` defines it (the SAE gates'
    mean ablation uses the same), after checking every target is a layer of the model."""
    for name, pair in pairs.items():
        if pair.target > n_layers - 1:
            raise CausalError(f"pairs.{name}: layer {pair.target} beyond the model's last layer {n_layers - 1}")
    means = read_train_means(layout.pair_stats, pairs, d_model, store_digest)
    return {layer: (source, torch.from_numpy(mean_y)) for layer, (source, mean_y) in means.items()}
