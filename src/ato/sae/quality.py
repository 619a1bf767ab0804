"""How good an SAE is on held-out VAL tokens (see docs/method.md#features, docs/contracts.md#sae):

- on residuals: fraction of variance explained, mean L0, dead and dense latent fractions;
- downstream (the SAELens / SAEBench check): the model's next-token cross-entropy and its KL to the
  clean model when the SAE's reconstruction replaces the residual at the SAE's layer, against zero
  and mean ablation of that residual; CE-loss recovered = (CE_abl − CE_sae) / (CE_abl − CE_clean),
  and the splice's own cost Δ = CE_sae − CE_clean (comparable with an operator's causal Δ).
  BOS keeps its clean residual (its norm is an outlier no SAE is trained on) and the prediction made
  at BOS is not scored (no splice can change it);
- the gates (`sae.gates`, CE judged against mean ablation by default) that decide whether
  feature-level numbers built on the SAE are reliable;
- the check that a saved SAE reloads to the same encoder.

The splice is a forward hook on the layer's block (`ato.models.patch_residual`); it could move to a
shared splice helper (`ato.splice`) later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ato.lm_head import chunk_logits, lm_head_and_softcap
from ato.models import final_hidden, patch_residual
from ato.params import SaeGates
from ato.store import ActivationStore

from .errors import SaeError

LOGIT_CHUNK_ROWS = 128  # rows of 262k-vocab logits alive at once (x2: clean and spliced)


@dataclass
class SaeQuality:
    """Quality of an SAE over a set of raw-residual tokens."""

    fve: float  # 1 − Σ‖x−x̂‖² / Σ‖x−x̄‖²
    mean_l0: float  # mean number of active latents per token
    dead_fraction: float  # fraction of latents never active
    n_tokens: int  # tokens evaluated
    dense_fraction: float = 0.0  # fraction of latents active on more than `dense_threshold` of the tokens


@torch.no_grad()
def evaluate_sae(
    sae: Any,
    chunks: Iterable[np.ndarray | torch.Tensor],
    device: str | torch.device = "cpu",
    dense_threshold: float = 0.1,
) -> SaeQuality:
    """Fraction of variance explained, mean L0, dead (never active) and dense (active on more than
    `dense_threshold` of the tokens) fractions of `sae` over raw-residual chunks."""
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
        counts = active.sum(0, dtype=torch.int64)
        fired = counts if fired is None else fired + counts
        n += x.shape[0]
    if n == 0 or s1 is None or s2 is None or fired is None:
        raise SaeError("no tokens to evaluate the SAE on")
    sst = float((s2 - s1 * s1 / n).sum())
    return SaeQuality(
        fve=1.0 - sse / max(sst, 1e-300),
        mean_l0=l0 / n,
        dead_fraction=float((fired == 0).float().mean()),
        n_tokens=n,
        dense_fraction=float((fired > dense_threshold * n).float().mean()),
    )


def check_roundtrip(sae: Any, path: Path, x: torch.Tensor) -> None:
    """Reload the SAE saved at `path` and insist on identical encodings (catches a lossy save)."""
    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        a, b = sae.to("cpu").encode(x), loaded.encode(x)
    if not torch.equal(a, b):
        raise SaeError(f"{path}: reloaded SAE encodes differently (max |Δ| {float((a - b).abs().max()):.3g})")


# --------------------------------------------------------------------------------------------
# Downstream: the SAE's reconstruction spliced into the model


@dataclass
class SpliceQuality:
    """Next-token cross-entropy (nats per scored token) and KL to the clean model when layer n's
    residual is replaced by the SAE reconstruction, zero, or `means` (mean ablation; the stage passes
    ȳ_train, `ato.artifacts.read_train_means`)."""

    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    kl_sae: float  # mean KL(clean ‖ spliced) per scored token
    kl_zero: float
    kl_mean: float
    ce_recovered_zero: float  # (CE_zero − CE_sae) / (CE_zero − CE_clean)
    ce_recovered_mean: float  # (CE_mean − CE_sae) / (CE_mean − CE_clean)
    ce_recovered_zero_se: float  # jackknife standard error over sequences
    ce_recovered_mean_se: float
    delta_sae: float  # ce_sae − ce_clean: the splice's own damage, nats per scored token
    delta_sae_se: float  # jackknife standard error over sequences
    n_sequences: int
    n_scored_tokens: int


def val_sequences(
    store: ActivationStore, n: int, seq_len: int, split: str = "val"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` sequences of `split` with at least `seq_len` tokens, cut to `seq_len`:
    (token ids int64 [n, T], special bool [n, T]). Too few is a SaeError naming the counts."""
    ids, pos, spec = [], [], []
    for chunk in store.iter_chunks(split, [], include_special=True, with_tokens=True):
        ids.append(chunk["token_id"])
        pos.append(chunk["position"])
        spec.append(chunk["special"])
    token_id, position, special = np.concatenate(ids), np.concatenate(pos), np.concatenate(spec)
    starts = np.flatnonzero(position == 0)
    ends = np.append(starts[1:], len(position))
    chosen = [s for s, e in zip(starts, ends) if e - s >= seq_len][:n]
    if len(chosen) < n:
        raise SaeError(
            f"{store.root}: split {split!r} has {len(chosen)} sequences of ≥ {seq_len} tokens, "
            f"sae.eval_sequences={n} needed; lower sae.eval_sequences or sae.eval_seq_len"
        )
    rows = np.asarray(chosen)[:, None] + np.arange(seq_len)[None, :]
    return torch.as_tensor(token_id[rows].astype(np.int64)), torch.as_tensor(special[rows])


