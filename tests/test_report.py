"""Stage `report` on realistic synthetic per-pair outputs (no model, no store): the files exist, the
summary carries every pair and the numbers of the inputs, and missing inputs are named."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from ato.artifacts import (
    ArtifactError,
    CausalSummary,
    CleanScores,
    EfficiencyTable,
    PatchedScores,
    PositionSetSummary,
    RecoveredShare,
    TuningResult,
    json_clean,
)
from ato.artifacts.causal import patched_conditions, recovered_references
from ato.math.cca import rank_grid

PAIRS = {"L05_k1": (5, 1), "L04_k2": (4, 2), "L03_k3": (3, 3), "L11_k1": (11, 1), "L10_k2": (10, 2), "L09_k3": (9, 3)}
D_MODEL = 640


def fake_metrics(L: int, k: int) -> dict[str, float]:
    """Plausible evaluate metrics: R² falls with k and with depth, baselines below the ATO; η beside its
    exactly-linear reference, held-out subspace size and PR beside their nulls."""
    r2 = round(0.93 - 0.09 * k - 0.006 * L, 6)
    m = {
        "alpha": 10.0 ** (1 + L / 4),
        "val_r2": r2 + 0.004,
        "r2": r2,
        "r2_weighted": r2 + 0.02,
        "identity_r2": r2 - 0.31,
        "identity_r2_weighted": round(-0.42 + 0.01 * L, 6),  # planted: the opposite sign to identity_r2
        "mean_r2": -0.0012,
        "mean_r2_weighted": -0.0007,
        "ols_r2_weighted": r2 + 0.003,
        "ols_r2": r2 - 0.017,
        "cosine": 0.9 - 0.05 * k,
        "mse": 12.5 * k + L,
        "n_test_tokens": 14960.0,
        "n_train_tokens": 59800.0,
        "n_val_tokens": 14950.0,
        "n_features": 128.0,
        "n_transported": float(90 - 17 * k),
        "n_synthesised": float(30 + 15 * k),
        "n_no_verdict": float(8 + 2 * k),
        "n_undetermined": float(4 + k),
        "live_n_features": 1000.0 - L,
        "live_n_judged": 980.0 - L,
        "live_n_transported": float(400 - 50 * k),
        "live_n_undetermined": float(100 + 10 * k),
        "live_n_synthesised": float(480 - L + 40 * k),
        "live_transported_fraction": round(0.47 - 0.05 * k, 6),
        "live_transported_fraction_low": round(0.44 - 0.05 * k, 6),
        "live_transported_fraction_high": round(0.5 - 0.05 * k, 6),
        "live_feature_r2_median": round(0.46 - 0.1 * k, 6),
        "live_feature_r2_median_low": round(0.43 - 0.1 * k, 6),
        "live_feature_r2_median_high": round(0.49 - 0.1 * k, 6),
        "feature_r2_median_low": round(0.68 - 0.12 * k, 6),
        "feature_r2_median_high": round(0.74 - 0.12 * k, 6),
        "feature_r2_median": round(0.71 - 0.12 * k, 6),
        "identity_feature_r2_median": 0.21,
        "ols_feature_r2_median": round(0.69 - 0.12 * k, 6),
        "feature_pearson_median": 0.88,
        "feature_rms_ratio_median": 0.93,
        "ceiling_full": round(0.95 - 0.05 * k, 6),
        "eta_test": round(0.97 - 0.01 * k, 6),
        "eta_train": round(0.999 - 0.001 * k, 6),
        "eta_expected": round(0.978 - 0.008 * k, 6),
        "eta_expected_std": round(0.0021 + 0.0003 * k, 6),
        "heldout_subspace_size": float(120 + 25 * k + 2 * L),
        "heldout_subspace_size_null": 171.25 + k,
        "heldout_subspace_size_null_std": 3.5,
        "heldout_pr": 37.25 + 3 * k + L,
        "heldout_pr_null": 203.75,
        "heldout_pr_null_std": 2.25,
        "participation_ratio": 473.5 + 10 * k + L,
        "participation_ratio_null": 460.25,
        "subspace_size": float(400 + 25 * k + 2 * L),
        "subspace_size_null": 421.5,
        "canonical_directions": 640.0,
        "transport_directions": float(600 - 10 * k - L),
        "transport_directions_low": float(597 - 10 * k - L),
        "transport_directions_high": float(605 - 10 * k - L),
        "transport_directions_share": round(0.998 - 0.001 * k, 6),
        "transport_directions_share_low": round(0.997 - 0.001 * k, 6),
        "transport_directions_share_high": round(0.999 - 0.001 * k, 6),
        "transport_directions_threshold": 0.0331,
    }
    m["eta_ratio"] = m["eta_test"] / m["eta_expected"]
    m["heldout_subspace_size_excess"] = m["heldout_subspace_size"] - m["heldout_subspace_size_null"]
    m["heldout_pr_excess"] = m["heldout_pr"] - m["heldout_pr_null"]
    m["transported_fraction"] = m["n_transported"] / (m["n_transported"] + m["n_synthesised"])
    m |= fake_learning_curve(m["eta_test"], m["r2_weighted"], k)
    return m


PLANTED_SHORTFALL = {1: 0.03, 2: 0.0, 3: -0.03}  # k → 1 − η∞: falls short / no shortfall shown / above linear


def fake_learning_curve(eta_all: float, r2w_all: float, k: int) -> dict[str, float]:
    """Nested-subset points below the full one, and a shortfall of ±0.02 around `PLANTED_SHORTFALL[k]`."""
    out = {}
    for f in (8, 4, 2, 1):
        out |= {f"curve_n_f{f}": 59800.0 / f, f"curve_eta_f{f}": eta_all - 0.01 * (f - 1), f"curve_r2w_f{f}": r2w_all}
    short = PLANTED_SHORTFALL[k]
    out |= {"eta_shortfall": short, "eta_shortfall_lo": short - 0.02, "eta_shortfall_hi": short + 0.02}
    out |= {"eta_inf": 1 - short, "eta_inf_lo": 1 - short - 0.02, "eta_inf_hi": 1 - short + 0.02}
    return out | {"r2w_inf": r2w_all + 0.004, "r2w_inf_lo": r2w_all, "r2w_inf_hi": r2w_all + 0.008}


def fake_efficiency(L: int, k: int) -> dict[str, list[float]]:
    ranks = np.array(rank_grid(D_MODEL, 24), dtype=float)
    full = 0.95 - 0.05 * k
    tau = 30.0 + 20 * k + L
    ceiling = full * (1 - np.exp(-ranks / tau)) / (1 - np.exp(-D_MODEL / tau))
    rrr_test = 0.97 - 0.05 * k - 0.01 * L - 0.03 * np.exp(-ranks / 50)
    svd_test = rrr_test - 1.6 * np.exp(-ranks / (12 + 4 * k))  # worse at small rank, can go below −1
    return {
        "rank": ranks.astype(int).tolist(),
        "ceiling": ceiling.tolist(),
        "eta_svd_train": (svd_test + 0.02).tolist(),
        "eta_svd_test": svd_test.tolist(),
        "eta_rrr_train": np.ones_like(ranks).tolist(),
        "eta_rrr_test": rrr_test.tolist(),
        "eta_svd_test_shift_removed": (svd_test + 0.05).tolist(),
        "eta_rrr_test_shift_removed": (rrr_test + 0.04 * np.exp(-ranks / 20)).tolist(),
    }


def _patched(delta: float, scale: float) -> PatchedScores:
    """A condition's scores: Δ over `all` is 0.8 × the `after` one; intervals ±20 % of Δ."""
    values = {}
    for scope, f in (("all", 0.8 * scale), ("after", scale)):
        dm = round(delta * f, 6)
        lo, hi = round(dm * 0.8, 6), round(dm * 1.2, 6)
        values |= {
            f"logppl_{scope}": 3.1 + dm,
            f"delta_{scope}_mean": dm,
            f"delta_{scope}_lo": lo,
            f"delta_{scope}_hi": hi,
            f"delta_{scope}_half_width": (hi - lo) / 2,
        }
    return PatchedScores(**values)


