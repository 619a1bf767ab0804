"""Stage `context`: carried, moved or computed — maps that also read other positions of layer L, and the
variance budget of every pair (docs/method.md#context-maps).

One forward pass over each split's stored token sequences serves every pair (`ato.context_pass`): the
residuals of layers L and L + k and the routed inputs (`ato.routed`) are stacked into each pair's context
inputs and streamed into float64 statistics (train in nested slices for the learning curve, val, test);
the test batches' forward outputs are kept in memory to score every map per test sequence afterwards
(about 1.5 GB for the default six pairs; no second pass). Per pair and kind (`ato`, `lagged`, `prefix`,
`routed`, `context`): α tuned on exact validation R²_w as `ato tune` does, the map fitted on train, its
test R²_w with a document-bootstrap interval and learning-curve extrapolation (`ato.context_budget`).

Outputs, all or none: reports/context/<pair>.json (`ContextBudget`) and
<paths.context_operators>/<pair>/ (`ato.artifacts.context_operator`); the budget's numbers are logged to
each pair's MLflow run under `context_` names (the pair's own R² keeps its name).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ato.artifacts import ContextBudget, Layout, atomic_group, read_pair_stats, write_context_operator
from ato.context_budget import budget_metrics, budget_record, fit_kinds, operator_config, score_sequences
from ato.context_jacobian import lagged_jacobians
from ato.context_pass import ContextPair, SplitPass, nested_slices, stream_split
from ato.errors import AtoError
from ato.math.learning_curve import subset_sum
from ato.models import load_prepared, resolve_device
from ato.params import SPLITS, Params
from ato.store import ActivationStore, require_validated, token_sequences

log = logging.getLogger(__name__)


class ContextError(AtoError):
    """Bad input of the context stage (model, store, statistics); the message names what is at fault."""


def main(params: Params) -> None:
    layout, cp = Layout.from_params(params), params.context
    store = ActivationStore.open(layout.store)
    require_validated(store, layout.validation)
    model, tokenizer, info = load_prepared(layout.model_dir, device=str(resolve_device(cp.device)))
    if store.manifest.model.weights_digest not in (None, info.weights_digest):
        raise ContextError(f"{layout.store}: collected with other model weights than {layout.model_dir}; rerun collect")
    pairs = [
        ContextPair(name, pair.L, pair.k, fill_of(layout, name, store.digest)) for name, pair in params.pairs.items()
    ]
    passes = stream_splits(params, store, model, tokenizer, pairs)
    device, d = next(model.parameters()).device, store.d_model
    n_tokens = {split: p.tokens for split, p in passes.items()}
    n_test_sequences = len(passes["test"].doc_ids)
    outputs = {}
    for pair in pairs:
        t0 = time.perf_counter()
        slices = passes["train"].stats[pair.name]
        fits = fit_kinds(slices, passes["val"].stats[pair.name][0], passes["test"].stats[pair.name][0], d, cp.lags,
                         pair.k, cp)  # fmt: skip
        train = subset_sum(slices)
        sums = score_sequences(passes["test"].kept, pair, cp.lags, fits, n_test_sequences, train.mean_y, device)
        budget = budget_record(pair, fits, sums, n_tokens, cp)
        config = operator_config(pair, d, cp.lags, fits, budget.n_train, store.digest, info.weights_digest,
                                 int(info.n_layers))  # fmt: skip
        outputs[pair.name] = (budget, config, fits, pair)
        log.info(
            "context %s: carried %.4f, moved %.4f [%.4f, %.4f], computed %.4f (identity %.4f; %.1fs)",
            pair.name, budget.carried.value, budget.moved.value, budget.moved.low, budget.moved.high,
            budget.computed.value, budget.identity_r2_w, time.perf_counter() - t0,
        )  # fmt: skip
    slopes = {name: (out[2]["lagged"].W, out[2]["ato"].W) for name, out in outputs.items()}
    for name, jacobian in lagged_jacobians(model, store, {p.name: (p.L, p.k) for p in pairs}, slopes, cp).items():
        outputs[name][0].jacobian = jacobian  # W_ℓ beside E[J_{t,t−ℓ}] (after the passes: it switches to eager)
    with atomic_group():  # every budget and every operator directory, or none
        for name, (budget, config, fits, pair) in outputs.items():
            budget.write(layout.context(name))
            maps = {kind: (fits[kind].W, fits[kind].b) for kind in config.kinds}  # not lagged_prefix
            write_context_operator(layout.context_operator(name), config, maps, pair.fill.numpy())
    _log_mlflow(params, {name: out[0] for name, out in outputs.items()}, layout)


def fill_of(layout: Layout, pair: str, store_digest: str) -> torch.Tensor:
    """Layer L's train mean (non-BOS rows, as `ato stats` summed them): the pair's train mean_x."""
    stats = read_pair_stats(layout.pair_stats("train", pair), store_digest)
    return torch.as_tensor(np.asarray(stats.mean_x, dtype=np.float32))


def stream_splits(
    params: Params, store: ActivationStore, model: object, tokenizer: object, pairs: list[ContextPair]
) -> dict[str, SplitPass]:
    """Each split forwarded once: train into the nested slices of the learning curve, test kept."""
    cp, out = params.context, {}
    for split in SPLITS:
        seqs = token_sequences(store, split, cp.tokens[split])
        if not seqs:
            raise ContextError(f"{store.root}: split {split} holds no sequence")
        slices = nested_slices(len(seqs), cp.curve_fractions) if split == "train" else np.zeros(len(seqs), np.int64)
        with torch.inference_mode():
            out[split] = stream_split(model, tokenizer, seqs, pairs, cp.lags, cp.batch_size, slices,
                                      keep=split == "test", desc=f"context {split}",
                                      product_dtype=getattr(torch, cp.gram_dtype))  # fmt: skip
        log.info(
            "context %s: %d tokens, %d sequences in %.1fs (forward %.1fs)",
            split, out[split].tokens, len(seqs), out[split].seconds, out[split].forward_seconds,
        )  # fmt: skip
    return out


def _log_mlflow(params: Params, budgets: dict[str, ContextBudget], layout: Layout) -> None:
    import mlflow

    from ato.tracking import RunContext, log_flat_metrics, pair_run

    runs = RunContext.from_params(params)
    for name, budget in budgets.items():
        with pair_run(runs, name, "context"):
            log_flat_metrics(budget_metrics(budget))
            mlflow.log_artifact(str(layout.context(name)), artifact_path="context")
