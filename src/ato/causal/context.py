"""The context condition's inputs (issue 22): the pair's union context map (`ato context`,
<paths.context_operators>/<pair>/) spliced at L + k like the ATO. Its patch value at target position t
is W · [x_t, x_{t−1} … x_{t−m}, prefix_t, z_{1,t} … z_{k,t}] + b, every block from one clean forward of
the batch (`ato.routed.context_forward`: layer L's residuals and block L+j's attention pattern applied
to their values; `ato.math.context.stack_context_inputs`: lags, prefix, absent inputs = `fill`).

The patch is at L + k, so blocks L+1 … L+k run clean in the patched forward too: the patterns the z's
use ARE the live forward's patterns, not stale ones from another pass. Given layer L's residual from
the batch's clean trace, only blocks L+1 … L+k run (`ato.routed.skipped_blocks`) instead of 0 … L+k;
the first batch is checked against the full eager forward (relative difference ≤ `SKIP_TOLERANCE`: the
trace's attention is the model's own, sdpa, where the full pass is eager throughout), and a miss falls
back to the full forward for the stage, with a warning.

The value reads other positions and the patterns, which no function of x_L's rows sees: the map-kind
registry carries it as a kind whose patch rows are these stacked inputs (`MapKind.reads == "context"`),
built once per batch and shared by every position set (`ato.causal.conditions`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ato.artifacts import ArtifactError, read_context_operator
from ato.math.context import stack_context_inputs
from ato.routed import context_forward

__all__ = ["ContextPatch", "read_context_patch"]

UNION = "context"  # the kind of `ato context` whose map is spliced: every input block
SKIP_TOLERANCE = 1e-4  # ‖skipped − full‖ / ‖full‖ of the first batch's stacked inputs
log = logging.getLogger(__name__)


@dataclass
class ContextPatch:
    """The union context map of one pair and what its stacked inputs need."""

    L: int
    k: int
    lags: int  # m
    W: torch.Tensor  # [d, p] float32, p = d · (1 + m + 1 + k)
    b: torch.Tensor  # [d]
    fill: torch.Tensor  # [d]: an absent input (BOS, before the sequence start)
    skip_checked: bool | None = field(default=None, compare=False)  # None: not yet compared (module docstring)

    def to(self, device: torch.device | str) -> ContextPatch:
        return ContextPatch(self.L, self.k, self.lags, self.W.to(device), self.b.to(device), self.fill.to(device))

    def inputs(self, model: nn.Module, ids: torch.Tensor, x_L: torch.Tensor | None = None) -> torch.Tensor:
        """The stacked context inputs [B, T, p] of the clean forward of `ids` [B, T] (row 0: BOS); with
        `x_L`, that forward's layer-L residual, only blocks L+1 … L+k run (module docstring)."""
        if x_L is None or self.skip_checked is False:
            return self._stacked(model, ids, None)
        skipped = self._stacked(model, ids, x_L)
        if self.skip_checked is None:
            full = self._stacked(model, ids, None)
            error = float((skipped - full).norm() / full.norm())
            self.skip_checked = error <= SKIP_TOLERANCE
            if not self.skip_checked:
                log.warning("context inputs from the trace's layer %d differ from the full forward's by %.1e "
                            "(> %.0e): every batch runs the full forward", self.L, error, SKIP_TOLERANCE)  # fmt: skip
                return full
        return skipped

    def _stacked(self, model: nn.Module, ids: torch.Tensor, x_L: torch.Tensor | None) -> torch.Tensor:
        start = None if x_L is None else (self.L, x_L)
        forward = context_forward(model, ids, None, [(self.L, self.k)], start=start)
        x, z = forward.hidden[self.L], forward.routed[(self.L, self.k)]
        return stack_context_inputs(x, z, self.lags, self.fill.to(x.dtype)).to(self.W.dtype)


def read_context_patch(directory: Path, L: int, k: int, d_model: int, store_digest: str | None) -> ContextPatch:
    """The pair's union map from its context-operator directory, checked to read every block in stacked
    order (the inputs `ContextPatch.inputs` builds) for this (L, k) and width."""
    config, maps, fill = read_context_operator(directory, store_digest)
    every_block = list(range(len(config.blocks)))
    if (config.L, config.k, config.d_model) != (L, k, d_model) or config.kinds.get(UNION) != every_block:
        raise ArtifactError(
            f"{directory}: context maps of L={config.L}, k={config.k}, d={config.d_model} reading "
            f"{config.kinds.get(UNION)}; expected L={L}, k={k}, d={d_model} and every block; rerun `ato context`"
        )
    W, b = maps[UNION]
    as_tensor = torch.from_numpy
    return ContextPatch(L, k, config.lags, as_tensor(W.copy()), as_tensor(b.copy()), as_tensor(fill.copy()))
