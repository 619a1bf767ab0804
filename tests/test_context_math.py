"""The pure math of the context maps (ato.math.context): stacked inputs, kind columns, sub-statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ato.artifacts.context import CONTEXT_KINDS
from ato.math import context as cm
from ato.math.stats import PairStats


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