def _reconstruct(sae: Any, h: torch.Tensor) -> torch.Tensor:
    return sae.decode(sae.encode(h))


def _spliced_hidden(model: Any, ids: torch.Tensor, layer: int, keep: torch.Tensor, value: Any) -> torch.Tensor:
    """Final hidden states with layer `layer`'s residual at `keep` [B, T] replaced by `value(h)`."""

    def splice(hidden: torch.Tensor) -> torch.Tensor:
        return torch.where(keep[..., None], value(hidden).to(hidden.dtype), hidden)

    with patch_residual(model, layer, splice):
        return final_hidden(model, ids)


def _ce_kl(
    model: Any, clean: torch.Tensor, spliced: dict[str, torch.Tensor], ids: torch.Tensor, scored: torch.Tensor
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per-sequence sums of next-token CE (clean and each spliced condition) and of KL(clean ‖ spliced)
    over the `scored` [B, T-1] prediction rows, with at most LOGIT_CHUNK_ROWS rows of logits alive."""
    head, cap = lm_head_and_softcap(model)
    b_idx, t_idx = scored.nonzero(as_tuple=True)
    targets = ids[b_idx, t_idx + 1]
    B = ids.shape[0]
    ce_clean = torch.zeros(B, dtype=torch.float64)
    out = {name: (torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)) for name in spliced}
    for start in range(0, len(b_idx), LOGIT_CHUNK_ROWS):
        sl = slice(start, start + LOGIT_CHUNK_ROWS)
        rows_b, rows_t, tgt = b_idx[sl], t_idx[sl], targets[sl]
        logp_clean = chunk_logits(head, cap, clean[rows_b, rows_t]).log_softmax(-1)
        ce_clean.index_add_(0, rows_b, -logp_clean.gather(1, tgt[:, None])[:, 0].double())
        p_clean = logp_clean.exp()
        for name, hidden in spliced.items():
            logp = chunk_logits(head, cap, hidden[rows_b, rows_t]).log_softmax(-1)
            ce, kl = out[name]
            ce.index_add_(0, rows_b, -logp.gather(1, tgt[:, None])[:, 0].double())
            kl.index_add_(0, rows_b, (p_clean * (logp_clean - logp)).sum(-1).double())
    return ce_clean, out


@torch.no_grad()
def splice_quality(
    model: Any,
    saes: dict[int, Any],
    means: dict[int, torch.Tensor],
    ids: torch.Tensor,
    special: torch.Tensor,
    batch_size: int = 8,
) -> dict[int, SpliceQuality]:
    """CE and KL with each layer's SAE reconstruction, zero and mean ablation spliced in (module
    docstring), on sequences `ids` [n, T]; one clean forward per batch serves every layer."""
    device = next(model.parameters()).device
    n, T = ids.shape
    sums: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, batch_size):
        b_ids, b_spec = ids[start : start + batch_size].to(device), special[start : start + batch_size].to(device)
        keep = ~b_spec
        scored = keep[:, :-1]  # predictions made at non-special positions (never at BOS)
        clean = final_hidden(model, b_ids)
        spliced = {}
        for layer, sae in saes.items():
            values: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
                "sae": partial(_reconstruct, sae),
                "zero": torch.zeros_like,
                "mean": means[layer].to(device).expand_as,
            }
            for name, value in values.items():
                spliced[f"{layer}/{name}"] = _spliced_hidden(model, b_ids, layer, keep, value)
        ce_clean, per = _ce_kl(model, clean, spliced, b_ids, scored)
        sums.setdefault("count", []).append(scored.sum(1).double().cpu())
        sums.setdefault("clean", []).append(ce_clean.cpu())
        for key, (ce, kl) in per.items():
            sums.setdefault(f"{key}/ce", []).append(ce.cpu())
            sums.setdefault(f"{key}/kl", []).append(kl.cpu())
    per_seq = {key: torch.cat(v).numpy() for key, v in sums.items()}
    return {layer: _summarise(per_seq, layer) for layer in saes}


def _summarise(per_seq: dict[str, np.ndarray], layer: int) -> SpliceQuality:
    count = per_seq["count"]

    def mean(key: str) -> float:
        return float(per_seq[key].sum() / count.sum())

    ce = {name: per_seq[f"{layer}/{name}/ce"] for name in ("sae", "zero", "mean")}
    rec = {ref: _recovered(per_seq["clean"], ce["sae"], ce[ref], count) for ref in ("zero", "mean")}
    delta = _jackknife(
        lambda keep: float((ce["sae"][keep].sum() - per_seq["clean"][keep].sum()) / count[keep].sum()), len(count)
    )
    return SpliceQuality(
        ce_clean=mean("clean"),
        ce_sae=mean(f"{layer}/sae/ce"),
        ce_zero=mean(f"{layer}/zero/ce"),
        ce_mean=mean(f"{layer}/mean/ce"),
        kl_sae=mean(f"{layer}/sae/kl"),
        kl_zero=mean(f"{layer}/zero/kl"),
        kl_mean=mean(f"{layer}/mean/kl"),
        ce_recovered_zero=rec["zero"][0],
        ce_recovered_mean=rec["mean"][0],
        ce_recovered_zero_se=rec["zero"][1],
        ce_recovered_mean_se=rec["mean"][1],
        delta_sae=delta[0],
        delta_sae_se=delta[1],
        n_sequences=len(count),
        n_scored_tokens=int(count.sum()),
    )


def _recovered(clean: np.ndarray, sae: np.ndarray, abl: np.ndarray, count: np.ndarray) -> tuple[float, float]:
    """(CE_abl − CE_sae)/(CE_abl − CE_clean) over all scored tokens, and its leave-one-sequence-out
    jackknife standard error."""

    def share(keep: np.ndarray) -> float:
        c, s, a = clean[keep].sum(), sae[keep].sum(), abl[keep].sum()
        return float((a - s) / (a - c)) if a != c else math.nan

    return _jackknife(share, len(count))


def _jackknife(statistic: Callable[[np.ndarray], float], n: int) -> tuple[float, float]:
    """`statistic` over all n sequences (a boolean mask selects them) and its leave-one-sequence-out
    jackknife standard error (NaN below 2 sequences)."""
    value = statistic(np.ones(n, dtype=bool))
    if n < 2:
        return value, math.nan
    loo = np.array([statistic(np.arange(n) != i) for i in range(n)])
    return value, float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))


def gate_failures(gates: SaeGates, fve: float, dead: float, recovered: float | None) -> list[str]:
    """One line per missed gate, with the shortfall; a gate whose number is missing fails too."""
    out = []
    if not fve >= gates.min_fve:
        out.append(f"fve_val {fve:.3f} < {gates.min_fve} (short by {gates.min_fve - fve:.3f})")
    if not dead <= gates.max_dead:
        out.append(f"dead_fraction {dead:.3f} > {gates.max_dead} (over by {dead - gates.max_dead:.3f})")
    name = f"ce_recovered_{gates.ce_reference}"
    if recovered is None or not math.isfinite(recovered):
        out.append(f"{name} not measured (sae.eval_sequences: 0)")
    elif recovered < gates.min_ce_recovered:
        out.append(
            f"{name} {recovered:.3f} < {gates.min_ce_recovered} (short by {gates.min_ce_recovered - recovered:.3f})"
        )
    return out
