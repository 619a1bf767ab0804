"""Stage `evaluate`: how well each operator transports the residual, on the held-out TEST split.

Residual-space scores of the ATO and its baselines, feature-space scores along the target layer's
SAE features (the selected ones and every live one; transported / undetermined / synthesised by each
R²'s interval over test documents), the CCA ceiling, η(r), and each headline number beside its
reference: η(test) beside an exactly linear map's, the held-out subspace size and participation ratio
beside a null at the same n and d. See `ato.evaluate`, docs/method.md#r2, #features, #cca, #efficiency
and docs/statistics.md#heldout.

BOS / special tokens are excluded unless `stats.include_bos` (the same choice as the statistics,
which is checked: the streamed test token count must equal the test statistics' n).

Outputs: `PairMetrics` (reports/metrics/<pair>.json: headline numbers, no per-rank series),
`EfficiencyTable` (the per-rank series) and `TransportVerdicts` (reports/evaluate/<pair>/), features.csv
beside them, figures <pair>_{efficiency, feature_r2, dim_r2}.png; all logged to the pair's MLflow run
(the metrics file's numbers as metrics, the sweep as step-indexed metrics, step = rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ato.accumulate import document_block_stats
from ato.artifacts import (
    EfficiencyTable,
    Layout,
    PairMetrics,
    SaeInfo,
    atomic_group,
    csv_cell,
    read_pair_stats,
    write_csv_atomic,
)
from ato.evaluate import (
    FEATURE_COLUMNS,
    EvaluateError,
    Evaluation,
    Predictors,
    SaeFeatures,
    TestAccumulators,
    evaluate,
    feature_rows,
    load_sae_features,
    score_test_split,
    transport_verdicts,
)
from ato.math.stats import PairStats
from ato.operators import load_operator
from ato.params import Pair, Params, StatsParams
from ato.plotting import unreliable_sae_text
from ato.plotting.evaluate import plot_dim_r2, plot_efficiency, plot_feature_r2
from ato.store import ActivationStore

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
SWEEP_LOGGED = EfficiencyTable.COLUMNS[1:]  # ceiling and every η(r) column, logged per rank

__all__ = ["EvaluateError", "evaluate_pair", "main"]


def main(params: Params, pair: str | None = None) -> None:
    names = [pair] if pair else list(params.pairs)
    for name in tqdm(names, desc="evaluate", unit="pair", disable=len(names) < 2):
        evaluate_pair(params, name)


def evaluate_pair(params: Params, name: str) -> PairMetrics:
    """Evaluate one pair; writes every output and returns its metrics."""
    if name not in params.pairs:
        raise EvaluateError(f"pair {name} is not in params.pairs ({', '.join(params.pairs)})")
    layout, pair = Layout.from_params(params), params.pairs[name]
    inputs = load_inputs(layout, pair)
    acc = stream_test_split(inputs, pair, params.stats)
    chunks = inputs.store.iter_chunks("test", [pair.L, pair.target], params.stats.chunk_tokens,
                                      params.stats.include_bos, with_tokens=True)  # fmt: skip
    documents = ((c[pair.L], c[pair.target], c["doc_id"]) for c in chunks)
    blocks = document_block_stats(inputs.store, pair.L, pair.target, params.evaluate.curve_blocks,
                                  params.stats.chunk_tokens, params.stats.include_bos)  # fmt: skip
    result = evaluate(
        acc, inputs.splits, inputs.predictors, inputs.features, inputs.alpha, params.evaluate, documents, blocks
    )
    gate = sae_gate(layout, pair.target)
    result.metrics.sae_reliable = float(gate.reliable)
    with atomic_group():  # all seven files or none (they lie in three directories)
        paths = write_outputs(layout, params, pair, result, gate)
    _log_mlflow(params, name, result, paths, gate)
    m = result.metrics
    log.info(
        "evaluate %s: R²=%.4f (identity %.4f, OLS %.4f); kept features transported/undetermined/synthesised "
        "%d/%d/%d, every live feature's transported fraction %.3f; ceiling %.4f; "
        "η_test %.4f vs linear %.4f (ratio %.4f), η∞ %.4f [%.4f, %.4f]; held-out subspace %d (null %.0f ± %.0f), "
        "PR %.1f (null %.1f)",
        name, m.ato.r2, m.identity.r2, m.ols.r2, int(m.n_transported), int(m.n_undetermined), int(m.n_synthesised),
        m.live_transported_fraction,
        m.ceiling_full, m.eta_test, m.eta_expected, m.eta_ratio, m.eta_inf, m.eta_inf_lo, m.eta_inf_hi,
        int(m.heldout_subspace_size),
        m.heldout_subspace_size_null, m.heldout_subspace_size_null_std, m.heldout_pr, m.heldout_pr_null,
    )  # fmt: skip
    return m


@dataclass
class PairInputs:
    store: ActivationStore
    splits: dict[str, PairStats]  # train / val / test statistics
    predictors: Predictors
    alpha: float  # the operator's ridge α (config.json)
    features: SaeFeatures


def load_inputs(layout: Layout, pair: Pair) -> PairInputs:
    """The store, the operator (checked against store and pair), the statistics and layer L+k's SAE
    features; the operator first, so a stale operator is named before anything else."""
    store = ActivationStore.open(layout.store)
    store.require_layers([pair.L, pair.target], f"pair {pair.name}")
    op = load_operator(
        layout.operator(pair.name),
        expect={
            "store_digest": store.digest,
            "model_digest": store.manifest.model.weights_digest,
            "d_model": store.d_model,
            "layer_in": pair.L,
            "layer_out": pair.target,
        },
    )
    splits = {s: read_pair_stats(layout.pair_stats(s, pair.name), store.digest) for s in SPLITS}
    features = load_sae_features(layout.sae(pair.target), layout.feature_set(pair.target), pair.target, store.d_model)
    predictors = Predictors.build(op.W.double().numpy(), op.b.double().numpy(), splits["train"])
    return PairInputs(store, splits, predictors, float(op.config.alpha), features)


def stream_test_split(inputs: PairInputs, pair: Pair, sp: StatsParams) -> TestAccumulators:
    """One pass over the test split (BOS/special excluded unless stats.include_bos); the token count
    must equal the test statistics' n, or the statistics were computed with another choice."""
    chunks = inputs.store.iter_chunks("test", [pair.L, pair.target], sp.chunk_tokens, sp.include_bos, with_tokens=True)
    n_test = inputs.splits["test"].n
    acc = score_test_split(((c[pair.L], c[pair.target], c["doc_id"]) for c in chunks), inputs.predictors,
                           inputs.features, total=int(n_test), desc=f"evaluate {pair.name} (test)")  # fmt: skip
    if acc.n_tokens != n_test:
        raise EvaluateError(
            f"pair {pair.name}: the test split streams {int(acc.n_tokens)} tokens (include_bos={sp.include_bos}) "
            f"but the test statistics have {int(n_test)}; rerun `ato stats`"
        )
    return acc


