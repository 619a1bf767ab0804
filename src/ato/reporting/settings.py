"""What the summary text says about the run besides the per-pair numbers, built once from params."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ato.artifacts import Layout
from ato.artifacts.model import model_label
from ato.params import EvaluateParams, Params, ReportParams


@dataclass
class SummarySettings:
    """What the summary text says about the run besides the per-pair numbers."""

    report: ReportParams
    evaluate: EvaluateParams
    include_bos: bool  # stats.include_bos
    model: str  # display name of the model
    root: Path  # project root: missing files are shown relative to it
    layout: Layout

    @classmethod
    def from_params(cls, params: Params) -> SummarySettings:
        return cls(
            params.report,
            params.evaluate,
            params.stats.include_bos,
            model_label(params.prepare),
            params.root,
            Layout.from_params(params),
        )
