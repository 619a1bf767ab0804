"""`ato context` on the tiny project: the budget record, the context operators, and the pass's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import copy_project, load_tiny_params

KINDS = ("ato", "lagged", "prefix", "routed", "context")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def context_run(validated_tiny_project, tmp_path_factory):
    """The tiny project's statistics and its context stage, run once for the module."""
    from ato.stages import context, stats

    project = copy_project(validated_tiny_project, tmp_path_factory.mktemp("context") / "project")
    params = load_tiny_params(project)
    stats.main(params)
    context.main(params)
    return params


def test_the_budget_reads_back_and_adds_up(context_run):
    from ato.artifacts import ContextBudget, Layout

    layout = Layout.from_params(context_run)
    for name, pair in context_run.pairs.items():
        budget = ContextBudget.read(layout.context(name))
        assert (budget.L, budget.k, budget.lags) == (pair.L, pair.k, context_run.context.lags)
        assert set(budget.kinds) == set(KINDS)
        assert budget.carried.value + budget.moved.value + budget.computed.value == pytest.approx(1, abs=1e-12)
        assert sum(e.value for e in budget.increments.values()) == pytest.approx(budget.moved.value, abs=1e-12)
        estimates = [budget.carried, budget.moved, budget.computed, *(s.r2_w for s in budget.kinds.values())]
        for e in estimates:
            assert e.low <= e.value <= e.high and e.high > e.low, (name, e)
            assert np.isfinite(e.extrapolated), (name, e)
        d = 32  # the tiny model's width
        assert budget.kinds["context"].p == d * (2 + budget.lags + budget.k)
        assert budget.kinds["ato"].p_over_n == pytest.approx(d / budget.n_train)
        assert budget.n_docs_test > 1 and budget.n_test > budget.n_docs_test
        assert budget.ceiling_same <= budget.ceiling_context + 1e-9
        assert "fill" in budget.bos_inputs and "200 resamples" in budget.interval
        jac = budget.jacobian  # W_ℓ beside E[J_{t,t−ℓ}], one entry per lag ℓ = 0 … m, noise over 3 sequences
        assert (jac.directions, jac.sequences, jac.tokens) == (4, 3, 3 * 11)
        assert len(jac.rel_diff) == len(jac.noise) == budget.lags + 1
        assert np.isfinite([*jac.rel_diff, *jac.noise, jac.ato_rel_diff]).all() and min(jac.noise) > 0


def test_a_token_budget_takes_the_first_whole_sequences(validated_tiny_project):
    from ato.store import ActivationStore, token_sequences

    store = ActivationStore.open(validated_tiny_project / "data" / "activations")
    every = token_sequences(store, "train")
    assert sum(len(s.token_ids) for s in every) == store.n_tokens("train")
    assert all(s.special[0] and s.token_ids[0] == 2 for s in every)  # BOS-led
    first = token_sequences(store, "train", 50)
    lengths = [len(s.token_ids) for s in first]
    assert sum(lengths) >= 50 > sum(lengths[:-1])
    assert [s.doc_id for s in first] == [s.doc_id for s in every[: len(first)]]


def test_the_pass_rows_are_the_stored_rows(context_run):
    """x_t and y of the pass's own forward, at the stored non-BOS tokens, are the rows `ato stats` summed."""
    from ato.artifacts import Layout, read_pair_stats
    from ato.context_budget import kind_columns
    from ato.context_pass import ContextPair, stream_split
    from ato.math.context import select_inputs
    from ato.models import load_prepared
    from ato.store import ActivationStore, token_sequences

    layout = Layout.from_params(context_run)
    store = ActivationStore.open(layout.store)
    model, tokenizer, _ = load_prepared(layout.model_dir)
    seqs = token_sequences(store, "val")
    pairs = [ContextPair(n, p.L, p.k, torch.zeros(store.d_model)) for n, p in context_run.pairs.items()]
    got = stream_split(model, tokenizer, seqs, pairs, 2, 3, np.zeros(len(seqs), np.int64))
    for pair in pairs:
        stored = read_pair_stats(layout.pair_stats("val", pair.name), store.digest)
        ours = select_inputs(got.stats[pair.name][0], kind_columns("ato", store.d_model, 2, pair.k))
        assert ours.n == stored.n == got.tokens
        for field in ("sum_x", "sum_y", "xtx", "xty", "yty"):
            want = getattr(stored, field)
            np.testing.assert_allclose(getattr(ours, field), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_operators_reproduce_the_stored_scores(context_run):
    """The saved maps, loaded back and run on a fresh pass over the test split, give the budget's R²_w."""
    from safetensors import safe_open

    from ato.artifacts import ContextBudget, Layout, read_context_operator
    from ato.context_budget import KindFit, score_sequences
    from ato.context_pass import ContextPair, stream_split
    from ato.models import load_prepared
    from ato.store import ActivationStore, token_sequences

    layout = Layout.from_params(context_run)
    store = ActivationStore.open(layout.store)
    model, tokenizer, _ = load_prepared(layout.model_dir)
    seqs = token_sequences(store, "test")
    for name in context_run.pairs:
        config, maps, fill = read_context_operator(layout.context_operator(name), store.digest)
        assert set(maps) == set(KINDS) and config.blocks[0] == "x_t"
        assert len(safe_open(layout.context_operator(name) / "context.safetensors", "np").keys()) == 2 * len(KINDS) + 1
        pair = ContextPair(name, config.L, config.k, torch.as_tensor(fill))
        again = stream_split(model, tokenizer, seqs, [pair], config.lags, 5, np.zeros(len(seqs), np.int64), keep=True)
        fits = {
            kind: KindFit(config.columns(kind), config.alphas[kind], W.astype(np.float64), b.astype(np.float64))
            for kind, (W, b) in maps.items()
        }
        sums = score_sequences(again.kept, pair, config.lags, fits, len(seqs), np.zeros(config.d_model), CPU)
        r2_w = {name: 1 - sse.sum() / sums.sst().sum() for name, sse in sums.sse.items()}
        budget = ContextBudget.read(layout.context(name))
        for kind in KINDS:
            assert r2_w[kind] == pytest.approx(budget.kinds[kind].r2_w.value, abs=1e-4), (name, kind)
        assert r2_w["identity"] == pytest.approx(budget.identity_r2_w, abs=1e-6)


def test_the_pair_runs_log_the_budget_beside_their_own_r2(context_run):
    import mlflow

    mlflow.set_tracking_uri(context_run.mlflow_uri())
    runs = mlflow.search_runs(experiment_names=[context_run.paths.mlflow_experiment], output_format="list")
    logged = {r.data.tags.get("ato.pair"): r.data.metrics for r in runs if r.data.tags.get("ato.kind") == "pair"}
    for name in context_run.pairs:
        assert {"context_carried", "context_moved_low", "context_routed_r2_w"} <= set(logged[name]), name
        assert not {"r2", "r2_weighted"} & set(logged[name])  # the pair's own R² is evaluate's to log
