"""The pure math of the context maps (ato.math.context): stacked inputs, kind columns, sub-statistics."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from ato.artifacts.context import CONTEXT_KINDS, Estimate
from ato.math import context as cm
from ato.math.cca import CCA
from ato.math.intervals import ratio_bounds
from ato.math.ridge import HeldOutR2Weighted, RidgePath, r2_from_stats
from ato.math.stats import PairStats, sst_from_stats


def brute_force_inputs(x: torch.Tensor, z: torch.Tensor | None, lags: int, fill: torch.Tensor) -> torch.Tensor:
    """The stacked input of every (sequence, position) by a plain loop over the definitions."""
    batch, length, _ = x.shape
    rows = []
    for b in range(batch):
        for t in range(length):
            parts = [x[b, t]]
            parts += [x[b, t - lag] if t - lag >= 1 else fill for lag in range(1, lags + 1)]
            parts.append(x[b, 1:t].mean(0) if t >= 2 else fill)
            if z is not None:
                parts += list(z[b, t])
            rows.append(torch.cat(parts))
    return torch.stack(rows).reshape(batch, length, -1)


@pytest.mark.parametrize("lags, k", [(2, 3), (0, 0), (5, 1)])
def test_stacked_inputs_equal_the_definitions(lags, k):
    batch, length, d = 3, 7, 4
    x = torch.randn(batch, length, d, dtype=torch.float64)
    x[:, 0] *= 1e4  # BOS: must never enter a lagged or prefix input
    z = torch.randn(batch, length, k, d, dtype=torch.float64) if k else None
    fill = torch.randn(d, dtype=torch.float64)
    got = cm.stack_context_inputs(x, z, lags, fill)
    assert got.shape == (batch, length, d * cm.n_blocks(lags, k))
    torch.testing.assert_close(got, brute_force_inputs(x, z, lags, fill), rtol=1e-12, atol=1e-12)


def test_padding_is_fill_and_never_read_by_valid_rows():
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    fill = torch.zeros(3, dtype=torch.float64)
    lengths = torch.tensor([6, 4])
    got = cm.stack_context_inputs(x, None, 2, fill, lengths)
    x_garbage = x.clone()
    x_garbage[1, 4:] = 1e6
    again = cm.stack_context_inputs(x_garbage, None, 2, fill, lengths)
    torch.testing.assert_close(got, again)
    assert torch.all(got[1, 4:] == 0)
    torch.testing.assert_close(got[1, :4], cm.stack_context_inputs(x[1:, :4], None, 2, fill)[0])


def test_sequences_shorter_than_the_lags():
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    fill = torch.ones(3, dtype=torch.float64)
    got = cm.stack_context_inputs(x, None, 4, fill)
    torch.testing.assert_close(got, brute_force_inputs(x, None, 4, fill))


def test_kind_names_match_the_contract():
    assert cm.CONTEXT_KINDS == CONTEXT_KINDS


def test_columns_pick_the_kinds_blocks():
    d, lags, k = 2, 2, 3
    blocks = {kind: sorted({int(c) // d for c in cm.context_columns(kind, d, lags, k)}) for kind in CONTEXT_KINDS}
    assert blocks == {
        "ato": [0],
        "lagged": [0, 1, 2],
        "prefix": [0, 3],
        "routed": [0, 4, 5, 6],
        "context": list(range(7)),
    }
    assert len(cm.context_columns("routed", d, lags, k)) == 4 * d
    with pytest.raises(ValueError, match="unknown context kind"):
        cm.context_columns("attention", d, lags, k)


def test_selected_statistics_equal_those_of_the_selected_columns():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 12)), rng.normal(size=(50, 3))
    cols = cm.context_columns("prefix", 2, 2, 2)
    got = cm.select_inputs(PairStats.from_data(x, y), cols)
    want = PairStats.from_data(x[:, cols], y)
    for name in ("n", "sum_x", "sum_y", "xtx", "xty", "yty"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)


def _regression_stats(rng: np.random.Generator, n: int, p: int, d: int) -> PairStats:
    """Correlated inputs (far from unit scale), a noisy linear target: a Gram with some spread."""
    x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) * 3.0 + 5.0
    y = x @ rng.normal(size=(p, d)) * 0.1 + rng.normal(size=(n, d)) * 4.0 + 2.0
    return PairStats.from_data(x, y)


@pytest.mark.parametrize("standardize", [False, True])
def test_heldout_r2_weighted_is_exact_for_every_alpha(standardize):
    rng = np.random.default_rng(1)
    train, val = _regression_stats(rng, 400, 12, 5), _regression_stats(rng, 300, 12, 5)
    path = RidgePath.from_stats(train, standardize)
    fast = HeldOutR2Weighted.of(path, val)
    for alpha in (0.0, 1e-3, 1.0, 1e2, 1e5):
        want = r2_from_stats(val, *path.solve(alpha))["r2_weighted"]
        assert fast(alpha) == pytest.approx(want, abs=1e-10)


def test_tune_and_fit_finds_the_best_alpha_of_the_curve():
    rng = np.random.default_rng(2)
    train, val = _regression_stats(rng, 200, 20, 4), _regression_stats(rng, 200, 20, 4)
    fit = cm.tune_and_fit(train, val, 1e-3, 1e7, n_trials=40, seed=0)
    assert fit.val_r2_w == pytest.approx(r2_from_stats(val, fit.W, fit.b)["r2_weighted"], abs=1e-10)
    np.testing.assert_allclose(fit.W, RidgePath.from_stats(train).solve(fit.alpha)[0])
    objective = HeldOutR2Weighted.of(RidgePath.from_stats(train), val)
    best_on_grid = max(objective(a) for a in np.geomspace(1e-3, 1e7, 200))
    assert fit.val_r2_w >= best_on_grid - 1e-3
    assert cm.tune_and_fit(train, val, 1e-3, 1e7, n_trials=40, seed=0).alpha == fit.alpha  # seeded


@pytest.mark.parametrize("standardize", [False, True])
def test_the_ceiling_equals_the_cca_ceiling(standardize):
    rng = np.random.default_rng(3)
    s = _regression_stats(rng, 500, 15, 6)
    want = CCA.from_stats(s).ceiling()
    assert cm.ceiling(RidgePath.from_stats(s, standardize), s) == pytest.approx(want, abs=1e-9)
    assert cm.tune_and_fit(s, s, 1e-3, 1e3, 5, 0, standardize).ceiling == pytest.approx(want, abs=1e-9)


# --------------------------------------------------------------------------------------------
# Planted budgets: sequences of 127 targets after a BOS row, AR-free Gaussian residuals

SEQ, D = 128, 8


def _sequences(rng: np.random.Generator, n_seq: int) -> torch.Tensor:
    x = rng.normal(size=(n_seq, SEQ, D))
    x[:, 0] = 1e4  # BOS
    return torch.as_tensor(x)


def _lagged(x: torch.Tensor) -> torch.Tensor:
    """x_{t−1} where it is a token (t ≥ 2), 0 otherwise (the planted law reads nothing of BOS)."""
    out = torch.zeros_like(x)
    out[:, 2:] = x[:, 1:-1]
    return out


def _split(x: torch.Tensor, y: torch.Tensor, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked inputs (lags 1, no routed inputs) and targets of every non-BOS row, [S, 127, ·]."""
    return cm.stack_context_inputs(x, None, 1, fill)[:, 1:], y[:, 1:]


