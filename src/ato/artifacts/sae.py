"""SAE info (`ato sae` → select, evaluate): what each layer's SAE is, where it came from and how good
it is. The same content is written twice: `sae_dir/layer_NN/ato_sae.json` beside the sae-lens files,
and `reports/sae/layer_NN.json`, a DVC metrics file (so its keys stay as they were). See
docs/contracts.md#sae."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._io import Record

# Keys that only one source writes (the other source's are left out of the JSON, not written as null).
TRAIN_ONLY = (
    "train_seconds",
    "train_tokens",
    "train_fve_last_batch",
    "train_l0_last_batch",
    "dead_window_steps",
    "input_scale",
    "width",
    "k",
    "l1_coefficient",
    "steps",
    "batch_tokens",
    "lr",
    "seed",
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
    gate_failures: list[str] = field(default_factory=list)  # one line per missed gate, e.g. "dead_fraction 0.31 > 0.05"
    # --- source: train
    train_seconds: float | None = None  # wall time of the training loop
    train_tokens: int | None = None  # steps × batch_tokens
    train_fve_last_batch: float | None = None  # FVE on the last logged training batch (scaled inputs)
    train_l0_last_batch: float | None = None  # mean L0 on that batch
    dead_window_steps: int | None = None  # steps without firing after which a latent counts as dead
    input_scale: float | None = None  # s = √d / mean‖x‖ used in training, folded back into the saved SAE
    width: int | None = None  # sae.width
    k: int | None = None  # sae.k (TopK)
    l1_coefficient: float | None = None  # sae.l1_coefficient (JumpReLU)
    steps: int | None = None  # sae.steps
    batch_tokens: int | None = None  # sae.batch_tokens
    lr: float | None = None  # sae.lr
    seed: int | None = None  # sae.seed
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
        keys = ("fve_val", "mean_l0", "dead_fraction", "train_seconds", "input_scale")
        return {key: getattr(self, key) for key in keys if isinstance(getattr(self, key), (int, float))}
