"""The variance budget in `ato report` (reports/context/<pair>.json, `ContextBudget`): the summary opens
with it, every share beside its interval and n → ∞ value, a figure of it, headline.json's `moved` and
`computed`; a pair without a budget file is said so, not a crash. Planted records, no model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from test_report import fake_budget, make_project, write_fake_outputs

PAIRS = {"L02_k1": (2, 1), "L00_k1": (0, 1), "L01_k2": (1, 2)}  # params order is not (L, k) order
NO_BUDGET = "L01_k2"


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    from ato.params import load_params
    from ato.stages import report

    project = make_project(tmp_path_factory.mktemp("budget"), PAIRS)
    write_fake_outputs(project, PAIRS, skip={NO_BUDGET: {"context"}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_log_mlflow", lambda *a, **k: None)
        summary = report.main(load_params(project / "params.yaml"))
    return project, summary.read_text()


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_fmt_estimate_sets_the_interval_and_the_value_at_infinity():
    from ato.artifacts import Estimate
    from ato.reporting.markdown_context import fmt_estimate

    assert fmt_estimate(Estimate(0.031, 0.024, 0.038, 0.029)) == "0.031 [0.024, 0.038] (∞: 0.029)"
    assert fmt_estimate(Estimate(0.031)) == "0.031"  # no interval, no curve: the value alone
    assert fmt_estimate(Estimate()) == "—"


def test_the_summary_opens_with_the_budget(reported):
    _project, text = reported
    first = text.split("\n## ", 2)[1]
    assert first.startswith("Carried, moved or computed: the variance budget (test)")
    section = _section(text, "Carried, moved or computed")
    for name, (L, k) in PAIRS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        if name == NO_BUDGET:
            assert "no budget (`dvc repro context` has not run)" in row
            continue
        b = fake_budget(name, L, k)
        shares = [b.carried, b.moved, *(b.increments[kind] for kind in ("lagged", "prefix", "routed")), b.computed]
        cells = [f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}] (∞: {e.extrapolated:.3f})" for e in shares]
        refs = [b.identity_r2_w, b.kinds["context"].p_over_n, b.ceiling_same, b.ceiling_context]
        assert row == f"| {name} | " + " | ".join([*cells, *(f"{v:.3f}" for v in refs), "1 / 2 / 1 / 1"]) + " |"
        maps = next(line for line in section.splitlines() if line.startswith(f"| {name} | {b.carried.value:.3f} ("))
        moved = b.moved
        assert f"| {moved.extrapolated:.3f} [{moved.extrapolated_low:.3f}, {moved.extrapolated_high:.3f}] |" in maps
    assert f"No budget for {NO_BUDGET}" in section and "Intervals: percentile document bootstrap" in section
    assert "**How to read.**" in section and "the context ceiling bounds those" in section
    missing = _section(text, "Missing inputs")
    assert f"**{NO_BUDGET}**: context — `reports/context/{NO_BUDGET}.json` (made by `dvc repro context`)" in missing
    # the readings the budget supports, not the same-position ones
    assert "also holds what the blocks read from other positions" not in text
    assert "splits it into moved" in _section(text, "Residual-space R²")
    assert "*moved* (a context map reaches the threshold" in _section(text, "Feature space")


def test_the_budget_figure_stacks_the_shares_per_pair(reported):
    from PIL import Image

    from ato import kinds

    project, text = reported
    png = project / "reports" / "figures" / "summary_budget.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Variance budget per pair" in text and "(figures/summary_budget.png)" in text
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    carried = np.array([int(kinds.get("ato").colour[i : i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - carried).sum(1) < 20).sum() > 5000  # two tall carried bars in the ATO's colour


def test_headline_has_moved_and_computed_from_the_budget(reported):
    project, _text = reported
    written = json.loads((project / "reports" / "headline.json").read_text())
    b = fake_budget("L00_k1", 0, 1)
    assert written["L00_k1"]["moved"] == pytest.approx(b.moved.value)
    assert written["L00_k1"]["computed"] == pytest.approx(b.computed.value)
    assert "moved" not in written[NO_BUDGET] and "computed" not in written[NO_BUDGET]


def test_parent_run_metrics_carry_the_shares_with_their_intervals():
    from ato.params import Pair
    from ato.reporting import PairResults, headline_metrics

    res = PairResults("L00_k1", Pair(0, 1), context=fake_budget("L00_k1", 0, 1))
    out = headline_metrics(res, "after")
    assert out["context_moved"] == pytest.approx(0.03) and out["context_moved_lo"] == pytest.approx(0.027)
    assert out["context_computed_inf"] == pytest.approx(res.context.computed.extrapolated)
    assert not any(key.startswith("context_") for key in headline_metrics(PairResults("L00_k1", Pair(0, 1)), "after"))
    assert math.isnan(out["r2"])  # no metrics file: NaN, not logged
