"""Stage `causal`: does the transport operator carry what the model needs?

Overwrites the residual after block L+k of held-out test sequences with the pair's conditions (the
ATO's W x_L + b, identity x_L, bias only b, the mean update x_L + ȳ_train − x̄_train from the pair's
train statistics, and the union context map of `ato context` on the stacked inputs of the clean forward:
x_t, lags, prefix mean and the routed z's, `ato.causal.context`) and takes clean, zero and train-mean from the target
layer's `CausalReference` (`ato causal_reference`, computed once per target layer). Reports Δ
log-perplexity vs clean for every condition and the share of each reference's damage the ATO recovers
(the mean update is the headline, `causal.headline_reference`), each with its interval over sequences
(`causal.interval`; `ato.causal`, docs/method.md#causal, docs/statistics.md#intervals).

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

from ato.artifacts import (
    CausalReference,
    CausalSequences,
    CausalSummary,
    Layout,
    ModelInfo,
    atomic_group,
    read_pair_stats,
)
from ato.artifacts.causal import SCOPE_TEXT, all_conditions
from ato.causal import (
    LEVEL,
    SPLIT,
    CausalError,
    HeldOut,
    PairPatch,
    SetResult,
    check_model,
    check_position_sets,
    check_reference,
    flat_numbers,
    load_sequences,
    merge_reference,
    pair_conditions,
    run_conditions,
    summarise_set,
)
from ato.causal.context import read_context_patch
from ato.kinds import causal_keys
from ato.params import CausalParams, Params
from ato.plotting.causal import plot_pair
from ato.store import ActivationStore

log = logging.getLogger(__name__)

__all__ = ["CausalError", "main", "prepare_inputs", "read_references"]


def main(params: Params, pair: str | None = None) -> dict[str, CausalSummary]:
    """Run the causal check for `pair` (None: every pair); returns each pair's summary."""
    from ato.lm_head import set_lm_head_dtype
    from ato.models import load_prepared, resolve_device

    cp, layout = params.causal, Layout.from_params(params)
    names = list(params.pairs) if pair is None else [pair]  # one pair: read only its entry (dvc.yaml)
    _check_request(cp, names, names if pair is not None and pair in params.pairs else list(params.pairs))
    # Everything that can be wrong is checked before the first forward pass.
    masks = check_position_sets(cp.position_sets, cp.seq_len)
    store = ActivationStore.open(layout.store)
    held = load_sequences(store, cp.n_sequences, cp.seq_len)
    model, _tok, info = load_prepared(layout.model_dir, device=str(resolve_device(cp.device)))
    check_model(store, held, model, info, layout.model_dir)
    set_lm_head_dtype(model, cp.lm_head_dtype)
    inputs = prepare_inputs(params, names, info, store.digest)
    refs = read_references(layout, cp, held, {inputs[n].layer_out for n in names}, info, store.digest)

    summaries: dict[str, CausalSummary] = {}
    device = next(model.parameters()).device
    for name in names:
        t0 = time.perf_counter()
        target = inputs[name].layer_out
        ref_path, ref = refs[target]
        conditions = pair_conditions(inputs[name], device)
        clean = torch.tensor(ref.clean_nll, dtype=torch.float32)
        sums, _ = run_conditions(
            model, held, target, conditions, masks, dict(cp.position_sets), cp.batch_size, cp.loss_chunk_tokens, clean
        )
        results = merge_reference(sums, ref, ref_path)
        summaries[name] = write_outputs(params, layout, name, held, results, ref_path, time.perf_counter() - t0)
    return summaries


def _check_request(cp: CausalParams, names: list[str], configured: list[str]) -> None:
    unknown = [n for n in names if n not in configured]
    if unknown:
        raise CausalError(f"pair {unknown[0]} is not in params.pairs ({', '.join(configured)})")
    if cp.n_sequences < 1 or cp.seq_len < 2 or cp.batch_size < 1 or cp.loss_chunk_tokens < 1:
        raise CausalError("causal.n_sequences/batch_size/loss_chunk_tokens must be ≥ 1 and causal.seq_len ≥ 2")


def prepare_inputs(
    params: Params, names: list[str], info: ModelInfo, store_digest: str | None = None
) -> dict[str, PairPatch]:
    """Load and check every pair's operator and train means before any forward pass."""
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
        mean_x, mean_y = _train_means(layout.pair_stats("train", name), info.d_model, store_digest)
        context = read_context_patch(layout.context_operator(name), pair.L, pair.k, info.d_model, store_digest)
        out[name] = PairPatch(name, pair.L, pair.target, op.W.float(), op.b.float(), mean_x, mean_y, context)
    return out


