"""The routed inputs of the context maps (issue 22, docs/method.md#context): for a pair (L, k) and each
block between, L + j (j = 1..k), z_{j,t} = o_proj(A_{L+j} · v_proj(input_layernorm_{L+j}(x_L)))_t —
block L+j's own attention pattern of the clean forward (all heads, GQA-expanded, with whatever sliding
window, soft-cap or mask the model applied), held fixed and applied to the values of layer L's
residuals at positions s ≤ t. Given the patterns, z is linear in x_L's normed rows; with no norms and
no MLP, y_{L+1} = x_L + z_1 exactly.

One forward with eager attention (the only implementation that hands its probabilities back): a
forward hook on block L+j's attention mixes the values the moment the pattern exists and drops it, so
no more than one block's patterns of one batch are ever alive, and none is written. The forward stops
after the deepest block needed (`ato.models.capture_residuals`). Given layer L's residual of the same
tokens from an earlier forward (`start`: the causal stage's clean trace), blocks 0 … L are skipped
(`skipped_blocks`): block L hands back that residual, the earlier ones their input, and only blocks
L+1 … L+k run, the body still building its own masks and position embeddings for eager attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any  # HF models and their modules: attributes by architecture

import torch

from .models import (
    UnsupportedArchitectureError,
    base_model,
    capture_residuals,
    decoder_blocks,
    layer_block,
    run_captured,
)

__all__ = ["ContextForward", "context_forward", "eager_attention", "mix_values", "routed_attention", "skipped_blocks"]

Pair = tuple[int, int]


@dataclass
class ContextForward:
    """What one batch's forward gives the context maps."""

    hidden: dict[int, torch.Tensor]  # layer n → [B, T, d] float32 residual after block n (every L, L + k)
    routed: dict[Pair, torch.Tensor]  # (L, k) → [B, T, k, d] float32: z_{j,t} for j = 1..k


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """The model with eager attention inside the block, its own implementation restored after."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@contextmanager
def skipped_blocks(model: Any, layer: int, residual: torch.Tensor) -> Iterator[None]:
    """Forwards in which blocks 0 … `layer` compute nothing: block `layer` returns `residual` (its output
    for these tokens in an earlier forward), the blocks before it their input. Each block's `forward` is
    shadowed on the instance, so hooks on the blocks still fire; restored on exit."""
    blocks = decoder_blocks(model)

    def hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def given(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return residual

    def passthrough(*args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_of(args, kwargs)

    shadowed = {j: vars(blocks[j]).get("forward") for j in range(layer + 1)}
    try:
        for j in range(layer + 1):
            blocks[j].forward = given if j == layer else passthrough
        yield
    finally:
        for j, before in shadowed.items():
            if before is None:
                del blocks[j].forward
            else:
                blocks[j].forward = before


def routed_attention(model: Any, block: int) -> tuple[Any, Any]:
    """(input norm, self-attention) of decoder block `block`: the two modules a routed input reads."""
    layer = layer_block(model, block)
    norm, attention = getattr(layer, "input_layernorm", None), getattr(layer, "self_attn", None)
    if norm is None or attention is None or not all(hasattr(attention, a) for a in ("v_proj", "o_proj")):
        raise UnsupportedArchitectureError(
            f"model_type={model.config.model_type!r}: routed inputs need blocks with input_layernorm and a "
            "self_attn with separate v_proj / o_proj (Llama, Gemma-2/3 and their kin)"
        )
    return norm, attention


def mix_values(norm: Any, attention: Any, pattern: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """o_proj(pattern · v_proj(norm(x))): `pattern` [B, H, T, T] (rows: queries) applied to the values of
    the residuals `x` [B, T, d], heads summed through o_proj → [B, T, d]."""
    batch, length, _ = x.shape
    heads = pattern.shape[1]
    head_dim = attention.o_proj.in_features // heads
    values = attention.v_proj(norm(x.to(pattern.dtype))).view(batch, length, -1, head_dim).transpose(1, 2)
    values = values.repeat_interleave(heads // values.shape[1], dim=1)  # GQA: head h reads kv head h // groups
    mixed = torch.matmul(pattern, values).transpose(1, 2).reshape(batch, length, -1)
    return attention.o_proj(mixed)


@torch.no_grad()
def context_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pairs: Sequence[Pair],
    start: tuple[int, torch.Tensor] | None = None,
) -> ContextForward:
    """One forward of a batch: the residuals of every L and L + k of `pairs` and each pair's routed
    inputs (module docstring). Padding stays in (callers select their real tokens by the mask). `start`
    (layer, its residual [B, T, d] for these ids): blocks up to it are skipped (`skipped_blocks`); every
    pair must read that layer or a later one."""
    pairs = list(dict.fromkeys((int(L), int(k)) for L, k in pairs))
    layers = sorted({L for L, _ in pairs} | {L + k for L, k in pairs})
    readers: dict[int, list[Pair]] = {}  # block L + j → the pairs reading its pattern
    for L, k in pairs:
        for j in range(1, k + 1):
            readers.setdefault(L + j, []).append((L, k))
    mixtures: dict[Pair, list[torch.Tensor]] = {pair: [] for pair in pairs}

    def reader(block: int, hidden: dict[int, torch.Tensor]):
        norm, attention = routed_attention(model, block)

        def hook(_module, _inputs, output):
            pattern = output[1] if isinstance(output, tuple) else None
            if pattern is None:
                raise RuntimeError(f"block {block}'s attention returned no pattern: is attention eager?")
            for pair in readers[block]:  # blocks run in order: z_1 … z_k are appended in order
                mixtures[pair].append(mix_values(norm, attention, pattern, hidden[pair[0]]).float())

        return attention.register_forward_hook(hook)

    with ExitStack() as stack:
        stack.enter_context(eager_attention(model))
        if start is not None:
            if min(L for L, _ in pairs) < start[0]:
                raise ValueError(f"pairs {pairs} read layers before the skipped blocks' last, {start[0]}")
            stack.enter_context(skipped_blocks(model, *start))
        hidden = stack.enter_context(capture_residuals(model, layers))
        for block in readers:
            stack.callback(reader(block, hidden).remove)
        run_captured(base_model(model), input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return ContextForward(
        hidden={n: hidden[n].float() for n in layers},
        routed={pair: torch.stack(mixtures[pair], dim=2) for pair in pairs},
    )
