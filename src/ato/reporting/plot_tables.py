"""The CSVs of reports/plots/ for `dvc plots`: headline numbers per pair, η(r) and ceiling(r) per k,
and α → validation R² per pair (its templates have no log axis, hence the log10 columns)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import PairMetrics, write_csv_atomic

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
    ("subspace_size", lambda m: m.subspace_size),
    ("participation_ratio", lambda m: m.participation_ratio),
)
CAUSAL_COLUMNS = (
    "causal_ato_delta",
    "causal_ato_delta_lo",
    "causal_ato_delta_hi",
    "causal_zero_delta",
    "causal_recovered",
    "causal_recovered_lo",
    "causal_recovered_hi",
)


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
    header = ["pair", "L", "k", "layer_out", *(name for name, _ in SUMMARY_METRICS), *CAUSAL_COLUMNS]
    rows = []
    for res in results:
        causal = (*res.causal_delta("ato", scope), res.causal_delta("zero", scope)[0], *res.recovered(scope))
        rows.append(
            [
                res.name,
                res.pair.L,
                res.pair.k,
                res.pair.target,
                *[cell(value(res.m)) for _, value in SUMMARY_METRICS],
                *[cell(v) for v in causal],
            ]
        )
    return write_csv_atomic(path, header, rows)


def write_efficiency_csv(path: Path, group: list[PairResults]) -> Path:
    """rank, log10_rank, then η_RRR(test) and ceiling per L of one k."""
    ranks = sorted({int(r) for res in group if res.efficiency is not None for r in res.efficiency.rank})
    columns = ("eta_rrr_test", "ceiling")
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
