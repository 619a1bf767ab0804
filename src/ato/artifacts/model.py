"""The prepared model (`ato prepare` → collect, select, causal): `<model_dir>/ato_model.json`, written
beside the float32 safetensors copy; read through `ato.models.load_prepared`."""

from __future__ import annotations

from dataclasses import dataclass

from ._io import Record


@dataclass
class ModelInfo(Record):
    """What `prepare` copied: identity and shape of the model, and a digest of its weights."""

    FORMAT = "ato-model/1"
    PRODUCER = "prepare"

    name: str  # display name: "gemma-3-270m" for the embedded default, else prepare.source
    source: str  # prepare.source as given ("embedded", a local directory or an HF hub id)
    model_type: str  # HF config.model_type, e.g. "gemma3_text"
    architecture: str  # HF model class, e.g. "Gemma3ForCausalLM"
    n_layers: int  # decoder blocks; layer n is the output of block n (docs/conventions.md#layers)
    d_model: int  # residual width (config.hidden_size)
    vocab_size: int  # config.vocab_size
    dtype: str  # dtype of the saved weights (prepare.dtype)
    weights_digest: str  # sha256 over the safetensors files, name + bytes (ato.models.weights_digest)
    bos_token_id: int | None  # the tokenizer's BOS id (None when it has none)
