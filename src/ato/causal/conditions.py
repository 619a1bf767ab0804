"""The patched conditions and every batch × position set × condition of one target layer
(`run_conditions`: one traced clean forward per batch, the conditions replayed from it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ato.artifacts.causal import SCOPES, patched_conditions
from ato.causal.context import ContextPatch
from ato.causal.forward import BodyTrace, ValueFn, first_patched_col, token_nll, trace_body, trace_prefix
from ato.causal.inputs import HeldOut, PositionSpec
from ato.kinds import PatchInputs, kinds_for
from ato.models import final_hidden
from ato.splicing import patch_rows, spliced

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Conditions: the causal kinds of the registry (`ato.kinds`), each building its own patch value


@dataclass
class Condition:
    """One patched condition: its name, the residual its value is computed from, and the value."""

    name: str
    layer_in: int | None  # the layer whose residual `value` reads (None: a constant, given y rows for shape)
    value: ValueFn  # residual rows at the patched positions [m, d] → patch values [m, d]
    # inputs other than a residual: (model, ids [B, T], the clean trace's layer_in residual or None) →
    # [B, T, p] per batch, the rows `value` reads instead of x_L's (the context map's stacked inputs,
    # `ato.causal.context`)
    stacked: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None


@dataclass
class PairPatch:
    """What one pair patches with: layers and the operator the conditions need."""

    name: str  # pair name
    layer_in: int  # L
    layer_out: int  # L + k
    W: torch.Tensor  # [d, d] float32
    b: torch.Tensor  # [d]
    mean_x: torch.Tensor  # x̄_train of layer L [d] (the pair's train statistics)
    mean_y: torch.Tensor  # ȳ_train of layer L+k [d]
    context: ContextPatch | None = None  # the pair's context maps (None: the context kinds are not patched)


def pair_conditions(pair: PairPatch, device: torch.device | str = "cpu") -> list[Condition]:
    """The conditions patched per pair (ato, identity, bias_only, mean_update, context, and any registered
    pair-scope kind); without the pair's context maps, none that reads the stacked context inputs."""
    context = None if pair.context is None else pair.context.to(device)
    inputs = PatchInputs(
        W=pair.W.to(device),
        b=pair.b.to(device),
        mean_x=pair.mean_x.to(device),
        mean_y=pair.mean_y.to(device),
        W_context=None if context is None else context.W,
        b_context=None if context is None else context.b,
    )
    return _registered_conditions("pair", inputs, pair.layer_in, context)


def reference_conditions(mean_y: torch.Tensor, device: torch.device | str = "cpu") -> list[Condition]:
    """The conditions patched per target layer (zero, train_mean, and any registered target-scope kind);
    `mean_y` [d] is ȳ_train. Their values read no residual (`layer_in` None)."""
    return _registered_conditions("target", PatchInputs(mean_y=mean_y.to(device)), None)


def _registered_conditions(
    scope: Literal["pair", "target"], inputs: PatchInputs, layer_in: int | None, context: ContextPatch | None = None
) -> list[Condition]:
    """The scope's causal kinds; a kind reading the stacked context inputs only where `context` is given."""
    kinds = [k for k in kinds_for("causal") if k.causal == scope and (k.reads != "context" or context is not None)]
    return [
        Condition(
            k.key("causal"),
            layer_in,
            k.patch_value(inputs),
            context.inputs if context is not None and k.reads == "context" else None,
        )
        for k in kinds
    ]


# --------------------------------------------------------------------------------------------
# Every batch × position set × condition of one target layer


@dataclass
class SetResult:
    """Per-sequence NLL sums of one position set: nll_sum[condition][scope] and token counts."""

    name: str
    spec: PositionSpec
    mask: torch.Tensor  # [T] positions of the set
    conditions: list[str]  # "clean" and the conditions run
    nll_sum: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    count: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SCOPES})
    n_patched: list[int] = field(default_factory=list)
    first_patched: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for c in self.conditions:
            self.nll_sum.setdefault(c, {s: [] for s in SCOPES})


