"""Splice an operator into a live HF causal LM: the residual after decoder block L+k is overwritten, at
chosen positions, from the same forward's residual after block L.

    import ato
    op = ato.load_operator("models/operators/L05_k1")
    with ato.splice(model, op, positions="all", mode="replace"):
        logits = model(**tokenizer("My own sentence.", return_tensors="pt")).logits

Modes, with x = residual after block L and h = the model's own residual after block T = L+k, at every
patched position:

    replace      h ← op(x)              the operator stands in for blocks L+1..T (what `ato causal` measures)
    add-delta    h ← h + (op(x) − x)    the operator's predicted update is added to the model's own residual;
                                        the identity operator leaves the model unchanged, and where blocks
                                        L+1..T are the identity it equals replace

Positions index the sequence axis of each forward's input: "all" (default) is every position but 0 (a
BOS-led sequence's BOS, never patched — as in the causal check), "every" includes 0, a list of ints
names positions, a bool tensor [T] or [batch, T] is the mask itself. With a KV cache each generation
step is a forward of its own (the new token is position 0 of it): pass "every" or a mask to patch it.

The model is checked against the operator's config before any hook is installed (`check_model`):
hidden size = d_model, the layers exist (and the layer count, where the config records it), and the
weights digest, where the model was loaded from a prepared directory (`ato prepare` writes
ato_model.json) or `model_digest=` is given. Any other model is checked by its input embedding's
fingerprint (`embedding_fingerprint`, recorded by `ato fit`): another model of the same width and
depth is refused unless `strict=False`. A mismatch is a `SpliceError` naming both values. The
hooks are removed on exit, also on an exception: the model is left exactly as it was.

One implementation: `patch_rows` is the spliced residual and `spliced` installs it with forward
hooks. `ato.causal` (the `causal` and `causal_reference` stages) computes every patched condition
with `patch_rows`, by hooks through `spliced` or by replaying the blocks after T from a traced forward.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .errors import AtoError
from .models import _block_output, _replace_block_output, decoder_blocks

if TYPE_CHECKING:
    from .artifacts.operator import OperatorConfig
    from .operators import Operator

log = logging.getLogger(__name__)

Mode = Literal["replace", "add-delta"]
MODES: tuple[str, ...] = ("replace", "add-delta")
Positions = str | Sequence[int] | torch.Tensor
ValueFn = Callable[[torch.Tensor], torch.Tensor]  # residual rows [m, d] → patch values [m, d]
Rows = tuple[torch.Tensor, ...]  # (batch index, position index) of the patched rows

__all__ = [
    "MODES",
    "ResidualPatch",
    "SpliceError",
    "SpliceState",
    "check_model",
    "patch_rows",
    "position_mask",
    "splice",
    "spliced",
]


class SpliceError(AtoError):
    """A splice that cannot be right: the model does not match the operator, or bad positions/mode."""


def patch_rows(
    h: torch.Tensor, x: torch.Tensor | None, rows: Rows, value: ValueFn, mode: str = "replace"
) -> torch.Tensor:
    """The spliced residual: `h` [B, T, d] with its `rows` set from `value` of the source rows (`x`,
    or `h` itself when the value does not depend on an earlier layer). A new tensor; `h` is untouched."""
    source = h if x is None else x
    if mode == "replace":
        return h.index_put(rows, value(source[rows]).to(h.dtype))
    if mode == "add-delta":
        xs = source[rows]
        return h.index_put(rows, (h[rows] + (value(xs) - xs)).to(h.dtype))
    raise SpliceError(f"mode {mode!r}: expected one of {', '.join(MODES)}")


def position_mask(positions: Positions, batch: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [batch, length]: the positions a splice patches (module docstring)."""
    if isinstance(positions, torch.Tensor):
        mask = positions.to(device=device, dtype=torch.bool)
        if mask.shape == (length,):
            return mask.expand(batch, length)
        if mask.shape != (batch, length):
            raise SpliceError(f"positions mask of shape {tuple(mask.shape)} for an input of shape {(batch, length)}")
        return mask
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if isinstance(positions, str):
        if positions not in ("all", "every"):
            raise SpliceError(f"positions={positions!r}: expected 'all', 'every', a list of ints or a bool mask")
        mask[:, 1 if positions == "all" else 0 :] = True
        return mask
    chosen = [int(p) for p in positions]
    bad = [p for p in chosen if not -length <= p < length]
    if bad:
        raise SpliceError(f"positions {bad} outside an input of {length} tokens")
    mask[:, chosen] = True
    return mask


@dataclass
class SpliceState:
    """What a splice did so far: forwards it patched and rows it overwrote (read it inside or after the block)."""

    layer_in: int | None
    layer_out: int
    mode: str
    forwards: int = 0
    n_patched: int = 0  # residual rows overwritten, over all forwards


