"""The fits and the budget of `ato context`, from the statistics of the streaming pass
(`ato.context_pass`): per pair and map (every context kind, and [x_t, lags, prefix] for the increments),
its sub-statistics of the union's, α tuned on exact validation R²_w as `ato tune` searches, the map fitted
on train, refitted on each nested train fraction for the learning curve; every map scored per test
sequence (the bootstrap's unit) on the kept forward outputs; the `ContextBudget` record and the
operator's config. The math is `ato.math.context`'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .artifacts import ContextBudget, ContextKindScore, ContextOperatorConfig, Estimate
from .artifacts.context import CONTEXT_KINDS
from .context_pass import ContextPair, KeptBatch
from .math import context as cm
from .math.learning_curve import subset_sum
from .math.stats import PairStats
from .params import ContextParams

BOS_INPUTS = (
    "BOS is never a target. An input from BOS or from before the sequence start (x_{t−ℓ} with t − ℓ ≤ 0; the "
    "prefix mean at t = 1, which is empty) is absent and takes `fill`, the train mean of layer L's non-BOS "
    "rows (zero after centring): BOS's ~1e4-norm residual never enters a lagged or prefix input. The routed "
    "inputs include BOS exactly as the model's attention does (after the block's input norm BOS's row is "
    "bounded)."
)
ROUTED_INPUTS = (
    "z_j = o_proj(A_{L+j} · v_proj(input_layernorm_{L+j}(x_L))): block L+j's own attention pattern of the "
    "same forward (fixed), applied to layer L's residuals at positions s ≤ t; at splice time, the live forward's"
)
LAGGED_PREFIX = "lagged_prefix"  # [x_t, lags, prefix]: fitted for the budget's increments, not saved


@dataclass
class KindFit:
    """One map of one pair, fitted."""

    columns: np.ndarray  # of the union's stacked input
    alpha: float
    W: np.ndarray  # [d, p_kind]
    b: np.ndarray  # [d]
    val_r2_w: float = float("nan")
    ceiling: float = float("nan")  # CCA ceiling of the kind's inputs on train
    curve: cm.KindCurve | None = None  # the learning curve over the nested train fractions


def kind_columns(kind: str, d: int, lags: int, k: int) -> np.ndarray:
    """A context kind's columns, or the cumulative [x_t, lags, prefix] of the increments."""
    if kind == LAGGED_PREFIX:
        return np.union1d(cm.context_columns("lagged", d, lags, k), cm.context_columns("prefix", d, lags, k))
    return cm.context_columns(kind, d, lags, k)


def block_names(lags: int, k: int) -> list[str]:
    """The union's d-wide input blocks, in stacked order."""
    return ["x_t", *(f"x_t-{lag}" for lag in range(1, lags + 1)), "prefix", *(f"z_{j}" for j in range(1, k + 1))]


def fit_kinds(
    slices: Sequence[PairStats], val: PairStats, test: PairStats, d: int, lags: int, k: int, cp: ContextParams
) -> dict[str, KindFit]:
    """Every map of `cm.FITTED_KINDS`: α and the fit (`cm.tune_and_fit`) on all train slices, and its
    learning curve (`cm.nested_curve`: the same α refitted on each nested fraction, scored on test)."""
    train = subset_sum(list(slices))
    fits = {}
    for kind in cm.FITTED_KINDS:
        cols = kind_columns(kind, d, lags, k)
        tuned = cm.tune_and_fit(cm.select_inputs(train, cols), cm.select_inputs(val, cols), cp.alpha_min,
                                cp.alpha_max, cp.n_trials, cp.seed)  # fmt: skip
        curve = cm.nested_curve(slices, test, cols, tuned.alpha, full=(tuned.W, tuned.b))
        fits[kind] = KindFit(cols, tuned.alpha, tuned.W, tuned.b, tuned.val_r2_w, tuned.ceiling, curve)
    return fits


