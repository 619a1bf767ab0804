"""Stage `causal`: does the transport operator carry what the model needs?

Overwrites the residual after block L+k of held-out test sequences with each condition's value
(the ATO's W x_L + b, identity, zero, bias only, train mean) and measures the change in
log-perplexity with paired-bootstrap CIs (`ato.patching`, docs/method.md#causal).

Outputs: `CausalSummary` (reports/causal/<pair>.json), `CausalSequences`
(reports/causal/<pair>_sequences.json), the figure <pair>_causal.png, and MLflow metrics
`causal_*` on the pair's run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ato.artifacts import CausalSequences, CausalSummary, Layout, ModelInfo, read_pair_stats
from ato.artifacts.causal import CONDITIONS, PATCHED, SCOPE_TEXT
from ato.params import CausalParams, Params
from ato.patching import (
    SPLIT,
    CausalError,
    HeldOut,
    PairPatch,
    SetResult,
    check_position_sets,
    flat_numbers,
    load_sequences,
    run_pair,
    summarise_set,
)
from ato.plotting.causal import plot_pair
from ato.store import ActivationStore

log = logging.getLogger(__name__)

__all__ = ["CausalError", "main", "prepare_inputs"]


def main(params: Params, pair: str | None = None) -> dict[str, CausalSummary]:
    """Run the causal check for `pair` (None: every pair); returns each pair's summary."""
    from ato.models import load_prepared, resolve_device

    cp, layout = params.causal, Layout.from_params(params)
    names = list(params.pairs) if pair is None else [pair]
    _check_request(cp, names, list(params.pairs))
    # Everything that can be wrong is checked before the first forward pass.
    masks = check_position_sets(cp.position_sets, cp.seq_len)
    store = ActivationStore.open(layout.store)
    held = load_sequences(store, cp.n_sequences, cp.seq_len)
    model, _tok, info = load_prepared(layout.model_dir, device=str(resolve_device(cp.device)))
    _check_model(store, held, model, info, layout.model_dir)
    inputs = prepare_inputs(params, names, info, store.digest)

    clean_cache: dict[int, torch.Tensor] = {}
    summaries: dict[str, CausalSummary] = {}
    for name in names:
        t0 = time.perf_counter()
        results = run_pair(
            model, held, inputs[name], masks, dict(cp.position_sets), cp.batch_size, cp.loss_chunk_tokens, clean_cache
        )
        summaries[name] = write_outputs(params, layout, name, held, results, time.perf_counter() - t0)
    return summaries


def _check_request(cp: CausalParams, names: list[str], configured: list[str]) -> None:
    unknown = [n for n in names if n not in configured]
    if unknown:
        raise CausalError(f"pair {unknown[0]} is not in params.pairs ({', '.join(configured)})")
    if cp.n_sequences < 1 or cp.seq_len < 2 or cp.batch_size < 1 or cp.loss_chunk_tokens < 1:
        raise CausalError("causal.n_sequences/batch_size/loss_chunk_tokens must be ≥ 1 and causal.seq_len ≥ 2")


def _check_model(store: ActivationStore, held: HeldOut, model: nn.Module, info: ModelInfo, model_dir: Path) -> None:
    """The store's token ids must come from this model's tokenizer and fit its vocabulary."""
    store_model = store.manifest.model.weights_digest
    if store_model is not None and store_model != info.weights_digest:
        raise CausalError(
            f"{store.root}: the store was collected with model weights {str(store_model)[:12]}…, but "
            f"{model_dir} has {info.weights_digest[:12]}…; its token ids may not fit this model"
        )
    config: Any = model.config  # an HF PretrainedConfig
    vocab = int(config.vocab_size)
    if int(held.tokens.max()) >= vocab:
        raise CausalError(f"{store.root}/{SPLIT}: token id {int(held.tokens.max())} ≥ the model's vocab {vocab}")


def prepare_inputs(
    params: Params, names: list[str], info: ModelInfo, store_digest: str | None = None
) -> dict[str, PairPatch]:
    """Load and check every pair's operator and train mean before any forward pass."""
    from ato.operators import load_operator

    layout = Layout.from_params(params)
    out: dict[str, PairPatch] = {}
    for name in names:
        pair = params.pairs[name]
        if pair.target > info.n_layers - 1:
            raise CausalError(f"pairs.{name}: layer {pair.target} beyond the model's last layer {info.n_layers - 1}")
        op = load_operator(
            layout.operator(name),
            expect={
                "model_digest": info.weights_digest,
                "d_model": info.d_model,
                "layer_in": pair.L,
                "layer_out": pair.target,
            },
        )
        stats = read_pair_stats(layout.pair_stats("train", name), store_digest)
        mean_y = torch.as_tensor(np.asarray(stats.mean_y, dtype=np.float32))
        if mean_y.shape != (info.d_model,) or not torch.isfinite(mean_y).all():
            raise CausalError(
                f"train statistics of {name}: mean_y has shape {tuple(mean_y.shape)} or non-finite "
                f"values; expected finite [{info.d_model}]"
            )
        out[name] = PairPatch(name, pair.L, pair.target, op.W.float(), op.b.float(), mean_y)
    return out


def write_outputs(
    params: Params, layout: Layout, name: str, held: HeldOut, results: dict[str, SetResult], seconds: float
) -> CausalSummary:
    """Summary, per-sequence detail, figure and MLflow metrics of one pair."""
    cp, pair = params.causal, params.pairs[name]
    sets = {n: summarise_set(res, cp.bootstrap_resamples, cp.seed) for n, res in results.items()}
    # forward tokens per second: every patched pass plus the clean one (shared between pairs)
    n_forward_tokens = cp.n_sequences * cp.seq_len * (1 + len(results) * len(PATCHED))
    summary = CausalSummary(
        L=pair.L,
        k=pair.k,
        n_sequences=cp.n_sequences,
        seq_len=cp.seq_len,
        seconds=seconds,
        tokens_per_second=n_forward_tokens / max(seconds, 1e-9),
        position_sets={n: s for n, (s, _) in sets.items()},
    )
    summary.write(layout.causal(name))
    CausalSequences(
        pair=name,
        split=SPLIT,
        seq_len=cp.seq_len,
        sequence_offsets=held.offsets,
        doc_ids=held.doc_ids,
        conditions=list(CONDITIONS),
        scopes=dict(SCOPE_TEXT),
        position_sets={n: d for n, (_, d) in sets.items()},
    ).write(layout.causal_sequences(name))
    figure = plot_pair(summary, name, layout.pair_figure(name, "causal"), dpi=params.report.dpi)
    _log_mlflow(params, name, summary, [layout.causal(name), layout.causal_sequences(name), figure])
    ato, zero = summary.headline.ato, summary.headline.zero
    log.info(
        "causal %s: Δlog-ppl(all) ato %+.4f [%+.4f, %+.4f], zero %+.4f, recovered %.3f → %s",
        name,
        *ato.delta("all"),
        zero.delta("all")[0],
        summary.headline.recovered.all_mean,
        layout.causal(name),
    )
    return summary


def _log_mlflow(params: Params, name: str, summary: CausalSummary, artifacts: list[Path]) -> None:
    import mlflow

    from ato.tracking import log_flat_metrics, pair_run

    metrics: dict[str, Any] = {f"causal_{k}": v for k, v in summary.headline_metrics().items()}
    for set_name, entry in summary.position_sets.items():
        metrics |= flat_numbers(entry, f"causal_{set_name}_")
    metrics["causal_seconds"] = summary.seconds
    with pair_run(params, name, "causal"):
        log_flat_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="causal")
