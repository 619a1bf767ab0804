"""Stage `validate`: check the activation store before anything is fitted on it (`ato.validation`).

The report (`<paths.reports>/validation/`: validation.json, validation.md, stats.csv, parts.csv,
splits.csv, metrics.json) is always written; on any failure `ValidationError` is raised afterwards,
so `ato validate` exits 1 and `dvc repro` stops. The verdict binds to the bytes checked: stats and
sae re-check them (`ato.store.require_validated`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ato.artifacts import Layout
from ato.params import Params, section_dict
from ato.validation import ValidationError, ValidationReport, failure_message, validate_store, write_report
from ato.validation.tables import error_text

log = logging.getLogger(__name__)


def _log_mlflow(params: Params, report: ValidationReport, directory: Path) -> None:
    """Summary metrics and the report files on the pipeline run; failures here never change the verdict."""
    try:
        import mlflow

        from ato.tracking import RunContext, log_flat_metrics, pipeline_run

        with pipeline_run(RunContext.from_params(params), "validate"):
            log_flat_metrics(report.metrics())
            mlflow.log_params({f"validate.{k}": v for k, v in section_dict(params.validate).items()})
            mlflow.set_tag("ato.validate.success", str(report.success).lower())
            mlflow.log_artifacts(str(directory), artifact_path="validation")
    except Exception as exc:  # tracking is best-effort here
        log.warning("validate: MLflow logging failed (%s); the validation result stands", error_text(exc))


def main(params: Params) -> ValidationReport:
    """Validate `paths.store`, write `<paths.reports>/validation/`, log to MLflow; raise on failure."""
    layout = Layout.from_params(params)
    report = validate_store(layout.store, params.validate, chunk_tokens=params.stats.chunk_tokens)
    write_report(report, layout)
    _log_mlflow(params, report, layout.validation_dir)
    log.info(
        "ato validate: %s: %d expectations, %d failed; report %s",
        "passed" if report.success else "FAILED",
        len(report.results),
        report.n_failed,
        layout.validation_report,
    )
    if not report.success:
        raise ValidationError(failure_message(report, layout.validation_report))
    return report
