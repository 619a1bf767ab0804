"""The CSVs of reports/plots/ for `dvc plots`: headline numbers per pair beside their references and
nulls (plots/summary.csv), η(r) and ceiling(r) per k, and α → validation R² per pair (its templates
have no log axis, hence the log10 columns)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import PairMetrics, write_csv_atomic
from ato.artifacts.causal import PATCHED, REFERENCES

from .results import PairResults

# plots/summary.csv: metric columns, named as in the metrics file
SUMMARY_METRICS: tuple[tuple[str, Callable[[PairMetrics], float]], ...] = (
    ("alpha", lambda m: m.alpha),
    ("val_r2", lambda m: m.val_r2),
    ("r2", lambda m: m.ato.r2),
    ("r2_weighted", lambda m: m.ato.r2_weighted),
    ("identity_r2", lambda m: m.identity.r2),
    ("mean_r2", lambda m: m.mean.r2),
    ("ols_r2", lambda m: m.ols.r2),
    ("feature_r2_median", lambda m: m.ato.feature_r2_median),
    ("identity_feature_r2_median", lambda m: m.identity.feature_r2_median),
    ("n_features", lambda m: m.n_features),
    ("n_transported", lambda m: m.n_transported),
    ("n_synthesised", lambda m: m.n_synthesised),
    ("n_no_verdict", lambda m: m.n_no_verdict),
    ("transported_fraction", lambda m: m.transported_fraction),
    ("ceiling_full", lambda m: m.ceiling_full),
    ("eta_test", lambda m: m.eta_test),
    ("eta_expected", lambda m: m.eta_expected),
    ("eta_expected_std", lambda m: m.eta_expected_std),
    ("eta_ratio", lambda m: m.eta_ratio),
    ("heldout_subspace_size", lambda m: m.heldout_subspace_size),
    ("heldout_subspace_size_null", lambda m: m.heldout_subspace_size_null),
    ("heldout_subspace_size_null_std", lambda m: m.heldout_subspace_size_null_std),
    ("heldout_subspace_size_excess", lambda m: m.heldout_subspace_size_excess),
    ("heldout_pr", lambda m: m.heldout_pr),
    ("heldout_pr_null", lambda m: m.heldout_pr_null),
    ("heldout_pr_null_std", lambda m: m.heldout_pr_null_std),
    ("heldout_pr_excess", lambda m: m.heldout_pr_excess),
    ("participation_ratio", lambda m: m.participation_ratio),
    ("participation_ratio_null", lambda m: m.participation_ratio_null),
    ("subspace_size", lambda m: m.subspace_size),
    ("subspace_size_null", lambda m: m.subspace_size_null),
    ("n_train_tokens", lambda m: m.n_train_tokens),
    ("n_val_tokens", lambda m: m.n_val_tokens),
    ("n_test_tokens", lambda m: m.n_test_tokens),
)
# plots/summary.csv: α diagnostics of the tuning record
TUNING_COLUMNS = ("alpha_flatness", "alpha_gain", "val_r2_noise", "alpha_immaterial")
# plots/summary.csv: causal columns (headline position set, `report.causal_scope`); `causal_recovered` is
# against the run's headline reference (`causal.headline_reference`), then against every reference
CAUSAL_DELTA_COLUMNS = tuple(f"causal_{c}_delta{s}" for c in PATCHED for s in ("", "_lo", "_hi", "_half_width"))
CAUSAL_SHARE_COLUMNS = tuple(
    f"causal_{prefix}{s}"
    for prefix in ("recovered", *(f"recovered_vs_{r}" for r in REFERENCES))
    for s in ("", "_lo", "_hi", "_half_width")
)
CAUSAL_COLUMNS = (*CAUSAL_DELTA_COLUMNS, *CAUSAL_SHARE_COLUMNS)


def cell(v: Any) -> str:
    """Full-precision number, or empty where missing or non-finite."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return repr(float(v))


def write_plot_csvs(out_dir: Path, results: list[PairResults], scope: str) -> list[Path]:
    paths = [write_summary_csv(out_dir / "summary.csv", results, scope)]
    for k in sorted({res.pair.k for res in results}):
        group = sorted((res for res in results if res.pair.k == k), key=lambda r: r.pair.L)
        paths.append(write_efficiency_csv(out_dir / f"efficiency_k{k}.csv", group))
    paths.append(write_alpha_csv(out_dir / "alpha.csv", results))
    return paths


def write_summary_csv(path: Path, results: list[PairResults], scope: str) -> Path:
    header = [
        "pair",
        "L",
        "k",
        "layer_out",
        *(name for name, _ in SUMMARY_METRICS),
        *TUNING_COLUMNS,
        *CAUSAL_COLUMNS,
    ]
    rows = []
    for res in results:
        tuning = [getattr(res.tuning, c) if res.tuning else None for c in TUNING_COLUMNS]
        rows.append(
            [
                res.name,
                res.pair.L,
                res.pair.k,
                res.pair.target,
                *[cell(value(res.m)) for _, value in SUMMARY_METRICS],
                *[cell(float(v) if isinstance(v, bool) else v) for v in tuning],
                *[cell(v) for v in _causal_cells(res, scope)],
            ]
        )
    return write_csv_atomic(path, header, rows)


def _causal_cells(res: PairResults, scope: str) -> list[float]:
    """The values of CAUSAL_COLUMNS, in order; NaN without causal output."""
    out: list[float] = []
    for c in PATCHED:
        out += [*res.causal_delta(c, scope), res.causal_half_width(c, scope)]
    for reference in (None, *REFERENCES):
        share = res.recovered_share(reference)
        out += [*res.recovered(scope, reference), share.half_width(scope) if share is not None else math.nan]
    return out


def write_efficiency_csv(path: Path, group: list[PairResults]) -> Path:
    """rank, log10_rank, then η_RRR(test), η_RRR(test) with the mean shift removed and ceiling per L of one k."""
    ranks = sorted({int(r) for res in group if res.efficiency is not None for r in res.efficiency.rank})
    columns = ("eta_rrr_test", "eta_rrr_test_shift_removed", "ceiling")
    header = ["rank", "log10_rank", *(f"{c}_L{res.pair.L:02d}" for res in group for c in columns)]
    table = []
    for r in ranks:
        row: list[Any] = [r, repr(math.log10(r))]
        for res in group:
            for c in columns:
                value = math.nan
                if res.efficiency is not None:
                    hit = np.flatnonzero(res.efficiency.rank.astype(int) == r)
                    value = res.efficiency.column(c)[hit[0]] if hit.size else math.nan
                row.append(cell(value))
        table.append(row)
    return write_csv_atomic(path, header, table)


def write_alpha_csv(path: Path, results: list[PairResults]) -> Path:
    """alpha, log10_alpha, then each pair's validation R² on its tuning curve."""
    curves = {res.name: {float(p.alpha): p.val_r2 for p in res.tuning.curve} if res.tuning else {} for res in results}
    alphas = sorted({a for curve in curves.values() for a in curve})
    rows = [
        [repr(a), repr(math.log10(a)), *[cell(curves[res.name].get(a)) for res in results]] for a in alphas if a > 0
    ]
    return write_csv_atomic(path, ["alpha", "log10_alpha", *(res.name for res in results)], rows)
