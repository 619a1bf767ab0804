"""Stage `report`: one readable summary of every pair's results, plus the figures that compare pairs.

Reads, for every pair in `params.pairs`, what the per-pair stages wrote (`PairMetrics` and
`EfficiencyTable` of evaluate, `CausalSummary` of causal, `TuningResult` of tune) and the pair's variance
budget (`ContextBudget` of context: the summary opens with it). A missing input is not an error (a pair's
evaluate, causal or context stage may not have run yet): its cells read "—", the
figures mark it, and summary.md lists every missing file and the command that makes it. A present
but unreadable input is an error naming the file. Outputs of pairs or target layers no longer in
`pairs:` (an earlier run's) are listed under "Stale outputs" (`ato.reporting.stale`).

Feature cards (`ato.reporting.feature_cards`: select's kept features and contexts, evaluate's verdicts,
the SAE's quality gates from reports/sae) go into summary.md and reports/features.html; every
feature-level number of an SAE that missed its gates is marked UNRELIABLE (summary, heatmaps, MLflow
tags `sae_reliable`, `sae_gate_failures`).

Writes headline.json (`HeadlineMetrics`, the pipeline's one DVC metrics file: a few numbers per pair and
each target layer's SAE gates; per pair `moved` and `computed` from the budget), summary.md, features.html,
figures/summary_{budget, heatmaps, efficiency, causal, alpha, learning_curve}.png and plots/{summary,
efficiency, alpha}.csv under `paths.reports`, and logs them to the pipeline's parent MLflow run
(`report/`) together with every pair's headline numbers beside their references and nulls as metrics
`<pair>/<name>` (`ato.reporting.headline_metrics`). Params: `report.dpi`,
`report.ranks` (ranks at which the tables quote η(r) and ceiling(r): the largest swept rank ≤ r),
`report.causal_scope` (`after`: predictions at or after the first patched position, the only ones a
patch can change; `all`: every prediction).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ato.artifacts import Layout, atomic_group, write_text_atomic
from ato.params import Params
from ato.plotting.summary import plot_alpha, plot_efficiency, plot_heatmaps, plot_learning_curve
from ato.plotting.summary_causal import plot_causal
from ato.plotting.summary_context import plot_budget
from ato.reporting import (
    PairResults,
    SummarySettings,
    build_headline,
    headline_metrics,
    load_pair,
    render_summary,
    write_plot_csvs,
)
from ato.reporting.feature_cards import LayerCards, cards_html, load_cards
from ato.reporting.stale import stale_outputs

log = logging.getLogger(__name__)


def main(params: Params) -> Path:
    """Write headline.json, summary.md, the summary figures and the plot CSVs; log them to the parent MLflow run."""
    layout, rp = Layout.from_params(params), params.report
    results = [load_pair(layout, name, pair) for name, pair in params.pairs.items()]
    cards = load_cards(layout, params.pairs)
    settings = SummarySettings.from_params(params)
    stale = stale_outputs(layout, params.pairs)
    if stale:
        log.warning("report: outputs of pairs or layers not in `pairs:` (listed in the summary): %s", ", ".join(stale))
    with atomic_group():  # figures, plot CSVs, headline, summary and cards, or none
        figures = write_figures(layout, params, results, cards)
        csvs = write_plot_csvs(layout.plots, results, rp.causal_scope)
        build_headline(layout, results, rp.causal_scope).write(layout.headline)
        write_text_atomic(layout.summary, render_summary(settings, results, figures, cards, stale) + "\n")
        write_text_atomic(layout.feature_cards, cards_html(cards, settings.model))
    n_missing = sum(len(res.missing) for res in results)
    _log_mlflow(
        params,
        [layout.headline, layout.summary, layout.feature_cards, *figures.values(), *csvs],
        _parent_metrics(results, rp.causal_scope, n_missing),
        cards,
    )
    log.info(
        "report: %s (%d pairs, %d missing input file(s)); figures in %s",
        layout.summary,
        len(results),
        n_missing,
        layout.figures,
    )
    return layout.summary


def write_figures(
    layout: Layout, params: Params, results: list[PairResults], cards: list[LayerCards] | None = None
) -> dict[str, Path]:
    dpi, figure = params.report.dpi, layout.summary_figure
    failures = {lc.layer: lc.failures or ["no gate result"] for lc in cards or [] if not lc.reliable}
    return {
        "budget": plot_budget(figure("budget"), results, dpi),
        "heatmaps": plot_heatmaps(figure("heatmaps"), results, dpi, failures),
        "efficiency": plot_efficiency(figure("efficiency"), results, params.evaluate.subspace_fraction, dpi),
        "causal": plot_causal(figure("causal"), results, params.report.causal_scope, dpi),
        "alpha": plot_alpha(figure("alpha"), results, dpi),
        "learning_curve": plot_learning_curve(figure("learning_curve"), results, dpi),
    }


def _parent_metrics(results: list[PairResults], scope: str, n_missing: int) -> dict[str, float]:
    """`<pair>/<metric>` for every pair's headline numbers, references and nulls, and the missing-input count."""
    out: dict[str, float] = {"report_missing_inputs": n_missing}
    for res in results:
        out |= {f"{res.name}/{key}": value for key, value in headline_metrics(res, scope).items()}
    return out


def _log_mlflow(params: Params, artifacts: list[Path], metrics: dict[str, float], cards: list[LayerCards]) -> None:
    import mlflow

    from ato.tracking import RunContext, log_flat_metrics, pipeline_run, sae_reliability_tags

    with pipeline_run(RunContext.from_params(params), "report"):
        bad = [lc for lc in cards if not lc.reliable]
        failures = [f"layer {lc.layer}: {f}" for lc in bad for f in lc.failures or ["no gate result"]]
        mlflow.set_tags(sae_reliability_tags(all(lc.reliable for lc in cards), failures))
        for lc in cards:
            mlflow.set_tags(sae_reliability_tags(lc.reliable, lc.failures, layer=lc.layer))
        log_flat_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="report")
