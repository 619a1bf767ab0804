"""The fits and the budget of `ato context`, from the statistics of the streaming pass
(`ato.context_pass`): per pair and context kind, its sub-statistics of the union's, α tuned on exact
validation R²_w, the map fitted on train; every map scored per test sequence (the bootstrap's unit) on
the kept forward outputs; the learning curve over the nested train fractions; the `ContextBudget`
record and the operator's tensors. The statistics themselves are `ato.math.context`'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .artifacts import ContextBudget, ContextKindScore, ContextOperatorConfig, Estimate
from .artifacts.context import CONTEXT_KINDS
from .context_pass import ContextPair, KeptBatch
from .math import context as cm
from .math.cca import CCA
from .math.learning_curve import extrapolate, subset_sum
from .math.metrics import percentile_interval
from .math.ridge import r2_from_stats, ridge_fit
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


@dataclass
class KindFit:
    """One context kind of one pair, fitted."""

    columns: np.ndarray  # of the union's stacked input
    alpha: float
    W: np.ndarray  # [d, p_kind]
    b: np.ndarray  # [d]
    val_r2_w: float
    test_r2_w: float  # exact, from the test statistics
    curve_n: list[float] = field(default_factory=list)  # train tokens of each nested fraction
    curve_r2_w: list[float] = field(default_factory=list)  # exact test R²_w of the fit on that fraction


LAGGED_PREFIX = "lagged_prefix"  # [x_t, lags, prefix]: fitted for the increments alone, not saved
INCREMENTS = {"lagged": ("ato", "lagged"), "prefix": ("lagged", LAGGED_PREFIX), "routed": (LAGGED_PREFIX, "context")}
# increments added in that order: each is R²_w(with it) − R²_w(without it); together they are `moved`


def kind_columns(kind: str, d: int, lags: int, k: int) -> np.ndarray:
    """A context kind's columns, or the cumulative [x_t, lags, prefix] of the increments."""
    if kind == LAGGED_PREFIX:
        return np.union1d(cm.context_columns("lagged", d, lags, k), cm.context_columns("prefix", d, lags, k))
    return cm.context_columns(kind, d, lags, k)


def block_names(lags: int, k: int) -> list[str]:
    """The union's d-wide input blocks, in stacked order."""
    return ["x_t", *(f"x_t-{lag}" for lag in range(1, lags + 1)), "prefix", *(f"z_{j}" for j in range(1, k + 1))]


def kind_blocks(kind: str, lags: int, k: int) -> list[int]:
    """The block indices a kind reads (from its columns at d = 1)."""
    return [int(c) for c in cm.context_columns(kind, 1, lags, k)]


def fit_kinds(
    slices: Sequence[PairStats], val: PairStats, test: PairStats, d: int, lags: int, k: int, cp: ContextParams
) -> dict[str, KindFit]:
    """Every kind: α by the α search of `ato tune` on exact validation R²_w, the fit on all train slices,
    and the learning curve (the same α refitted on each nested fraction, scored exactly on test)."""
    train = subset_sum(list(slices))
    nested = [subset_sum(list(slices[: j + 1])) for j in range(len(slices))]
    fits = {}
    for kind in (*CONTEXT_KINDS, LAGGED_PREFIX):
        cols = kind_columns(kind, d, lags, k)
        sub = {name: cm.select_inputs(s, cols) for name, s in (("train", train), ("val", val), ("test", test))}
        alpha, W, b, val_r2_w = cm.tune_and_fit(
            sub["train"], sub["val"], cp.alpha_min, cp.alpha_max, cp.n_trials, cp.seed
        )
        fit = KindFit(cols, alpha, W, b, val_r2_w, float(r2_from_stats(sub["test"], W, b)["r2_weighted"]))
        for part in nested:
            if part.n > 0:
                Wf, bf = ridge_fit(cm.select_inputs(part, cols), alpha)
                fit.curve_n.append(part.n)
                fit.curve_r2_w.append(float(r2_from_stats(sub["test"], Wf, bf)["r2_weighted"]))
        fits[kind] = fit
    return fits


