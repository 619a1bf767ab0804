"""The forward passes: the per-token NLL through the chunked LM head, a patched full forward, and the
traced clean forward whose later blocks can be replayed from a changed residual (`BodyTrace`; after the
first batch, a traced prefix borrows the later blocks' calls: `trace_prefix`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ato.lm_head import chunked_nll
from ato.models import base_model, decoder_blocks, final_hidden
from ato.splicing import spliced

ValueFn = Callable[[torch.Tensor], torch.Tensor]  # x_L rows [m, d] → patch values [m, d]


def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    chunk_rows: int,
    hidden: torch.Tensor | None = None,
    from_col: int = 0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL [B, T-1]: column j is −log p(token j+1 | tokens ≤ j).

    Columns < `from_col` are copied from `base` (the clean NLL) and skip the LM head: a patch at
    positions ≥ from_col cannot change them in a causal model.
    """
    if hidden is None:
        hidden = final_hidden(model, input_ids)
    B, T = input_ids.shape
    nll = torch.empty(B, T - 1, dtype=torch.float32, device=input_ids.device)
    if from_col > 0:
        if base is None:
            raise ValueError("from_col > 0 needs the clean NLL as `base`")
        nll[:, :from_col] = base[:, :from_col]
    if from_col < T - 1:
        h = hidden[:, from_col : T - 1].reshape(-1, hidden.shape[-1])
        y = input_ids[:, from_col + 1 :].reshape(-1)
        nll[:, from_col:] = chunked_nll(model, h, y, chunk_rows).view(B, T - 1 - from_col)
    return nll


def first_patched_col(patch: torch.Tensor) -> int:
    """The first column any row of `patch` [B, T] patches (T − 1: none, so no LM-head row is needed)."""
    return int(patch.any(0).nonzero()[0]) if patch.any() else patch.shape[1] - 1


