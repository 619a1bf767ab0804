"""Where every artifact lives: the one place file names are written (dvc.yaml templates the same
names from `params.yaml`'s `paths`, and tests/test_dvc_truth.py checks the two agree)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..params import Params


def layer_dir_name(layer: int) -> str:
    return f"layer_{layer:02d}"


def model_info_path(model_dir: str | Path) -> Path:
    """`ModelInfo` of a prepared model directory (`ato prepare`), wherever the directory is."""
    return Path(model_dir) / "ato_model.json"


@dataclass(frozen=True)
class Layout:
    """Absolute paths of every stage's inputs and outputs, from `params.paths`."""

    model_dir: Path  # prepare → float32 model copy + ato_model.json
    store: Path  # collect → activation store (zarr parts + manifest.json)
    stats: Path  # stats → <split>/<pair>.safetensors
    sae_dir: Path  # sae → layer_NN/ (sae-lens weights + cfg + ato_sae.json)
    features: Path  # select → layer_NN.json, layer_NN_contexts.json
    operators: Path  # fit → <pair>/ (operator.safetensors + config.json)
    atlas: Path  # atlas → maps.safetensors
    context_operators: Path  # context → <pair>/ (context.safetensors + config.json)
    reports: Path  # every human-facing output

    @classmethod
    def from_params(cls, params: Params) -> Layout:
        return cls(**{name: params.path(name) for name in cls.__dataclass_fields__})

    # prepare
    @property
    def model_info(self) -> Path:
        return model_info_path(self.model_dir)

    # collect
    @property
    def manifest(self) -> Path:
        return self.store / "manifest.json"

    # validate
    @property
    def validation_dir(self) -> Path:
        return self.reports / "validation"

    @property
    def validation(self) -> Path:
        return self.validation_dir / "validation.json"

    @property
    def validation_report(self) -> Path:
        return self.validation_dir / "validation.md"

    @property
    def validation_metrics(self) -> Path:
        return self.validation_dir / "metrics.json"

    def validation_table(self, table: str) -> Path:
        """stats.csv (the layers table), parts.csv, splits.csv."""
        return self.validation_dir / f"{table}.csv"

    # stats
    def pair_stats(self, split: str, pair: str) -> Path:
        return self.stats / split / f"{pair}.safetensors"

    # tune
    def tuning(self, pair: str) -> Path:
        return self.reports / "tuning" / f"{pair}.json"

    def tuning_curve(self, pair: str) -> Path:
        return self.reports / "tuning" / f"{pair}_curve.csv"

    def tuning_figure(self, pair: str) -> Path:
        return self.reports / "tuning" / f"{pair}_alpha.png"

    # fit
    def operator(self, pair: str) -> Path:
        return self.operators / pair

    # sae
    def sae(self, layer: int) -> Path:
        return self.sae_dir / layer_dir_name(layer)

    def sae_info(self, layer: int) -> Path:
        return self.sae(layer) / "ato_sae.json"

    def sae_report(self, layer: int) -> Path:
        return self.reports / "sae" / f"{layer_dir_name(layer)}.json"

    # select
    def feature_set(self, layer: int) -> Path:
        return self.features / f"{layer_dir_name(layer)}.json"

    def feature_contexts(self, layer: int) -> Path:
        return self.features / f"{layer_dir_name(layer)}_contexts.json"

    def select_report(self, layer: int) -> Path:
        return self.reports / "select" / f"{layer_dir_name(layer)}.json"

    # evaluate
    def metrics(self, pair: str) -> Path:
        return self.reports / "metrics" / f"{pair}.json"

    def evaluate_dir(self, pair: str) -> Path:
        return self.reports / "evaluate" / pair

    def transport(self, pair: str) -> Path:
        return self.evaluate_dir(pair) / "transport.json"

    def efficiency(self, pair: str) -> Path:
        return self.evaluate_dir(pair) / "efficiency.csv"

    def feature_table(self, pair: str) -> Path:
        return self.evaluate_dir(pair) / "features.csv"

    # context
    def context(self, pair: str) -> Path:
        return self.reports / "context" / f"{pair}.json"

    def context_operator(self, pair: str) -> Path:
        """The pair's context maps (`ato.artifacts.context_operator`)."""
        return self.context_operators / pair

    # causal_reference
    @property
    def causal_reference_dir(self) -> Path:
        return self.reports / "causal" / "reference"

    def causal_reference(self, layer: int) -> Path:
        """The clean/zero/train_mean record of target layer `layer`, shared by its pairs."""
        return self.causal_reference_dir / f"{layer_dir_name(layer)}.json"

    # causal
    def causal(self, pair: str) -> Path:
        return self.reports / "causal" / f"{pair}.json"

    def causal_sequences(self, pair: str) -> Path:
        return self.reports / "causal" / f"{pair}_sequences.json"

    # languages
    @property
    def languages_dir(self) -> Path:
        return self.reports / "languages"

    @property
    def languages(self) -> Path:
        """`LanguageReport`: the operators across languages, every number beside its reference."""
        return self.languages_dir / "transfer.json"

    @property
    def languages_metrics(self) -> Path:
        return self.languages_dir / "metrics.json"

    @property
    def languages_scores(self) -> Path:
        return self.languages_dir / "scores.csv"

    def languages_figure(self, kind: str) -> Path:
        return self.figures / f"languages_{kind}.png"

    # atlas
    @property
    def atlas_dir(self) -> Path:
        return self.reports / "atlas"

    @property
    def atlas_result(self) -> Path:
        """`AtlasResult`: every atlas pair's scores, references, Jacobian comparison and budget."""
        return self.atlas_dir / "atlas.json"

    @property
    def atlas_metrics(self) -> Path:
        """The atlas summarised per k (numbers only)."""
        return self.atlas_dir / "metrics.json"

    @property
    def atlas_table(self) -> Path:
        """One CSV row per atlas pair."""
        return self.atlas_dir / "pairs.csv"

    @property
    def atlas_report(self) -> Path:
        """atlas.md: the tables the README's "What the atlas shows" points to."""
        return self.atlas_dir / "atlas.md"

    @property
    def atlas_figures(self) -> Path:
        return self.atlas_dir / "figures"

    def atlas_figure(self, kind: str) -> Path:
        return self.atlas_figures / f"{kind}.png"

    @property
    def atlas_maps(self) -> Path:
        """The ridge map (W, b) of every atlas pair, float32 safetensors (`ato.artifacts.atlas`)."""
        return self.atlas / "maps.safetensors"

    # figures (evaluate, causal, report)
    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    def pair_figure(self, pair: str, kind: str) -> Path:
        return self.figures / f"{pair}_{kind}.png"

    def summary_figure(self, kind: str) -> Path:
        return self.figures / f"summary_{kind}.png"

    # report
    @property
    def summary(self) -> Path:
        return self.reports / "summary.md"

    @property
    def feature_cards(self) -> Path:
        """Self-contained HTML page: one card per kept feature of every target layer."""
        return self.reports / "features.html"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def headline(self) -> Path:
        """`HeadlineMetrics`: the pipeline's one DVC metrics file."""
        return self.reports / "headline.json"