def _stats(inputs: torch.Tensor, y: torch.Tensor) -> PairStats:
    return PairStats.from_data(inputs.reshape(-1, inputs.shape[-1]).numpy(), y.reshape(-1, D).numpy())


def _planted_budget(rng: np.random.Generator, law, n_test: int = 160) -> cm.BudgetEstimates:
    """Fit every kind on planted train/val sequences (α by the tune search), score the test sequences."""
    x = {name: _sequences(rng, n) for name, n in (("train", 160), ("val", 40), ("test", n_test))}
    y = {name: law(rng, seqs) for name, seqs in x.items()}
    fill = x["train"][:, 1:].mean((0, 1))
    rows = {name: _split(x[name], y[name], fill) for name in x}
    slices = [_stats(*(part[a:b] for part in rows["train"])) for a, b in ((0, 20), (20, 40), (40, 80), (80, 160))]
    train, val = slices[0].merge(slices[1]).merge(slices[2]).merge(slices[3]), _stats(*rows["val"])
    test_inputs, test_y = rows["test"]
    sums = cm.SequenceSums(np.full(n_test, float(SEQ - 1)), test_y.sum(1).numpy(), (test_y**2).sum((1, 2)).numpy(), {})
    sums.sse["identity"] = ((test_y - test_inputs[..., :D]) ** 2).sum((1, 2)).numpy()
    curves = {}
    for kind in cm.FITTED_KINDS:
        cols = cm.context_columns(kind, D, 1, 0)
        fit = cm.tune_and_fit(cm.select_inputs(train, cols), cm.select_inputs(val, cols), 1e-3, 1e5, 20, 0)
        predicted = test_inputs[..., cols] @ torch.as_tensor(fit.W).T + torch.as_tensor(fit.b)
        sums.sse[kind] = ((test_y - predicted) ** 2).sum((1, 2)).numpy()
        curves[kind] = cm.nested_curve(slices, _stats(test_inputs, test_y), cols, fit.alpha, full=(fit.W, fit.b))
        solved = cm.nested_curve(slices, _stats(test_inputs, test_y), cols, fit.alpha)  # every fraction solved
        np.testing.assert_allclose(curves[kind].r2_w, solved.r2_w, rtol=0, atol=1e-9)
    return cm.context_budget(sums, curves, resamples=400, seed=0)