def _share(reference: str, ato: PatchedScores, ref: PatchedScores, undefined: bool) -> RecoveredShare:
    """1 − Δ(ato)/Δ(ref) with a ±1 % interval (cut at 100 %); NaN and unbounded when `undefined`."""
    values: dict = {"reference": reference}
    for scope in ("all", "after"):
        m = math.nan if undefined else 1 - ato.delta(scope)[0] / ref.delta(scope)[0]
        lo, hi = m - 0.01, min(1.0, m + 0.01)
        values |= {
            f"{scope}_mean": m,
            f"{scope}_lo": lo,
            f"{scope}_hi": hi,
            f"{scope}_half_width": (hi - lo) / 2,
            f"{scope}_bounded": not undefined,
            f"{scope}_degenerate": undefined,
        }
    return RecoveredShare(**values)


def fake_causal(L: int, k: int, recovered_null: bool = False) -> dict:
    """What `ato causal` writes, made by the record itself (flat headline keys + `position_sets`, NaN as
    null); `recovered_null`: every recovered share undefined (references without damage)."""
    base = {
        "ato": 0.021 * k + 0.001 * L,
        "identity": 0.35 * k,
        "zero": 2.4 + 0.2 * k,
        "bias_only": 1.7,
        "train_mean": 1.1 + 0.1 * k,
        "mean_update": 0.3 * k,
        "context": 0.015 * k + 0.001 * L,
    }
    sets = {}
    for set_name, scale in (("all", 1.0), ("early", 0.2), ("late", 0.1), ("single_8", 0.03)):
        patched = {c: _patched(delta, scale) for c, delta in base.items()}
        shares = {r: _share(r, patched["ato"], patched[r], recovered_null) for r in recovered_references()}
        sets[set_name] = PositionSetSummary(
            n_patched_tokens=int(2016 * scale),
            first_patched_position=1,
            n_tokens_all=2016,
            n_tokens_after=int(2016 * scale) + 10,
            clean=CleanScores(logppl_all=3.1, logppl_after=3.05),
            **patched,
            recovered=shares["train_mean"],
            **{f"recovered_vs_{r}": share for r, share in shares.items()},
            recovered_context=_share("train_mean", patched["context"], patched["train_mean"], recovered_null),
        )
    record = CausalSummary(
        L=L,
        k=k,
        n_sequences=32,
        seq_len=64,
        seconds=12.5,
        tokens_per_second=4100.0,
        headline_reference="train_mean",
        interval_method="studentized_hull",
        interval_level=0.95,
        interval_n_units=32,
        interval_resamples=2000,
        position_sets=sets,
    )
    return json_clean(record.to_dict())


