"""How good an SAE is on held-out residuals: fraction of variance explained, mean L0 and the dead
fraction; and the check that a saved SAE reloads to the same encoder (see docs/contracts.md#sae)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SaeError


@dataclass
class SaeQuality:
    """Quality of an SAE over a set of raw-residual tokens."""

    fve: float  # 1 − Σ‖x−x̂‖² / Σ‖x−x̄‖²
    mean_l0: float  # mean number of active latents per token
    dead_fraction: float  # fraction of latents never active
    n_tokens: int  # tokens evaluated


@torch.no_grad()
def evaluate_sae(
    sae: Any, chunks: Iterable[np.ndarray | torch.Tensor], device: str | torch.device = "cpu"
) -> SaeQuality:
    """Fraction of variance explained, mean L0 and dead fraction (never active) of `sae` over
    raw-residual chunks."""
    n, sse, l0 = 0, 0.0, 0.0
    s1 = s2 = fired = None
    for chunk in chunks:
        x = torch.as_tensor(chunk, dtype=torch.float32, device=device)
        acts = sae.encode(x)
        rec = sae.decode(acts)
        sse += float(((rec - x).double() ** 2).sum())
        xd = x.double()
        s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
        s2 = (xd * xd).sum(0) if s2 is None else s2 + (xd * xd).sum(0)
        active = acts > 0
        l0 += float(active.sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
        n += x.shape[0]
    if n == 0 or s1 is None or s2 is None or fired is None:
        raise SaeError("no tokens to evaluate the SAE on")
    sst = float((s2 - s1 * s1 / n).sum())
    return SaeQuality(
        fve=1.0 - sse / max(sst, 1e-300),
        mean_l0=l0 / n,
        dead_fraction=1.0 - float(fired.float().mean()),
        n_tokens=n,
    )


def check_roundtrip(sae: Any, path: Path, x: torch.Tensor) -> None:
    """Reload the SAE saved at `path` and insist on identical encodings (catches a lossy save)."""
    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        a, b = sae.to("cpu").encode(x), loaded.encode(x)
    if not torch.equal(a, b):
        raise SaeError(f"{path}: reloaded SAE encodes differently (max |Δ| {float((a - b).abs().max()):.3g})")