def _covers(e: cm.ShareEstimate, truth: float) -> bool:
    return e.low <= truth <= e.high


def test_a_lagged_law_is_moved_not_carried():
    """y_t = A x_{t−1} + noise: the lagged map recovers the truth, the ATO explains nothing, and `moved`
    excludes 0; the increments add up to `moved`."""
    A = np.random.default_rng(10).normal(size=(D, D)) / np.sqrt(D)
    sigma = 1.0

    def law(rng, x):
        return _lagged(x) @ torch.as_tensor(A).T + sigma * torch.as_tensor(rng.normal(size=x.shape))

    lag_share = (SEQ - 2) / (SEQ - 1)  # targets with a lagged token
    sst = lag_share * np.sum(A**2) + sigma**2 * D
    truth_lagged = 1 - sigma**2 * D / sst
    budget = _planted_budget(np.random.default_rng(11), law)
    lagged, ato = budget.r2_w["lagged"], budget.r2_w["ato"]
    assert _covers(lagged, truth_lagged), (lagged, truth_lagged)
    assert lagged.extrapolated_low <= truth_lagged <= lagged.extrapolated_high, (lagged, truth_lagged)
    assert not _covers(ato, truth_lagged) and abs(ato.value) < 0.01
    assert budget.shares["moved"].low > 0.3
    increments = sum(budget.shares[f"increment_{name}"].value for name in ("lagged", "prefix", "routed"))
    assert increments == pytest.approx(budget.shares["moved"].value, abs=1e-12)
    total = budget.shares["carried"].value + budget.shares["moved"].value + budget.shares["computed"].value
    assert total == pytest.approx(1.0, abs=1e-12)


def test_a_nonlinear_term_is_computed():
    """y_t = A x_t + B x_{t−1} + c (x_{t,1}² − 1) u: no map linear in the residuals of s ≤ t explains the
    square (uncorrelated with every linear function of Gaussian x), so `computed` holds its share."""
    rng = np.random.default_rng(20)
    A, B = rng.normal(size=(2, D, D)) / np.sqrt(D)
    u = np.ones(D) / np.sqrt(D)
    c = 1.5

    def law(rng, x):
        square = (x[..., :1] ** 2 - 1) * torch.as_tensor(c * u)
        return x @ torch.as_tensor(A).T + _lagged(x) @ torch.as_tensor(B).T + square

    lag_share = (SEQ - 2) / (SEQ - 1)
    share = 2 * c**2 / (np.sum(A**2) + lag_share * np.sum(B**2) + 2 * c**2)  # Var(x² − 1) = 2
    budget = _planted_budget(np.random.default_rng(21), law)
    assert _covers(budget.shares["computed"], share), (budget.shares["computed"], share)
    assert budget.shares["moved"].low > 0 and budget.shares["carried"].low > 0


def _heavy_tailed_sums(rng: np.random.Generator, A: np.ndarray, B: np.ndarray, n_seq: int) -> cm.SequenceSums:
    """The true maps' per-sequence sums under y_t = A x_t + B x_{t−1} + e_t, e_t = s_j h(x_t) ε_t: ε
    Student-t (3 df, unit variance), h(x) = 0.5 + |x_1| (heteroscedastic), s_j = exp(g_j / 2) per
    sequence (documents differ). ATO: A x_t; lagged (and every map with the lag): + B x_{t−1}."""
    x = rng.normal(size=(n_seq, SEQ - 1, len(A)))
    lag = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    scale = np.exp(rng.normal(size=(n_seq, 1, 1)) / 2) * (0.5 + np.abs(x[..., :1]))
    noise = scale * rng.standard_t(3, size=x.shape) / np.sqrt(3.0)
    carried, moved = x @ A.T, lag @ B.T
    y = carried + moved + noise
    sse_ato, sse_lag = ((moved + noise) ** 2).sum((1, 2)), (noise**2).sum((1, 2))
    sse = {kind: sse_lag if kind in ("lagged", "lagged_prefix", "context") else sse_ato for kind in cm.FITTED_KINDS}
    return cm.SequenceSums(np.full(n_seq, SEQ - 1.0), y.sum(1), (y**2).sum((1, 2)), sse)


