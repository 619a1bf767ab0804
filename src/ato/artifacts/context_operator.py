"""The context maps of one pair (`ato context` → <paths.context_operators>/<pair>/; read by the causal
splice and by anyone reusing them):

* `context.safetensors`: per kind `<kind>.W` float32 [d_model, p_kind] and `<kind>.b` [d_model]
  (ŷ_t = X_kind,t Wᵀ + b), and `fill` [d_model], the value of an absent input;
* `config.json`: `ContextOperatorConfig` — which d-wide blocks of the stacked inputs each kind reads.

The stacked input of target position t is [x_t, x_{t−1} … x_{t−m}, prefix_t, z_{1,t} … z_{k,t}]
(`ato.math.context.stack_context_inputs`); a kind's X is the concatenation of its blocks in that order.
docs/contracts.md#context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ._io import ArtifactError, Record, atomic_path, read_safetensors

WEIGHTS = "context.safetensors"
CONFIG = "config.json"


@dataclass
class ContextOperatorConfig(Record):
    """What the context maps of one pair read and how they were fitted."""

    FORMAT: ClassVar[str] = "ato-context-operator/1"
    PRODUCER: ClassVar[str] = "context"

    pair: str  # params pair name (L05_k1)
    L: int  # input layer (residual after block L)
    k: int  # target layer L + k (the same position t)
    lags: int  # m: lagged blocks x_{t−1} … x_{t−m}
    d_model: int  # width of every block and of ŷ
    blocks: list[str]  # the union's d-wide input blocks in stacked order: x_t, x_t-1 …, prefix, z_1 …
    kinds: dict[str, list[int]]  # kind → the indices in `blocks` it reads (ascending: its X's column order)
    alphas: dict[str, float]  # kind → ridge α (Optuna on exact validation R²_w)
    absent_inputs: str  # what an input from BOS or before the sequence start is (the `fill` tensor)
    routed_inputs: str  # what z_j is (the pattern of the live forward at splice time)
    n_train_tokens: int  # target tokens (BOS excluded) the maps were fitted on
    store_digest: str  # content digest of the activation store whose token sequences were forwarded
    model_digest: str | None  # sha256 of the prepared model's weights (the store manifest's)
    n_layers: int  # decoder blocks of the model
    equation: str = "ŷ_t = X_kind,t Wᵀ + b; X_kind,t = the kind's blocks of the stacked input, in order"

    def columns(self, kind: str) -> np.ndarray:
        """Column indices of the union's stacked input that `kind` reads."""
        d = self.d_model
        return np.concatenate([np.arange(b * d, (b + 1) * d) for b in self.kinds[kind]])


def write_context_operator(
    directory: str | Path,
    config: ContextOperatorConfig,
    maps: dict[str, tuple[np.ndarray, np.ndarray]],
    fill: np.ndarray,
) -> None:
    """The directory, written whole or not at all (published by one rename, or with the stage's group)."""
    import torch
    from safetensors.torch import save_file

    tensors = {"fill": torch.as_tensor(np.asarray(fill, dtype=np.float32)).contiguous()}
    for kind, (W, b) in maps.items():
        tensors[f"{kind}.W"] = torch.as_tensor(np.asarray(W, dtype=np.float32)).contiguous()
        tensors[f"{kind}.b"] = torch.as_tensor(np.asarray(b, dtype=np.float32)).contiguous()
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": ContextOperatorConfig.FORMAT})
        config.write(tmp / CONFIG)


def read_context_operator(
    directory: str | Path, store_digest: str | None = None
) -> tuple[ContextOperatorConfig, dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """(config, {kind: (W, b)}, fill), float32; every kind's shape checked against its columns."""
    directory = Path(directory)
    config = ContextOperatorConfig.read(directory / CONFIG)
    path = directory / WEIGHTS
    arrays, _ = read_safetensors(path, "context maps; rerun `ato context`", framework="np")
    if store_digest is not None and config.store_digest != store_digest:
        raise ArtifactError(f"{directory / CONFIG}: fitted on another activation store; rerun `ato context`")
    d, maps = config.d_model, {}
    for kind in config.kinds:
        W, b = arrays.get(f"{kind}.W"), arrays.get(f"{kind}.b")
        if W is None or b is None or W.shape != (d, len(config.columns(kind))) or b.shape != (d,):
            raise ArtifactError(f"{path}: {kind}.W / {kind}.b missing or of the wrong shape; rerun `ato context`")
        maps[kind] = (W, b)
    fill = arrays.get("fill")
    if fill is None or fill.shape != (d,):
        raise ArtifactError(f"{path}: `fill` missing or not [{d}]; rerun `ato context`")
    return config, maps, fill
