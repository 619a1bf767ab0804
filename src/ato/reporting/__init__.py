"""The summary of `ato report`: per-pair results read through their records (`results`), the
markdown of summary.md (`markdown`, its sections in `markdown_transport` and `markdown_causal`, its
cells in `cells`), the CSVs for `dvc plots` (`plot_tables`) and the one DVC metrics file
(`headline`); its figures are in `ato.plotting.summary` and `ato.plotting.summary_causal`."""

from .headline import build_headline
from .markdown import render_summary
from .plot_tables import write_plot_csvs
from .results import MissingInput, PairResults, headline_metrics, load_pair, rank_value
from .settings import SummarySettings

__all__ = [
    "build_headline",
    "MissingInput",
    "PairResults",
    "SummarySettings",
    "headline_metrics",
    "load_pair",
    "rank_value",
    "render_summary",
    "write_plot_csvs",
]
