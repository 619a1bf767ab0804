"""The fit of an operator (`ato fit`): the map by `fit.method`, its variants, and their exact scores on
every split from the pair statistics. No files: the stage reads the inputs and saves the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .artifacts.operator import OperatorConfig
from .kinds import parse_variant
from .math.cca import CCA
from .math.ridge import RidgePath, r2_from_stats
from .math.stats import PairStats
from .operators import Operator, operator_variant
from .params import FitParams, Pair, StatsParams

if TYPE_CHECKING:
    from .store import ActivationStore

TUNED_METHODS = ("ridge",)  # methods fitted at the α `ato tune` chose
SCORED = ("train", "val", "test")  # splits every operator and variant is scored on (exactly, from the statistics)


@dataclass
class FitResult:
    """One fitted operator before it is saved: ŷ = x Wᵀ + b, its config.json and its scores."""

    W: np.ndarray  # [d_out, d_in]
    b: np.ndarray  # [d_out]
    config: OperatorConfig  # the operator's config.json
    metrics: dict[str, float] = field(default_factory=dict)  # alpha, train/val/test R² (uniform, weighted)
    variants: dict[str, Operator] = field(default_factory=dict)  # fit.variants, each with config.metrics


def fit_map(
    f: FitParams,
    train: PairStats,
    *,
    tuned_alpha: float | None,
    standardize: bool,
    store: ActivationStore,
    pair: Pair,
    stats: StatsParams,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(W, b, α) by `fit.method`: ridge at `tuned_alpha` (solved in standardised coordinates when
    `standardize`; W is in the original ones), OLS, or lasso / elastic-net by scikit-learn on the
    first `fit.sklearn_subsample` TRAIN rows of the store (read in `stats.chunk_tokens` chunks; the
    `stats` section is read only on that path, so the other methods do not depend on it)."""
    if f.method in TUNED_METHODS:
        if tuned_alpha is None:
            raise ValueError(f"fit.method {f.method}: needs the α chosen by `ato tune`")
        W, b = RidgePath.from_stats(train, standardize).solve(tuned_alpha)
        return W, b, tuned_alpha
    if f.method == "ols":
        W, b = RidgePath.from_stats(train).solve(0.0)
        return W, b, 0.0
    X, Y = training_rows(store, pair, f.sklearn_subsample, stats.chunk_tokens, stats.include_bos)
    W, b = sklearn_fit(X, Y, f)
    return W, b, f.sklearn_alpha


def training_rows(
    store: ActivationStore, pair: Pair, n_rows: int, chunk_tokens: int, include_bos: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The first `n_rows` TRAIN rows (x at layer L, y at L+k) in store order, read chunk by chunk
    only as far as needed."""
    xs, ys, n = [], [], 0
    for chunk in store.iter_chunks("train", [pair.L, pair.target], chunk_tokens, include_special=include_bos):
        xs.append(chunk[pair.L])
        ys.append(chunk[pair.target])
        n += len(xs[-1])
        if n >= n_rows:
            break
    return np.concatenate(xs)[:n_rows], np.concatenate(ys)[:n_rows]


def sklearn_fit(X: np.ndarray, Y: np.ndarray, f: FitParams) -> tuple[np.ndarray, np.ndarray]:
    """Lasso (`fit.method: lasso`) or elastic-net (`elasticnet`, `fit.l1_ratio`) at `fit.sklearn_alpha`
    in scikit-learn's scaling, with its intercept, on unscaled rows: W [d_out, d_in] and b [d_out]."""
    from sklearn.linear_model import ElasticNet, Lasso

    model = (
        Lasso(alpha=f.sklearn_alpha) if f.method == "lasso" else ElasticNet(alpha=f.sklearn_alpha, l1_ratio=f.l1_ratio)
    )
    model.fit(X, Y)
    return model.coef_, model.intercept_


def make_variants(fitted: FitResult, splits: dict[str, PairStats], names: list[str]) -> dict[str, Operator]:
    """Each variant of the fitted map (`ato.operators.operator_variant`), scored on every split as saved (float32)."""
    if not names:
        return {}
    parent = Operator(torch.as_tensor(fitted.W), torch.as_tensor(fitted.b), fitted.config)
    ranked = any(parse_variant(n).rank is not None for n in names)  # every ranked kind shares one CCA
    cca = CCA.from_stats(splits["train"]) if ranked else None
    out: dict[str, Operator] = {}
    for name in names:
        op = operator_variant(parent, splits["train"], name, cca)
        op.config.metrics = scores(op.W.double().numpy(), op.b.double().numpy(), splits)
        out[name] = op
    return out


def scores(W: np.ndarray, b: np.ndarray, splits: dict[str, PairStats]) -> dict[str, float]:
    """`<split>_r2` (uniform average over dimensions) and `<split>_r2_weighted`, exactly."""
    out: dict[str, float] = {}
    for split, s in splits.items():
        r2 = r2_from_stats(s, W, b)
        out[f"{split}_r2"], out[f"{split}_r2_weighted"] = float(r2["r2"]), float(r2["r2_weighted"])
    return out