@dataclass
class _Batch:
    """One batch's tokens, traced clean forward, clean NLL and whether the replay reproduces it."""

    ids: torch.Tensor
    special: torch.Tensor
    trace: BodyTrace
    clean: torch.Tensor  # [B, T-1]
    replay_exact: bool
    stacked: dict[str, torch.Tensor] = field(default_factory=dict)  # a condition's stacked inputs, once per batch


def run_conditions(
    model: nn.Module,
    held: HeldOut,
    layer_out: int,
    conditions: list[Condition],
    masks: dict[str, torch.Tensor],
    specs: Mapping[str, PositionSpec],
    batch_size: int,
    chunk_rows: int,
    clean_nll: torch.Tensor | None = None,
    share_prefix: bool = True,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, SetResult], torch.Tensor]:
    """Per-sequence NLL sums of "clean" and every condition, patching residual `layer_out`, for every
    position set; and the clean NLL [n, T-1] (float32, CPU).

    `clean_nll`: the clean NLL from an earlier run on the same sequences and batches (a
    `CausalReference`); None computes it here. `share_prefix=False` runs every condition as a full
    forward (the design before issue 11; for comparison). `timings` accumulates seconds per
    condition ("clean": the traced forward, its replay check and the clean LM head).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    names = ["clean", *(c.name for c in conditions)]
    results = {n: SetResult(n, specs[n], m, names) for n, m in masks.items()}
    layers = sorted({layer_out, *(c.layer_in for c in conditions if c.layer_in is not None)})
    clock = _Clock(device, timings)
    cleans: list[torch.Tensor] = []
    starts = list(range(0, held.tokens.shape[0], batch_size))
    bar = tqdm(total=len(starts) * len(masks) * len(conditions), desc=f"causal T={layer_out}", disable=not progress)
    template: BodyTrace | None = None  # a full trace whose replay was exact: later batches trace their prefix
    with torch.inference_mode():
        for start in starts:
            with clock("clean"):
                stop = start + batch_size
                base = None if clean_nll is None else clean_nll[start:stop].to(device)
                batch = _trace_batch(
                    model, held, start, stop, layers, layer_out, chunk_rows, base, share_prefix, template
                )
            if batch.replay_exact and batch.trace.final is not None:
                template = batch.trace
            cleans.append(batch.clean.cpu())
            for res in results.values():
                _run_set(model, batch, layer_out, conditions, res, chunk_rows, clock, bar.update)
    bar.close()
    return results, torch.cat(cleans)


def _trace_batch(
    model: nn.Module,
    held: HeldOut,
    start: int,
    stop: int,
    layers: list[int],
    layer_out: int,
    chunk_rows: int,
    clean: torch.Tensor | None,
    share_prefix: bool,
    template: BodyTrace | None = None,
) -> _Batch:
    """The batch's clean trace: given the clean NLL and an exact `template`, only the prefix up to
    `layer_out` (`trace_prefix`); otherwise the full forward, its replay checked bit for bit."""
    device = next(model.parameters()).device
    ids, special = held.tokens[start:stop].to(device), held.special[start:stop].to(device)
    if share_prefix and clean is not None and template is not None:
        prefix = trace_prefix(model, ids, layers, template)
        if prefix is not None:
            return _Batch(ids, special, prefix, clean, True)
    trace = trace_body(model, ids, layers, replay_from=layer_out + 1)
    assert trace.final is not None  # a full trace
    exact = share_prefix and torch.equal(trace.replay(model, layer_out, trace.residuals[layer_out]), trace.final)
    if share_prefix and not exact:
        log.warning(
            "sequences %d–%d: re-running blocks %d.. from the traced calls does not reproduce the model's own "
            "forward bit for bit; these batches patch with full forwards (same numbers, more time)",
            start,
            stop - 1,
            layer_out + 1,
        )
    if clean is None:
        clean = token_nll(model, ids, chunk_rows, hidden=trace.final)
    return _Batch(ids, special, trace, clean, exact)


def _run_set(
    model: nn.Module,
    batch: _Batch,
    layer_out: int,
    conditions: list[Condition],
    res: SetResult,
    chunk_rows: int,
    clock: _Clock,
    tick: Callable[[int], Any],
) -> None:
    """One batch of one position set: every condition's patched pass, sums appended to `res`."""
    ids, trace = batch.ids, batch.trace
    B, T = ids.shape
    patch = res.mask.to(ids.device)[None, :] & ~batch.special
    patch[:, 0] = False  # BOS is never patched, whatever the set says
    has = patch.any(1)
    first = torch.where(has, patch.int().argmax(1), torch.full_like(has, T, dtype=torch.long))
    cols = torch.arange(T - 1, device=ids.device)[None, :]  # column j: the prediction made at position j
    after = cols >= first[:, None]  # predictions a patch in this sequence can change
    res.n_patched += patch.sum(1).tolist()
    res.first_patched += [int(f) for f, h in zip(first.tolist(), has.tolist()) if h]
    res.count["all"] += [T - 2] * B  # every prediction but the one made at BOS, which no patch reaches
    res.count["after"] += after.sum(1).tolist()
    rows, from_col = patch.nonzero(as_tuple=True), first_patched_col(patch)
    y = trace.residuals[layer_out]
    per_cond = {"clean": batch.clean}
    for cond in conditions:
        with clock(cond.name):
            value, layer_in = _value_at(model, batch, cond, rows)
            if batch.replay_exact:
                x = None if layer_in is None else trace.residuals[layer_in]
                hidden = trace.replay(model, layer_out, patch_rows(y, x, rows, value))
            else:  # the same patch by hooks in a full forward (`ato.splicing`, what `ato.splice` runs)
                with spliced(model, layer_out, value, rows, layer_in):
                    hidden = final_hidden(model, ids)
            per_cond[cond.name] = token_nll(model, ids, chunk_rows, hidden=hidden, from_col=from_col, base=batch.clean)
        tick(1)
    for name, nll in per_cond.items():
        nll64 = nll.double()
        res.nll_sum[name]["all"] += nll64[:, 1:].sum(1).tolist()
        res.nll_sum[name]["after"] += (nll64 * after).sum(1).tolist()


