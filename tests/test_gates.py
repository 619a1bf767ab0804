"""An SAE that misses its quality gates turns every feature-level number built on it into an
"unreliable" mark: in the per-pair metrics record, the transport verdicts, the MLflow tags of the
evaluate and report runs, summary.md, features.html and the figures. Tiny synthetic project
(tests/test_evaluate.py's), one evaluate + report pass; the reliable case is checked for the absence
of every mark."""

from __future__ import annotations

import html
import json
import math

import numpy as np

from test_evaluate import PAIR, build_project

FAILURES = ["dead_fraction 0.312 > 0.05", "ce_recovered_zero 0.712 < 0.9 (short by 0.188)"]


def _sae_info(reliable: bool):
    from ato.artifacts import SaeInfo

    return SaeInfo(
        layer=1,
        architecture="topk",
        d_in=8,
        d_sae=16,
        store_digest="store-digest-0",
        fve_val=0.9,
        mean_l0=3.0,
        dead_fraction=0.05 if reliable else 0.312,
        n_val_tokens=180,
        hook="blocks.1.hook_resid_post",
        source="train",
        reliable=reliable,
        gate_failures=[] if reliable else FAILURES,
    )


def _red_pixels(path) -> int:
    from PIL import Image

    from ato.plotting import UNRELIABLE_COLOUR

    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    red = np.array([int(UNRELIABLE_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - red).sum(1) < 40).sum())


def _tags(params, **filters) -> dict[str, str]:
    import mlflow

    mlflow.set_tracking_uri(params.mlflow_uri())
    runs = mlflow.search_runs(experiment_names=[params.paths.mlflow_experiment], output_format="list")
    chosen = [r for r in runs if all(r.data.tags.get(k) == v for k, v in filters.items())]
    assert len(chosen) == 1, [r.data.tags for r in runs]
    return chosen[0].data.tags


def test_failing_gate_marks_every_feature_level_output(tmp_path):
    from ato.artifacts import Layout, PairMetrics, TransportVerdicts
    from ato.stages import evaluate, report

    params = build_project(tmp_path)["params"]
    layout = Layout.from_params(params)
    info = _sae_info(reliable=False)
    info.write(layout.sae_info(1))
    info.write(layout.sae_report(1))
    evaluate.main(params, PAIR)
    report.main(params)

    # the per-pair metrics record (a DVC metrics file: numbers only) and the verdicts
    metrics = json.loads(layout.metrics(PAIR).read_text())
    assert metrics["sae_reliable"] == 0.0 and PairMetrics.read(layout.metrics(PAIR)).sae_reliable == 0.0
    verdicts = TransportVerdicts.read(layout.transport(PAIR))
    assert verdicts.sae_reliable is False and verdicts.sae_gate_failures == FAILURES
    assert len(verdicts.r2) == len(verdicts.features) == len(verdicts.identity_r2) > 0
    # MLflow: the pair's evaluate run and the pipeline's report run
    pair_tags = _tags(params, **{"ato.pair": PAIR})
    assert pair_tags["sae_reliable"] == "false" and pair_tags["sae_gate_failures"] == "; ".join(FAILURES)
    parent = _tags(params, **{"ato.kind": "pipeline"})
    assert parent["sae_reliable"] == "false" and parent["sae_reliable.layer_01"] == "false"
    assert FAILURES[0] in parent["sae_gate_failures"] and FAILURES[1] in parent["sae_gate_failures.layer_01"]
    # summary.md: a banner naming the failures and the pair, and the pair's row marked
    summary = layout.summary.read_text()
    assert f"**UNRELIABLE SAE at layer 1: {'; '.join(FAILURES)}.**" in summary
    row = next(line for line in summary.splitlines() if line.startswith(f"| {PAIR} | **UNRELIABLE**"))
    assert row.count("|") > 10
    assert html.escape("UNRELIABLE SAE: " + "; ".join(FAILURES)) in layout.feature_cards.read_text()
    # figures: the banner on the pair's feature figure and on the summary heatmaps
    assert _red_pixels(layout.pair_figure(PAIR, "feature_r2")) > 500
    assert _red_pixels(layout.summary_figure("heatmaps")) > 500


def test_passing_gate_leaves_no_mark(tmp_path):
    """The same outputs from a reliable SAE: flags true, no banner, no red, no UNRELIABLE text."""
    from ato.artifacts import Layout, PairMetrics
    from ato.params import load_params
    from ato.plotting.evaluate import plot_feature_r2
    from ato.plotting.summary import plot_heatmaps
    from ato.reporting import PairResults, SummarySettings, render_summary
    from ato.reporting.feature_cards import cards_html, load_cards
    from ato.tracking import sae_reliability_tags

    (tmp_path / "params.yaml").write_text("pairs: {L00_k1: {L: 0, k: 1}}\n")
    params = load_params(tmp_path / "params.yaml")
    layout = Layout.from_params(params)
    _sae_info(reliable=True).write(layout.sae_report(1))
    metrics = PairMetrics.missing()
    metrics.sae_reliable = 1.0
    results = [PairResults(PAIR, params.pairs[PAIR], metrics=metrics)]
    cards = load_cards(layout, params.pairs)
    assert cards[0].reliable and cards[0].banner is None
    assert "UNRELIABLE" not in render_summary(SummarySettings.from_params(params), results, {}, cards)
    assert "UNRELIABLE" not in cards_html(cards, "tiny")
    assert sae_reliability_tags(True, []) == {"sae_reliable": "true", "sae_gate_failures": "none"}
    r2 = np.array([0.9, 0.2, math.nan])
    verdicts = np.array(["transported", "synthesised", "no_verdict"])
    assert _red_pixels(plot_feature_r2(tmp_path / "ok.png", PAIR, r2, r2 - 0.1, verdicts, 0.5, 60)) == 0
    assert _red_pixels(plot_heatmaps(tmp_path / "heat.png", results, 60, {})) == 0
    # … and the same calls with the SAE marked unreliable do draw the mark (the check above can fail)
    metrics.sae_reliable = 0.0
    banner = "UNRELIABLE SAE: " + FAILURES[0]
    assert _red_pixels(plot_feature_r2(tmp_path / "bad.png", PAIR, r2, r2 - 0.1, verdicts, 0.5, 60, banner)) > 500
    assert "UNRELIABLE" in render_summary(SummarySettings.from_params(params), results, {}, cards)


def test_missing_sae_report_counts_as_unreliable(tmp_path):
    """No gate result (no SaeInfo) is never read as a pass."""
    from ato.artifacts import Layout
    from ato.params import load_params
    from ato.reporting.feature_cards import load_cards
    from ato.stages.evaluate import sae_gate

    (tmp_path / "params.yaml").write_text("pairs: {L00_k1: {L: 0, k: 1}}\n")
    params = load_params(tmp_path / "params.yaml")
    layout = Layout.from_params(params)
    gate = sae_gate(layout, 1)
    assert gate.reliable is False and "missing" in gate.failures[0] and gate.banner
    layer = load_cards(layout, params.pairs)[0]
    assert layer.reliable is False and "missing" in layer.failures[0]
