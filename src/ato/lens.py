"""Splice an operator where interpretability researchers already work: a TransformerLens
`HookedTransformer` and an nnsight `LanguageModel` trace. Same contract as `ato.splice` (positions,
modes, a model that does not match the operator is refused, nothing left behind), same patch
(`ResidualPatch`), so a spliced forward gives the same logits in all three.

    with ato.lens.splice_hooked(tl_model, op):          # TransformerLens: blocks.{n}.hook_resid_post = our layer n
        logits = tl_model(tokens)

    with lm.trace(tokens):                              # nnsight: inside the trace body
        ato.lens.splice_trace(lm, op)
        logits = lm.output.save()

TransformerLens: load the model with `HookedTransformer.from_pretrained_no_processing` (or
`from_pretrained` where it leaves the residual as the HF model computes it: post-norm models such as
Gemma 2/3 skip `fold_ln` and `center_writing_weights`). A model whose layer norms were folded is
refused, and a residual that was centred (`center_writing_weights`, every row's mean exactly 0) is
refused on the first forward: the operator maps the unprocessed residual stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .models import _block_output, _replace_block_output, decoder_blocks
from .splicing import (
    Mode,
    Positions,
    ResidualPatch,
    SpliceError,
    SpliceState,
    check_fingerprint,
    check_model,
    operator_value,
    resolve_operator,
)

if TYPE_CHECKING:
    from .artifacts.operator import OperatorConfig
    from .operators import Operator

__all__ = ["check_hooked", "splice_hooked", "splice_trace"]

CENTRED_TOLERANCE = 1e-6  # |row mean| / row RMS below this on every row: the residual was centred


def check_hooked(model: nn.Module, config: OperatorConfig, *, strict: bool = True) -> None:
    """A TransformerLens model fits the operator's config: width, depth, unfolded norms, and the
    input embedding's fingerprint (`strict=False` makes a fingerprint mismatch a warning)."""
    cfg: Any = model.cfg
    where = f"operator {config.model} L{config.layer_in}→{config.layer_out} on HookedTransformer {cfg.model_name}"
    if int(config.d_model) != int(cfg.d_model):
        raise SpliceError(f"{where}: fitted at d_model={config.d_model}, the model's d_model is {cfg.d_model}")
    n = int(cfg.n_layers)
    if not 0 <= int(config.layer_in) < int(config.layer_out) < n:
        raise SpliceError(f"{where}: layers {config.layer_in}→{config.layer_out} do not exist in {n} layers")
    if config.n_layers is not None and int(config.n_layers) != n:
        raise SpliceError(f"{where}: fitted on a model of {config.n_layers} layers, this one has {n}")
    if str(cfg.normalization_type).endswith("Pre"):
        raise SpliceError(
            f"{where}: its layer norms were folded (normalization_type={cfg.normalization_type}), so its residual "
            "stream is not the one the operator was fitted on; load it with "
            "HookedTransformer.from_pretrained_no_processing"
        )
    # TransformerLens folds Gemma's embedding scale √d into W_E; the recorded fingerprint is of the HF weights
    scale = float(cfg.d_model) ** 0.5 if str(cfg.original_architecture).startswith("Gemma") else 1.0
    check_fingerprint(model.W_E.detach() / scale, config, where, strict)  # type: ignore[operator]  # HookedTransformer


@contextmanager
def splice_hooked(
    model: nn.Module,
    op: Operator | str | Path,
    positions: Positions = "all",
    mode: Mode = "replace",
    *,
    variant: str | None = None,
    strict: bool = True,
) -> Iterator[SpliceState]:
    """`ato.splice` for a TransformerLens `HookedTransformer`: `blocks.{T}.hook_resid_post` ←
    op(`blocks.{L}.hook_resid_post`) at `positions` for the forwards inside the block. The hooks go
    through `model.hooks`, which removes them on exit, also after an exception."""
    op = resolve_operator(op, variant)
    check_hooked(model, op.config, strict=strict)
    param = next(model.parameters())
    patch = ResidualPatch(op.layer_out, operator_value(op, param.device, param.dtype), positions, op.layer_in, mode)

    def capture(resid: torch.Tensor, hook: Any) -> None:
        refuse_centred(resid, f"{hook.name} of HookedTransformer {model.cfg.model_name}")  # type: ignore[union-attr]
        patch.capture(resid)

    def patched(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return patch.patched(resid)

    hooks = [(f"blocks.{op.layer_in}.hook_resid_post", capture), (f"blocks.{op.layer_out}.hook_resid_post", patched)]
    with model.hooks(fwd_hooks=hooks):  # type: ignore[operator]  # HookedTransformer
        yield patch.state


def refuse_centred(resid: torch.Tensor, where: str) -> None:
    """`center_writing_weights` makes every residual row's mean over d exactly 0 (an HF residual's is
    not): such a residual is another coordinate system from the one the operator was fitted on."""
    rows = resid.detach().reshape(-1, resid.shape[-1]).double()
    ratio = rows.mean(dim=1).abs() / rows.pow(2).mean(dim=1).sqrt().clamp_min(1e-30)
    if bool((ratio < CENTRED_TOLERANCE).all()):
        raise SpliceError(
            f"{where}: the residual is centred (center_writing_weights), not the stream the operator was fitted on; "
            "load the model with HookedTransformer.from_pretrained_no_processing"
        )


def splice_trace(
    lm: Any,
    op: Operator | str | Path,
    positions: Positions = "all",
    mode: Mode = "replace",
    *,
    model_digest: str | None = "auto",
    variant: str | None = None,
    strict: bool = True,
) -> SpliceState:
    """`ato.splice` inside an nnsight `LanguageModel.trace(...)` body: block T's output ← op(block L's
    output) at `positions`. Call it before reading any later module; the intervention lives only in
    that trace, so nothing outlives it. The wrapped HF model is checked as `ato.splice` checks it."""
    op = resolve_operator(op, variant)
    hf_model = lm._module  # the wrapped HF causal LM
    check_model(hf_model, op.config, model_digest, strict=strict)
    param = next(hf_model.parameters())
    patch = ResidualPatch(op.layer_out, operator_value(op, param.device, param.dtype), positions, op.layer_in, mode)
    block_in, block_out = (_block_envoy(lm, hf_model, n) for n in (op.layer_in, op.layer_out))
    patch.capture(_block_output(block_in.output))
    output = block_out.output
    block_out.output = _replace_block_output(output, patch.patched(_block_output(output)))
    return patch.state


def _block_envoy(lm: Any, hf_model: nn.Module, layer: int) -> Any:
    """nnsight's envoy of decoder block `layer`, found by the block's module path in the HF model."""
    block = decoder_blocks(hf_model)[layer]
    path = next(name for name, module in hf_model.named_modules() if module is block)
    envoy = lm
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy
