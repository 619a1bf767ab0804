"""The activation store: hooks into parts, manifest contents, BOS flags, atomic parts, resume."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from ato.models import base_model, load_prepared
from ato.stages import collect
from ato.store import ActivationStore, StoreError, layer_key
from conftest import load_tiny_params


def test_store_layout_manifest_and_values_match_the_model(tiny_project):
    params = load_tiny_params(tiny_project)
    root = collect.main(params)
    store = ActivationStore.open(root)
    m = store.manifest
    assert m.layers == [0, 1, 2, 3] and m.d_model == 32 and m.dtype == "float32"
    assert m.model.weights_digest and m.corpus.digest and m.corpus.split_rule
    for split, budget in (("train", 600), ("val", 200), ("test", 200)):
        info = m.splits[split]
        assert info.tokens == budget == sum(info.part_tokens) == info.budget
        assert all((root / split / p).is_dir() for p in info.parts)
        assert len(info.part_sha256) == len(info.parts)
    # The manifest on disk is exactly the record (sorted keys, a format key, nothing else).
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk == m.to_dict() and on_disk["format"] == "ato-activation-store/1"
    # Stored layer n equals block n's output recomputed directly, token by token.
    model, tok, _ = load_prepared(params.path("model_dir"))
    group = store.open_part("train", 0)
    ids = np.asarray(group["token_id"][:])
    pos = np.asarray(group["position"][:])
    special = np.asarray(group["special"][:])
    starts = np.flatnonzero(pos == 0)
    seq = ids[starts[0] : starts[1]]
    assert special[starts].all() and not special[starts[0] + 1 : starts[1]].any()
    assert seq[0] == tok.bos_token_id
    with torch.no_grad():
        hs = base_model(model)(input_ids=torch.tensor(seq[None]), output_hidden_states=True).hidden_states
    for layer in (0, 2):
        stored = np.asarray(group[layer_key(layer)][starts[0] : starts[1]])
        np.testing.assert_allclose(stored, hs[layer + 1][0].numpy(), rtol=1e-4, atol=1e-4)
    # Padding is never stored: no pad token ids anywhere
    assert (ids != tok.pad_token_id).all()


def test_bos_exclusion_changes_the_token_mask(tiny_project):
    params = load_tiny_params(tiny_project)
    store = ActivationStore.open(collect.main(params))
    with_bos = sum(len(c[0]) for c in store.iter_chunks("train", [0], 128, include_special=True))
    without = sum(len(c[0]) for c in store.iter_chunks("train", [0], 128))
    assert with_bos == 600
    assert with_bos - without == store.manifest.splits["train"].special_tokens > 0


def _read_all(root):
    store = ActivationStore.open(root)
    out = {}
    for split in ("train", "val", "test"):
        for i, part in enumerate(store.parts(split)):
            g = store.open_part(split, i)
            for key in ("token_id", "doc_id", "position", "special", layer_key(0), layer_key(3)):
                out[f"{split}/{part.name}/{key}"] = np.asarray(g[key][:])
    return store.manifest, out


def test_interrupted_collect_resumes_to_the_same_store(tiny_project, monkeypatch):
    params = load_tiny_params(tiny_project, **{"collect.part_tokens": 128})
    ref_manifest, ref = _read_all(collect.main(params))
    import shutil

    shutil.rmtree(params.path("store"))
    real_write = collect.write_part
    calls = {"n": 0}

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(collect, "write_part", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        collect.main(params)
    root = params.path("store")
    assert not (root / "manifest.json").exists()
    with pytest.raises(StoreError, match="manifest"):
        ActivationStore.open(root)
    assert len(list((root / "train").glob("part-*.zarr"))) == 3
    assert not list(root.rglob(".tmp-*"))
    monkeypatch.setattr(collect, "write_part", real_write)
    manifest, again = _read_all(collect.main(params))
    assert manifest == ref_manifest
    assert again.keys() == ref.keys()
    for key in ref:
        np.testing.assert_array_equal(again[key], ref[key], err_msg=key)


def test_rerun_with_same_params_does_nothing_and_changed_params_rebuild(tiny_project, caplog):
    params = load_tiny_params(tiny_project)
    root = collect.main(params)
    digest = json.loads((root / "manifest.json").read_text())["content_digest"]
    with caplog.at_level(logging.INFO, logger="ato.stages.collect"):
        collect.main(params)
    assert "nothing to do" in caplog.text
    params = load_tiny_params(tiny_project, **{"collect.layers": [0, 1, 3], "corpus.max_length": 20})
    store = ActivationStore.open(collect.main(params))
    assert store.layers == [0, 1, 3] and store.digest != digest
