"""Atlas step 3: the model's mean Jacobian E[J] per probed input layer (one traced forward, vmapped jvps
through the re-run blocks), and the Jacobian operator it adds to the probed pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ato.accumulate import BandedGramAccumulator
from ato.atlas.fitting import AtlasError
from ato.causal.forward import BodyTrace, trace_body
from ato.causal.inputs import load_sequences
from ato.math.atlas import (
    PairFit,
    jacobian_map,
    local_vs_global,
    probe_directions,
    score,
)
from ato.math.jacobian import JacobianProbe, probe
from ato.models import decoder_blocks, load_prepared
from ato.params import AtlasParams, pair_name
from ato.store import ActivationStore


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n (0: unchanged) inside the block. The Jacobian's vmapped jvps and
    the causal replays are many small ops; with two threads on a busy 2-core CPU they spin-wait (measured
    2–5× slower than one thread, `atlas.threads`)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_model(model_dir: Path, device: torch.device) -> Any:
    """The prepared model with eager attention (forward-mode AD has no rule for fused SDPA kernels)
    and frozen weights."""
    model, _tokenizer, _info = load_prepared(model_dir, device=str(device))
    model.set_attn_implementation("eager")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def block_stack(model: Any, calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]], L: int, targets: list[int]):
    """f(h_L) = the residuals after blocks `targets` (> L), re-running blocks L+1… with the traced
    calls' other arguments (masks, position embeddings): a local version of `BodyTrace.replay` that
    returns intermediate residuals."""
    blocks, last = decoder_blocks(model), max(targets)

    def f(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for j in range(L + 1, last + 1):
            args, kwargs = calls[j]
            out = blocks[j](h, *args[1:], **kwargs) if args else blocks[j](**{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
            if j in targets:
                outs.append(h)
        return tuple(outs)

    return f


@dataclass
class ProbedPair:
    V: np.ndarray  # [d, r] probed directions
    probe: JacobianProbe


def probe_atlas(
    model: Any, store: ActivationStore, fits: dict[str, PairFit], layers: list[int], ap: AtlasParams
) -> dict[str, ProbedPair]:
    """E[J] (and everything `ato.math.jacobian.probe` estimates, the lagged E[J_{t,t−ℓ}] included) for
    every pair of the probed layers."""
    targets = {L: sorted(f.T for f in fits.values() if f.L == L) for L in layers}
    every = sorted({*layers, *(t for ts in targets.values() for t in ts)})
    trace, mask = traced_sequences(model, store, ap.jacobian_sequences, ap.jacobian_seq_len, every)
    generator = torch.Generator().manual_seed(ap.seed)
    out: dict[str, ProbedPair] = {}
    for L in tqdm(layers, desc="atlas Jacobian", unit="layer"):
        ts = targets[L]
        V = probe_directions([fits[pair_name(L, T - L)].maps["ridge"][0] for T in ts], ap.jacobian_directions)
        probes = probe_blocks(model, trace, L, ts, V, mask, generator, ap.jacobian_chunk, ap.jacobian_lags)
        for T, p in zip(ts, probes):
            out[pair_name(L, T - L)] = ProbedPair(V, p)
    return out


def traced_sequences(
    model: Any, store: ActivationStore, sequences: int, seq_len: int, layers: list[int]
) -> tuple[BodyTrace, torch.Tensor]:
    """One traced forward of the first TRAIN sequences (the residuals of `layers` and every later block's
    call) and the mask of the tokens the Jacobian averages over and shifts: every non-special token but BOS."""
    device = next(model.parameters()).device
    held = load_sequences(store, sequences, seq_len, split="train")
    mask = (~held.special).to(device)
    mask[:, 0] = False  # BOS: its residual is a fixed point the fits exclude
    with torch.no_grad():
        trace = trace_body(model, held.tokens.to(device), layers, min(layers) + 1)
    return trace, mask


def probe_blocks(
    model: Any,
    trace: BodyTrace,
    L: int,
    targets: list[int],
    V: np.ndarray,
    mask: torch.Tensor,
    generator: torch.Generator,
    chunk: int,
    lags: int,
) -> list[JacobianProbe]:
    """`ato.math.jacobian.probe` of blocks L+1 … max(targets), re-run from the traced calls (checked to
    reproduce the trace), on the directions V [d, r]: one probe per target layer."""
    f = block_stack(model, trace.calls, L, targets)
    x = trace.residuals[L]
    _check_replay(f, x, [trace.residuals[T] for T in targets], L, targets)
    return probe(f, x, torch.as_tensor(V, dtype=x.dtype, device=x.device), mask, generator, chunk, lags)


def _check_replay(f: Callable[..., Any], x: torch.Tensor, want: list[torch.Tensor], L: int, ts: list[int]) -> None:
    """The re-run blocks must reproduce the traced residuals, or the Jacobian is of another function."""
    with torch.no_grad():
        got = f(x)
    for T, a, b in zip(ts, got, want):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())):
            raise AtlasError(
                f"re-running blocks {L + 1}..{T} from the traced calls does not reproduce layer {T}; "
                "this model's body does more between blocks than the atlas's Jacobian supports"
            )


def apply_jacobian(fits: dict[str, PairFit], probes: dict[str, ProbedPair], grams: dict[str, BandedGramAccumulator]):
    """Add the Jacobian operator (its test R²) and the local-vs-global numbers to the probed pairs."""
    for name, pp in probes.items():
        fit = fits[name]
        train, test = grams["train"].pair_stats(fit.L, fit.T), grams["test"].pair_stats(fit.L, fit.T)
        W, b = fit.maps["ridge"]
        W_J, b_J = jacobian_map(W, pp.V, pp.probe.mean.numpy(), train)
        fit.maps["jacobian"] = (W_J, b_J)
        fit.scores["jacobian"] = score(test, W_J, b_J)
        fit.extra.update(local_vs_global(W, b, pp.V, pp.probe))  # type: ignore[arg-type]