def fake_tuning(name: str, L: int, k: int) -> dict:
    grid = np.geomspace(1e-3, 1e7, 64)
    best = 10.0 ** (1 + L / 4)
    top = 0.93 - 0.09 * k - 0.006 * L + 0.004
    curve = top - 0.02 * (np.log10(grid) - np.log10(best)) ** 2 / 4
    curve = np.where(grid > best, top - 0.12 * np.abs(np.log10(grid / best)) ** 1.5, np.maximum(curve, top - 0.03))
    return {
        "format": TuningResult.FORMAT,
        "pair": name,
        "study": f"ato-{name}-abc",
        "objective": "val",
        "alpha": best,
        "val_r2": top,
        "n_trials": 40,
        "tune_seconds": 1.2,
        "curve": [{"alpha": float(a), "val_r2": float(v)} for a, v in zip(grid, curve)],
        "trials": [{"alpha": best, "val_r2": top}],
        # α diagnostics of `ato tune`: immaterial for the shallow pairs, at the range's edge for L = 11
        "n_val": 14960,
        "alpha_flatness": float(curve.max() - curve.min()),
        "alpha_gain": 1.5e-5 if L <= 5 else float(top - curve[0]),
        "val_r2_noise": 0.002,
        "alpha_immaterial": L <= 5,
        "alpha_edge_warning": "best α within one grid step of alpha_max = 1e+07" if L == 11 else None,
    }


def _estimate(value: float, half: float, inf_shift: float):
    from ato.artifacts import Estimate

    inf = value + inf_shift
    return Estimate(value, value - half, value + half, inf, inf - 2 * half, inf + 2 * half)


def fake_budget(name: str, L: int, k: int):
    """A context budget whose moved share grows with k (increments 0.010, 0.002 and the rest routed) and
    whose features read transported / moved (by lagged, routed) / synthesised / undetermined."""
    from ato.artifacts import ContextBudget, ContextFeatureVerdicts, ContextKindScore

    carried, moved = round(0.86 - 0.08 * k - 0.004 * L, 6), round(0.02 + 0.01 * k, 6)
    increments = {"lagged": 0.01, "prefix": 0.002, "routed": round(moved - 0.012, 6)}
    kinds = {
        kind: ContextKindScore(p=640 * blocks, p_over_n=640 * blocks / 59800, alpha=10.0, r2_w=_estimate(r2, 0.004, 0))
        for kind, blocks, r2 in (
            ("ato", 1, carried),
            ("lagged", 3, carried + 0.01),
            ("prefix", 2, carried + 0.001),
            ("routed", 1 + k, carried + moved - 0.005),
            ("context", 4 + k, carried + moved),
        )
    }
    return ContextBudget(
        pair=name, L=L, k=k, lags=2, n_train=59800, n_val=14960, n_test=15210, n_docs_test=120,
        interval="percentile document bootstrap over 120 test sequences, 1000 resamples, 95 %",
        kinds=kinds,
        identity_r2_w=round(0.5 - 0.1 * k, 6),
        carried=_estimate(carried, 0.004, 0.003),
        moved=_estimate(moved, 0.003, -0.002),
        computed=_estimate(round(1 - carried - moved, 6), 0.004, -0.001),
        increments={kind: _estimate(v, 0.002, 0.0) for kind, v in increments.items()},
        ceiling_same=0.71, ceiling_context=0.74 + 0.01 * k,
        bos_inputs="absent inputs are the train mean of layer L's non-BOS rows",
        features=ContextFeatureVerdicts(
            features=[5, 2, 7, 9, 11],
            verdict=["transported", "moved", "moved", "synthesised", "undetermined"],
            by=["", "lagged", "routed", "", ""],
            ato_r2=[0.9, 0.2, 0.3, 0.1, 0.45],
            context_r2=[0.92, 0.71, 0.64, 0.15, 0.5],
            context_r2_low=[0.88, 0.62, 0.55, 0.08, 0.41],
            context_r2_high=[0.95, 0.8, 0.7, 0.22, 0.58],
        ),
    )  # fmt: skip


