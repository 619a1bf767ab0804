"""The great-expectations suite over the statistics tables (`ato.validation.tables`): one suite per
table, thresholds from `params.validate`, expected values from the manifest. Each failing row becomes
a `ValidationFailure` whose message names the split/part, layer and expectation."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ato.artifacts import ExpectationOutcome, StoreManifest, ValidationFailure, json_clean
from ato.params import ValidateParams
from ato.store import TOKEN_ARRAYS

from .tables import StoreTables

MAX_ROWS_PER_EXPECTATION = 200  # failing rows kept per expectation in validation.json


@dataclass
class Check:
    """One expectation on one table, plus how to describe a failing row to a human."""

    table: str
    expectation: str  # class name in `great_expectations.expectations`
    kwargs: dict[str, Any]
    describe: str  # e.g. "nan_count ≤ 0"
    show: tuple[str, ...]  # columns whose values explain a failing row

    @property
    def type_name(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.expectation).lower()


@dataclass
class CheckResult:
    check: Check
    success: bool
    element_count: int
    unexpected_count: int
    exception: str | None
    failures: list[ValidationFailure] = field(default_factory=list)

    def outcome(self) -> ExpectationOutcome:
        return ExpectationOutcome(
            table=self.check.table,
            expectation=self.check.type_name,
            kwargs=self.check.kwargs,
            describe=self.check.describe,
            success=self.success,
            element_count=self.element_count,
            unexpected_count=self.unexpected_count,
            exception=self.exception,
        )


def _between(
    table: str, column: str, lo: float | None, hi: float | None, describe: str, show: tuple[str, ...] | None = None
) -> Check:
    kwargs: dict[str, Any] = {"column": column}
    if lo is not None:
        kwargs["min_value"] = lo
    if hi is not None:
        kwargs["max_value"] = hi
    return Check(table, "ExpectColumnValuesToBeBetween", kwargs, describe, show or (column,))


def _in_set(table: str, column: str, values: list[Any], describe: str, show: tuple[str, ...] | None = None) -> Check:
    return Check(
        table, "ExpectColumnValuesToBeInSet", {"column": column, "value_set": values}, describe, show or (column,)
    )


def _equal(table: str, a: str, b: str, describe: str) -> Check:
    return Check(
        table,
        "ExpectColumnPairValuesToBeEqual",
        {"column_A": a, "column_B": b, "ignore_row_if": "either_value_is_missing"},
        describe,
        (a, b),
    )


def build_checks(manifest: StoreManifest, cfg: ValidateParams) -> list[Check]:
    """The suite, with thresholds from `params.validate` and expected values from the manifest."""
    checks = [
        _in_set("manifest", "ok", [True], "required manifest key present and well-typed", ("problem",)),
        _in_set("splits", "present", [True], "split present in the manifest", ("split",)),
        _equal("splits", "manifest_part_tokens_sum", "manifest_tokens", "sum(part_tokens) == tokens"),
        _equal("splits", "n_part_tokens", "n_parts", "len(part_tokens) == len(parts)"),
        _equal("splits", "observed_tokens", "manifest_tokens", "tokens in parts == manifest tokens"),
        _equal("splits", "observed_special_tokens", "manifest_special_tokens", "special tokens == manifest"),
        _equal("splits", "observed_sequences", "manifest_sequences", "sequences (position 0) == manifest"),
        _equal("splits", "observed_documents", "manifest_documents", "distinct doc_ids == manifest documents"),
        _in_set("parts", "present", [True], "part directory present", ("error",)),
        _in_set("parts", "readable", [True], "part readable", ("error",)),
        _between("parts", "missing_layers", 0, 0, "every manifest layer present", ("missing_layer_list",)),
        _equal("parts", "n_tokens", "expected_tokens", "part n_tokens == manifest part_tokens"),
        *(
            _equal("parts", f"{name}_rows", "expected_tokens", f"{name} rows == manifest part_tokens")
            for name in TOKEN_ARRAYS
        ),
        _between("parts", "token_id_min", 0, None, "token_id ≥ 0"),
        _between("parts", "doc_id_min", 0, None, "doc_id ≥ 0"),
        _between("parts", "position_breaks", 0, 0, "positions count up from 0 within each sequence"),
        _between("parts", "special_unknown", 0, 0, "special tokens have a special token id"),
        _in_set("layers", "readable", [True], "array readable", ("error",)),
        _between("layers", "missing_chunks", 0, 0, "every chunk stored (missing ones read as zeros)"),
        _between("layers", "nan_count", 0, cfg.max_nan, f"nan_count ≤ {cfg.max_nan}"),
        _between("layers", "inf_count", 0, cfg.max_inf, f"inf_count ≤ {cfg.max_inf}"),
        _between(
            "layers",
            "zero_row_fraction",
            0,
            cfg.max_zero_row_fraction,
            f"zero_row_fraction ≤ {cfg.max_zero_row_fraction:g}",
        ),
        _equal("layers", "n_rows", "expected_rows", "rows == manifest part_tokens"),
        _between(
            "layers",
            "mean_norm",
            cfg.min_mean_norm,
            cfg.max_mean_norm,
            f"{cfg.min_mean_norm:g} ≤ mean_norm ≤ {cfg.max_mean_norm:g}",
        ),
        _between("layers", "max_abs", None, cfg.max_abs_value, f"max_abs ≤ {cfg.max_abs_value:g}"),
        _between("docs", "n_splits", 1, 1, "n_splits == 1: a document in one split only", ("n_splits", "splits")),
    ]
    return checks + _manifest_checks(manifest)


def _manifest_checks(manifest: StoreManifest) -> list[Check]:
    """Checks whose expected value the manifest gives (left out where that value is ill-typed: the
    manifest table already fails on it)."""
    d_model, dtype = manifest.d_model, manifest.dtype
    vocab, max_length = manifest.tokenizer.vocab_size, manifest.corpus.max_length
    checks = []
    if isinstance(d_model, int):
        checks.append(_in_set("layers", "n_cols", [d_model], f"n_cols == manifest d_model {d_model}"))
    if isinstance(dtype, str):
        checks.append(_in_set("layers", "dtype", [dtype], f"dtype == manifest dtype {dtype}"))
    if isinstance(vocab, int):
        checks.append(_between("parts", "token_id_max", None, vocab - 1, f"token_id < vocab_size {vocab}"))
    if isinstance(max_length, int):
        checks.append(_between("parts", "position_max", None, max_length - 1, f"position < max_length {max_length}"))
    return checks


def run_checks(tables: StoreTables, checks: list[Check]) -> list[CheckResult]:
    """Run the great-expectations suites (one per table) on the statistics tables."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("ato_store")
    frames = dict(tables.items())
    results: list[CheckResult] = []
    for table, df in tables.items():
        mine = [c for c in checks if c.table == table]
        if not mine:
            continue
        batch = (
            source.add_dataframe_asset(table)
            .add_batch_definition_whole_dataframe("all")
            .get_batch(batch_parameters={"dataframe": df})
        )
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"ato_store_{table}"))
        for check in mine:
            suite.add_expectation(getattr(gx.expectations, check.expectation)(**check.kwargs))
        outcome = batch.validate(
            suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]}
        )
        by_type: dict[tuple[Any, ...], Any] = {}
        for r in outcome.results:
            cfg = r.expectation_config
            if cfg is not None:
                by_type[(cfg.type, _kwargs_key(cfg.kwargs))] = r
        for check in mine:
            found = by_type.get((check.type_name, _kwargs_key(check.kwargs)))
            results.append(_check_result(check, found, frames[table]))
    return results


