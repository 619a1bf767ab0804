"""Score every feature of one layer's SAE, rank, keep the best (`ato select`; README "Feature selection").

All scores use the SAE's real encoder (`sae.encode`: JumpReLU threshold / TopK), never a plain
ReLU, on TRAIN-split tokens (BOS/special excluded, at most `select.max_tokens`). Definitions and the
scoring rule in `ato.math.features`; the model-dependent parts live here and in `ato.sae.effects`:

- vocab_focus: excess kurtosis of W_U · (N(d_f) − N(0)) with N the model's own final norm module
  (Gemma: x/rms(x)·(1+w); LayerNorm: centring, gain and bias — N(0) removes the bias). Applying N
  to the direction itself is the logit lens of a residual equal to d_f; kurtosis is invariant to
  the scalar 1/rms(·) the norm would apply to a real residual, so the choice of that scalar does
  not matter. The LM head's bias (if any) is ignored: it does not depend on the feature. Computed
  for the eligible features only (the others are never ranked on it).
- causal_effect: exact Δ next-token loss per ablated activation on `select.causal_sequences` VAL
  sequences, for the `select.exact_budget` best candidates by the other criteria (`ato.sae.effects`).
"""

from __future__ import annotations

import dataclasses
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
from ato.artifacts.features import ExactAblation, SelectSeconds
from ato.math.features import (
    CAUSAL,
    FeatureActivationStats,
    Ranking,
    composite_score,
    decoder_redundancy,
    exact_candidates,
    excess_kurtosis,
    n_keep,
    rate_band_score,
    select_ranking,
    zscore,
)
from ato.params import SelectParams
from ato.store import ActivationStore

from .effects import ExactEffects, PoolSequence, decoder_directions, exact_effects
from .errors import FeatureScoreError

ENCODE_BATCH = 4096
SEQUENCE_READ_TOKENS = 2048
TOP_LOGIT_TOKENS = 10
SHORTLIST_FACTOR = 4  # vocabulary focus is computed for the best 4 × max(exact_budget, kept) by the cheap criteria
CAUSAL_METHOD = "exact_single_feature_ablation_kl_per_activation"


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
    from ato.lm_head import lm_head_and_softcap

    norm = final_norm(model)
    w_u = cast(torch.Tensor, lm_head_and_softcap(model)[0].weight)
    d = directions.to(w_u.device, w_u.dtype)
    normed = norm(d[None])[0] - norm(torch.zeros_like(d[:1])[None])[0]
    return normed @ w_u.T


@torch.no_grad()
def vocab_focus(
    model: nn.Module, directions: torch.Tensor, rows: np.ndarray | None = None, chunk: int = 128
) -> np.ndarray:
    """Excess kurtosis of each direction's logit-lens vector; only `rows` (a bool mask) are computed,
    the rest are NaN."""
    out = np.full(len(directions), np.nan)
    ids = np.flatnonzero(rows) if rows is not None else np.arange(len(directions))
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        out[part] = excess_kurtosis(direction_logits(model, directions[part]).float()).cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Store-side scores