class ResidualPatch:
    """The splice's per-forward logic, independent of how a library exposes the residual: `capture`
    takes block L's output, `patched` turns block T's output into the spliced one (`patch_rows`) and
    counts it in `state`. HF forward hooks (`spliced`), TransformerLens hooks and nnsight traces
    (`ato.lens`) all drive this one object."""

    def __init__(self, layer_out: int, value: ValueFn, positions: Any, layer_in: int | None, mode: str) -> None:
        if mode not in MODES:
            raise SpliceError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        if layer_in is not None and layer_in >= layer_out:
            raise SpliceError(f"layer_out {layer_out} must come after layer_in {layer_in}")
        self.state = SpliceState(layer_in, layer_out, mode)
        self.value, self.positions, self.mode = value, positions, mode
        self._captured: list[torch.Tensor] = []

    def capture(self, x: torch.Tensor) -> None:
        self._captured[:] = [x]

    def patched(self, h: torch.Tensor) -> torch.Tensor:
        layer_in, layer_out = self.state.layer_in, self.state.layer_out
        if layer_in is not None and not self._captured:
            raise SpliceError(f"block {layer_in} did not run before block {layer_out} in this forward")
        x = self._captured.pop() if layer_in is not None else None
        rows = patch_rows_at(self.positions, h)
        self.state.forwards += 1
        self.state.n_patched += int(rows[0].numel())
        return patch_rows(h, x, rows, self.value, self.mode)


@contextmanager
def spliced(
    model: nn.Module,
    layer_out: int,
    value: ValueFn,
    positions: Positions | Rows | Callable[[int, int], torch.Tensor] = "all",
    layer_in: int | None = None,
    mode: str = "replace",
) -> Iterator[SpliceState]:
    """Forward hooks that patch block `layer_out`'s output with `patch_rows` (no model check: `splice`
    does that). `positions` may also be a function (batch, length) → mask, or precomputed `rows` as a
    tuple of index tensors (what the causal stage passes). Hooks are removed on exit, whatever happens."""
    patch = ResidualPatch(layer_out, value, positions, layer_in, mode)
    blocks = decoder_blocks(model)

    def capture_hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        patch.capture(_block_output(output))

    def patch_hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        return _replace_block_output(output, patch.patched(_block_output(output)))

    handles = [] if layer_in is None else [blocks[layer_in].register_forward_hook(capture_hook)]
    try:
        handles.append(blocks[layer_out].register_forward_hook(patch_hook))
        yield patch.state
    finally:
        for handle in handles:
            handle.remove()


def patch_rows_at(positions: Any, h: torch.Tensor) -> Rows:
    """The (batch, position) rows of `h` [B, T, d] that `positions` names (precomputed rows pass through)."""
    if isinstance(positions, tuple) and all(isinstance(t, torch.Tensor) for t in positions):
        return positions  # precomputed rows
    batch, length = h.shape[:2]
    mask = positions(batch, length) if callable(positions) else position_mask(positions, batch, length, h.device)
    return mask.nonzero(as_tuple=True)


# --------------------------------------------------------------------------------------------
# The public splice


@contextmanager
def splice(
    model: nn.Module,
    op: Operator | str | Path,
    positions: Positions = "all",
    mode: Mode = "replace",
    *,
    model_digest: str | None = "auto",
    variant: str | None = None,
    strict: bool = True,
) -> Iterator[SpliceState]:
    """Patch `model` with operator `op` (an `Operator`, an operator directory or a registry URI
    `models:/<name>@<alias>`; `variant` picks one of a directory's variants) at the operator's own
    layers for the forwards inside the block (module docstring). `model_digest`: "auto" checks the
    weights digest where the model came from a prepared directory, a digest string checks that one,
    None skips the digest check (hidden size and layers are always checked). Without a digest, the
    embedding fingerprint is compared; `strict=False` turns its mismatch into a warning."""
    op = resolve_operator(op, variant)
    check_model(model, op.config, model_digest, strict=strict)
    param = next(model.parameters())
    value = operator_value(op, param.device, param.dtype)
    with spliced(model, op.layer_out, value, positions, op.layer_in, mode) as state:
        yield state


def resolve_operator(op: Operator | str | Path, variant: str | None = None) -> Operator:
    """An `Operator` as given, or loaded from a directory / registry URI (`variant` picks one of a
    directory's variants)."""
    from .operators import Operator, load_operator

    if not isinstance(op, Operator):
        return load_operator(op, variant=variant)
    if variant is not None:
        raise SpliceError("variant= selects a variant of an operator directory; pass that variant's Operator instead")
    return op


def operator_value(op: Operator, device: torch.device | str, dtype: torch.dtype) -> ValueFn:
    """x ↦ W x + b on the model's device and dtype."""
    W, b = op.W.to(device, dtype), op.b.to(device, dtype)
    return lambda x: nn.functional.linear(x, W, b)


