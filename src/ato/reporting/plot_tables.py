"""The CSVs of reports/plots/ for `dvc plots`: headline numbers per pair beside their references and
nulls (plots/summary.csv), η(r) and ceiling(r) per pair (efficiency.csv) and α → validation R² per pair
(alpha.csv). The curves are in long format, one row per pair and point with a `pair` column, which the
project's `pairs` template (.dvc/plots/pairs.json) colours by, so the plots follow `pairs:` with no edit
of dvc.yaml. The templates have no log axis, hence the log10 columns."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ato.artifacts import PairMetrics, write_csv_atomic
from ato.artifacts.causal import patched_conditions, recovered_references

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
    ("n_undetermined", lambda m: m.n_undetermined),
    ("n_no_verdict", lambda m: m.n_no_verdict),
    ("transported_fraction", lambda m: m.transported_fraction),
    ("transported_fraction_low", lambda m: m.transported_fraction_low),
    ("transported_fraction_high", lambda m: m.transported_fraction_high),
    ("live_n_judged", lambda m: m.live_n_judged),
    ("live_n_transported", lambda m: m.live_n_transported),
    ("live_transported_fraction", lambda m: m.live_transported_fraction),
    ("live_transported_fraction_low", lambda m: m.live_transported_fraction_low),
    ("live_transported_fraction_high", lambda m: m.live_transported_fraction_high),
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


def causal_columns() -> tuple[str, ...]:
    """plots/summary.csv's causal columns (headline position set, `report.causal_scope`): Δ per condition,
    then `causal_recovered` against the run's headline reference (`causal.headline_reference`), then
    against every reference."""
    triplet = ("", "_lo", "_hi", "_half_width")
    deltas = [f"causal_{c}_delta{s}" for c in patched_conditions() for s in triplet]
    prefixes = ("recovered", *(f"recovered_vs_{r}" for r in recovered_references()))
    return (*deltas, *(f"causal_{prefix}{s}" for prefix in prefixes for s in triplet))


def cell(v: Any) -> str:
    """Full-precision number, or empty where missing or non-finite."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return repr(float(v))


def write_plot_csvs(out_dir: Path, results: list[PairResults], scope: str) -> list[Path]:
    return [
        write_summary_csv(out_dir / "summary.csv", results, scope),
        write_efficiency_csv(out_dir / "efficiency.csv", results),
        write_alpha_csv(out_dir / "alpha.csv", results),
    ]


def write_summary_csv(path: Path, results: list[PairResults], scope: str) -> Path:
    header = [
        "pair",
        "L",
        "k",
        "layer_out",
        *(name for name, _ in SUMMARY_METRICS),
        *TUNING_COLUMNS,
        *causal_columns(),
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
    """The values of `causal_columns()`, in order; NaN without causal output."""
    out: list[float] = []
    for c in patched_conditions():
        out += [*res.causal_delta(c, scope), res.causal_half_width(c, scope)]
    for reference in (None, *recovered_references()):
        share = res.recovered_share(reference)
        out += [*res.recovered(scope, reference), share.half_width(scope) if share is not None else math.nan]
    return out


def write_efficiency_csv(path: Path, results: list[PairResults]) -> Path:
    """One row per pair and swept rank (long format: `pair` names the curve, so the plots follow `pairs:`):
    η_RRR(test), η_RRR(test) with the mean shift removed and the ceiling at that rank."""
    columns = ("eta_rrr_test", "eta_rrr_test_shift_removed", "ceiling")
    rows = [
        [*_pair_cells(res), int(r), repr(math.log10(r)), *(cell(res.efficiency.column(c)[i]) for c in columns)]
        for res in results
        if res.efficiency is not None
        for i, r in enumerate(res.efficiency.rank)
    ]
    return write_csv_atomic(path, [*PAIR_COLUMNS, "rank", "log10_rank", *columns], rows)


def write_alpha_csv(path: Path, results: list[PairResults]) -> Path:
    """One row per pair and point of its tuning curve (α > 0): α, log10 α and the validation R²."""
    rows = [
        [*_pair_cells(res), repr(float(p.alpha)), repr(math.log10(p.alpha)), cell(p.val_r2)]
        for res in results
        if res.tuning is not None
        for p in sorted(res.tuning.curve, key=lambda p: p.alpha)
        if p.alpha > 0
    ]
    return write_csv_atomic(path, [*PAIR_COLUMNS, "alpha", "log10_alpha", "val_r2"], rows)


# the leading columns of the long-format CSVs: which pair a row belongs to
PAIR_COLUMNS = ("pair", "L", "k")


def _pair_cells(res: PairResults) -> list[Any]:
    return [res.name, res.pair.L, res.pair.k]
