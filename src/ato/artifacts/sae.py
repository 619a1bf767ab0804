"""SAE info (`ato sae` → select, evaluate, report): what each layer's SAE is, where it came from,
how good it is on VAL (FVE, L0, dead/dense latents, CE-loss recovered and KL with the reconstruction
spliced in) and whether it passed its quality gates (`reliable`, `gate_failures`). The same content
is written twice: `sae_dir/layer_NN/ato_sae.json` beside the sae-lens files, and
`reports/sae/layer_NN.json` (its gates reach reports/headline.json). See docs/contracts.md#sae."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._io import Record

# Keys that only one source writes (the other source's are left out of the JSON, not written as null).
TRAIN_ONLY = (
    "train_seconds",
    "train_tokens",
    "train_tokens_per_s",
    "train_l0",
    "train_dead_fraction",
    "dead_window_steps",
    "input_scale",
    "width",
    "k",
    "l1_coefficient",
    "steps",
    "batch_tokens",
    "lr",
    "seed",
    "tokens",
    "data_tokens",
    "data_tokens_from_store",
    "data_tokens_from_model",
    "data_forward_seconds",
    "data_forward_tokens_per_s",
)
PRETRAINED_ONLY = ("release", "sae_id", "repo_id", "folder", "neuronpedia_id")


@dataclass
class SaeInfo(Record):
    """One layer's SAE: identity, provenance and quality on the VAL split."""

    FORMAT: ClassVar[str] = "ato-sae/1"
    PRODUCER: ClassVar[str] = "sae"

    layer: int  # residual layer n the SAE reads (output of decoder block n)
    architecture: str  # sae-lens architecture of the saved SAE: topk | jumprelu | …
    d_in: int  # input width (the model's d_model)
    d_sae: int  # number of latents
    store_digest: str  # content digest of the activation store it was trained on / checked against
    fve_val: float  # fraction of variance explained on VAL tokens, 1 − Σ‖x−x̂‖² / Σ‖x−x̄‖²
    mean_l0: float  # mean number of active latents per VAL token
    dead_fraction: float  # fraction of latents never active on the VAL tokens
    n_val_tokens: int  # VAL tokens (special excluded) the quality numbers are over
    hook: str  # TransformerLens hook name, blocks.n.hook_resid_post
    source: str  # train | pretrained (sae.source)
    reliable: bool = False  # every quality gate (sae.gates) passed; feature-level numbers using it are trustworthy
    gate_failures: list[str] = field(default_factory=list)  # one line per missed gate, with the shortfall
    gates: dict[str, Any] = field(default_factory=dict)  # the thresholds applied (sae.gates)
    dense_fraction: float | None = None  # fraction of latents active on more than `dense_threshold` of VAL tokens
    dense_threshold: float | None = None  # sae.dense_threshold
    # --- downstream, on `n_eval_sequences` VAL sequences (BOS kept clean and not scored)
    ce_clean: float | None = None  # next-token cross-entropy of the clean model, nats per scored token
    ce_sae: float | None = None  # … with the SAE reconstruction spliced in at this layer
    ce_zero: float | None = None  # … with this layer's residual zeroed (zero ablation)
    ce_mean: float | None = None  # … with it replaced by ȳ_train, causal_reference's (mean ablation)
    kl_sae: float | None = None  # mean KL(clean ‖ SAE-spliced) per scored token, nats
    kl_zero: float | None = None  # mean KL(clean ‖ zero-ablated)
    kl_mean: float | None = None  # mean KL(clean ‖ mean-ablated)
    ce_recovered_zero: float | None = None  # (ce_zero − ce_sae) / (ce_zero − ce_clean)
    ce_recovered_mean: float | None = None  # (ce_mean − ce_sae) / (ce_mean − ce_clean)
    ce_recovered_zero_se: float | None = None  # jackknife standard error over sequences
    ce_recovered_mean_se: float | None = None  # jackknife standard error over sequences
    # the SAE's own cost, comparable with an operator's causal Δ: log-ppl(SAE spliced) − log-ppl(clean)
    delta_sae: float | None = None  # ce_sae − ce_clean, nats per scored token
    delta_sae_se: float | None = None  # jackknife standard error over sequences
    n_eval_sequences: int | None = None  # VAL sequences of the downstream check (sae.eval_sequences)
    n_eval_tokens: int | None = None  # predictions scored in it
    stage_seconds: float | None = None  # wall time of the whole `sae` stage (all layers) when this record was written
    # --- source: train
    train_seconds: float | None = None  # wall time of the training loop
    train_tokens: int | None = None  # steps × batch_tokens (token-steps, with repeats over epochs)
    train_tokens_per_s: float | None = None  # train_tokens / train_seconds
    train_l0: float | None = None  # mean L0 over training (sae-lens' feature sparsity window)
    train_dead_fraction: float | None = None  # latents dead at the end of training (no firing for dead_window_steps)
    dead_window_steps: int | None = None  # steps without firing after which a latent counts as dead
    input_scale: float | None = None  # s = √d / mean‖x‖ used in training, folded back into the saved SAE
    width: int | None = None  # sae.width
    k: int | None = None  # sae.k (TopK)
    l1_coefficient: float | None = None  # sae.l1_coefficient (JumpReLU)
    steps: int | None = None  # sae.steps
    batch_tokens: int | None = None  # sae.batch_tokens
    lr: float | None = None  # sae.lr
    seed: int | None = None  # sae.seed
    tokens: int | None = None  # sae.tokens: distinct TRAIN tokens asked for
    data_tokens: int | None = None  # distinct TRAIN tokens trained on (store + streamed)
    data_tokens_from_store: int | None = None  # of which read from the activation store's TRAIN split
    data_tokens_from_model: int | None = None  # of which streamed from the model (further TRAIN documents)
    data_forward_seconds: float | None = None  # wall time of the streaming forward passes (all target layers at once)
    data_forward_tokens_per_s: float | None = None  # streamed tokens per second of it
    # --- source: pretrained
    release: str | None = None  # sae-lens release (or hub repo id)
    sae_id: str | None = None  # id inside the release
    repo_id: str | None = None  # Hugging Face repo it lives in
    folder: str | None = None  # folder inside that repo
    neuronpedia_id: str | None = None  # Neuronpedia model/sae-set id, when the release has one

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        skip = PRETRAINED_ONLY if self.source == "train" else TRAIN_ONLY
        return {key: value for key, value in out.items() if key not in skip}

    def metrics(self) -> dict[str, float]:
        """The numbers worth tracking (MLflow), where set and numeric."""
        keys = (
            "fve_val",
            "mean_l0",
            "dead_fraction",
            "dense_fraction",
            "ce_clean",
            "ce_sae",
            "ce_recovered_zero",
            "ce_recovered_mean",
            "kl_sae",
            "stage_seconds",
            "train_seconds",
            "train_tokens_per_s",
            "input_scale",
            "data_tokens",
            "data_forward_tokens_per_s",
        )
        out = {key: float(getattr(self, key)) for key in keys if isinstance(getattr(self, key), (int, float))}
        return {**out, "reliable": float(self.reliable)}
