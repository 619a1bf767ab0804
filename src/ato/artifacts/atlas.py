"""The transport atlas (`ato atlas`): every stored layer pair's operators, scores and references.

* `AtlasResult` — reports/atlas/atlas.json: the budget, the seconds per step, and one `AtlasPair`
  per pair (five operators' test R² side by side, causal Δ where measured, η beside its linear
  reference, the held-out subspace size beside its null, and the mean Jacobian beside the ridge map
  as `LocalGlobal` where probed).
* the maps — <paths.atlas>/maps.safetensors: the ridge map of every atlas pair, float32 tensors
  `<pair>.W` [d_out, d_in] and `<pair>.b` [d_out] (ŷ = x Wᵀ + b), with `AtlasMapsMeta` as the one
  metadata key `ato` (for stages that reuse the atlas's maps, e.g. `languages`).

Definitions: docs/method.md#atlas; file layout: docs/contracts.md#atlas.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ._io import ArtifactError, Record, atomic_path, read_safetensors

MAPS_FORMAT = "ato-atlas-maps/1"


@dataclass
class OperatorScore:
    """One operator of an atlas pair: residual R² on the test split and, where measured, its causal Δ."""

    r2: float = math.nan  # R², uniform average over residual dimensions (test)
    r2_weighted: float = math.nan  # 1 − SSE/SST over all dimensions (test)
    causal_delta: float = math.nan  # Δ log-perplexity (nats/token) when layer L+k is patched with it; nan: not run
    causal_low: float = math.nan  # lower end of its 95 % interval over sequences (atlas.causal_* budget)
    causal_high: float = math.nan  # upper end


@dataclass
class LocalGlobal:
    """The mean Jacobian E[J] of blocks L+1…L+k beside the ridge map W, on the probed input subspace V."""

    directions: int  # r = dim V (atlas.jacobian_directions, at most d_model)
    n_probe_tokens: int  # TRAIN tokens the Jacobian is averaged over (BOS excluded)
    w_captured: float  # ‖W V‖²_F / ‖W‖²_F: the share of the ridge map V covers
    rel_diff: float  # ‖(W − E[J]) V‖_F / ‖W V‖_F
    rel_diff_update: float  # ‖(W − E[J]) V‖_F / ‖(W − I) V‖_F: against the computed part only
    rel_diff_total: float  # ‖(W − E[J_total]) V‖_F / ‖W V‖_F, J_total = Σ_s ∂y_t/∂x_s (whole-stream shift)
    alignment: float  # mean cos² of principal angles, top ⌈r/2⌉ left singular subspaces of W V and E[J] V
    alignment_update: float  # the same for (W − I) V and (E[J] − I) V
    alignment_null: float  # its value for random subspaces, ⌈r/2⌉ / d
    token_variation: float  # Σ_v Var_t(J_t v) / ‖E[J] V‖²_F: how much J moves from token to token
    estimate_noise: float  # relative standard error of E[J] V from the two sign draws
    sampling_error: float  # √(token_variation / n): relative error of the token mean (independent tokens)
    linearisation_r2: float  # R²_w of ŷ_t = J_t x_t + c on the probe tokens (per-token linearisation)
    total_linearisation_r2: float  # R²_w of ŷ_t = Σ_s J_ts x_s + c on the probe tokens
    ridge_r2_probe: float  # R²_w of W x + b on the same probe tokens (the global map's reference)
    sv_ridge: list[float] = field(default_factory=list)  # singular values of W V
    sv_jacobian: list[float] = field(default_factory=list)  # singular values of E[J] V
    sv_total: list[float] = field(default_factory=list)  # singular values of E[J_total] V
    n_probe_sequences: int = 0  # TRAIN sequences those tokens come from (the noise's unit)
    sequence_noise: float = math.nan  # ‖SE(E[J] V)‖_F / ‖W V‖_F, sequences as the unit: the noise of rel_diff
    sequences_for_gap: float = math.nan  # sequences at which sequence_noise would be rel_diff / 2 (SE ∝ 1/√n)
    lag_response: list[float] = field(default_factory=list)  # ‖E[J_{t,t−ℓ}] V‖_F / ‖E[J_tt] V‖_F, ℓ = 1 … m
    lag_noise: list[float] = field(default_factory=list)  # its standard error on that scale (sequences as unit)


@dataclass
class AtlasPair:
    """One pair (L, T = L + k) of the atlas."""

    pair: str  # pair name, e.g. L05_k1
    L: int  # input layer
    k: int  # depth of the transport
    T: int  # target layer L + k
    alpha: float  # ridge α (GCV choice, or atlas.alpha)
    alpha_at_edge: bool  # the GCV choice sits at an end of the α grid
    operators: dict[str, OperatorScore]  # identity, procrustes, procrustes_centred, ridge, rrr, jacobian
    gain_over_identity: float  # R²(ridge) − R²(identity), uniform, test
    procrustes_scale: float  # s of the plain scaled-orthogonal map ŷ = s R x
    procrustes_centred_scale: float  # s of the centred one
    orthogonal_procrustes_score: float  # 2‖ÃᵀB̃‖_* − 1, centred, unit-Frobenius rows (train, in sample)
    peer_linearity: float  # Razzhigaev et al.'s score as llm-microscope computes it: in-sample R²_w of OLS (train)
    ceiling: float  # CCA ceiling Σρ²/d_out (train)
    eta_test: float  # whitened R² of the ridge map on test / ceiling
    eta_expected: float  # η(test) an exactly linear map reaches at this n, d, ρ (analytic)
    eta_expected_std: float  # its spread under exact linearity (Wishart; nan when atlas.eta_replicates < 2)
    eta_ratio: float  # eta_test / eta_expected
    heldout_subspace_size: float  # smallest r with subspace_fraction of Σρ⁺² (test ρ, train directions)
    heldout_subspace_size_null: float  # its mean for independent x, y at the same n, d
    heldout_subspace_size_null_std: float  # its spread under the null
    heldout_subspace_size_excess: float  # observed − null mean
    rrr_rank: int  # rank of the reduced-rank operator (the held-out subspace size)
    local: LocalGlobal | None = None  # E[J] beside W where the Jacobian was probed
    # docs/statistics.md#directions; the null is taken at the test token count (no design effect here)
    transport_directions: float = math.nan  # canonical directions whose held-out ρ passes the step-down test
    transport_directions_share: float = math.nan  # their Σρ² (train ρ) over Σρ²: their share of the ceiling


@dataclass
class AtlasBudget:
    """What the atlas was computed from (printed on every figure)."""

    k_max: int  # atlas.k_max
    n_train_tokens: float  # train tokens in the joint Gram (BOS excluded)
    n_test_tokens: float  # test tokens in the joint Gram
    alpha_choice: str  # "gcv" (grid atlas.alpha_min…alpha_max) or "fixed"
    subspace_fraction: float  # atlas.subspace_fraction
    null_replicates: int  # atlas.null_replicates
    jacobian_layers: list[int]  # input layers probed
    jacobian_tokens: int  # TRAIN tokens per probed layer (sequences × (seq_len − 1))
    jacobian_directions: int  # r probed directions (d_model: the whole matrix)
    causal_pairs: list[str]  # pairs patched with every operator
    causal_sequences: int  # TEST sequences per causal pair
    causal_seq_len: int  # tokens per causal sequence

    def label(self) -> str:
        """One line for figure titles."""
        jac = (
            f"E[J] on {len(self.jacobian_layers)} layers, {self.jacobian_tokens} tok, r = {self.jacobian_directions}"
            if self.jacobian_layers
            else "no E[J]"
        )
        causal = (
            f"causal {len(self.causal_pairs)} pair(s) × {self.causal_sequences} seq × {self.causal_seq_len}"
            if self.causal_pairs
            else "no causal"
        )
        return (
            f"budget: {int(self.n_train_tokens)} train / {int(self.n_test_tokens)} test tokens, k ≤ {self.k_max}, "
            f"α {self.alpha_choice}; {jac}; {causal}"
        )


@dataclass
class AtlasResult(Record):
    """The whole atlas (reports/atlas/atlas.json)."""

    FORMAT: ClassVar[str] = "ato-atlas/1"
    PRODUCER: ClassVar[str] = "atlas"

    model: str  # model label
    store_digest: str  # content digest of the activation store
    d_model: int  # residual width
    layers: list[int]  # stored layers in the atlas
    budget: AtlasBudget  # tokens, directions, sequences
    seconds: dict[str, float]  # wall time per step: gram, fit, jacobian, causal, write
    pairs: list[AtlasPair]  # by L, then k

    def pair(self, name: str) -> AtlasPair:
        for p in self.pairs:
            if p.pair == name:
                return p
        raise KeyError(f"pair {name} is not in the atlas")


# --------------------------------------------------------------------------------------------
# The maps


@dataclass
class AtlasMapsMeta:
    """What the maps file was fitted on (safetensors metadata key `ato`)."""

    store_digest: str  # content digest of the activation store
    n_train_tokens: float  # train tokens behind every map
    include_bos: bool  # stats.include_bos
    alpha: dict[str, float]  # pair → ridge α
    format: str = MAPS_FORMAT


def write_atlas_maps(path: str | Path, maps: dict[str, tuple[np.ndarray, np.ndarray]], meta: AtlasMapsMeta) -> None:
    """`<pair>.W`, `<pair>.b` float32 for every pair, written atomically."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, (W, b) in maps.items():
        tensors[f"{name}.W"] = torch.as_tensor(np.asarray(W, dtype=np.float32)).contiguous()
        tensors[f"{name}.b"] = torch.as_tensor(np.asarray(b, dtype=np.float32)).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ato": json.dumps(asdict(meta), sort_keys=True)})


def read_atlas_maps(
    path: str | Path, store_digest: str | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], AtlasMapsMeta]:
    """{pair: (W, b)} as float32 arrays and their metadata; refuses another store's maps."""
    path = Path(path)
    what = "the atlas maps; run `ato atlas`"
    arrays, metadata = read_safetensors(path, what, framework="np")
    try:
        meta = AtlasMapsMeta(**json.loads(metadata.get("ato", "{}")))
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: unreadable metadata ({what}): {exc}") from None
    if meta.format != MAPS_FORMAT:
        raise ArtifactError(f"{path}: format {meta.format!r}, expected {MAPS_FORMAT!r}; run `ato atlas`")
    if store_digest is not None and meta.store_digest != store_digest:
        raise ArtifactError(f"{path}: fitted on another activation store; run `ato atlas`")
    names = sorted({key.rsplit(".", 1)[0] for key in arrays})
    return {name: (arrays[f"{name}.W"], arrays[f"{name}.b"]) for name in names}, meta
