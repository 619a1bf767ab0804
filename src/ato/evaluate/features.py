"""Layer T's SAE, its live and its kept features: the directions feature-space R² is measured along,
and which features the SAE's own encoder says are active on the true y (docs/method.md#features)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import FeatureSet
from ato.evaluate.errors import EvaluateError
from ato.math.metrics import (
    unit_directions,
)

SAE_ENCODE_ROWS = 2048  # rows per SAE encode call: bounds the [rows, d_sae] activation buffer


@dataclass
class SaeFeatures:
    """Layer T's SAE and the unit decoder directions of its kept and of its live features."""

    layer: int  # residual layer T
    sae: Any  # sae_lens.SAE, eval mode
    kept: list[int]  # kept feature ids (FeatureSet.kept order)
    directions: np.ndarray  # [d, F] float64 unit decoder directions
    live: list[int]  # every feature active on select's scan of train tokens (kept ones included), by id
    live_directions: np.ndarray  # [d, F_live] float64 unit decoder directions

    @property
    def kept_in_live(self) -> np.ndarray:
        """The column of each kept feature among the live ones."""
        return np.searchsorted(self.live, self.kept)


def load_sae_features(sae_dir: Path, features_path: Path, layer: int, d_model: int) -> SaeFeatures:
    """Layer `layer`'s SAE (`ato.sae.load_sae`) and its kept features; clear errors when they do not fit."""
    from ato.sae import load_sae

    sae = load_sae(sae_dir)
    feature_set = FeatureSet.read(features_path)
    kept = feature_set.kept
    if not kept:
        raise EvaluateError(f"{features_path}: needs a non-empty list `kept` of feature ids")
    if int(sae.cfg.d_in) != d_model:
        raise EvaluateError(f"{sae_dir}: SAE d_in={sae.cfg.d_in} but the store's d_model={d_model}")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in kept if not isinstance(f, int) or not 0 <= f < d_sae]
    if bad:
        raise EvaluateError(f"{features_path}: kept ids {bad[:5]} outside 0..{d_sae - 1} of the layer-{layer} SAE")
    rates = feature_set.scores.activation_rate
    if len(rates) > d_sae:
        raise EvaluateError(f"{features_path}: {len(rates)} activation rates but the layer-{layer} SAE has {d_sae}")
    live = sorted({f for f, rate in enumerate(rates) if rate} | set(kept))  # a dead feature cannot be judged
    try:
        directions = unit_directions(sae.W_dec.detach(), kept)
        live_directions = unit_directions(sae.W_dec.detach(), live)
    except ValueError as exc:
        raise EvaluateError(f"{sae_dir}: {exc}") from None
    return SaeFeatures(layer, sae, [int(f) for f in kept], directions, live, live_directions)


def sae_active(sae: Any, y: np.ndarray, kept: list[int]) -> np.ndarray:
    """[m, F] bool: feature active on the true y according to the SAE's own encode()."""
    import torch

    idx = torch.as_tensor(kept, dtype=torch.long)
    out = np.zeros((len(y), len(kept)), dtype=bool)
    dtype = next(sae.parameters()).dtype
    with torch.inference_mode():
        for start in range(0, len(y), SAE_ENCODE_ROWS):
            rows = torch.as_tensor(y[start : start + SAE_ENCODE_ROWS]).to(dtype)
            out[start : start + len(rows)] = (sae.encode(rows)[:, idx] > 0).cpu().numpy()
    return out
