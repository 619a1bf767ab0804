"""Causal: a language's text patched with the English operator, its own map, and mean ablation
(`ato.causal.run_conditions`), Δ log-perplexity and the recovered share with intervals over sequences."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ato.accumulate import LayerPairs
from ato.artifacts import (
    IntervalScore,
)
from ato.causal.conditions import Condition, run_conditions
from ato.causal.inputs import HeldOut, position_mask
from ato.causal.summary import LEVEL
from ato.corpus import TokenSequence
from ato.kinds import keys_for
from ato.languages.inputs import Inputs, Map, Text
from ato.languages.maps import PairFits
from ato.languages.streams import HalfStats
from ato.math.intervals import Interval, delta_interval, recovered_interval
from ato.params import Params


def causal_conditions() -> tuple[str, ...]:
    """operator, own, mean (`ato.kinds`, asked at each use): per pair; "mean" (ȳ of the language's fit
    rows) per target."""
    return keys_for("languages_causal")


def held_out(seqs: list[TokenSequence]) -> HeldOut:
    """`ato.causal.HeldOut` of equally long BOS-led sequences (offsets: their index)."""
    return HeldOut(
        tokens=torch.tensor([s.token_ids for s in seqs], dtype=torch.long),
        special=torch.tensor([s.special for s in seqs], dtype=torch.bool),
        offsets=list(range(len(seqs))),
        doc_ids=[int(s.doc_ids[0]) for s in seqs],
    )


def _linear(W: np.ndarray, b: np.ndarray, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    Wt = torch.as_tensor(W, dtype=torch.float32, device=device)
    bt = torch.as_tensor(b, dtype=torch.float32, device=device)
    return lambda x: torch.nn.functional.linear(x, Wt, bt)


def _constant(value: np.ndarray, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    return lambda x: v.expand(x.shape[0], -1)


def causal_sums(
    model: Any,
    held: HeldOut,
    pairs: LayerPairs,
    maps: dict[str, dict[str, Map]],
    means: dict[int, np.ndarray],
    batch_size: int,
    chunk_rows: int,
    own: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Per pair: per-sequence NLL sums of clean and of every `causal_conditions()` patch (residual L+k at
    every position but BOS; "own" only with `own`), over the predictions at/after the first patched
    position, and their token counts ("count"). One traced forward per target layer and batch serves
    its pairs (`ato.causal.run_conditions`); the clean loss is computed once."""
    preds = ("operator", "own") if own else ("operator",)
    device = next(model.parameters()).device
    seq_len = int(held.tokens.shape[1])
    masks, specs = {"all": position_mask("all", seq_len)}, {"all": "all"}
    out: dict[str, dict[str, np.ndarray]] = {}
    clean = None
    for T in sorted({t for _L, t in pairs.values()}):
        names = [name for name, (_L, t) in pairs.items() if t == T]
        conditions = [Condition("mean", None, _constant(means[T], device))]
        conditions += [
            Condition(f"{name}/{pred}", pairs[name][0], _linear(*maps[name][pred], device))
            for name in names
            for pred in preds
        ]
        results, clean = run_conditions(
            model, held, T, conditions, masks, specs, batch_size, chunk_rows, clean_nll=clean
        )
        res = results["all"]
        for name in names:
            out[name] = {
                "clean": _after(res.nll_sum["clean"]),
                "mean": _after(res.nll_sum["mean"]),
                "count": _after(res.count),
                **{pred: _after(res.nll_sum[f"{name}/{pred}"]) for pred in preds},
            }
    return out


def _after(by_scope: dict[str, Any]) -> np.ndarray:
    return np.asarray(by_scope["after"], dtype=np.float64)


def language_causal(
    params: Params, inputs: Inputs, fit: HalfStats, text: Text, fits: dict[str, PairFits], lang: str
) -> dict[str, dict[str, np.ndarray]]:
    """Per-sequence NLL sums of the causal check on this language's sequences."""
    maps = {name: {"operator": inputs.operators[name], "own": fits[name].own[lang]} for name in inputs.pairs}
    means = {T: fit.pair(name)[0].mean_y for name, (_L, T) in inputs.pairs.items()}
    cp = params.causal
    return causal_sums(
        inputs.model,
        held_out(text.causal),
        inputs.pairs,
        maps,
        means,
        params.languages.batch_size,
        cp.loss_chunk_tokens,
        params.languages.causal_own,
    )


def _interval(iv: Interval) -> IntervalScore:
    return IntervalScore(iv.estimate, iv.low, iv.high, iv.half_width)


def causal_scores(sums: dict[str, np.ndarray], params: Params) -> dict[str, Any]:
    cp = params.causal
    kw: dict[str, Any] = {"level": LEVEL, "method": cp.interval, "n_resamples": cp.bootstrap_resamples, "seed": cp.seed}
    clean, count = sums["clean"], sums["count"]
    rec = recovered_interval(sums["operator"], sums["mean"], clean, **kw)
    missing = IntervalScore(math.nan, math.nan, math.nan, math.nan)  # the own map unpatched (languages.causal_own)
    return {
        **{
            f"delta_{c}": _interval(delta_interval(sums[c], clean, count, **kw)) if c in sums else missing
            for c in ("operator", "own", "mean")
        },
        "recovered": _interval(rec),
        "recovered_bounded": math.isfinite(rec.low) and math.isfinite(rec.high),
    }
