"""The contract between stages: one typed record per inter-stage file, and where each file lives.

Stages import this package (and libraries), never each other. Every file below is written through one
atomic writer (`atomic_path`), and read through its record: a missing, truncated or foreign file is one
`ArtifactError` naming the file. File names live in `Layout` (layout.py); formats in docs/contracts.md.

| stage | reads (record ← `Layout` path) | writes (record → `Layout` path) |
|---|---|---|
| prepare | the model source | model dir + `ModelInfo` → model_info |
| collect | `ModelInfo`, the corpus | zarr parts + `StoreManifest` → manifest |
| validate | `StoreManifest` + parts | `ValidationVerdict` → validation (+ tables, report, metrics) |
| stats | `StoreManifest`, `ValidationVerdict` (bytes checked) | `PairStatsMeta` + tensors → pair_stats |
| tune | `StoreManifest`, pair_stats(train/val) | `TuningResult` → tuning(pair), tuning_curve, tuning_figure |
| fit | pair_stats(train/val), `TuningResult` | operator dir (`ato.operators`) → operator(pair) |
| sae | `StoreManifest`, `ValidationVerdict` | sae-lens dir + `SaeInfo` → sae(layer), sae_info, sae_report |
| select | `SaeInfo`/SAE, `ModelInfo`, store | `FeatureSet` → feature_set(layer); `FeatureContexts`; `SelectReport` |
| evaluate | operator, pair_stats, SAE, `FeatureSet`, store | `PairMetrics`, `EfficiencyTable`, `TransportVerdicts` |
| causal_reference | `ModelInfo`, pair_stats(train) (ȳ), store | `CausalReference` → causal_reference(layer) |
| causal | operator, `ModelInfo`, `CausalReference`, store | `CausalSummary` → causal(pair); `CausalSequences` |
| languages | operators, store, SAE, `FeatureSet`, `SaeInfo`, other text | `LanguageReport` → languages |
| atlas | `StoreManifest`, `ValidationVerdict`, store, model | `AtlasResult` → atlas_result; atlas_maps; tables |
| context | `StoreManifest`, `ValidationVerdict`, pair_stats(train), model | `ContextBudget`; context maps |
| report | `PairMetrics`, `EfficiencyTable`, `CausalSummary`, `TuningResult`, `SaeInfo` | `HeadlineMetrics`, summary |
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._io import (
    ArtifactError,
    Record,
    atomic_group,
    atomic_path,
    check_safetensors,
    json_clean,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from .layout import Layout, layer_dir_name, model_info_path

# Each record is imported on first use (PEP 562), so a stage imports, and depends on (dvc.yaml),
# only the records it uses — and `import ato.artifacts` stays light (no torch).
_LAZY = {
    "ContextBudget": "context",
    "ContextFeatureVerdicts": "context",
    "LaggedJacobian": "context",
    "ContextKindScore": "context",
    "Estimate": "context",
    "ContextOperatorConfig": "context_operator",
    "read_context_operator": "context_operator",
    "write_context_operator": "context_operator",
    "AtlasBudget": "atlas",
    "AtlasMapsMeta": "atlas",
    "AtlasPair": "atlas",
    "AtlasResult": "atlas",
    "LocalGlobal": "atlas",
    "OperatorScore": "atlas",
    "read_atlas_maps": "atlas",
    "write_atlas_maps": "atlas",
    "CausalReference": "causal",
    "CausalSequences": "causal",
    "CausalSummary": "causal",
    "CleanScores": "causal",
    "PatchedScores": "causal",
    "PositionSetSummary": "causal",
    "RecoveredShare": "causal",
    "ReferenceSet": "causal",
    "SequenceDetail": "causal",
    "HeadlineMetrics": "headline",
    "PairHeadline": "headline",
    "SaeHeadline": "headline",
    "FeatureContext": "features",
    "FeatureContexts": "features",
    "FeatureScores": "features",
    "FeatureSet": "features",
    "SelectReport": "features",
    "TokenContext": "features",
    "IntervalScore": "languages",
    "LanguageReport": "languages",
    "LanguageScores": "languages",
    "LanguageSource": "languages",
    "PairTransfer": "languages",
    "ManifestCorpus": "manifest",
    "ManifestModel": "manifest",
    "ManifestTokenizer": "manifest",
    "SplitInfo": "manifest",
    "StoreManifest": "manifest",
    "BaselineScores": "metrics",
    "EfficiencyTable": "metrics",
    "PairMetrics": "metrics",
    "PredictorScores": "metrics",
    "TransportVerdicts": "metrics",
    "csv_cell": "metrics",
    "write_csv_atomic": "metrics",
    "ModelInfo": "model",
    "SaeInfo": "sae",
    "PairStatsMeta": "stats",
    "publish_stats_dir": "stats",
    "read_pair_stats": "stats",
    "read_pair_stats_meta": "stats",
    "read_train_means": "stats",
    "write_pair_stats": "stats",
    "AlphaPoint": "tuning",
    "TuningResult": "tuning",
    "ExpectationOutcome": "validation",
    "ValidationFailure": "validation",
    "ValidationVerdict": "validation",
}

__all__ = [
    "AlphaPoint",
    "ArtifactError",
    "AtlasBudget",
    "AtlasMapsMeta",
    "AtlasPair",
    "AtlasResult",
    "BaselineScores",
    "CausalReference",
    "CausalSequences",
    "CausalSummary",
    "CleanScores",
    "ContextBudget",
    "ContextFeatureVerdicts",
    "LaggedJacobian",
    "ContextKindScore",
    "ContextOperatorConfig",
    "EfficiencyTable",
    "Estimate",
    "ExpectationOutcome",
    "FeatureContext",
    "FeatureContexts",
    "FeatureScores",
    "FeatureSet",
    "HeadlineMetrics",
    "IntervalScore",
    "LanguageReport",
    "LanguageScores",
    "LanguageSource",
    "Layout",
    "LocalGlobal",
    "ManifestCorpus",
    "ManifestModel",
    "ManifestTokenizer",
    "ModelInfo",
    "OperatorScore",
    "PairHeadline",
    "PairMetrics",
    "PairStatsMeta",
    "PairTransfer",
    "PatchedScores",
    "PositionSetSummary",
    "PredictorScores",
    "Record",
    "RecoveredShare",
    "ReferenceSet",
    "SaeHeadline",
    "SaeInfo",
    "SelectReport",
    "SequenceDetail",
    "SplitInfo",
    "StoreManifest",
    "TokenContext",
    "TransportVerdicts",
    "TuningResult",
    "ValidationFailure",
    "ValidationVerdict",
    "atomic_group",
    "atomic_path",
    "check_safetensors",
    "csv_cell",
    "json_clean",
    "layer_dir_name",
    "model_info_path",
    "publish_stats_dir",
    "read_atlas_maps",
    "read_context_operator",
    "read_json",
    "read_pair_stats",
    "read_pair_stats_meta",
    "read_train_means",
    "write_atlas_maps",
    "write_context_operator",
    "write_csv_atomic",
    "write_json_atomic",
    "write_pair_stats",
    "write_text_atomic",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ato.artifacts' has no attribute {name!r}")


if TYPE_CHECKING:
    from .atlas import (
        AtlasBudget,
        AtlasMapsMeta,
        AtlasPair,
        AtlasResult,
        LocalGlobal,
        OperatorScore,
        read_atlas_maps,
        write_atlas_maps,
    )
    from .causal import (
        CausalReference,
        CausalSequences,
        CausalSummary,
        CleanScores,
        PatchedScores,
        PositionSetSummary,
        RecoveredShare,
        ReferenceSet,
        SequenceDetail,
    )
    from .context import ContextBudget, ContextFeatureVerdicts, ContextKindScore, Estimate, LaggedJacobian
    from .context_operator import ContextOperatorConfig, read_context_operator, write_context_operator
    from .features import FeatureContext, FeatureContexts, FeatureScores, FeatureSet, SelectReport, TokenContext
    from .headline import HeadlineMetrics, PairHeadline, SaeHeadline
    from .languages import IntervalScore, LanguageReport, LanguageScores, LanguageSource, PairTransfer
    from .manifest import ManifestCorpus, ManifestModel, ManifestTokenizer, SplitInfo, StoreManifest
    from .metrics import (
        BaselineScores,
        EfficiencyTable,
        PairMetrics,
        PredictorScores,
        TransportVerdicts,
        csv_cell,
        write_csv_atomic,
    )
    from .model import ModelInfo
    from .sae import SaeInfo
    from .stats import (
        PairStatsMeta,
        publish_stats_dir,
        read_pair_stats,
        read_pair_stats_meta,
        read_train_means,
        write_pair_stats,
    )
    from .tuning import AlphaPoint, TuningResult
    from .validation import ExpectationOutcome, ValidationFailure, ValidationVerdict