@dataclass
class SequenceSums:
    """Per test sequence: what every R²_w and its bootstrap need."""

    n: np.ndarray  # [S] target rows
    sum_y: np.ndarray  # [S, d] Σ y
    sum_y2: np.ndarray  # [S] Σ ‖y‖²
    sse: dict[str, np.ndarray]  # map → [S] Σ ‖y − ŷ‖² (every kind, and "identity": ŷ = x_t)

    def r2_w(self, name: str, chosen: np.ndarray | None = None) -> float:
        """R²_w of a map over the chosen sequences (all by default), SST about their own mean."""
        idx = slice(None) if chosen is None else chosen
        n, sy = self.n[idx].sum(), self.sum_y[idx].sum(0)
        sst = self.sum_y2[idx].sum() - float(sy @ sy) / n
        return float(1 - self.sse[name][idx].sum() / sst)


@torch.no_grad()
def score_sequences(
    kept: Sequence[KeptBatch],
    pair: ContextPair,
    lags: int,
    fits: dict[str, KindFit],
    n_sequences: int,
    device: torch.device,
) -> SequenceSums:
    """Every fitted map and the identity on the kept test batches, summed per sequence (float64)."""
    d = pair.fill.shape[0]
    out = SequenceSums(np.zeros(n_sequences), np.zeros((n_sequences, d)), np.zeros(n_sequences), {})
    maps = {
        kind: (torch.as_tensor(f.W, device=device), torch.as_tensor(f.b, device=device), torch.as_tensor(f.columns))
        for kind, f in fits.items()
    }
    sse = {name: np.zeros(n_sequences) for name in [*fits, "identity"]}
    for batch in kept:
        rows = batch.rows(pair, lags, device)
        x, y = rows.x.double(), rows.y.double()
        seq = torch.as_tensor(batch.sequences, device=device)[rows.row_sequence].cpu().numpy()
        np.add.at(out.n, seq, 1)
        np.add.at(out.sum_y, seq, y.cpu().numpy())
        np.add.at(out.sum_y2, seq, (y * y).sum(1).cpu().numpy())
        np.add.at(sse["identity"], seq, ((y - x[:, :d]) ** 2).sum(1).cpu().numpy())
        for kind, (W, b, cols) in maps.items():
            residual = y - x[:, cols.to(device)] @ W.T - b
            np.add.at(sse[kind], seq, (residual * residual).sum(1).cpu().numpy())
    out.sse = sse
    return out


def ceilings(union_train: PairStats, d: int, lags: int, k: int) -> tuple[float, float]:
    """(CCA ceiling of x_t alone, of every context input), on train as `PairMetrics.ceiling_full`."""
    same = CCA.from_stats(cm.select_inputs(union_train, cm.context_columns("ato", d, lags, k)))
    union = CCA.from_stats(union_train)
    return float(same.ceiling()), float(union.ceiling())


def operator_config(
    pair: ContextPair, d: int, lags: int, fits: dict[str, KindFit], n_train: int, store_digest: str,
    model_digest: str | None, n_layers: int,
) -> ContextOperatorConfig:  # fmt: skip
    return ContextOperatorConfig(
        pair=pair.name,
        L=pair.L,
        k=pair.k,
        lags=lags,
        d_model=d,
        blocks=block_names(lags, pair.k),
        kinds={kind: kind_blocks(kind, lags, pair.k) for kind in fits},
        alphas={kind: f.alpha for kind, f in fits.items()},
        absent_inputs=BOS_INPUTS,
        routed_inputs=ROUTED_INPUTS,
        n_train_tokens=n_train,
        store_digest=store_digest,
        model_digest=model_digest,
        n_layers=n_layers,
    )


