"""The contract between stages: one typed record per inter-stage file, and where each file lives.

Stages import this package (and libraries), never each other. Read `STAGE_IO` to see every stage's
inputs and outputs; read a record's class to see every field of a file. docs/contracts.md has
the same table in prose.

| record | file (see `Layout`) | written by | read by |
|---|---|---|---|
| `ModelInfo` | model_dir/ato_model.json | prepare | collect, select, causal |
| `StoreManifest` | store/manifest.json | collect | every later stage (via `store.ActivationStore`) |
| `ValidationVerdict` | reports/validation/validation.json | validate | stats, sae (bytes re-checked) |
| `PairStatsFile` | stats/<split>/<pair>.safetensors | stats | tune, fit, evaluate, causal |
| `TuningResult` | reports/tuning/<pair>.json | tune | fit, report |
| operator dir | operators/<pair>/ (safetensors + config.json) | fit | evaluate, causal (`ato.operators`) |
| `SaeInfo` | sae_dir/layer_NN/ato_sae.json | sae | select, evaluate |
| `FeatureSet` | features/layer_NN.json | select | evaluate |
| `PairMetrics` | reports/metrics/<pair>.json | evaluate | report |
| `CausalSummary` | reports/causal/<pair>.json | causal | report |
"""

from ._io import (
    ArtifactError,
    Record,
    atomic_path,
    json_clean,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from .causal import (
    CausalSequences,
    CausalSummary,
    CleanScores,
    PatchedScores,
    PositionSetSummary,
    RecoveredShare,
    SequenceDetail,
)
from .features import FeatureContext, FeatureContexts, FeatureScores, FeatureSet, SelectReport, TokenContext
from .layout import Layout, layer_dir_name
from .manifest import ManifestCorpus, ManifestModel, ManifestTokenizer, SplitInfo, StoreManifest
from .metrics import EfficiencyTable, PairMetrics, PredictorScores, TransportVerdicts, csv_cell, write_csv_atomic
from .model import ModelInfo
from .sae import SaeInfo
from .stats import PairStatsMeta, publish_stats_dir, read_pair_stats, read_pair_stats_meta, write_pair_stats
from .tuning import AlphaPoint, TuningResult
from .validation import ExpectationOutcome, ValidationFailure, ValidationVerdict

__all__ = [
    "ExpectationOutcome",
    "ManifestCorpus",
    "ManifestModel",
    "ManifestTokenizer",
    "ModelInfo",
    "SplitInfo",
    "StoreManifest",
    "ValidationFailure",
    "ValidationVerdict",
    "CausalSequences",
    "CausalSummary",
    "CleanScores",
    "EfficiencyTable",
    "PairMetrics",
    "PatchedScores",
    "PositionSetSummary",
    "PredictorScores",
    "RecoveredShare",
    "SequenceDetail",
    "TransportVerdicts",
    "csv_cell",
    "write_csv_atomic",
    "FeatureContext",
    "FeatureContexts",
    "FeatureScores",
    "FeatureSet",
    "SaeInfo",
    "SelectReport",
    "TokenContext",
    "ArtifactError",
    "Layout",
    "AlphaPoint",
    "PairStatsMeta",
    "Record",
    "TuningResult",
    "atomic_path",
    "json_clean",
    "layer_dir_name",
    "publish_stats_dir",
    "read_json",
    "read_pair_stats",
    "read_pair_stats_meta",
    "write_json_atomic",
    "write_pair_stats",
    "write_text_atomic",
]