@torch.no_grad()
def score_sequences(
    kept: Sequence[KeptBatch], pair: ContextPair, lags: int, fits: dict[str, KindFit], n_sequences: int,
    shift: np.ndarray, device: torch.device,
) -> cm.SequenceSums:  # fmt: skip
    """Every fitted map and the identity (ŷ = x_t) on the kept test batches, summed per sequence in float64;
    y is shifted by `shift` (the train mean of y: no R²_w changes, float64 keeps its digits)."""
    d = len(shift)
    out = cm.SequenceSums(np.zeros(n_sequences), np.zeros((n_sequences, d)), np.zeros(n_sequences))
    maps = {kind: (torch.as_tensor(f.W, device=device), torch.as_tensor(f.b, device=device),
                   torch.as_tensor(f.columns, device=device)) for kind, f in fits.items()}  # fmt: skip
    sse = {name: np.zeros(n_sequences) for name in [*fits, "identity"]}
    centre = torch.as_tensor(shift, dtype=torch.float64, device=device)
    for batch in kept:
        rows = batch.rows(pair, lags, device)
        x, y = rows.x.double(), rows.y.double()
        seq = torch.as_tensor(batch.sequences, device=device)[rows.row_sequence].cpu().numpy()
        np.add.at(out.n, seq, 1)
        np.add.at(out.sum_y, seq, (y - centre).cpu().numpy())
        _add_squares(out.sum_y2, seq, y - centre)
        _add_squares(sse["identity"], seq, y - x[:, :d])
        for kind, (W, b, cols) in maps.items():
            _add_squares(sse[kind], seq, y - x[:, cols] @ W.T - b)
    out.sse = sse
    return out


def _add_squares(target: np.ndarray, sequence: np.ndarray, rows: torch.Tensor) -> None:
    """target[sequence[i]] += ‖rows[i]‖² for every row."""
    np.add.at(target, sequence, (rows * rows).sum(1).cpu().numpy())


def operator_config(
    pair: ContextPair, d: int, lags: int, fits: dict[str, KindFit], n_train: int, store_digest: str,
    model_digest: str | None, n_layers: int,
) -> ContextOperatorConfig:  # fmt: skip
    """The saved kinds (CONTEXT_KINDS) and the blocks each reads."""
    return ContextOperatorConfig(
        pair=pair.name, L=pair.L, k=pair.k, lags=lags, d_model=d, blocks=block_names(lags, pair.k),
        kinds={kind: [int(c) for c in kind_columns(kind, 1, lags, pair.k)] for kind in CONTEXT_KINDS},
        alphas={kind: fits[kind].alpha for kind in CONTEXT_KINDS}, absent_inputs=BOS_INPUTS,
        routed_inputs=ROUTED_INPUTS, n_train_tokens=n_train, store_digest=store_digest, model_digest=model_digest,
        n_layers=n_layers,
    )  # fmt: skip


def budget_record(
    pair: ContextPair, fits: dict[str, KindFit], sums: cm.SequenceSums, n_tokens: dict[str, int], cp: ContextParams
) -> ContextBudget:
    """The pair's `ContextBudget`: every value with its interval over test
    sequences and its learning-curve extrapolation (`cm.context_budget`)."""
    curves = {kind: f.curve for kind, f in fits.items() if f.curve is not None}
    est = cm.context_budget(sums, curves, cp.bootstrap_resamples, cp.bootstrap_seed, cp.level, cp.interval)
    e = {name: Estimate(**asdict(share)) for name, share in (est.r2_w | est.shares).items()}
    n_train = n_tokens["train"]
    kinds = {
        kind: ContextKindScore(p=len(fits[kind].columns), p_over_n=len(fits[kind].columns) / n_train,
                               alpha=fits[kind].alpha, r2_w=e[kind], val_r2_w=fits[kind].val_r2_w)
        for kind in CONTEXT_KINDS
    }  # fmt: skip
    return ContextBudget(
        pair=pair.name, L=pair.L, k=pair.k, lags=cp.lags, n_train=n_train, n_val=n_tokens["val"],
        n_test=n_tokens["test"], n_docs_test=len(sums.n), interval=est.interval, kinds=kinds,
        identity_r2_w=e["identity"].value, carried=e["carried"], moved=e["moved"], computed=e["computed"],
        increments={name: e[f"increment_{name}"] for name, _, _ in cm.INCREMENT_PATH}, bos_inputs=BOS_INPUTS,
        ceiling_same=fits["ato"].ceiling, ceiling_context=fits["context"].ceiling,
    )  # fmt: skip


def budget_metrics(budget: ContextBudget) -> dict[str, float]:
    """The budget's numbers under `context_` names (MLflow: the pair run's own `r2` … keep theirs)."""
    out = {"context_identity_r2_w": budget.identity_r2_w}
    for share in ("carried", "moved", "computed"):
        e = getattr(budget, share)
        out |= {f"context_{share}": e.value, f"context_{share}_low": e.low, f"context_{share}_high": e.high,
                f"context_{share}_extrapolated": e.extrapolated}  # fmt: skip
    for name, e in budget.increments.items():
        out[f"context_increment_{name}"] = e.value
    for kind, score in budget.kinds.items():
        out |= {f"context_{kind}_r2_w": score.r2_w.value, f"context_{kind}_alpha": score.alpha,
                f"context_{kind}_p_over_n": score.p_over_n}  # fmt: skip
    out["context_ceiling_same"], out["context_ceiling_context"] = budget.ceiling_same, budget.ceiling_context
    return out
