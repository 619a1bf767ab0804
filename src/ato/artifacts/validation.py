"""The validation verdict (`ato validate` → stats, sae): `reports/validation/validation.json`.

It binds the verdict to the bytes that were checked: the sha256 of the manifest file and of every
part directory. `ato.store.require_validated` checks them before a stage computes on the store, so a
store changed after validation is refused even outside DVC (docs/contracts.md#validation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._io import Record


@dataclass
class ExpectationOutcome:
    """One great-expectations expectation run on one statistics table."""

    table: str  # manifest | parts | layers | docs | splits
    expectation: str  # snake_case expectation type, e.g. expect_column_values_to_be_between
    kwargs: dict[str, Any]  # the expectation's arguments (column, bounds, value set …)
    describe: str  # the check in words, e.g. "nan_count ≤ 0"
    success: bool  # passed (and did not raise)
    element_count: int  # rows of the table it ran on
    unexpected_count: int  # failing rows
    exception: str | None  # why it could not run, if it raised


@dataclass
class ValidationFailure:
    """One failing row (or a store that could not be opened), as a message naming where and what."""

    table: str  # the table of the failing row ("store" when the store cannot be opened)
    expectation: str  # expectation type (or "store_opens")
    where: str  # split/part, layer, doc_id or manifest key at fault
    message: str  # one line for humans: where, the check, the offending values
    row: dict[str, Any] | None = None  # the failing row's values (absent for a store or exception failure)


@dataclass
class ValidationVerdict(Record):
    """Pass / fail of the store, the expectations behind it, and digests of the bytes checked."""

    FORMAT = "ato-validation/1"
    PRODUCER = "validate"

    success: bool  # every expectation passed: later stages may compute on the store
    store: str  # the store root that was validated
    store_digest: str | None  # the manifest's content_digest (None when the store could not be opened)
    n_expectations: int  # expectations run
    n_failed: int  # expectations failed (+1 if the store could not be opened)
    results: list[ExpectationOutcome]  # every expectation, in report order
    failures: list[ValidationFailure]  # every failing row (at most 200 per expectation)
    manifest_sha256: str | None = None  # sha256 of manifest.json's bytes as validated
    part_sha256: dict[str, str] = field(default_factory=dict)  # "split/part-NNNNN.zarr" → ato.store.directory_digest
    # "split/part-NNNNN.zarr" → ato.store.stat_signature of its files as hashed (left out for files
    # changed just before validation): equal stat data let a check skip re-hashing that part
    part_stat: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for failure in out["failures"]:  # a failure without a row is written without the key
            if failure.get("row") is None:
                failure.pop("row", None)
        return out
