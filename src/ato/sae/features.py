"""Score every feature of one layer's SAE, rank, keep the best (`ato select`; see docs/method.md#features).

All scores use the SAE's real encoder (`sae.encode`: JumpReLU threshold / TopK), never a plain
ReLU, on TRAIN-split tokens (BOS/special excluded, at most `select.max_tokens`). Definitions in
`ato.math.features`; the model-dependent parts live here and in `ato.sae.effects`:

- vocab_focus: excess kurtosis of W_U · (N(d_f) − N(0)) with N the model's own final norm module
  (Gemma: x/rms(x)·(1+w); LayerNorm: centring, gain and bias — N(0) removes the bias). Applying N
  to the direction itself is the logit lens of a residual equal to d_f; kurtosis is invariant to
  the scalar 1/rms(·) the norm would apply to a real residual, so the choice of that scalar does
  not matter. The LM head's bias (if any) is ignored: it does not depend on the feature.
- causal_effect: first-order change in mean next-token loss on `select.causal_sequences` VAL
  sequences when a_f·d_f is removed (`ato.sae.effects`); for the `select.exact_check` features with
  the largest estimated |effect| the exact ablation is also run and both are reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ato.artifacts import (
    FeatureContext,
    FeatureContexts,
    FeatureScores,
    FeatureSet,
    SelectReport,
    TokenContext,
    json_clean,
)
from ato.artifacts.features import CausalCheck, SelectSeconds
from ato.math.features import (
    METRICS,
    FeatureActivationStats,
    composite_score,
    excess_kurtosis,
    n_keep,
    rank_features,
)
from ato.params import SelectParams
from ato.store import ActivationStore

from .effects import Sequence, decoder_directions, exact_effects, first_order_effects
from .errors import FeatureScoreError

ENCODE_BATCH = 4096
SEQUENCE_READ_TOKENS = 2048
TOP_LOGIT_TOKENS = 10
CAUSAL_METHOD = "first_order_gradient_x_contribution"


def check_weights(weights: dict[str, float]) -> None:
    """select.weights may only name known metrics."""
    unknown = sorted(set(weights) - set(METRICS))
    if unknown:
        raise FeatureScoreError(f"select.weights.{unknown[0]}: unknown metric; known: {', '.join(METRICS)}")


# --------------------------------------------------------------------------------------------
# Model-side scores


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied before the LM head."""
    from ato.models import base_model

    base = base_model(model)
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(base, attr, None)
        if isinstance(module, nn.Module):
            return module
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise FeatureScoreError(f"cannot find the final norm of model_type={model_type!r}")