def _value_at(model: nn.Module, batch: _Batch, cond: Condition, rows: tuple[torch.Tensor, ...]):
    """(value function, the layer it reads or None) of `cond` at `rows`. A condition on stacked inputs
    gets its values now, from the batch's stacked inputs (built once, shared by the position sets), and
    patches them as constants: the rows of its own clean forward, whichever way the patch runs."""
    if cond.stacked is None:
        return cond.value, cond.layer_in
    if cond.name not in batch.stacked:
        x_L = None if cond.layer_in is None else batch.trace.residuals.get(cond.layer_in)
        batch.stacked[cond.name] = cond.stacked(model, batch.ids, x_L)
    values = cond.value(batch.stacked[cond.name][rows])
    return (lambda _rows: values), None


class _Clock:
    """Seconds per condition into `timings` (None: not timed); synchronises CUDA around each span."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.sync = device.type == "cuda"
        self.timings = timings

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def run_pair(
    model: nn.Module,
    held: HeldOut,
    pair: PairPatch,
    mean_y: torch.Tensor,
    masks: dict[str, torch.Tensor],
    specs: Mapping[str, PositionSpec],
    batch_size: int,
    chunk_rows: int,
    share_prefix: bool = False,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> dict[str, SetResult]:
    """Every condition of one pair in one run, clean included: the per-pair design before issue 11
    (with `share_prefix=False`, its cost too). What `ato causal_reference` + `ato causal` must equal."""
    device = next(model.parameters()).device
    conditions = pair_conditions(pair, device) + reference_conditions(mean_y, device)
    order = patched_conditions()
    conditions.sort(key=lambda c: order.index(c.name))
    results, _ = run_conditions(
        model,
        held,
        pair.layer_out,
        conditions,
        masks,
        specs,
        batch_size,
        chunk_rows,
        None,
        share_prefix,
        progress,
        timings,
    )
    return results
