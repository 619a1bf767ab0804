"""The languages library: transport across languages, the compute behind `ato languages` (docs/method.md#languages).

Every language ℓ gets the same treatment. Its text is split by document with the corpus' seeded rule
(`ato.corpus.split_of`): `fit_tokens` of its TRAIN documents and `test_tokens` of its TEST documents.
The reference language (the one in the activation store, `corpus.language`) is read from the store's
train and test splits; every other language is tokenised from its own corpus and streamed through the
model with the collect hooks (`ato.residuals`). Nothing but float64 sufficient statistics is kept:

* fit statistics per pair, in two halves by document parity (`HalfStats`): the whole for the
  per-language ridge map, the halves for the split-half reference of the subspace overlap;
* test statistics per pair, plus feature-space sums along the target layer's kept SAE features for
  the English operator, the language's own map and the identity (`FeatureScorer`).

Scores, each beside its reference: residual R² of the English operator on ℓ beside ℓ's own map, a
pooled map (all languages) and the identity; the canonical tracking of the operator on ℓ (∈ [0, 1])
beside ℓ's own map's, and R²_w split into ℓ's high- and low-variance directions; the transfer matrix
of the per-language maps; the overlap of their update subspaces beside the same language's split-half
overlap and the random-subspace r/d (`ato.math.transfer`); causal Δ log-perplexity of patching ℓ's
text with the English operator, with intervals over sequences, beside ℓ's mean ablation
(`ato.causal.run_conditions`).

Modules: `inputs` (each language's text; the operators and features scored), `streams` (residual rows and
their statistics), `maps` (per-language maps, tracking, overlaps), `causal` (the patched passes and their
intervals), `scores` (the `LanguageReport` pieces).
"""

from ato.languages.causal import causal_conditions, causal_scores, causal_sums, held_out, language_causal
from ato.languages.inputs import (
    Inputs,
    LanguagesError,
    Map,
    Text,
    causal_sequences,
    language_corpus,
    language_texts,
    split_sequences,
)
from ato.languages.maps import Overlaps, PairFits, fit_pair, language_alpha, overlap_tables, transfer_scores
from ato.languages.scores import language_scores, language_source, pair_transfer, sae_notes
from ato.languages.streams import (
    Chunk,
    FeatureScorer,
    HalfStats,
    TestPass,
    feature_predictors,
    feature_summary,
    fit_statistics,
    forward_chunks,
    store_chunks,
    test_pass,
    test_statistics,
)

__all__ = [
    "Chunk",
    "FeatureScorer",
    "HalfStats",
    "Inputs",
    "LanguagesError",
    "Map",
    "Overlaps",
    "PairFits",
    "TestPass",
    "Text",
    "causal_conditions",
    "causal_scores",
    "causal_sequences",
    "causal_sums",
    "feature_predictors",
    "feature_summary",
    "fit_pair",
    "fit_statistics",
    "forward_chunks",
    "held_out",
    "language_alpha",
    "language_causal",
    "language_corpus",
    "language_scores",
    "language_source",
    "language_texts",
    "overlap_tables",
    "pair_transfer",
    "sae_notes",
    "split_sequences",
    "store_chunks",
    "test_pass",
    "test_statistics",
    "transfer_scores",
]
