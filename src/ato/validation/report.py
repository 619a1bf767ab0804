"""The validation report: the verdict record, flat metrics, the CSV tables and validation.md.

`<paths.reports>/validation/`: validation.json (`ato.artifacts.ValidationVerdict`), validation.md,
stats.csv (layers table), parts.csv, splits.csv and metrics.json (numbers, MLflow)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ato.artifacts import (
    Layout,
    StoreManifest,
    ValidationFailure,
    ValidationVerdict,
    atomic_group,
    atomic_path,
    write_json_atomic,
    write_text_atomic,
)

from .suite import CheckResult, format_value
from .tables import LAYER_COLUMNS, PART_COLUMNS, SPLIT_COLUMNS, StoreTables

MAX_MESSAGE_LINES = 12  # failure lines in the exception message (all are in the report)
MAX_MARKDOWN_FAILURES = 100
CSV_TABLES = {"stats": ("layers", LAYER_COLUMNS), "parts": ("parts", PART_COLUMNS), "splits": ("splits", SPLIT_COLUMNS)}


@dataclass
class ValidationReport:
    """Outcome of validating one store; `failures` are ready-made messages naming where and what."""

    store: str
    success: bool
    results: list[CheckResult]
    failures: list[ValidationFailure]
    tables: StoreTables | None
    manifest: StoreManifest | None = None
    manifest_sha256: str | None = None  # bytes of manifest.json as validated
    part_sha256: dict[str, str] = field(default_factory=dict)  # "split/part" → ato.store.directory_digest
    part_stat: dict[str, str] = field(default_factory=dict)  # "split/part" → ato.store.stat_signature

    @property
    def n_failed(self) -> int:
        return sum(not r.success for r in self.results) + sum(1 for f in self.failures if f.table == "store")

    def metrics(self) -> dict[str, float]:
        """Flat numbers for metrics.json and MLflow."""
        out: dict[str, float] = {
            "validate_success": float(self.success),
            "validate_n_expectations": float(len(self.results)),
            "validate_n_failed": float(self.n_failed),
            "validate_n_failed_rows": float(len(self.failures)),
        }
        if self.tables is not None:
            out.update(_table_metrics(self.tables))
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def verdict(self) -> ValidationVerdict:
        return ValidationVerdict(
            success=self.success,
            store=self.store,
            store_digest=self.manifest.content_digest if self.manifest is not None else None,
            n_expectations=len(self.results),
            n_failed=self.n_failed,
            results=[r.outcome() for r in self.results],
            failures=self.failures,
            manifest_sha256=self.manifest_sha256,
            part_sha256=self.part_sha256,
            part_stat=self.part_stat,
        )


def _table_metrics(tables: StoreTables) -> dict[str, float]:
    splits, layers = tables.splits, tables.layers
    out: dict[str, float] = {}
    for _, r in splits.iterrows():
        out[f"validate_tokens_{r['split']}"] = float(r["observed_tokens"])
    out["validate_n_parts"] = float(len(tables.parts))
    out["validate_n_unreadable_parts"] = float((~tables.parts["readable"].astype(bool)).sum())
    if len(layers):
        readable = layers[layers["readable"].astype(bool)]
        for layer, g in readable.groupby("layer"):
            w = g["token_count"].astype(float)
            if w.sum() > 0:
                out[f"validate_mean_norm_layer_{int(layer):02d}"] = float(
                    (g["mean_norm"].astype(float) * w).sum() / w.sum()
                )
        out["validate_max_abs"] = float(readable["max_abs"].astype(float).max()) if len(readable) else math.nan
    return out


def write_report(report: ValidationReport, layout: Layout) -> None:
    """validation.json, validation.md, stats.csv (+ parts.csv, splits.csv) and metrics.json."""
    import pandas as pd

    with atomic_group():  # every table, the verdict, the metrics and the report, or none
        for name, (attr, columns) in CSV_TABLES.items():
            if report.tables is not None:
                df = getattr(report.tables, attr).drop(columns=["row"])
            else:
                df = pd.DataFrame(columns=[c for c in columns if c != "row"])
            with atomic_path(layout.validation_table(name)) as tmp:
                df.to_csv(tmp, index=False)
        report.verdict().write(layout.validation)
        write_json_atomic(layout.validation_metrics, report.metrics())
        write_text_atomic(layout.validation_report, markdown(report))


def markdown(report: ValidationReport) -> str:
    """validation.md: status, failures, every expectation, per-split and per-layer summaries."""
    status = "PASSED" if report.success else "FAILED"
    m = report.manifest
    lines = [
        f"# Activation store validation: {status}",
        "",
        f"- store: `{report.store}`",
        f"- model: {m.model.name if m is not None else '?'}",
        f"- content digest: `{m.content_digest if m is not None else '?'}`",
        f"- expectations: {len(report.results)}, failed: {report.n_failed}, failing rows: {len(report.failures)}",
        "",
    ]
    if report.failures:
        lines += ["## Failures", ""]
        lines += [f"- {f.message}" for f in report.failures[:MAX_MARKDOWN_FAILURES]]
        if len(report.failures) > MAX_MARKDOWN_FAILURES:
            lines.append(f"- … and {len(report.failures) - MAX_MARKDOWN_FAILURES} more (validation.json)")
        lines.append("")
    if report.results:
        lines += [
            "## Expectations",
            "",
            "| table | expectation | check | result | unexpected / rows |",
            "|---|---|---|---|---|",
        ]
        for r in report.results:
            lines.append(
                f"| {r.check.table} | `{r.check.type_name}` | {r.check.describe} | "
                f"{'pass' if r.success else '**FAIL**'} | {r.unexpected_count} / {r.element_count} |"
            )
        lines.append("")
    if report.tables is not None:
        lines += _split_lines(report.tables) + _layer_lines(report.tables)
    return "\n".join(lines) + "\n"


def _split_lines(tables: StoreTables) -> list[str]:
    lines = [
        "## Splits",
        "",
        "| split | parts | tokens (manifest) | tokens (parts) | sequences | documents |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in tables.splits.iterrows():
        lines.append(
            f"| {r['split']} | {r['n_parts']} | {format_value(r['manifest_tokens'])} | "
            f"{r['observed_tokens']} | {r['observed_sequences']} | {r['observed_documents']} |"
        )
    return [*lines, ""]


def _layer_lines(tables: StoreTables) -> list[str]:
    layers = tables.layers
    readable = layers[layers["readable"].astype(bool)] if len(layers) else layers
    if not len(readable):
        return []
    lines = [
        "## Layers (all splits and parts)",
        "",
        "| layer | tokens | NaN | Inf | mean ‖x‖ | max ‖x‖ | max abs | mean | std | zero rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer, g in readable.groupby("layer"):
        w = g["token_count"].astype(float)

        def weighted(column: str, g: Any = g, w: Any = w) -> float:
            return float((g[column].astype(float) * w).sum() / max(w.sum(), 1))

        lines.append(
            f"| {int(layer)} | {int(w.sum())} | {int(g['nan_count'].sum())} | {int(g['inf_count'].sum())} | "
            f"{weighted('mean_norm'):.4g} | {g['max_norm'].astype(float).max():.4g} | "
            f"{g['max_abs'].astype(float).max():.4g} | {weighted('mean'):.4g} | {g['std'].astype(float).mean():.4g} | "
            f"{weighted('zero_row_fraction'):.3g} |"
        )
    return [*lines, "", "Per-part statistics: `stats.csv`; token-array checks: `parts.csv`.", ""]


def failure_message(report: ValidationReport, report_path: Path | None = None) -> str:
    """The error text `ato validate` exits with: a head line and the first failures, one per line."""
    lines = [f.message for f in report.failures[:MAX_MESSAGE_LINES]]
    more = len(report.failures) - len(lines)
    head = (
        f"activation store {report.store} failed validation ({report.n_failed} expectation(s), "
        f"{len(report.failures)} failing row(s))"
    )
    if report_path is not None:
        head += f"; report: {report_path}"
    body = "\n  ".join(lines) + (f"\n  … and {more} more" if more > 0 else "")
    return f"{head}:\n  {body}"