def check_model(
    model: nn.Module, config: OperatorConfig, model_digest: str | None = "auto", *, strict: bool = True
) -> None:
    """The model fits the operator's config: hidden size, layers, and the weights digest where known,
    else the embedding fingerprint (a mismatch only warns when `strict` is False)."""
    where = f"operator {config.model} L{config.layer_in}→{config.layer_out}"
    model_config: Any = model.config  # an HF PretrainedConfig
    hidden = int(model_config.hidden_size)
    if int(config.d_model) != hidden:
        raise SpliceError(f"{where}: fitted at d_model={config.d_model}, the model's hidden size is {hidden}")
    n = len(decoder_blocks(model))
    layer_in, layer_out = int(config.layer_in), int(config.layer_out)
    if not 0 <= layer_in < layer_out < n:
        raise SpliceError(f"{where}: layers {layer_in}→{layer_out} do not exist in a model of {n} layers (0..{n - 1})")
    if config.n_layers is not None and int(config.n_layers) != n:
        raise SpliceError(f"{where}: fitted on a model of {config.n_layers} layers, this one has {n}")
    digest = model_weights_digest(model) if model_digest == "auto" else model_digest
    expected = config.model_digest
    if digest is not None and expected is not None and digest != expected:
        raise SpliceError(
            f"{where}: fitted on model weights {str(expected)[:12]}…, but this model's are {digest[:12]}… "
            "(a different model or checkpoint); load the model the operator was fitted on"
        )
    if digest is None or expected is None:
        check_fingerprint(model.get_input_embeddings().weight.detach(), config, where, strict)  # type: ignore[operator]  # HF model


FINGERPRINT_ROWS = 32  # embedding rows whose norms make the fingerprint (evenly spaced over the vocabulary)
FINGERPRINT_RTOL = 1e-2  # dtype copies of one model agree to ~1e-3 on a row norm; two models differ by far more


def embedding_fingerprint(model: nn.Module) -> dict[str, Any]:
    """A cheap fingerprint of the model's input embedding: the vocabulary size and the L2 norms of
    `FINGERPRINT_ROWS` evenly spaced rows. Norms, not a hash of bytes: the same model loaded in
    another dtype still matches, while another model of the same width and depth does not."""
    return weight_fingerprint(model.get_input_embeddings().weight.detach())  # type: ignore[operator]  # HF model


def weight_fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """`embedding_fingerprint` of an embedding matrix [vocab, d] in any dtype (read in float64)."""
    rows = torch.linspace(0, weight.shape[0] - 1, FINGERPRINT_ROWS).round().long().to(weight.device)
    norms = weight[rows].double().norm(dim=1).cpu()
    return {"vocab_size": int(weight.shape[0]), "row_norms": [float(f"{v:.7g}") for v in norms.tolist()]}


def check_fingerprint(embedding: torch.Tensor, config: OperatorConfig, where: str, strict: bool = True) -> None:
    """Compare the `weight_fingerprint` of a model's input embedding [vocab, d] with the one `ato fit`
    recorded in the config (a mismatch only warns when `strict` is False)."""
    recorded = config.embedding_fingerprint
    if recorded is None:
        warnings.warn(
            f"{where}: the operator's config records no embedding fingerprint (fitted before ato recorded one), "
            "so only the model's width and depth were checked; refit with `ato fit` to check the model itself",
            stacklevel=3,
        )
        return
    mine = weight_fingerprint(embedding)
    norms = recorded.get("row_norms", [])
    same = (mine["vocab_size"], len(mine["row_norms"])) == (recorded.get("vocab_size"), len(norms)) and torch.allclose(
        torch.tensor(mine["row_norms"], dtype=torch.float64),
        torch.tensor(norms, dtype=torch.float64),
        rtol=FINGERPRINT_RTOL,
        atol=0.0,
    )
    if same:
        return
    message = (
        f"{where}: the model's input embedding (vocabulary {mine['vocab_size']}, row norms "
        f"{mine['row_norms'][:3]}…) differs from the fitted model's (vocabulary {recorded.get('vocab_size')}, "
        f"row norms {norms[:3]}…): another model of the same width and depth"
    )
    if strict:
        raise SpliceError(message + "; load the model the operator was fitted on, or pass strict=False")
    warnings.warn(message + " (strict=False: splicing anyway)", stacklevel=3)


def model_weights_digest(model: nn.Module) -> str | None:
    """The weights digest `ato prepare` recorded for the directory the model was loaded from, if any."""
    from .artifacts import ArtifactError, ModelInfo, model_info_path

    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    info = model_info_path(str(source)) if source else None
    if info is None or not info.is_file():
        return None
    try:
        return ModelInfo.read(info).weights_digest
    except ArtifactError as exc:
        raise SpliceError(f"{info}: unreadable ({exc}); pass model_digest= explicitly or None") from None
