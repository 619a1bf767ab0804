"""Validation of the activation store before anything is fitted on it (docs/contracts.md#validation).

Why: every later number (R², ceilings, perplexities) silently inherits bad activations — a NaN
poisons a Gram matrix, an all-zero row (a dropped batch) biases the means, a manifest that disagrees
with the parts makes token counts and digests lie. So the store is streamed once, chunk by chunk,
into small statistics tables (`tables`), a great-expectations suite (`suite`) with thresholds from
`params.validate` decides pass / fail, and `report` writes the verdict, CSVs and markdown. The
verdict records the sha256 of every part it checked, which `ato.store.require_validated` re-checks.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ato.artifacts import ValidationFailure
from ato.errors import AtoError
from ato.params import ValidateParams
from ato.store import ActivationStore, StoreError, bind_parts, manifest_sha256

from .array_stats import ArrayStats
from .report import ValidationReport, failure_message, markdown, write_report
from .suite import Check, CheckResult, build_checks, run_checks
from .tables import StoreTables, collect_tables

log = logging.getLogger(__name__)

__all__ = [
    "ArrayStats",
    "Check",
    "CheckResult",
    "StoreTables",
    "ValidationError",
    "ValidationReport",
    "build_checks",
    "collect_tables",
    "failure_message",
    "markdown",
    "run_checks",
    "validate_store",
    "write_report",
]


class ValidationError(AtoError):
    """The activation store failed validation; the message names split/part, layer and expectation."""


def validate_store(
    root: str | Path, cfg: ValidateParams, chunk_tokens: int = 8192, progress: bool = True
) -> ValidationReport:
    """Validate the store at `root`; never raises for bad data (see `ValidationReport.success`)."""
    try:
        store = ActivationStore.open(root)
    except StoreError as exc:
        failure = ValidationFailure(
            table="store", expectation="store_opens", where=str(root), message=f"{root}: store cannot be opened: {exc}"
        )
        return ValidationReport(str(root), False, [], [failure], None)
    manifest_digest = manifest_sha256(store.root)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ato-bind") as pool:
        binding = pool.submit(bind_parts, store)  # sha256 of every part on the other cores while the scan reads
        tables = collect_tables(store, chunk_tokens, progress=progress)
        parts, signatures = binding.result()
    log.info("validate: verdict bound to the sha256 of %d parts (%d with stat signatures)", len(parts), len(signatures))
    results = run_checks(tables, build_checks(store.manifest, cfg))
    failures = [f for r in results for f in r.failures]
    success = all(r.success for r in results)
    return ValidationReport(
        str(root), success, results, failures, tables, store.manifest, manifest_digest, parts, signatures
    )
