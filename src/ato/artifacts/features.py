"""Feature selection (`ato select` → evaluate): per target layer, every SAE feature's scores, the
ranking and the kept features (`features/layer_NN.json`), the kept features' top activating contexts
(`features/layer_NN_contexts.json`) and a summary with the exact ablations of the candidates
(`reports/select/layer_NN.json`). See docs/contracts.md#features and README "Feature selection"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._io import Record


@dataclass
class FeatureScores:
    """One value per SAE feature (index = feature id); null where undefined (never active,
    ineligible, not measured)."""

    activation_rate: list[float | None]  # fraction of scored tokens where the feature is active
    token_entropy: list[float | None]  # entropy (nats) of the token ids where it is active (lower: coherent)
    vocab_focus: list[float | None]  # excess kurtosis of W_U · (N(d_f) − N(0)) (shortlisted features only)
    redundancy: list[float | None]  # max |cos| of its decoder row with another live feature's row
    causal_effect: list[float | None]  # exact KL(clean ‖ ablated) per ablated activation (exact_budget candidates)
    composite: list[float | None]  # final score (candidates) or pre-score (other eligible); README "Feature selection"
    rate_band: list[float | None] = field(default_factory=list)  # 0 inside select.rate_band, −decades outside
    token_entropy_ratio: list[float | None] = field(default_factory=list)  # token_entropy / that of random tokens


@dataclass
class FeatureSet(Record):
    """The scored, ranked and kept features of one layer's SAE."""

    FORMAT: ClassVar[str] = "ato-features/2"
    PRODUCER: ClassVar[str] = "select"

    layer: int  # residual layer n of the SAE
    ranked: list[int]  # every feature id: exact-ablation candidates by composite, other eligible, the rest
    kept: list[int]  # the first round(select.keep_fraction · d_sae) eligible features of `ranked`
    scores: FeatureScores  # per-feature scores
    sae_store_digest: str | None = None  # store digest recorded in the SAE's ato_sae.json


@dataclass
class TokenContext:
    """One top activating position of a feature, with ±window tokens of its sequence."""

    activation: float  # the feature's activation at the marked token
    doc_id: int  # document the sequence came from
    position: int  # position of the marked token in its sequence
    tokens: list[str]  # decoded tokens of the window
    max_index: int  # index of the marked token in `tokens`
    text: str  # the window joined, the marked token «like this»


@dataclass
class FeatureContext:
    """What one kept feature responds to and promotes."""

    feature: int  # feature id
    contexts: list[TokenContext]  # strongest activations first
    top_logit_tokens: list[str] = field(default_factory=list)  # top-10 tokens its direction promotes
    neuronpedia_explanations: list[str] | None = None  # only with select.neuronpedia: true


@dataclass
class FeatureContexts(Record):
    """The kept features' contexts of one layer, in the order of `FeatureSet.kept`."""

    FORMAT: ClassVar[str] = "ato-feature-contexts/1"
    PRODUCER: ClassVar[str] = "select"

    layer: int  # residual layer n
    features: list[FeatureContext]  # one entry per kept feature

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for entry in out["features"]:  # written only when fetched
            if entry.get("neuronpedia_explanations") is None:
                entry.pop("neuronpedia_explanations", None)
        return out


@dataclass
class ExactAblation:
    """The candidates ablated exactly (select.exact_budget at most), best pre-score first."""

    features: list[int]  # feature ids
    n_active: list[int]  # activations ablated in the causal pool (0: never fires there, no measurement)
    n_predictions: list[int]  # next-token predictions scored (≤ causal_horizon per sequence)
    n_sequences: list[int]  # pool sequences it was ablated in (≤ select.exact_sequences)
    kl: list[float | None]  # Σ KL(clean ‖ ablated) over the scored predictions (nats); / n_active = causal_effect
    delta_loss: list[float | None]  # Δ summed next-token loss over the same predictions (nats)


@dataclass
class SelectSeconds:
    """Wall time of the parts of one layer's scoring."""

    scan: float  # encoding the TRAIN tokens (rates, entropy, contexts)
    vocab_focus: float  # logit-lens kurtosis of the shortlisted decoder directions (+ decoder redundancy)
    causal: float  # exact ablations of the candidates (clean passes included)
    total: float  # the whole layer


@dataclass
class SelectReport(Record):
    """Summary of one layer's selection (reports/select/layer_NN.json)."""

    FORMAT: ClassVar[str] = "ato-select-report/2"
    PRODUCER: ClassVar[str] = "select"

    layer: int  # residual layer n
    n_tokens_scored: int  # TRAIN tokens encoded (special excluded, ≤ select.max_tokens)
    d_sae: int  # features of the SAE
    n_eligible: int  # features with activation rate ≥ select.min_activation_rate
    n_kept: int  # len(FeatureSet.kept)
    n_dead: int  # features never active on the scored tokens
    target_rate: float  # the sparse regime r₀ = mean L0 / d_sae on the scored tokens (k/width for TopK)
    rate_band: list[float]  # [lo, hi] activation rates scoring 0 on rate_band (select.rate_band × r₀)
    n_in_band: int  # eligible features with a rate inside the band
    clean_val_loss: float | None  # mean next-token loss of the unpatched model on the causal sequences
    n_causal_sequences: int  # VAL sequences in the pool of the exact ablations
    n_causal_loss_tokens: int  # clean predictions scored (the mean of clean_val_loss is over them)
    causal_method: str  # how causal_effect is computed
    exact: ExactAblation  # the candidates' exact ablations
    n_kept_without_exact: int  # kept features outside the candidates (no causal measurement)
    sae_reliable: bool  # SaeInfo.reliable: the SAE passed its quality gates
    sae_gate_failures: list[str]  # SaeInfo.gate_failures
    seconds: SelectSeconds  # timings
    kept_median_activation_rate: float | None  # medians/means over the kept features (null if none is finite)
    kept_in_band_fraction: float | None  # share of kept features with a rate inside the band
    kept_mean_token_entropy: float | None
    kept_mean_token_entropy_ratio: float | None
    kept_mean_vocab_focus: float | None
    kept_mean_redundancy: float | None
    kept_mean_causal_effect: float | None

    def metrics(self) -> dict[str, float]:
        """The numbers worth tracking (MLflow), where set."""
        keys = (
            "n_eligible",
            "n_kept",
            "n_dead",
            "target_rate",
            "n_in_band",
            "clean_val_loss",
            "n_kept_without_exact",
            "kept_median_activation_rate",
            "kept_in_band_fraction",
            "kept_mean_token_entropy",
            "kept_mean_token_entropy_ratio",
            "kept_mean_vocab_focus",
            "kept_mean_redundancy",
            "kept_mean_causal_effect",
        )
        out = {key: getattr(self, key) for key in keys if isinstance(getattr(self, key), (int, float))}
        out["sae_reliable"] = float(self.sae_reliable)
        out["seconds"] = self.seconds.total
        return out