def test_moved_interval_covers_under_heavy_tailed_heteroscedastic_noise():
    """200 simulated test splits of the default's size (190 sequences of 127 targets): the budget's
    interval (nominal 95 %) of `moved` holds its population value in ≥ 90 % of them. The splits go
    through `ratio_bounds` at once (leading axis), as `context_budget` sends its numerators."""
    rng, d = np.random.default_rng(30), 4
    A, B = rng.normal(size=(2, d, d)) / np.sqrt(d)
    noise_var = d * np.exp(0.5) * (1.25 + np.sqrt(2 / np.pi))  # E s² · E h² · E ε² per dimension
    lagged_b = (SEQ - 2) / (SEQ - 1) * np.sum(B**2)
    truth = lagged_b / (np.sum(A**2) + lagged_b + noise_var)
    splits = [_heavy_tailed_sums(rng, A, B, 190) for _ in range(200)]
    sst = np.stack([s.sst() for s in splits])
    moved = np.stack([cm.budget_shares({k: t - e for k, e in s.sse.items()}, t)["moved"] for s, t in zip(splits, sst)])
    _, low, high = ratio_bounds(moved, sst, n_resamples=500)
    assert np.mean((low <= truth) & (truth <= high)) >= 0.90


def test_share_estimates_carry_the_contract_fields():
    assert [f.name for f in fields(cm.ShareEstimate)] == [f.name for f in fields(Estimate)]


def test_sequence_sst_adds_up_to_the_split_sst():
    rng = np.random.default_rng(40)
    y = rng.normal(size=(5, 9, 3)) * 7 + 100
    sums = cm.SequenceSums(np.full(5, 9.0), (y - 100).sum(1), ((y - 100) ** 2).sum((1, 2)))  # shifted
    want = sst_from_stats(PairStats.from_data(np.zeros((45, 1)), y.reshape(-1, 3))).sum()
    assert sums.sst().sum() == pytest.approx(want, rel=1e-12)


def test_extrapolation_of_a_line_in_one_over_n():
    n = np.array([1000.0, 2000.0, 4000.0, 8000.0])
    value, low, high = cm.extrapolated(n, 0.6 - 50.0 / n, 0.0, 0.95)
    assert value == pytest.approx(0.6) and high - low == pytest.approx(0.0, abs=1e-9)
    value, low, high = cm.extrapolated(n, 0.6 - 50.0 / n + np.array([0.01, -0.01, 0.01, -0.01]), 0.002, 0.95)
    assert low < value < high and high - low > 2 * 1.96 * 0.002


@pytest.mark.parametrize("product_dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_the_striped_gram_accumulator_gives_the_full_sums(product_dtype, tol):
    """Upper stripes (a width that does not divide p), mirrored, over batches buffered into two products
    (9 + 30 rows, then 4 at the end) of off-centre rows:
    the uncentred sums of numpy's float64 products."""
    from ato.context_pass import GramAccumulator

    gen = torch.Generator().manual_seed(3)
    p, d = 23, 5
    batches = [(torch.randn(n, p, generator=gen) * 3 + 40, torch.randn(n, d, generator=gen) - 7) for n in (9, 30, 4)]
    acc = GramAccumulator(p, d, torch.device("cpu"), product_dtype, stripe=7, flush_rows=12)
    for x, y in batches:
        acc.update(x, y)
    stats = acc.pair_stats()
    x = np.concatenate([b[0].double().numpy() for b in batches])
    y = np.concatenate([b[1].double().numpy() for b in batches])
    assert stats.n == len(x)
    for got, want in [(stats.sum_x, x.sum(0)), (stats.sum_y, y.sum(0)), (stats.xtx, x.T @ x), (stats.xty, x.T @ y),
                      (stats.yty, y.T @ y)]:  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=tol, atol=0)
    np.testing.assert_array_equal(stats.xtx, stats.xtx.T)