def write_fake_outputs(
    project: Path,
    pairs: dict[str, tuple[int, int]],
    skip: dict[str, set[str]] | None = None,
    recovered_null: tuple[str, ...] = (),
) -> None:
    """Per-pair stage outputs under project/reports; `skip[pair]` ⊂ {metrics, efficiency, causal, tuning, context}."""
    skip = skip or {}
    reports = project / "reports"
    for name, (L, k) in pairs.items():
        left_out = skip.get(name, set())
        if "metrics" not in left_out:
            (reports / "metrics").mkdir(parents=True, exist_ok=True)
            (reports / "metrics" / f"{name}.json").write_text(json.dumps(fake_metrics(L, k), indent=2))
        if "efficiency" not in left_out:
            eff = fake_efficiency(L, k)
            (reports / "evaluate" / name).mkdir(parents=True, exist_ok=True)
            with open(reports / "evaluate" / name / "efficiency.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(list(eff))
                w.writerows(zip(*eff.values()))
        if "causal" not in left_out:
            (reports / "causal").mkdir(parents=True, exist_ok=True)
            (reports / "causal" / f"{name}.json").write_text(
                json.dumps(fake_causal(L, k, recovered_null=name in recovered_null), indent=2)
            )
        if "tuning" not in left_out:
            (reports / "tuning").mkdir(parents=True, exist_ok=True)
            (reports / "tuning" / f"{name}.json").write_text(json.dumps(fake_tuning(name, L, k)))
        if "context" not in left_out:
            fake_budget(name, L, k).write(reports / "context" / f"{name}.json")


def make_project(tmp_path: Path, pairs: dict[str, tuple[int, int]], **report) -> Path:
    raw = {"pairs": {n: {"L": L, "k": k} for n, (L, k) in pairs.items()}}
    if report:
        raw["report"] = report
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One report over six pairs, with L04_k2's causal output and L10_k2's evaluate outputs missing."""
    from ato.params import load_params
    from ato.stages import report

    project = make_project(tmp_path_factory.mktemp("report"), PAIRS)
    write_fake_outputs(
        project, PAIRS, skip={"L04_k2": {"causal"}, "L10_k2": {"metrics", "efficiency"}}, recovered_null=("L09_k3",)
    )
    params = load_params(project / "params.yaml")
    summary_path = report.main(params)
    return project, params, summary_path


def test_outputs_exist(reported):
    project, _params, summary_path = reported
    reports = project / "reports"
    assert summary_path == reports / "summary.md"
    for name in ("summary_heatmaps", "summary_efficiency", "summary_causal", "summary_alpha"):
        png = reports / "figures" / f"{name}.png"
        assert png.exists() and png.stat().st_size > 10_000, png
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (reports / "plots").iterdir()) == ["alpha.csv", "efficiency.csv", "summary.csv"]
    assert (reports / "headline.json").exists()
    assert not list(reports.rglob(".tmp-*"))


def test_summary_has_every_pair_and_the_input_numbers(reported):
    project, params, summary_path = reported
    text = summary_path.read_text()
    for name in PAIRS:
        assert text.count(f"| {name} |") >= 4, name  # one row in each per-pair table
    for name, (L, k) in PAIRS.items():
        if name == "L10_k2":
            continue
        m = fake_metrics(L, k)
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | {L} → {L + k} |"))
        for key in ("r2", "identity_r2", "ols_r2", "val_r2", "r2_weighted"):
            assert f"{m[key]:.4f}" in row, (name, key)
        # every baseline's R²_w beside its R², even where the two disagree in sign (identity)
        assert m["identity_r2"] > 0 > m["identity_r2_weighted"]
        for key in ("identity", "mean", "ols"):
            assert f"| {m[f'{key}_r2']:.4f} | {m[f'{key}_r2_weighted']:.4f} |" in row, (name, key)
        assert f"{m['alpha']:.3g}" in row
        r2_median = (m["feature_r2_median"], m["feature_r2_median_low"], m["feature_r2_median_high"])
        assert "| {:.4f} [{:.4f}, {:.4f}] |".format(*r2_median) in text  # each median with its interval
        assert f"| {int(m['n_transported'])} | {int(m['n_undetermined'])} | {int(m['n_synthesised'])} |" in text
        assert f"{m['transported_fraction']:.3f}" in text
        live = [m[f"live_{key}"] for key in ("n_features", "n_judged", "n_transported", "n_undetermined")]
        assert "| {} | {} | {} | {} |".format(*map(int, live)) in text  # every live feature, judged
        live_fraction = [m[f"live_transported_fraction{end}"] for end in ("", "_low", "_high")]
        assert "{:.3f} [{:.3f}, {:.3f}]".format(*live_fraction) in text
        assert f"{m['ceiling_full']:.4f}" in text
        # η beside the η of an exactly linear map (± its spread) and the ratio
        eta_row = next(line for line in text.splitlines() if line.startswith(f"| {name} | {m['ceiling_full']:.4f} |"))
        assert f"| {m['eta_test']:.4f} | {m['eta_expected']:.4f} ± {m['eta_expected_std']:.4f} |" in eta_row
        assert f"| {m['eta_ratio']:.4f} |" in eta_row
        # the count of directions that carry transport (of d), its bootstrap range and ceiling share
        count = f"| {name} | {int(m['transport_directions'])} of 640 |"
        row = next(line for line in text.splitlines() if line.startswith(count))
        low, high = int(m["transport_directions_low"]), int(m["transport_directions_high"])
        share = f"{m['transport_directions_share']:.4f} [{m['transport_directions_share_low']:.4f}, "
        assert f"| {low}–{high} | {share}" in row and f"| {m['transport_directions_threshold']:.4f} |" in row
        # held-out subspace size and PR beside their null (mean ± sd), no excess; in-sample PR beside its null
        size = int(m["heldout_subspace_size"])
        null, null_sd = m["heldout_subspace_size_null"], m["heldout_subspace_size_null_std"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | {size} |"))
        pr = f"| {m['heldout_pr']:.1f} | {m['heldout_pr_null']:.1f} ± {m['heldout_pr_null_std']:.1f} |"
        assert f"| {size} | {null:.1f} ± {null_sd:.1f} " + pr in row
        assert f"{m['heldout_pr_excess']:+.1f}" not in row
        assert f"| {m['participation_ratio']:.1f} | {m['participation_ratio_null']:.1f} |" in row
        eff = fake_efficiency(L, k)
        for r in (1, 10):  # both in the default sweep of d = 640
            i = eff["rank"].index(r)
            assert f"{eff['eta_rrr_test'][i]:.4f}" in text and f"{eff['ceiling'][i]:.4f}" in text
            assert f"{eff['eta_rrr_test_shift_removed'][i]:.4f}" in text
    # r = 100 is not swept: the header names the rank used (81, the largest swept rank ≤ 100)
    assert "η_RRR(r=81)" in text and "ceiling(r=81)" in text and "η_RRR(r=81) shift removed" in text
    # α: immaterial, or the edge warning, at n_val
    alpha_section = text.split("## Ridge penalty α", 1)[1].split("\n## ", 1)[0]
    alpha_rows = {line.split(" | ")[0][2:]: line for line in alpha_section.splitlines() if line.startswith("| L")}
    assert "α immaterial at n_val = 14960" in alpha_rows["L05_k1"]
    assert "edge: best α within one grid step of alpha_max" in alpha_rows["L11_k1"]
    assert "α matters at n_val = 14960" in alpha_rows["L09_k3"]
    causal = fake_causal(5, 1)
    assert params.report.causal_scope == "after"
    d, lo, hi, hw = (causal[f"ato_delta_after{s}"] for s in ("", "_lo", "_hi", "_half_width"))
    assert f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] ±{hw:.4f}" in text  # every Δ with its interval and half-width
    tm = causal["train_mean_delta_after_half_width"]
    assert f"±{tm:.4f}" in text
    # recovered vs mean ablation is the headline, zero ablation and identity beside it
    assert "recovered vs mean ablation ȳ_train (headline) | recovered vs zero ablation | recovered vs identity" in text
    row = next(line for line in text.splitlines() if line.startswith("| L05_k1 | ") and "%" in line)
    for ref in ("train_mean", "zero", "identity"):
        m_, lo_, hi_, hw_ = (causal[f"recovered_vs_{ref}_after{s}"] for s in ("", "_lo", "_hi", "_half_width"))
        assert f"{m_:.1%} [{lo_:.1%}, {hi_:.1%}] ±{hw_:.1%}" in row, ref
    assert causal["recovered_after"] == causal["recovered_vs_train_mean_after"]
    assert "interval `studentized_hull` over n = 32 sequences (2000 resamples)" in text
    assert "(interval unbounded)" not in text  # L09_k3's undefined shares read as dashes
    # a "How to read" paragraph in every results section
    for section in (
        "Residual-space R²",
        "Ridge penalty",
        "Feature space",
        "CCA ceiling and transport efficiency η",
        "Directions that carry transport",
        "Causal check",
    ):
        body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
        assert "**How to read.**" in body, section
    assert "“Falls short of linear” is said only when the interval lies above 0" in text
    for name, (_L, k) in PAIRS.items():  # the learning curve's words follow the planted intervals
        if name == "L10_k2":  # no metrics
            continue
        eta_inf = f"{1 - PLANTED_SHORTFALL[k]:.4f} ["
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | ") and eta_inf in line)
        words = {0.03: "falls short of linear", 0.0: "no shortfall shown", -0.03: "above linear"}
        assert words[PLANTED_SHORTFALL[k]] in row, row
        assert f"{PLANTED_SHORTFALL[k]:+.4f} [{PLANTED_SHORTFALL[k] - 0.02:+.4f}, " in row
    assert "| R² ATO | R²_w ATO | R² identity | R²_w identity | R² train mean | R²_w train mean |" in text
    assert "single_8" in text and "early" in text  # per position set table
    assert "| L05_k1 | single_8 | 60 |" in text


def test_missing_inputs_are_reported(reported):
    _project, _params, summary_path = reported
    text = summary_path.read_text()
    section = text.split("## Missing inputs", 1)[1].split("\n## ", 1)[0]
    assert "**L04_k2**: causal — `reports/causal/L04_k2.json`" in section
    assert "dvc repro causal@L04_k2" in section
    assert "**L10_k2**: metrics — `reports/metrics/L10_k2.json`" in section
    assert "**L10_k2**: efficiency — `reports/evaluate/L10_k2/efficiency.csv`" in section
    assert "3 input file(s) are missing" in section
    assert "L05_k1" not in section
    row = next(line for line in text.splitlines() if line.startswith("| L10_k2 | 10 → 12 |"))
    assert row.count("—") >= 8  # every evaluate cell of the residual table
    causal_rows = [line for line in text.splitlines() if line.startswith("| L04_k2 |")]
    assert any(line.count("—") >= 6 for line in causal_rows)
    # a null `recovered` (zero-ablation Δ of 0) reads as a dash, not "nan" or "None"
    assert "nan" not in text.lower().replace("nan)", "") and "None" not in text


def test_plot_csvs(reported):
    project, _params, _ = reported
    plots = project / "reports" / "plots"
    with open(plots / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["pair"] for r in rows] == list(PAIRS)
    by = {r["pair"]: r for r in rows}
    assert math.isclose(float(by["L05_k1"]["r2"]), fake_metrics(5, 1)["r2"])
    assert by["L10_k2"]["r2"] == "" and by["L04_k2"]["causal_ato_delta"] == ""
    assert math.isclose(float(by["L11_k1"]["causal_ato_delta"]), fake_causal(11, 1)["ato_delta_after"])
    causal, m = fake_causal(11, 1), fake_metrics(11, 1)
    for column, key in (
        ("causal_ato_delta_half_width", "ato_delta_after_half_width"),
        ("causal_train_mean_delta_hi", "train_mean_delta_after_hi"),
        ("causal_recovered", "recovered_vs_train_mean_after"),
        ("causal_recovered_vs_zero", "recovered_vs_zero_after"),
        ("causal_recovered_vs_identity_lo", "recovered_vs_identity_after_lo"),
    ):
        assert math.isclose(float(by["L11_k1"][column]), causal[key]), column
    for key in ("eta_expected", "eta_ratio", "heldout_subspace_size_null", "heldout_pr_excess", "n_val_tokens"):
        assert math.isclose(float(by["L11_k1"][key]), m[key]), key
    assert by["L05_k1"]["alpha_immaterial"] == "1.0" and by["L11_k1"]["alpha_immaterial"] == "0.0"
    assert by["L09_k3"]["causal_recovered"] == ""  # undefined share
    # the curves: long format, one row per pair and point, so dvc.yaml's plots name no pair
    with open(plots / "efficiency.csv") as fh:
        eff = list(csv.DictReader(fh))
    assert list(eff[0]) == [
        "pair",
        "L",
        "k",
        "rank",
        "log10_rank",
        "eta_rrr_test",
        "eta_rrr_test_shift_removed",
        "ceiling",
    ]
    curves = {name: [r for r in eff if r["pair"] == name] for name in PAIRS}
    assert curves.pop("L10_k2") == []  # its efficiency.csv is missing
    for name, rows in curves.items():
        L, k = PAIRS[name]
        assert {(r["L"], r["k"]) for r in rows} == {(str(L), str(k))}
        assert [int(r["rank"]) for r in rows] == rank_grid(D_MODEL, 24)
        assert [float(r["ceiling"]) for r in rows] == pytest.approx(fake_efficiency(L, k)["ceiling"])
    with open(plots / "alpha.csv") as fh:
        alpha = list(csv.DictReader(fh))
    assert list(alpha[0]) == ["pair", "L", "k", "alpha", "log10_alpha", "val_r2"]
    assert [r["pair"] for r in alpha] == [name for name in PAIRS for _ in range(64)]
    assert math.isclose(float(alpha[0]["log10_alpha"]), -3.0)


def test_headline_metrics(reported):
    """reports/headline.json, the one DVC metrics file: a few numbers per pair under short keys, the SAE
    gates per target layer, no strings, missing inputs left out; it reads back through its record."""
    from ato.artifacts import HeadlineMetrics

    project, _params, _ = reported
    path = project / "reports" / "headline.json"
    written = json.loads(path.read_text())
    assert list(written) == [*PAIRS, "sae_L06", "sae_L12"]
    assert written["sae_L06"] == written["sae_L12"] == {}  # no SAE quality report in this project
    keys = ["r2", "r2_w", "eta", "ceiling", "d_ato", "d_ato_hw", "recovered", "recovered_mean_abl"]
    keys += ["recovered_identity", "transported", "moved", "computed"]
    assert list(written["L05_k1"]) == keys
    m, causal = fake_metrics(5, 1), fake_causal(5, 1)
    expected = {
        "r2": m["r2"],
        "r2_w": m["r2_weighted"],
        "eta": m["eta_test"],
        "ceiling": m["ceiling_full"],
        "d_ato": causal["ato_delta_after"],
        "d_ato_hw": causal["ato_delta_after_half_width"],
        "recovered": causal["recovered_vs_train_mean_after"],
        "recovered_mean_abl": causal["recovered_vs_train_mean_after"],
        "recovered_identity": causal["recovered_vs_identity_after"],
        "transported": m["transported_fraction"],
        "moved": fake_budget("L05_k1", 5, 1).moved.value,
        "computed": fake_budget("L05_k1", 5, 1).computed.value,
    }
    assert written["L05_k1"] == pytest.approx(expected)
    causal_keys = ["d_ato", "d_ato_hw", "recovered", "recovered_mean_abl", "recovered_identity"]
    assert list(written["L10_k2"]) == [*causal_keys, "moved", "computed"]  # evaluate output missing
    assert list(written["L04_k2"]) == ["r2", "r2_w", "eta", "ceiling", "transported", "moved", "computed"]
    assert "recovered" not in written["L09_k3"]  # undefined share
    back = HeadlineMetrics.read(path)
    assert back.pairs["L05_k1"].r2 == m["r2"] and math.isnan(back.pairs["L10_k2"].r2)


def test_headline_carries_the_sae_gates(tmp_path, monkeypatch):
    from ato.artifacts import HeadlineMetrics
    from ato.params import load_params
    from ato.stages import report

    monkeypatch.setattr(report, "_log_mlflow", lambda *a, **k: None)
    pairs = {"L00_k1": (0, 1), "L01_k2": (1, 2), "L02_k1": (2, 1)}  # targets 1 and 3
    project = make_project(tmp_path, pairs)
    write_fake_outputs(project, pairs)
    _sae_info(
        3,
        fve_val=0.83,
        dead_fraction=0.07,
        reliable=False,
        gate_failures=["dead fraction 0.07 > 0.05"],
        ce_recovered_zero=0.97,
        ce_recovered_mean=0.91,
    ).write(project / "reports" / "sae" / "layer_03.json")
    report.main(load_params(project / "params.yaml"))
    written = json.loads((project / "reports" / "headline.json").read_text())
    assert list(written) == [*pairs, "sae_L01", "sae_L03"]
    assert written["sae_L01"] == {}  # no quality report for layer 1 yet
    assert written["sae_L03"] == {"fve": 0.83, "dead": 0.07, "ce_rec": 0.91, "reliable": 0.0}  # the gate's reference
    assert HeadlineMetrics.read(project / "reports" / "headline.json").saes[3].ce_rec == 0.91


def test_summary_sets_the_sae_splice_cost_beside_the_operators(tmp_path, monkeypatch):
    """Each SAE's Δ (CE_SAE − CE_clean) stands beside the causal Δ of every operator into its layer,
    with the weaker ingredient named: layer 3's SAE (+0.69) loses more than L02_k1's operator (+0.023),
    layer 1's (+0.001) less than L00_k1's (+0.021)."""
    from ato.params import load_params
    from ato.stages import report

    monkeypatch.setattr(report, "_log_mlflow", lambda *a, **k: None)
    pairs = {"L00_k1": (0, 1), "L01_k2": (1, 2), "L02_k1": (2, 1)}  # targets 1 and 3
    project = make_project(tmp_path, pairs)
    write_fake_outputs(project, pairs)
    for layer, delta, recovered in ((1, 0.001, 0.99), (3, 0.69, 0.871)):
        _sae_info(
            layer,
            fve_val=0.84,
            dead_fraction=0.01,
            reliable=recovered >= 0.9,
            gate_failures=[] if recovered >= 0.9 else [f"ce_recovered_mean {recovered:.3f} < 0.9"],
            ce_recovered_zero=0.965,
            ce_recovered_mean=recovered,
            ce_recovered_mean_se=0.013,
            delta_sae=delta,
            delta_sae_se=0.0005,
        ).write(project / "reports" / "sae" / f"layer_{layer:02d}.json")
    report.main(load_params(project / "params.yaml"))
    summary = (project / "reports" / "summary.md").read_text()
    assert "| 3 | 0.840 | 1.0% | 0.871 ± 0.013 | 0.965 | +0.690 ± 0.001 | mean | **UNRELIABLE**" in summary
    assert "| L02_k1 | 3 | +0.690 ± 0.001 | +0.023 ± 0.005 | SAE |" in summary
    assert "| L00_k1 | 1 | +0.001 ± 0.001 | +0.021 ± 0.004 | operator |" in summary


def test_weaker_ingredient_needs_a_difference_beyond_its_interval():
    from ato.reporting.markdown_sae import weaker_ingredient

    assert weaker_ingredient(0.69, 0.01, 0.55, 0.04) == "SAE"
    assert weaker_ingredient(0.30, 0.01, 0.55, 0.04) == "operator"
    assert weaker_ingredient(0.57, 0.01, 0.55, 0.04) == "neither resolved"  # |0.02| < 1.96·√(0.01² + 0.0204²)
    assert weaker_ingredient(0.69, float("nan"), 0.55, 0.04) == "—"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"L05_k1": {"r2": 0.5, "r2_typo": 1}}', "L05_k1: unknown key 'r2_typo'"),
        ('{"L05_k1": {"r2": "high"}}', "L05_k1.r2: expected a number"),
        ('{"sae_L06": {"fve": 0.9, "r2": 0.5}}', "sae_L06: unknown key 'r2'"),
        ('{"L05_k1": 0.5}', "L05_k1: expected an object of numbers"),
    ],
)
def test_headline_keys_are_checked_on_read(tmp_path, content, message):
    from ato.artifacts import HeadlineMetrics

    path = tmp_path / "headline.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=re.escape(message)) as info:
        HeadlineMetrics.read(path)
    assert str(path) in str(info.value)


def test_every_headline_name_is_a_key_its_record_writes():
    """The headline lists name keys the records write (a renamed field cannot leave a stale name in
    the metrics file's top keys or the pair runs' `headline.` metrics), each name once."""
    from ato.artifacts import PairHeadline, PairMetrics
    from ato.tracking import PAIR_HEADLINE

    written = PairMetrics.missing().flat()
    causal = CausalSummary.from_dict(fake_causal(5, 1)).headline_metrics()
    for names in (PairMetrics.HEADLINE, PAIR_HEADLINE):
        assert len(set(names)) == len(names)
        stale = [n for n in names if n not in written and n.removeprefix("causal_") not in causal]
        assert stale == [], "a headline name no record writes"
    copied = PairHeadline.copied_keys()
    assert set(copied) == {"r2", "r2_w", "eta", "ceiling", "transported"}
    assert [key for key in copied.values() if key not in written] == []


def test_logged_to_the_parent_run(reported):
    import mlflow

    from ato import tracking

    _project, params, _ = reported
    runs = tracking.RunContext.from_params(params)
    tracking.setup(runs)
    run_id = tracking.parent_run_id(runs)
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {
        "report/summary.md",
        "report/summary_heatmaps.png",
        "report/summary_efficiency.png",
        "report/summary_causal.png",
        "report/summary_alpha.png",
        "report/summary.csv",
    } <= logged
    run = client.get_run(run_id)
    assert run.data.tags.get("ato.stage.report") == "done"
    assert run.data.metrics["report_missing_inputs"] == 3
    # every pair's headline numbers beside their references and nulls
    logged_metrics, m, causal = run.data.metrics, fake_metrics(5, 1), fake_causal(5, 1)
    for key in ("r2", "identity_r2", "eta_expected", "eta_expected_std", "eta_ratio", "heldout_subspace_size_null"):
        assert math.isclose(logged_metrics[f"L05_k1/{key}"], m[key]), key
    for key in ("recovered_vs_train_mean_after", "recovered_vs_zero_after_lo", "ato_delta_after_half_width"):
        assert math.isclose(logged_metrics[f"L05_k1/causal_{key}"], causal[key]), key
    assert logged_metrics["L05_k1/alpha_immaterial"] == 1.0 and logged_metrics["L05_k1/causal_n_sequences"] == 32
    assert "L10_k2/r2" not in logged_metrics and "L04_k2/causal_ato_delta_after" not in logged_metrics


def test_nothing_there_yet(tmp_path, monkeypatch):
    """No per-pair output at all: still a summary (everything missing), no crash; MLflow skipped here."""
    from ato.params import load_params
    from ato.stages import report

    monkeypatch.setattr(report, "_log_mlflow", lambda *a, **k: None)
    pairs = {"L00_k1": (0, 1), "L01_k2": (1, 2)}
    params = load_params(make_project(tmp_path, pairs, ranks=[1, 4], causal_scope="all") / "params.yaml")
    text = report.main(params).read_text()
    assert "10 input file(s) are missing" in text
    for name in pairs:
        assert f"| {name} |" in text
    assert (tmp_path / "reports" / "figures" / "summary_heatmaps.png").exists()


def test_unreadable_input_names_the_file(tmp_path, monkeypatch):
    from ato.params import load_params
    from ato.stages import report

    monkeypatch.setattr(report, "_log_mlflow", lambda *a, **k: None)
    pairs = {"L00_k1": (0, 1)}
    project = make_project(tmp_path, pairs)
    write_fake_outputs(project, pairs)
    bad = project / "reports" / "causal" / "L00_k1.json"
    bad.write_text('{"ato_delta_all": 0.1,')  # truncated
    params = load_params(project / "params.yaml")
    with pytest.raises(ArtifactError, match="L00_k1.json: unreadable or truncated JSON"):
        report.main(params)
    bad.write_text(json.dumps(fake_causal(0, 1)))
    eff = project / "reports" / "evaluate" / "L00_k1" / "efficiency.csv"
    eff.write_text("rank,ceiling\n1,0.5\n")
    with pytest.raises(ArtifactError, match=r"efficiency.csv: missing column\(s\)"):
        report.main(params)


def test_rank_value_picks_the_largest_swept_rank_below():
    from ato.reporting import rank_value

    eff = EfficiencyTable(*([np.array([1.0, 2, 4, 8]), np.array([0.1, 0.2, 0.4, 0.8])] + [np.zeros(4)] * 6))
    assert rank_value(eff, "ceiling", 5) == (0.4, 4)
    assert rank_value(eff, "ceiling", 8) == (0.8, 8)
    assert rank_value(eff, "ceiling", 100) == (0.8, 8)
    assert rank_value(None, "ceiling", 3)[1] is None


def test_report_params_are_checked(tmp_path):
    from ato.params import ParamsError, load_params

    with pytest.raises(ParamsError, match="report.ranks"):
        load_params(make_project(tmp_path, {"L00_k1": (0, 1)}, ranks=[0, 4]) / "params.yaml")
    with pytest.raises(ParamsError, match="report.causal_scope"):
        load_params(make_project(tmp_path, {"L00_k1": (0, 1)}, causal_scope="before") / "params.yaml")


def test_records_round_trip_the_files_keys_and_values(tmp_path):
    """What report reads is what evaluate and causal write: same keys, same values, no `format` key
    in the two DVC metrics files (so `dvc metrics diff` sees numbers only)."""
    from ato.artifacts import PairMetrics

    metrics = {**fake_metrics(5, 1), "transported_fraction": float("nan")}
    record = PairMetrics.from_dict(metrics)
    assert record.ato.r2 == metrics["r2"] and record.identity.feature_r2_median == 0.21
    assert record.eta_expected == metrics["eta_expected"] and record.heldout_pr_null == metrics["heldout_pr_null"]
    record.write(tmp_path / "m.json")
    written = json.loads((tmp_path / "m.json").read_text())
    assert written == {k: v for k, v in metrics.items() if k != "transported_fraction"}  # NaN left out
    assert math.isnan(PairMetrics.read(tmp_path / "m.json").transported_fraction)
    with pytest.raises(ArtifactError, match="unknown key 'r2_typo'"):
        PairMetrics.from_dict({**metrics, "r2_typo": 1.0})

    causal = fake_causal(5, 1, recovered_null=True)
    summary = CausalSummary.from_dict(causal)
    assert summary.headline_set == "all"
    assert summary.headline.ato.delta("after") == tuple(causal[f"ato_delta_after{s}"] for s in ("", "_lo", "_hi"))
    summary.write(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == causal
    with pytest.raises(ArtifactError, match="missing key 'ato_delta_after'"):
        CausalSummary.from_dict({k: v for k, v in causal.items() if k != "ato_delta_after"})


def test_condition_names_agree():
    from ato import plotting
    from ato.artifacts.causal import TYPED_CONDITIONS, condition_labels

    patched = patched_conditions()
    assert set(condition_labels()) == set(plotting.condition_colours()) == {"clean", *patched}
    assert set(patched) == TYPED_CONDITIONS  # every built-in condition has its own summary field


def test_outputs_of_pairs_and_layers_no_longer_in_params_are_listed_as_stale(tmp_path, monkeypatch):
    """A run of another model (or with pairs removed) leaves its files beside the new ones: the summary
    names each of them under its pair or target layer, and lists none of the current pairs'."""
    from ato.params import load_params
    from ato.stages import report

    monkeypatch.setattr(report, "_log_mlflow", lambda *a, **k: None)
    project = make_project(tmp_path, {"L00_k1": (0, 1)})
    write_fake_outputs(project, {"L00_k1": (0, 1), "L02_k1": (2, 1)})
    earlier = [
        "models/operators/L02_k1",
        "reports/figures/L02_k1_causal.png",
        "data/stats/train/L02_k1.safetensors",
        "reports/sae/layer_03.json",
        "models/sae/layer_03",
        "reports/causal/reference/layer_03.json",
    ]
    current = ["models/operators/L00_k1", "reports/figures/L00_k1_causal.png", "data/stats/train/L00_k1.safetensors"]
    for rel in earlier + current:
        path = project / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "." not in path.name else path.write_text("{}")
    text = report.main(load_params(project / "params.yaml")).read_text()
    section = text.split("## Stale outputs", 1)[1].split("\n## ", 1)[0]
    stale_pair = ["reports/metrics/L02_k1.json", "reports/causal/L02_k1.json", "reports/tuning/L02_k1.json"]
    stale_pair += ["reports/context/L02_k1.json"]
    stale_pair += ["reports/evaluate/L02_k1", *earlier[:3]]
    line = {ln.split("**")[1]: ln for ln in section.splitlines() if ln.startswith("- **")}
    assert set(line) == {"L02_k1", "layer 3"}
    assert sorted(line["L02_k1"].split(": ", 1)[1].replace("`", "").split(", ")) == sorted(stale_pair)
    assert sorted(line["layer 3"].split(": ", 1)[1].replace("`", "").split(", ")) == sorted(earlier[3:])
    assert f"{len(stale_pair) + 3} file(s) or folder(s)" in section and not any(rel in text for rel in current)


def test_no_stale_section_when_every_output_belongs_to_a_pair(reported):
    _project, _params, summary_path = reported
    assert "## Stale outputs" not in summary_path.read_text()


def _sae_info(layer: int, **quality):
    """A trained TopK SAE's quality record for `layer` (1024 latents on d 640, mean-ablation gates)."""
    from ato.artifacts import SaeInfo

    gates = {"min_fve": 0.8, "max_dead": 0.05, "min_ce_recovered": 0.9, "ce_reference": "mean"}
    common = {"architecture": "topk", "d_in": 640, "d_sae": 1024, "store_digest": "x", "mean_l0": 64.0}
    where = {"n_val_tokens": 1000, "hook": f"blocks.{layer}.hook_resid_post", "source": "train", "gates": gates}
    return SaeInfo(layer=layer, **common, **where, **quality)