def _kwargs_key(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("column", "column_A", "column_B")
    return tuple(kwargs.get(k) for k in keys)


def _check_result(check: Check, r: Any, df: Any) -> CheckResult:
    if r is None:
        return CheckResult(check, False, 0, 0, "expectation result missing")
    info = r.exception_info or {}
    raised = info.get("raised_exception") if isinstance(info, dict) else getattr(info, "raised_exception", False)
    exception = None
    if raised:
        exception = (info.get("exception_message") if isinstance(info, dict) else str(info)) or "raised"
    res = r.result or {}
    indices = [item["row"] if isinstance(item, dict) else item for item in res.get("unexpected_index_list") or []]
    result = CheckResult(
        check,
        bool(r.success) and not raised,
        int(res.get("element_count") or len(df)),
        int(res.get("unexpected_count") or len(indices)),
        exception,
    )
    if result.success:
        return result
    if exception:
        result.failures.append(
            ValidationFailure(
                table=check.table,
                expectation=check.type_name,
                where=check.table,
                message=f"{check.table}: {check.type_name}({check.describe}) could not run: {exception}",
            )
        )
        return result
    lookup = df.set_index("row", drop=False)
    for index in indices[:MAX_ROWS_PER_EXPECTATION]:
        row = json_clean(lookup.loc[int(index)].to_dict())
        result.failures.append(_row_failure(check, row))
    return result


def _row_failure(check: Check, row: dict[str, Any]) -> ValidationFailure:
    text = ("error", "problem")  # free-text columns are shown as they are
    detail = ", ".join(str(row.get(c)) if c in text else f"{c} = {format_value(row.get(c))}" for c in check.show)
    if "error" not in check.show and row.get("error"):
        detail = f"{detail}; {row['error']}"
    where = _where(check.table, row)
    return ValidationFailure(
        table=check.table,
        expectation=check.type_name,
        where=where,
        row=row,
        message=f"{where}: {check.type_name}({check.describe}) failed: {detail}",
    )


def _where(table: str, row: dict[str, Any]) -> str:
    if table == "layers":
        return f"{row['split']}/{row['part']} layer {row['layer']}"
    if table == "parts":
        return f"{row['split']}/{row['part']}"
    if table == "splits":
        return f"split {row['split']}"
    if table == "docs":
        return f"doc_id {row['doc_id']}"
    if table == "manifest":
        return f"manifest key {row['key']}"
    return table


def format_value(value: Any) -> str:
    """A number as a human reads it: integers without a decimal point, others to 6 significant digits."""
    if isinstance(value, float):
        return f"{value:.6g}" if not value.is_integer() or abs(value) >= 1e15 else str(int(value))
    return str(value)