def kind_score(fit: KindFit, n_train: float, r2_w: Estimate) -> ContextKindScore:
    p = len(fit.columns)
    return ContextKindScore(p=p, p_over_n=p / n_train, alpha=fit.alpha, r2_w=r2_w, val_r2_w=fit.val_r2_w)


def empty_budget(pair: ContextPair, lags: int) -> ContextBudget:
    """A budget with its identity filled and every number still NaN (the caller fills them)."""
    return ContextBudget(
        pair=pair.name, L=pair.L, k=pair.k, lags=lags, n_train=0, n_val=0, n_test=0, n_docs_test=0, interval="",
        kinds={}, identity_r2_w=float("nan"), carried=Estimate(), moved=Estimate(), computed=Estimate(),
        bos_inputs=BOS_INPUTS,
    )  # fmt: skip


def bootstrap_r2_w(sums: SequenceSums, resamples: int, seed: int) -> dict[str, np.ndarray]:
    """map → [resamples] R²_w over test sequences drawn with replacement (the same draws for every map,
    so differences of maps are paired)."""
    S = len(sums.n)
    draws = np.random.default_rng(seed).integers(0, S, size=(resamples, S))
    counts = np.stack([np.bincount(row, minlength=S) for row in draws]).astype(np.float64)  # [B, S]
    n, sy = counts @ sums.n, counts @ sums.sum_y
    sst = counts @ sums.sum_y2 - np.einsum("bd,bd->b", sy, sy) / n
    return {name: 1 - (counts @ sse) / sst for name, sse in sums.sse.items()}


def estimate(value: float, samples: np.ndarray, level: float, extrapolated: float) -> Estimate:
    """Percentile interval of the bootstrap `samples`; the extrapolated value's interval is the same
    test-sampling spread around it (the curve's own spread over train fractions is not resampled)."""
    low, high = (float(v) for v in percentile_interval(samples, level))
    return Estimate(value, low, high, extrapolated, extrapolated - (value - low), extrapolated + (high - value))


def budget_record(
    pair: ContextPair, fits: dict[str, KindFit], sums: SequenceSums, n_tokens: dict[str, int], n_docs_test: int,
    cp: ContextParams,
) -> ContextBudget:  # fmt: skip
    """The pair's `ContextBudget`: every kind's R²_w and the three shares, with intervals over test
    sequences and learning-curve extrapolations."""
    boot = bootstrap_r2_w(sums, cp.bootstrap_resamples, cp.bootstrap_seed)
    r2 = {name: sums.r2_w(name) for name in sums.sse}
    extra = {kind: extrapolate(np.asarray(f.curve_n), np.asarray(f.curve_r2_w)) for kind, f in fits.items()}

    def diff(hi: str, lo: str) -> Estimate:
        return estimate(r2[hi] - r2[lo], boot[hi] - boot[lo], cp.level, extra[hi] - extra[lo])

    n_train = n_tokens["train"]
    budget = empty_budget(pair, cp.lags)
    budget.n_train, budget.n_val, budget.n_test, budget.n_docs_test = (
        n_train,
        n_tokens["val"],
        n_tokens["test"],
        n_docs_test,
    )
    budget.interval = (
        f"percentile, document bootstrap over the {n_docs_test} test sequences, {cp.bootstrap_resamples} resamples "
        f"(paired across maps), level {cp.level}; extrapolated: linear in 1/n over train fractions "
        f"{cp.curve_fractions}, interval = the test bootstrap's spread around it"
    )
    budget.kinds = {
        kind: kind_score(fits[kind], n_train, estimate(r2[kind], boot[kind], cp.level, extra[kind]))
        for kind in CONTEXT_KINDS
    }
    budget.identity_r2_w = r2["identity"]
    budget.carried = budget.kinds["ato"].r2_w
    budget.moved = diff("context", "ato")
    budget.computed = estimate(1 - r2["context"], 1 - boot["context"], cp.level, 1 - extra["context"])
    budget.increments = {name: diff(hi, lo) for name, (lo, hi) in INCREMENTS.items()}
    return budget


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