def _train_means(path: Path, d_model: int, store_digest: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x̄_train and ȳ_train of a pair's train statistics (the mean update's shift), checked finite [d]."""
    stats = read_pair_stats(path, store_digest)
    means = [torch.as_tensor(np.asarray(m, dtype=np.float32)) for m in (stats.mean_x, stats.mean_y)]
    for key, mean in zip(("mean_x", "mean_y"), means):
        if mean.shape != (d_model,) or not torch.isfinite(mean).all():
            raise CausalError(f"{path}: {key} has shape {tuple(mean.shape)} or non-finite values; expected [{d_model}]")
    return means[0], means[1]


def read_references(
    layout: Layout, cp: CausalParams, held: HeldOut, layers: set[int], info: ModelInfo, store_digest: str | None
) -> dict[int, tuple[Path, CausalReference]]:
    """The `CausalReference` of every target layer, checked against these sequences, model and store."""
    out: dict[int, tuple[Path, CausalReference]] = {}
    for layer in sorted(layers):
        path = layout.causal_reference(layer)
        ref = CausalReference.read(path)
        check_reference(
            ref,
            path,
            held,
            layer=layer,
            model_digest=info.weights_digest,
            store_digest=store_digest,
            specs=dict(cp.position_sets),
            batch_size=cp.batch_size,
        )
        out[layer] = (path, ref)
    return out


def write_outputs(
    params: Params,
    layout: Layout,
    name: str,
    held: HeldOut,
    results: dict[str, SetResult],
    reference: Path,
    seconds: float,
) -> CausalSummary:
    """Summary, per-sequence detail, figure and MLflow metrics of one pair."""
    cp, pair = params.causal, params.pairs[name]
    sets = {n: summarise_set(res, cp) for n, res in results.items()}
    summary = CausalSummary(
        L=pair.L,
        k=pair.k,
        n_sequences=cp.n_sequences,
        seq_len=cp.seq_len,
        seconds=seconds,
        tokens_per_second=cp.n_sequences
        * cp.seq_len
        * (1 + len(results) * len(causal_keys("pair")))
        / max(seconds, 1e-9),
        headline_reference=cp.headline_reference,
        interval_method=cp.interval,
        interval_level=LEVEL,
        interval_n_units=cp.n_sequences,
        interval_resamples=cp.bootstrap_resamples,
        position_sets={n: s for n, (s, _) in sets.items()},
    )
    with atomic_group():  # summary, sequences and figure, or none
        summary.write(layout.causal(name))
        CausalSequences(
            pair=name,
            split=SPLIT,
            reference=str(reference.relative_to(layout.reports)),
            seq_len=cp.seq_len,
            sequence_offsets=held.offsets,
            doc_ids=held.doc_ids,
            conditions=list(all_conditions()),
            scopes=dict(SCOPE_TEXT),
            position_sets={n: d for n, (_, d) in sets.items()},
        ).write(layout.causal_sequences(name))
        figure = plot_pair(summary, name, layout.pair_figure(name, "causal"), dpi=params.report.dpi)
    _log_mlflow(params, name, summary, [layout.causal(name), layout.causal_sequences(name), figure])
    head = summary.headline
    log.info(
        "causal %s: Δlog-ppl(all) ato %+.4f ± %.4f, %s %+.4f; recovered vs %s %.3f → %s",
        name,
        head.ato.delta_all_mean,
        head.ato.delta_all_half_width,
        cp.headline_reference,
        head.patched(cp.headline_reference).delta_all_mean,
        cp.headline_reference,
        head.recovered.all_mean,
        layout.causal(name),
    )
    return summary


def _log_mlflow(params: Params, name: str, summary: CausalSummary, artifacts: list[Path]) -> None:
    import mlflow

    from ato.tracking import RunContext, log_pair_metrics, pair_run

    metrics: dict[str, Any] = {f"causal_{k}": v for k, v in summary.headline_metrics().items()}
    for set_name, entry in summary.position_sets.items():
        metrics |= flat_numbers(entry, f"causal_{set_name}_")
    metrics["causal_seconds"] = summary.seconds
    with pair_run(RunContext.from_params(params), name, "causal"):
        log_pair_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="causal")
