"""Atlas step 4: causal Δ log-perplexity of every operator (and mean ablation) on `atlas.causal_pairs`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ato.accumulate import BandedGramAccumulator
from ato.atlas.fitting import operators
from ato.causal.conditions import Condition, run_conditions
from ato.causal.inputs import load_sequences, position_mask
from ato.kinds import keys_for
from ato.math.atlas import PairFit
from ato.math.intervals import Interval, delta_interval
from ato.params import AtlasParams
from ato.store import ActivationStore

LOSS_CHUNK_ROWS = 256  # LM-head rows per chunk in the causal passes


REFERENCE = keys_for("atlas_reference")[0]  # train_mean: mean ablation, patched beside the operators for scale


def causal_atlas(
    model: Any,
    store: ActivationStore,
    fits: dict[str, PairFit],
    grams: dict[str, BandedGramAccumulator],
    ap: AtlasParams,
) -> dict[str, dict[str, Interval]]:
    """Δ log-perplexity of every operator (and mean ablation) patched into layer L+k of TEST sequences."""
    if not ap.causal_pairs:
        return {}
    device = next(model.parameters()).device
    held = load_sequences(store, ap.causal_sequences, ap.causal_seq_len, split="test")
    masks = {"all": position_mask("all", ap.causal_seq_len)}
    out = {}
    for name in ap.causal_pairs:
        fit = fits[name]
        mean_y = torch.as_tensor(grams["train"].pair_stats(fit.L, fit.T).mean_y, dtype=torch.float32, device=device)
        conditions = [_linear_condition(op, fit.L, *fit.maps[op], device) for op in operators() if op in fit.maps]
        conditions.append(Condition(REFERENCE, None, _constant(mean_y)))
        results, _ = run_conditions(
            model, held, fit.T, conditions, masks, {"all": "all"}, ap.causal_batch_size, LOSS_CHUNK_ROWS,
            progress=False,
        )  # fmt: skip
        res = results["all"]
        clean, count = res.nll_sum["clean"]["after"], res.count["after"]
        out[name] = {
            c.name: delta_interval(res.nll_sum[c.name]["after"], clean, count, seed=ap.seed) for c in conditions
        }
    return out


def _constant(value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda rows: value.expand(rows.shape[0], -1)


def _linear_condition(name: str, layer_in: int, W: np.ndarray, b: np.ndarray, device: torch.device) -> Condition:
    Wt = torch.as_tensor(W, dtype=torch.float32, device=device)
    bt = torch.as_tensor(b, dtype=torch.float32, device=device)
    return Condition(name, layer_in, lambda x: torch.nn.functional.linear(x, Wt, bt))