@dataclass
class SaeGate:
    """Whether layer L+k's SAE passed its quality gates: its feature-level numbers are marked otherwise."""

    reliable: bool
    failures: list[str]

    @property
    def banner(self) -> str | None:
        return None if self.reliable else unreliable_sae_text(self.failures)


def sae_gate(layout: Layout, layer: int) -> SaeGate:
    """SaeInfo.reliable / gate_failures of layer `layer`'s SAE; no SaeInfo counts as unreliable."""
    path = layout.sae_info(layer)
    if not path.exists():
        return SaeGate(False, [f"no SAE quality report ({path.name} missing)"])
    info = SaeInfo.read(path)
    return SaeGate(bool(info.reliable), list(info.gate_failures))


def write_outputs(
    layout: Layout, params: Params, pair: Pair, result: Evaluation, gate: SaeGate | None = None
) -> list[Path]:
    """Metrics, tables, verdicts and figures of one pair; returns the paths to log."""
    name, ev, dpi = pair.name, params.evaluate, params.report.dpi
    gate = gate or SaeGate(False, ["no gate result"])
    result.metrics.write(layout.metrics(name))
    features_csv = write_csv_atomic(
        layout.feature_table(name), FEATURE_COLUMNS, [[csv_cell(v) for v in row] for row in feature_rows(result)]
    )
    efficiency_csv = EfficiencyTable.from_columns(result.table).write(layout.efficiency(name))
    fr, t = result.feature_scores, result.transport
    transport_verdicts(result, name, pair.L, pair.target, ev, gate.reliable, gate.failures).write(
        layout.transport(name)
    )
    figures = [
        plot_efficiency(
            layout.pair_figure(name, "efficiency"),
            name,
            t.table,
            t.heldout,
            t.subspace,
            t.linear,
            result.metrics.n_test_tokens,
            dpi,
        ),
        plot_feature_r2(
            layout.pair_figure(name, "feature_r2"),
            name,
            fr["ato"]["r2"],
            fr["identity"]["r2"],
            result.verdicts,
            ev.transported_r2,
            dpi,
            unreliable=gate.banner,
        ),
        plot_dim_r2(layout.pair_figure(name, "dim_r2"), name, result.per_dim, dpi),
    ]
    return [layout.metrics(name), features_csv, efficiency_csv, layout.transport(name), *figures]


def _log_mlflow(params: Params, name: str, result: Evaluation, artifacts: list[Path], gate: SaeGate) -> None:
    import mlflow

    from ato.tracking import RunContext, log_flat_metrics, log_pair_metrics, pair_run, sae_reliability_tags

    table = result.table
    with pair_run(RunContext.from_params(params), name, "evaluate"):
        mlflow.set_tags(sae_reliability_tags(gate.reliable, gate.failures))
        log_pair_metrics(result.metrics.flat())
        for i, r in enumerate(table["rank"]):  # the sweep as step-indexed curves (step = rank)
            log_flat_metrics({f"sweep_{c}": float(table[c][i]) for c in SWEEP_LOGGED}, step=int(r))
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="evaluate")
