"""The CCA ceiling, η and the subspace size of one pair, each beside its reference, and the number of
canonical directions that carry transport (docs/statistics.md#heldout, #effective-n, #directions)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ato.evaluate.errors import EvaluateError
from ato.math.cca import CCA, efficiency_table, rank_grid
from ato.math.design_effect import DesignEffectAccumulator, DesignEffects, effective_n
from ato.math.directions import DocumentProjectionSums, TransportDirections, transport_directions
from ato.math.heldout import (
    CCANull,
    HeldOutCCA,
    SubspaceReport,
    cca_null,
    heldout_from_cca,
    rank_zero_r2,
    shift_removed_table,
    subspace_report,
)
from ato.math.learning_curve import FRACTIONS, LearningCurve, learning_curve
from ato.math.linear_reference import LinearReference, linear_reference
from ato.math.stats import PairStats
from ato.params import EvaluateParams


@dataclass
class Transport:
    """What the train and test statistics say about linear transport for one pair (docs/statistics.md#heldout)."""

    cca: CCA  # train canonical correlations (pseudo-inverse whitening: a true in-sample bound)
    table: dict[str, np.ndarray]  # `efficiency_table` + `shift_removed_table` columns, one entry per swept rank
    heldout: HeldOutCCA  # train directions, correlations measured on test
    subspace: SubspaceReport  # held-out / in-sample PR and subspace size beside the Wishart null
    linear: LinearReference  # η(test) beside η_expected of an exactly linear map (at the effective n)
    linear_iid: LinearReference  # the same at the token count, as if tokens were independent
    linear_sandwich: LinearReference  # the same at n_eff / κ: heteroscedastic error (the sandwich form)
    design: DesignEffects  # documents make tokens dependent: n_eff = n / deff for the Wishart references
    directions: TransportDirections  # directions whose held-out ρ passes the step-down test at n_eff
    curve: LearningCurve  # η and R²_w on nested train subsets, extrapolated to n → ∞


@functools.lru_cache(maxsize=4)
def shared_null(
    n_train: int, n_test: int, d_in: int, d_out: int, fraction: float, replicates: int, seed: int
) -> CCANull:
    """`cca_null`, simulated once per process for each set of sizes (pairs of one store share n and d)."""
    return cca_null(n_train, n_test, d_in, d_out, fraction, replicates, seed)


TestChunks = Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (x_L, y_L+k, document id) per chunk


def transport(
    train: PairStats,
    test: PairStats,
    W: np.ndarray,
    b: np.ndarray,
    ev: EvaluateParams,
    test_chunks: TestChunks,
    train_blocks: list[PairStats],
    alpha: float,
) -> Transport:
    """Ceiling, rank sweep (raw and without the mean shift), held-out subspace vs null, η vs linear
    reference; the Wishart references at the effective sample size that `test_chunks` (the test
    split's tokens, in store order) give (docs/statistics.md#effective-n); the learning curve of the
    ridge map (α) over `train_blocks`, the train split's document blocks (docs/statistics.md#learning-curve)."""
    streamed = sum(block.n for block in train_blocks)
    if streamed != train.n:
        raise EvaluateError(
            f"the train split streams {int(streamed)} tokens but its statistics have {int(train.n)}; rerun `ato stats`"
        )
    if ev.null_replicates < 1:
        raise EvaluateError(f"evaluate.null_replicates: must be at least 1, got {ev.null_replicates}")
    cca = CCA.from_stats(train)
    ranks = rank_grid(min(cca.d_in, cca.d_out), ev.n_ranks)
    table = efficiency_table(cca, W, train, test, ranks)
    table.update(shift_removed_table(table, rank_zero_r2(cca, train), rank_zero_r2(cca, test)))
    heldout = heldout_from_cca(cca, test)
    ceiling = float(cca.ceiling())
    eta_test = float(cca.whitened_r2(test, W, b)) / ceiling if ceiling > 0 else float("nan")
    acc = DesignEffectAccumulator(W, b, cca.wy, cca.wx, test.mean_x, test.mean_y)
    documents = DocumentProjectionSums(heldout, cca.mean_x, cca.mean_y)
    for x, y, groups in test_chunks:
        acc.add(x, y, groups)
        documents.add(x, y, groups)
    design = acc.result()
    null_sizes = (effective_n(train.n, design.null), effective_n(test.n, design.null), cca.d_in, cca.d_out)
    eta_sizes = (effective_n(train.n, design.score), effective_n(test.n, design.r2), cca.d_in, cca.d_out)
    iid_sizes = (int(train.n), int(test.n), cca.d_in, cca.d_out)
    # Many medium-sized (d_in + d_out)³ draws and decompositions: on the shared 2-core machine the
    # 8-replicate null at d = 640 took 4.6 s on one BLAS thread and 59 s on two fighting over a busy core.
    with threadpool_limits(limits=1, user_api="blas"):
        null = shared_null(*null_sizes, ev.subspace_fraction, ev.null_replicates, ev.null_seed)
        linear = linear_reference(eta_test, cca.rho, *eta_sizes, replicates=ev.null_replicates, seed=ev.null_seed)
    linear_iid = linear_reference(eta_test, cca.rho, *iid_sizes)  # analytic only: the contrast
    sandwich_sizes = (max(2, int(round(eta_sizes[0] / design.heteroscedasticity))), *eta_sizes[1:])
    linear_sandwich = linear_reference(eta_test, cca.rho, *sandwich_sizes)
    subspace = subspace_report(train, test, ev.subspace_fraction, null=null, heldout=heldout)
    directions = transport_directions(heldout, null_sizes[1], documents, seed=ev.null_seed)
    test_sd = (design.r2w_sd, design.r2_sd / ceiling if ceiling > 0 else float("nan"))
    try:
        curve = learning_curve(train_blocks, test, cca, alpha, test_sd, ev.curve_resamples, ev.null_seed)
    except ValueError as exc:
        raise EvaluateError(f"{exc}: lower evaluate.curve_blocks ({ev.curve_blocks}) or add train documents") from None
    return Transport(cca, table, heldout, subspace, linear, linear_iid, linear_sandwich, design, directions, curve)


def transport_metrics(t: Transport, train: PairStats, W: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The `PairMetrics` fields of a `Transport` (floats, under their field names)."""
    ceiling = float(t.cca.ceiling())
    rep, lin, dirs = t.subspace, t.linear, t.directions
    return {
        "ceiling_full": ceiling,
        "eta_train": float(t.cca.whitened_r2(train, W, b)) / ceiling if ceiling > 0 else float("nan"),
        "eta_test": lin.eta_test,
        "eta_expected": lin.eta_expected,
        "eta_expected_std": lin.eta_simulated_std,
        "eta_ratio": lin.ratio,
        "eta_expected_iid": t.linear_iid.eta_expected,
        "eta_expected_sandwich": t.linear_sandwich.eta_expected,
        "eta_ratio_sandwich": t.linear_sandwich.ratio,
        "heteroscedasticity": t.design.heteroscedasticity,
        **curve_metrics(t.curve),
        "design_effect_score": t.design.score,
        "design_effect_r2": t.design.r2,
        "design_effect_null": t.design.null,
        "n_test_documents": float(t.design.n_groups),
        "canonical_directions": float(dirs.m),
        "transport_directions": float(dirs.count),
        "transport_directions_low": dirs.count_low,
        "transport_directions_high": dirs.count_high,
        "transport_directions_share": dirs.share,
        "transport_directions_share_low": dirs.share_low,
        "transport_directions_share_high": dirs.share_high,
        "transport_directions_threshold": dirs.threshold,
        "heldout_subspace_size": rep.heldout_size.observed,
        "heldout_subspace_size_null": rep.heldout_size.null,
        "heldout_subspace_size_null_std": rep.heldout_size.null_std,
        "heldout_subspace_size_excess": rep.heldout_size.excess,
        "heldout_pr": rep.heldout_pr.observed,
        "heldout_pr_null": rep.heldout_pr.null,
        "heldout_pr_null_std": rep.heldout_pr.null_std,
        "heldout_pr_excess": rep.heldout_pr.excess,
        "participation_ratio": rep.insample_pr.observed,
        "participation_ratio_null": rep.insample_pr.null,
        "subspace_size": rep.insample_size.observed,
        "subspace_size_null": rep.insample_size.null,
    }


def curve_metrics(curve: LearningCurve) -> dict[str, float]:
    """The learning curve's `PairMetrics` fields: each point (`curve_<n|r2w|eta>_f<1/f>`) and the values at
    n → ∞ with their intervals."""
    out: dict[str, float] = {}
    for f, p in zip(FRACTIONS, curve.points):
        tag = f"f{round(1 / f)}"
        out |= {f"curve_n_{tag}": p.n_train, f"curve_r2w_{tag}": p.r2w_test, f"curve_eta_{tag}": p.eta_test}
    for name, e in (("r2w_inf", curve.r2w_inf), ("eta_inf", curve.eta_inf), ("eta_shortfall", curve.shortfall)):
        out |= {name: e.value, f"{name}_lo": e.lo, f"{name}_hi": e.hi}
    out |= {"eta_inf_sd_train": curve.eta_inf.sd_train, "eta_inf_sd_test": curve.eta_inf.sd_test}
    return out
