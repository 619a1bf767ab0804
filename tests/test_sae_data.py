"""SAE training tokens: the store's TRAIN split, then residuals streamed from the model over further
TRAIN documents (never VAL/TEST, never a document twice), equal to an independent forward pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import load_tiny_params

LAYERS = [1, 3]  # the tiny project's target layers


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A real `ato collect` store of a tiny project (validated by construction) and its pair statistics,
    shared by the module."""
    import yaml

    from ato.artifacts import Layout
    from ato.stages import collect, stats
    from conftest import TINY_PARAMS, make_corpus, make_prepared_model
    from store_factory import write_passing_verdict

    project = tmp_path_factory.mktemp("sae_data")
    make_prepared_model(project / "models" / "base")
    make_corpus(project / "corpus.jsonl")
    (project / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    params = load_tiny_params(project, **{"collect.layers": [0, *LAYERS]})
    root = collect.main(params)
    write_passing_verdict(root, Layout.from_params(params).validation)
    stats.main(params)  # the SAE gates' ȳ_train
    return params


def _store_docs(store, split):
    return set(np.concatenate([c["doc_id"] for c in store.iter_chunks(split, [], with_tokens=True)]).tolist())


def test_streamed_tokens_continue_the_train_split(collected):
    from ato.corpus import Corpus, split_of
    from ato.models import base_model, capture_residuals, load_prepared, run_captured
    from ato.sae.data import further_sequences, gather
    from ato.store import ActivationStore

    params = collected
    store = ActivationStore.open(params.path("store"))
    model, tokenizer, _ = load_prepared(params.path("model_dir"))
    corpus = Corpus(params.corpus, params.root)
    in_store = store.n_tokens("train") - store.split_info("train").special_tokens
    data = gather(store, LAYERS, in_store + 500, model, tokenizer, corpus, batch_size=3)
    assert data.from_store == in_store and data.from_model == 500 and data.documents > 0
    assert all(len(t) == in_store + 500 for t in data.tokens.values())
    # the store's rows come first, unchanged
    stored = np.concatenate([c[1] for c in store.iter_chunks("train", [1])])
    np.testing.assert_array_equal(data.tokens[1][:in_store].numpy(), stored)
    # streamed documents: TRAIN split, none already in the store (the cut one is skipped whole)
    seqs = list(further_sequences(corpus, tokenizer, store.n_tokens("train")))
    docs = [s.doc_ids[0] for s in seqs]
    keys = {d.doc_id: d.key for d in corpus}
    c = params.corpus
    assert all(split_of(keys[d], c.split_seed, c.split_fractions) == "train" for d in docs)
    assert not set(docs) & (_store_docs(store, "train") | _store_docs(store, "val") | _store_docs(store, "test"))
    # and the rows are the model's residuals of those sequences (special tokens dropped), in order
    expect = []
    for s in seqs:
        with torch.no_grad(), capture_residuals(model, [3]) as cap:
            run_captured(base_model(model), input_ids=torch.tensor([s.token_ids]))
        expect.append(cap[3][0][~torch.tensor(s.special)])
    want = torch.cat(expect)
    got = data.tokens[3][in_store:]
    assert len(want) >= len(got) == 500
    # batches are length-sorted within blocks: every streamed row is one of the expected rows
    nearest = torch.cdist(got.double(), want.double()).amin(1)
    assert float(nearest.max()) < 1e-4 * float(want.norm(dim=1).mean())


def test_within_the_store_no_model_is_needed(collected):
    from ato.sae import SaeError
    from ato.sae.data import gather
    from ato.store import ActivationStore

    store = ActivationStore.open(collected.path("store"))
    data = gather(store, LAYERS, 100)
    assert data.from_model == 0 and len(data.tokens[3]) == 100 and data.forward_seconds == 0.0
    with pytest.raises(SaeError, match="no model to stream from"):
        gather(store, LAYERS, 10**5)
    with pytest.raises(SaeError, match="GiB in memory"):
        gather(store, LAYERS, 10**12)


def test_another_corpus_split_is_refused(collected):
    from ato.corpus import Corpus
    from ato.models import load_prepared
    from ato.sae import SaeError
    from ato.sae.data import gather
    from ato.store import ActivationStore

    params = collected
    store = ActivationStore.open(params.path("store"))
    model, tokenizer, _ = load_prepared(params.path("model_dir"))
    other = Corpus(dataclasses.replace(params.corpus, split_seed=1), params.root)
    with pytest.raises(SaeError, match="VAL/TEST"):
        gather(store, LAYERS, 5000, model, tokenizer, other)


def test_stage_streams_and_records_the_cost(collected):
    from ato.stages import sae as stage

    overrides = {"sae.tokens": 1500, "sae.steps": 20, "sae.eval_sequences": 4, "sae.eval_seq_len": 8}
    params = load_tiny_params(collected.root, **overrides)
    info = stage.main(params)[3]
    assert info.data_tokens == 1500 and info.data_tokens_from_model and info.data_tokens_from_model > 0
    assert info.data_tokens_from_store + info.data_tokens_from_model == 1500
    assert info.data_forward_tokens_per_s and info.data_forward_tokens_per_s > 0
    assert info.train_tokens == 20 * 64 and info.stage_seconds and info.stage_seconds > 0