def read_pool(store: ActivationStore, split: str, n: int, layer: int) -> list[PoolSequence]:
    """The first `n` sequences of a split with their stored layer-`layer` residuals, BOS included.
    Sequences are stored contiguously; a new one starts where position == 0."""
    parts: dict[str, list[np.ndarray]] = {"token_id": [], "special": [], "position": [], "h": []}
    n_starts = 0
    for chunk in store.iter_chunks(split, [layer], SEQUENCE_READ_TOKENS, include_special=True, with_tokens=True):
        for key in ("token_id", "special", "position"):
            parts[key].append(chunk[key])
        parts["h"].append(chunk[layer])
        n_starts += int((chunk["position"] == 0).sum())
        if n_starts > n:  # the n-th sequence is complete
            break
    if not parts["token_id"]:
        return []
    tok, spec, pos, h = (np.concatenate(parts[k]) for k in ("token_id", "special", "position", "h"))
    starts = [int(s) for s in np.flatnonzero(pos == 0)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, len(tok)]
    pool = [PoolSequence(tok[a:b], spec[a:b], h[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return pool[:n]


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


def eligible_features(rate: np.ndarray, min_activation_rate: float) -> np.ndarray:
    """Features active often enough to be scored (any activity when the minimum is ≤ 0)."""
    return rate > 0 if min_activation_rate <= 0 else rate >= min_activation_rate


def floats(x: np.ndarray) -> list[float | None]:
    """JSON-ready float64 values, non-finite → None."""
    return json_clean(np.asarray(x, dtype=np.float64))


@dataclass
class LayerScores:
    """Everything measured on one layer's features."""

    rate: np.ndarray  # [d_sae] activation rate
    target: float  # mean L0 / d_sae
    band: tuple[float, float]  # absolute rate band
    eligible: np.ndarray  # [d_sae] bool
    metrics: dict[str, np.ndarray]  # criterion → [d_sae] (token_entropy: relative to random tokens)
    entropy: np.ndarray  # [d_sae] raw token entropy (nats)
    ranking: Ranking
    effects: ExactEffects | None  # None when there were no candidates
    n_sequences: int


def causal_effects(
    model: nn.Module, sae: Any, store: ActivationStore, layer: int, sp: SelectParams, candidates: list[int]
) -> tuple[ExactEffects, int]:
    """Exact ablation of the candidates in the pool of the first `select.causal_sequences` VAL sequences."""
    pool = read_pool(store, "val", sp.causal_sequences, layer)
    if not pool:
        raise FeatureScoreError(f"{store.root}: the VAL split has no sequences for the causal effect")
    effects = exact_effects(model, sae, layer, pool, candidates, sp.exact_sequences, sp.causal_horizon)
    return effects, len(pool)


def top_ids(score: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """bool mask of the best `n` entries of `mask` by `score` (ties → lower id)."""
    out = np.zeros(len(mask), dtype=bool)
    out[exact_candidates(score, mask, n)] = True
    return out


def measure_layer(
    model: nn.Module, sae: Any, store: ActivationStore, layer: int, sp: SelectParams, acc: FeatureActivationStats
) -> tuple[LayerScores, list[float]]:
    """Criteria, candidates, exact ablations and ranking of one layer (a funnel: the cheap criteria
    over every eligible feature, vocabulary focus over the shortlist, exact ablation over the
    candidates); the lap times after the vocabulary focus and the causal part."""
    device = next(model.parameters()).device
    rate = acc.activation_rate()
    target = float(rate.mean())  # mean L0 / d_sae
    band = (sp.rate_band[0] * target, sp.rate_band[1] * target)
    eligible = eligible_features(rate, sp.min_activation_rate)
    directions = decoder_directions(sae)
    w = dataclasses.asdict(sp.weights)
    laps = [time.perf_counter()]
    metrics = {
        "rate_band": rate_band_score(rate, target, (sp.rate_band[0], sp.rate_band[1])),
        "token_entropy": acc.token_entropy_ratio(),  # size-fair: raw entropy grows with the count
        "vocab_focus": np.full(len(rate), np.nan),
        "redundancy": decoder_redundancy(directions, rate > 0),
        CAUSAL: np.full(len(rate), np.nan),
    }
    cheap = composite_score(metrics, {k: w[k] for k in ("rate_band", "token_entropy", "redundancy")}, eligible)
    n_short = SHORTLIST_FACTOR * max(sp.exact_budget, n_keep(sp.keep_fraction, len(rate), len(rate)))
    shortlist = top_ids(cheap, eligible, n_short)
    metrics["vocab_focus"] = vocab_focus(model, directions.to(device), shortlist)
    laps.append(time.perf_counter())
    pre = cheap + w["vocab_focus"] * zscore(metrics["vocab_focus"], shortlist)
    candidates = exact_candidates(pre, shortlist, sp.exact_budget)
    effects, n_seq = causal_effects(model, sae, store, layer, sp, candidates) if candidates else (None, 0)
    if effects is not None:
        metrics[CAUSAL][candidates] = effects.per_activation(effects.kl)
    ranking = select_ranking(pre, metrics[CAUSAL], candidates, w[CAUSAL], [shortlist, eligible], rate)
    laps.append(time.perf_counter())
    return LayerScores(rate, target, band, eligible, metrics, acc.token_entropy(), ranking, effects, n_seq), laps


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
    and the summary report (its SAE-reliability fields are the caller's to fill)."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    acc, rows = scan_features(sae, store, layer, sp.max_tokens, sp.top_contexts, device, progress)
    ls, laps = measure_layer(model, sae, store, layer, sp, acc)
    n_eligible = int(ls.eligible.sum())
    kept = ls.ranking.ranked[: n_keep(sp.keep_fraction, sae.cfg.d_sae, n_eligible)] if n_eligible else []
    m = ls.metrics
    scores = FeatureScores(
        activation_rate=floats(ls.rate),
        token_entropy=floats(ls.entropy),
        vocab_focus=floats(m["vocab_focus"]),
        redundancy=floats(m["redundancy"]),
        causal_effect=floats(m[CAUSAL]),
        composite=floats(ls.ranking.composite),
        rate_band=floats(m["rate_band"]),
        token_entropy_ratio=floats(m["token_entropy"]),
    )
    features = FeatureSet(layer=layer, ranked=ls.ranking.ranked, kept=kept, scores=scores)
    contexts = kept_contexts(model, tokenizer, acc, rows, decoder_directions(sae), kept, sp.context_window)
    seconds = SelectSeconds(
        scan=laps[0] - start, vocab_focus=laps[1] - laps[0], causal=laps[2] - laps[1], total=time.perf_counter() - start
    )
    report = select_report(layer, acc.n, sae.cfg.d_sae, ls, kept, seconds)
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


def exact_ablation(candidates: list[int], eff: ExactEffects | None) -> ExactAblation:
    if eff is None:
        return ExactAblation(candidates, [], [], [], [], [])
    return ExactAblation(
        features=candidates,
        n_active=[int(v) for v in eff.n_active],
        n_predictions=[int(v) for v in eff.n_predictions],
        n_sequences=[int(v) for v in eff.n_sequences],
        kl=floats(eff.kl),
        delta_loss=floats(eff.delta_loss),
    )


def _kept_stat(values: np.ndarray, kept: np.ndarray, stat: Callable[[np.ndarray], Any]) -> float | None:
    v = values[kept] if len(kept) else np.zeros(0)
    v = v[np.isfinite(v)]
    return float(stat(v)) if len(v) else None


def select_report(
    layer: int, n_scored: int, d_sae: int, ls: LayerScores, kept: list[int], seconds: SelectSeconds
) -> SelectReport:
    """The summary of one layer: counts, the rate band, the exact ablations, timings, kept statistics."""
    k = np.asarray(kept, dtype=np.int64)
    in_band = (ls.rate >= ls.band[0]) & (ls.rate <= ls.band[1])
    eff = ls.effects
    cands = ls.ranking.candidates
    return SelectReport(
        layer=layer,
        n_tokens_scored=n_scored,
        d_sae=d_sae,
        n_eligible=int(ls.eligible.sum()),
        n_kept=len(kept),
        n_dead=int((ls.rate == 0).sum()),
        target_rate=ls.target,
        rate_band=[ls.band[0], ls.band[1]],
        n_in_band=int((in_band & ls.eligible).sum()),
        clean_val_loss=eff.clean_loss if eff is not None else None,
        n_causal_sequences=ls.n_sequences,
        n_causal_loss_tokens=eff.n_loss_tokens if eff is not None else 0,
        causal_method=CAUSAL_METHOD,
        exact=exact_ablation(cands, eff),
        n_kept_without_exact=len(set(kept) - set(cands)),
        sae_reliable=False,
        sae_gate_failures=[],
        seconds=seconds,
        kept_median_activation_rate=_kept_stat(ls.rate, k, np.median),
        kept_in_band_fraction=_kept_stat(in_band.astype(float), k, np.mean),
        kept_mean_token_entropy=_kept_stat(ls.entropy, k, np.mean),
        kept_mean_token_entropy_ratio=_kept_stat(ls.metrics["token_entropy"], k, np.mean),
        kept_mean_vocab_focus=_kept_stat(ls.metrics["vocab_focus"], k, np.mean),
        kept_mean_redundancy=_kept_stat(ls.metrics["redundancy"], k, np.mean),
        kept_mean_causal_effect=_kept_stat(ls.metrics[CAUSAL], k, np.mean),
    )
