"""The LM-head loss, one implementation (causal, select and the SAE quality checks use it): logits of
final hidden states in chunks of rows, in float32 or with the matmul in bf16 (`set_lm_head_dtype`), and the
per-row next-token NLL (`chunked_nll`) without the 262k-vocabulary logits ever existing all at once.

Without autograd the NLL reuses one float32 logits buffer per chunk shape and works in place on it
(copy, softcap, max, exp, sum): on a CPU every fresh [256, 262144] float32 tensor is a new 268 MB mapping
whose page faults cost 6× the copy into an existing one (`bench/lm_head.py`)."""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .models import ModelLoadError

log = logging.getLogger(__name__)


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
    head: nn.Module,
    cap: float | None,
    hidden: torch.Tensor,
    targets: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 logits of `hidden` rows, softcapped like the model's own forward (the matmul in bf16 where
    `set_lm_head_dtype` asked for it, with the logits that decide the loss recomputed exactly). With `out`
    (float32 [rows, vocab]; no autograd) they are written into it and softcapped in place."""
    low = _LOW_PRECISION_HEADS.get(head)
    weight, bias = _head_parameters(head)
    if out is None:
        if low is None:
            logits = head(hidden).float()
        else:
            logits = nn.functional.linear(hidden.to(low.dtype), low, None if bias is None else bias.to(low.dtype))
            logits = logits.float()
    else:
        logits = out
        if low is None:
            torch.matmul(hidden.to(weight.dtype), weight.T, out=logits)
        else:
            product = _buffer(low.dtype, logits.shape, logits.device)
            logits.copy_(torch.matmul(hidden.to(low.dtype), low.T, out=product))
        if bias is not None:
            logits.add_(bias.to(logits.dtype))
    if low is not None:
        _exact_top_logits(logits, head, hidden, targets)
    if cap is None:
        return logits
    return logits.div_(cap).tanh_().mul_(cap) if out is not None else torch.tanh(logits / cap) * cap


_BUFFERS: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}  # (dtype, device, vocab) → [rows, vocab]


def _buffer(dtype: torch.dtype, shape: torch.Size | tuple[int, int], device: torch.device) -> torch.Tensor:
    """A reused [rows, vocab] tensor (the first `rows` of the largest asked for so far; contents undefined)."""
    rows, vocab = shape
    key = (dtype, device, int(vocab))
    held = _BUFFERS.get(key)
    if held is None or held.shape[0] < rows:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            held = _BUFFERS[key] = torch.empty(rows, vocab, dtype=dtype, device=device)
    return held[:rows]


def _nll_in_place(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row −log softmax(logits)[target], as `cross_entropy(reduction="none")`, overwriting `logits`
    (max subtracted, exponentiated in place) instead of allocating the log-softmax."""
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    top = logits.amax(1, keepdim=True)
    log_sum = logits.sub_(top).exp_().sum(1).log_()
    return log_sum + top[:, 0] - target_logit


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
    are computed in float32 like transformers' own loss; without autograd in one reused buffer, in place
    (module docstring). With `checkpointed` (and grad enabled) each
    chunk's logits are recomputed in the backward pass instead of kept.
    """
    from torch.utils.checkpoint import checkpoint

    head, cap = lm_head_and_softcap(model)

    def rows_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and h.requires_grad:
            return nn.functional.cross_entropy(chunk_logits(head, cap, h, t), t, reduction="none")
        vocab = _head_parameters(head)[0].shape[0]
        return _nll_in_place(chunk_logits(head, cap, h, t, out=_buffer(torch.float32, (len(h), vocab), h.device)), t)

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
