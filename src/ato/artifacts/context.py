"""The carried / moved / computed budget of one pair (`ato context` → reports/context/<pair>.json), and
the three-way reading of each judged SAE feature across map kinds (docs/method.md#context).

Every share is on the variance-weighted R² scale of the test split (R²_w = 1 − SSE/SST over all
dimensions). The context maps read layer L of the same sequence at positions s ≤ t only:
- `ato`: W₀ x_t + b (the same-position operator, refitted here on the same tokens: `carried`);
- `lagged`: + Σ_{ℓ=1..m} W_ℓ x_{t−ℓ};
- `prefix`: + W_p · mean_{0<s<t} x_s;
- `routed`: + Σ_j W_j z_{j,t}, z_j = block L+j's attention (its clean pattern, fixed) applied to x_L;
- `context`: all of them together (the best context map; `moved` = its R²_w − the ATO's).
File layout: docs/contracts.md#context."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ._io import Record

CONTEXT_KINDS = ("ato", "lagged", "prefix", "routed", "context")  # file order; `context` = the union
BUDGET_SHARES = ("carried", "moved", "computed")  # sum to 1 (up to the identity's offset: none)


@dataclass
class Estimate:
    """A number on the test split with its interval and learning-curve extrapolation."""

    value: float = math.nan  # observed on the test split
    low: float = math.nan  # interval, lower end (ContextBudget.interval says how)
    high: float = math.nan  # interval, upper end
    extrapolated: float = math.nan  # learning curve, n_train → ∞ (linear in 1/n over nested train fractions)
    extrapolated_low: float = math.nan  # its interval, lower end
    extrapolated_high: float = math.nan  # its interval, upper end


@dataclass
class ContextKindScore:
    """One context map kind of one pair."""

    p: int  # inputs per target dimension (d × number of stacked blocks)
    p_over_n: float  # p / train tokens: how much of a gain may be finite-sample
    alpha: float  # ridge α, tuned on exact validation R²_w (Optuna, as `ato tune`)
    r2_w: Estimate  # test R²_w of the map
    val_r2_w: float = math.nan  # validation R²_w at the tuned α


@dataclass
class ContextFeatureVerdicts:
    """Every judged SAE latent of layer L + k (as `TransportVerdicts`' live ones), read across kinds with
    the interval rule of evaluate: a kind reaches the threshold when its feature-R² interval lies wholly
    ≥ evaluate.transported_r2."""

    features: list[int] = field(default_factory=list)  # latent ids
    verdict: list[str] = field(default_factory=list)  # transported | moved | synthesised | undetermined
    by: list[str] = field(default_factory=list)  # moved: the first context kind (file order) reaching it; else ""
    ato_r2: list[float | None] = field(default_factory=list)  # the ATO's feature R² (test)
    context_r2: list[float | None] = field(default_factory=list)  # the union map's feature R² (test)
    context_r2_low: list[float | None] = field(default_factory=list)  # its interval, lower end
    context_r2_high: list[float | None] = field(default_factory=list)  # its interval, upper end


@dataclass
class LaggedJacobian:
    """The model's lagged mean Jacobians E[∂y_t/∂x_{t−ℓ}] (random-sign jvps, `ato.math.jacobian`) beside
    the lagged map's slopes W_ℓ, their right counterpart by Stein's lemma with positions, on the top input
    directions V of the lagged map (docs/method.md#atlas)."""

    directions: int = 0  # r = dim V: top right singular vectors of [W_0; W_1; …; W_m] (lagged map)
    sequences: int = 0  # TRAIN sequences averaged over (context.jacobian_sequences): the noise's unit
    tokens: int = 0  # their tokens t (BOS excluded) at lag 0
    rel_diff: list[float] = field(default_factory=list)  # per ℓ = 0 … m: ‖(W_ℓ − E[J_{t,t−ℓ}])V‖_F / ‖W_ℓ V‖_F
    noise: list[float] = field(default_factory=list)  # per ℓ: ‖SE(E[J_{t,t−ℓ}] V)‖_F / ‖W_ℓ V‖_F, sequences as unit
    ato_rel_diff: float = math.nan  # ‖(W − E[J_tt])V‖_F / ‖W V‖_F for the same-position map (`ato` kind)
    ato_noise: float = math.nan  # its noise, as `noise`
    seconds: float = math.nan  # wall time of the probe (trace + jvps) for this pair


@dataclass
class ContextBudget(Record):
    """One pair's budget: what the ATO carries, what context maps add, what no linear map explains."""

    FORMAT: ClassVar[str] = "ato-context/1"
    PRODUCER: ClassVar[str] = "context"

    pair: str  # params pair name (L05_k1)
    L: int  # input layer (residual after block L)
    k: int  # target layer L + k
    lags: int  # m: lagged inputs x_{t−1} … x_{t−m}
    n_train: int  # target tokens (BOS excluded) the maps are fitted on
    n_val: int  # … α is tuned on
    n_test: int  # … every share is scored on
    n_docs_test: int  # test sequences (the bootstrap's resampling unit)
    interval: str  # how every Estimate's interval was computed: method, resamples, level
    kinds: dict[str, ContextKindScore]  # by CONTEXT_KINDS name
    identity_r2_w: float  # R²_w of ŷ = x_t (pure carry-over), for scale
    carried: Estimate  # R²_w(ato)
    moved: Estimate  # R²_w(context) − R²_w(ato)
    computed: Estimate  # 1 − R²_w(context)
    increments: dict[str, Estimate] = field(default_factory=dict)  # lagged, prefix, routed: added in that order
    ceiling_same: float = math.nan  # CCA ceiling of inputs x_t alone (as PairMetrics.ceiling_full)
    ceiling_context: float = math.nan  # … of every context input: the bound of any map linear in them
    bos_inputs: str = ""  # how BOS and positions before the sequence start enter as inputs
    features: ContextFeatureVerdicts = field(default_factory=ContextFeatureVerdicts)  # empty: SAE not run
    jacobian: LaggedJacobian = field(default_factory=LaggedJacobian)  # W_ℓ beside E[J_{t,t−ℓ}]; empty: not probed