@torch.no_grad()
def direction_logits(model: nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """W_U · (N(d) − N(0)) for rows d of `directions` → [m, vocab]."""
    from ato.models import lm_head_and_softcap

    norm = final_norm(model)
    w_u = cast(torch.Tensor, lm_head_and_softcap(model)[0].weight)
    d = directions.to(w_u.device, w_u.dtype)
    normed = norm(d[None])[0] - norm(torch.zeros_like(d[:1])[None])[0]
    return normed @ w_u.T


@torch.no_grad()
def vocab_focus(model: nn.Module, directions: torch.Tensor, chunk: int = 128) -> np.ndarray:
    out = []
    for i in range(0, len(directions), chunk):
        out.append(excess_kurtosis(direction_logits(model, directions[i : i + chunk]).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


# --------------------------------------------------------------------------------------------
# Store-side scores


def read_sequences(store: ActivationStore, split: str, n: int) -> list[Sequence]:
    """The first `n` sequences of a split as (token ids, special flags), BOS included. Sequences are
    stored contiguously; a new one starts where position == 0."""
    toks, specs, poss = [], [], []
    n_starts = 0
    chunks = store.iter_chunks(split, [], SEQUENCE_READ_TOKENS, include_special=True, with_tokens=True)
    for chunk in chunks:  # token arrays only, no residuals
        toks.append(chunk["token_id"])
        specs.append(chunk["special"])
        poss.append(chunk["position"])
        n_starts += int((chunk["position"] == 0).sum())
        if n_starts > n:  # the n-th sequence is complete
            break
    if not toks:
        return []
    tok, spec, pos = np.concatenate(toks), np.concatenate(specs), np.concatenate(poss)
    starts = [int(s) for s in np.flatnonzero(pos == 0)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, len(tok)]
    return [(tok[a:b], spec[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a][:n]


def scan_features(
    sae: Any, store: ActivationStore, layer: int, max_tokens: int, top_k: int, device: Any, progress: bool = True
) -> tuple[FeatureActivationStats, dict[str, np.ndarray]]:
    """Encode up to `max_tokens` non-special TRAIN tokens; returns the statistics and the token
    arrays of every row read (special rows included, for context windows)."""
    from tqdm import tqdm

    acc = FeatureActivationStats(sae.cfg.d_sae, top_k=top_k)
    rows: dict[str, list[np.ndarray]] = {"token_id": [], "position": [], "doc_id": []}
    offset = 0
    bar = tqdm(total=max_tokens, desc=f"select layer {layer}: encode", disable=not progress, mininterval=1.0)
    for chunk in store.iter_chunks("train", [layer], ENCODE_BATCH, include_special=True, with_tokens=True):
        m = len(chunk["token_id"])
        for key in rows:
            rows[key].append(chunk[key])
        keep = np.flatnonzero(~chunk["special"])[: max_tokens - acc.n]
        if len(keep):
            x = torch.from_numpy(chunk[layer][keep]).to(device)
            with torch.no_grad():
                acts = sae.encode(x)
            acc.update(acts, chunk["token_id"][keep], offset + keep)
            bar.update(len(keep))
        offset += m
        if acc.n >= max_tokens:
            break
    bar.close()
    if acc.n == 0:
        raise FeatureScoreError(f"{store.root}: no non-special TRAIN tokens for layer {layer}")
    return acc, {k: np.concatenate(v) for k, v in rows.items()}


def context_windows(
    acc: FeatureActivationStats,
    rows: dict[str, np.ndarray],
    features: list[int],
    window: int,
    decode: Callable[[int], str],
) -> list[FeatureContext]:
    """Top activating contexts of each feature: ±`window` tokens inside the same sequence, the
    max-activating token marked «like this» in `text`."""
    pos = rows["position"]
    starts = np.flatnonzero(pos == 0)
    n_rows = len(pos)
    out = []
    for f in features:
        contexts = []
        for value, i in acc.top_contexts(f):
            k = int(np.searchsorted(starts, i, side="right")) - 1
            seq_start = int(starts[k]) if k >= 0 else 0
            seq_end = int(starts[k + 1]) if k + 1 < len(starts) else n_rows
            lo, hi = max(seq_start, i - window), min(seq_end, i + window + 1)
            pieces = [decode(int(t)) for t in rows["token_id"][lo:hi]]
            j = i - lo
            text = "".join(pieces[:j]) + "«" + pieces[j] + "»" + "".join(pieces[j + 1 :])
            contexts.append(TokenContext(value, int(rows["doc_id"][i]), int(pos[i]), pieces, j, text))
        out.append(FeatureContext(feature=int(f), contexts=contexts))
    return out


# --------------------------------------------------------------------------------------------
# One layer


@dataclass
class CausalScores:
    """First-order effects of every feature and the exact check of the strongest."""

    effects: np.ndarray  # [d_sae] Δ mean loss, NaN for ineligible features
    clean_loss: float  # mean next-token loss of the unpatched model
    n_loss_tokens: int  # next-token pairs the means are over
    n_sequences: int  # VAL sequences used
    check_ids: list[int]  # features also ablated exactly
    exact: np.ndarray  # their exact Δ mean loss


def causal_scores(
    model: nn.Module,
    sae: Any,
    store: ActivationStore,
    layer: int,
    sp: SelectParams,
    eligible: np.ndarray,
    progress: bool = True,
) -> CausalScores:
    """First-order causal effects on VAL sequences, plus the exact ablation of the strongest few."""
    sequences = read_sequences(store, "val", sp.causal_sequences)
    if not sequences:
        raise FeatureScoreError(f"{store.root}: the VAL split has no sequences for the causal score")
    effects, clean_loss, n_loss = first_order_effects(model, sae, layer, sequences, progress=progress)
    effects = np.where(eligible, effects, np.nan)
    order = np.argsort(-np.nan_to_num(np.abs(effects), nan=-1.0), kind="stable")
    check_ids = [int(f) for f in order[: min(max(0, sp.exact_check), int(eligible.sum()))]]
    exact = exact_effects(model, sae, layer, sequences, check_ids) if check_ids else np.zeros(0)
    return CausalScores(effects, clean_loss, n_loss, len(sequences), check_ids, exact)


def eligible_features(rate: np.ndarray, min_activation_rate: float) -> np.ndarray:
    """Features active often enough to be scored (any activity when the minimum is ≤ 0)."""
    return rate > 0 if min_activation_rate <= 0 else rate >= min_activation_rate


def floats(x: np.ndarray) -> list[float | None]:
    """JSON-ready float64 values, non-finite → None."""
    return json_clean(np.asarray(x, dtype=np.float64))


def score_layer(
    model: nn.Module,
    tokenizer: Any,
    store: ActivationStore,
    sae: Any,
    layer: int,
    sp: SelectParams,
    progress: bool = True,
) -> tuple[FeatureSet, FeatureContexts, SelectReport]:
    """Score, rank and keep one layer's features: the features file, the kept features' contexts,
    and the summary report."""
    device = next(model.parameters()).device
    laps = [time.perf_counter()]
    acc, rows = scan_features(sae, store, layer, sp.max_tokens, sp.top_contexts, device, progress)
    rate = acc.activation_rate()
    eligible = eligible_features(rate, sp.min_activation_rate)
    laps.append(time.perf_counter())
    directions = decoder_directions(sae)
    focus = vocab_focus(model, directions.to(device))
    laps.append(time.perf_counter())
    causal = causal_scores(model, sae, store, layer, sp, eligible, progress)
    laps.append(time.perf_counter())
    metrics = {
        "activation_rate": rate,
        "token_entropy": acc.token_entropy(),
        "vocab_focus": focus,
        "redundancy": acc.redundancy(),
        "causal_effect": causal.effects,
    }
    composite = composite_score(metrics, sp.weights, eligible)
    ranked = rank_features(composite, eligible, rate)
    kept = ranked[: n_keep(sp.keep_fraction, sae.cfg.d_sae, int(eligible.sum()))] if eligible.any() else []
    scores = FeatureScores(**{k: floats(v) for k, v in metrics.items()}, composite=floats(composite))
    features = FeatureSet(layer=layer, ranked=ranked, kept=kept, scores=scores)
    contexts = kept_contexts(model, tokenizer, acc, rows, directions, kept, sp.context_window)
    report = select_report(layer, acc.n, sae.cfg.d_sae, eligible, rate, metrics, kept, causal, laps)
    return features, FeatureContexts(layer=layer, features=contexts), report


def kept_contexts(
    model: nn.Module,
    tokenizer: Any,
    acc: FeatureActivationStats,
    rows: dict[str, np.ndarray],
    directions: torch.Tensor,
    kept: list[int],
    window: int,
) -> list[FeatureContext]:
    """Top activating contexts of the kept features, with the tokens each direction promotes most."""

    def decode(t: int) -> str:
        return tokenizer.decode([t])

    contexts = context_windows(acc, rows, kept, window, decode)
    if kept:
        device = next(model.parameters()).device
        logits = direction_logits(model, directions[kept].to(device))
        top = torch.topk(logits, min(TOP_LOGIT_TOKENS, logits.shape[-1]), dim=-1).indices.cpu().tolist()
        for entry, toks in zip(contexts, top):
            entry.top_logit_tokens = [decode(t) for t in toks]
    return contexts


def select_report(
    layer: int,
    n_scored: int,
    d_sae: int,
    eligible: np.ndarray,
    rate: np.ndarray,
    metrics: dict[str, np.ndarray],
    kept: list[int],
    causal: CausalScores,
    laps: list[float],
) -> SelectReport:
    """The summary of one layer: counts, the first-order-vs-exact check, timings, kept means."""
    ids, exact = causal.check_ids, causal.exact
    first = causal.effects[ids] if ids else np.zeros(0)
    rel_err = np.abs(first - exact) / np.maximum(np.abs(exact), 1e-12) if ids else np.zeros(0)
    kept_arr = np.asarray(kept, dtype=np.int64)
    kept_means = {
        f"kept_mean_{k}": float(np.nanmean(v[kept_arr])) if len(kept_arr) and np.isfinite(v[kept_arr]).any() else None
        for k, v in metrics.items()
    }
    return SelectReport(
        layer=layer,
        n_tokens_scored=n_scored,
        d_sae=d_sae,
        n_eligible=int(eligible.sum()),
        n_kept=len(kept),
        n_dead=int((rate == 0).sum()),
        clean_val_loss=causal.clean_loss,
        n_causal_sequences=causal.n_sequences,
        n_causal_loss_tokens=causal.n_loss_tokens,
        causal_method=CAUSAL_METHOD,
        causal_check=CausalCheck(ids, floats(first) if ids else [], floats(exact), floats(rel_err)),
        causal_check_max_relative_error=float(rel_err.max()) if len(rel_err) else None,
        seconds=SelectSeconds(
            scan=laps[1] - laps[0],
            vocab_focus=laps[2] - laps[1],
            causal=laps[3] - laps[2],
            total=time.perf_counter() - laps[0],
        ),
        **kept_means,
    )