def patched_token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    layer_in: int,
    layer_out: int,
    patch: torch.Tensor,
    value_fn: ValueFn,
    chunk_rows: int,
    clean_nll: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL [B, T-1] of one full forward where residual `layer_out` at `patch` [B, T] (bool) is
    replaced by `value_fn(x_layer_in[patch])`, x captured from the same forward (the reference
    implementation that `run_conditions` shares the prefix of)."""
    if layer_out <= layer_in:
        raise ValueError(f"layer_out {layer_out} must come after layer_in {layer_in}")
    with spliced(model, layer_out, value_fn, patch.nonzero(as_tuple=True), layer_in):
        hidden = final_hidden(model, input_ids)
    from_col = first_patched_col(patch) if clean_nll is not None else 0
    return token_nll(model, input_ids, chunk_rows, hidden=hidden, from_col=from_col, base=clean_nll)


def _block_output(output: object) -> torch.Tensor:
    # as ato.models: recent transformers return the hidden state itself; older versions and GPT-2 a tuple
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


@dataclass
class BodyTrace:
    """One clean forward of the body: residuals, and what every block and every module after the last
    block was called with, so the rest of the body can be re-run from a changed residual (`replay`)."""

    residuals: dict[int, torch.Tensor]  # layer → block output [B, T, d]
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]]  # block index → (args, kwargs) of its call
    tail: list[nn.Module]  # the body's modules called after its last block, in order (the final norm)
    final: torch.Tensor | None  # final hidden states [B, T, d] of the clean forward (None: `trace_prefix`)

    def replay(self, model: nn.Module, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states when the residual after block `layer` is `hidden`: blocks layer+1.. and
        the tail run again with the arguments of the traced call; nothing before them does."""
        blocks = decoder_blocks(model)
        for j in range(layer + 1, len(blocks)):
            args, kwargs = self.calls[j]
            out = blocks[j](hidden, *args[1:], **kwargs) if args else blocks[j](**{**kwargs, "hidden_states": hidden})
            hidden = _block_output(out)
        for module in self.tail:
            hidden = module(hidden)
        return hidden


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_body(model: nn.Module, input_ids: torch.Tensor, layers: list[int], replay_from: int) -> BodyTrace:
    """The clean forward of `input_ids` with the residuals of `layers` and the calls of the blocks
    recorded (`BodyTrace`; those before `replay_from` too, for `trace_prefix` to compare with)."""
    blocks, body = decoder_blocks(model), base_model(model)
    residuals: dict[int, torch.Tensor] = {}
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    finished: list[tuple[str, Any]] = []  # ("block", index) / ("child", module) in the order they return

    def on_block(j: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if j in layers:
                residuals[j] = _block_output(output).detach()
            finished.append(("block", j))

        return hook

    def on_call(j: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[j] = (args, dict(kwargs))

        return hook

    def on_child(module: nn.Module) -> Callable[..., None]:
        return lambda *_: finished.append(("child", module))

    handles = [b.register_forward_hook(on_block(j)) for j, b in enumerate(blocks)]
    handles += [blocks[j].register_forward_pre_hook(on_call(j), with_kwargs=True) for j in range(len(blocks))]
    handles += [m.register_forward_hook(on_child(m)) for m in body.children() if m is not blocks]
    with _hooks(handles):
        final = final_hidden(model, input_ids)
    last = max(i for i, (kind, _) in enumerate(finished) if kind == "block")
    tail = [m for kind, m in finished[last + 1 :] if kind == "child"]
    return BodyTrace(residuals, calls, tail, final)


class _Cut(Exception):
    """Raised after the last block a prefix trace needs: the rest of the forward is not run."""


def trace_prefix(model: nn.Module, input_ids: torch.Tensor, layers: list[int], template: BodyTrace) -> BodyTrace | None:
    """The clean forward of `input_ids` cut after block max(`layers`), with the later blocks' calls and
    the tail taken from `template` (a `trace_body` of an earlier batch whose replay was checked exact).

    A body computes every block's arguments but the hidden state (masks, position embeddings) from the
    input's shape and mask before its first block, so when every block up to the cut got the same
    arguments as in the template, the later blocks get them too, and the template's calls replay this
    batch. None when any argument differs (a batch of another shape): trace that batch in full. The
    residuals are the model's own forward either way, so the numbers do not change; the blocks after
    the cut, and the check replay of them, run only once per stage instead of once per batch."""
    blocks, last = decoder_blocks(model), max(layers)
    residuals: dict[int, torch.Tensor] = {}
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def on_block(j: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if j in layers:
                residuals[j] = _block_output(output).detach()
            if j == last:
                raise _Cut

        return hook

    def on_call(j: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[j] = (args, dict(kwargs))

        return hook

    handles = [blocks[j].register_forward_hook(on_block(j)) for j in range(last + 1)]
    handles += [blocks[j].register_forward_pre_hook(on_call(j), with_kwargs=True) for j in range(last + 1)]
    with _hooks(handles):
        try:
            final_hidden(model, input_ids)
        except _Cut:
            pass
    if not all(j in template.calls and _same_arguments(calls[j], template.calls[j]) for j in range(last + 1)):
        return None
    later = {j: call for j, call in template.calls.items() if j > last}
    return BodyTrace(residuals, {**calls, **later}, template.tail, None)


def _same_arguments(
    call: tuple[tuple[Any, ...], dict[str, Any]], other: tuple[tuple[Any, ...], dict[str, Any]]
) -> bool:
    """Whether two calls of a block got the same arguments, the hidden state (the first) aside."""
    (args, kwargs), (other_args, other_kwargs) = call, other
    rest = [{k: v for k, v in kw.items() if k != "hidden_states"} for kw in (kwargs, other_kwargs)]
    return _same(args[1:], other_args[1:]) and _same(rest[0], rest[1])


def _same(a: Any, b: Any) -> bool:
    """Equal values: tensors element by element (shape and dtype too), containers item by item, plain
    scalars by value; any other object only if it is the same object (then nothing is assumed)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) in (bool, int, float, str, type(None)):
        return type(a) is type(b) and a == b
    return a is b
