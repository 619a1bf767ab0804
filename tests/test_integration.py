"""End to end on the real embedded model and corpus (a small slice): prepare → collect → validate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from ato.models import base_model, load_prepared
from ato.params import load_params
from ato.stages import collect, validate
from ato.store import ActivationStore, layer_key

pytestmark = pytest.mark.integration


def test_real_model_store_equals_block_outputs(real_model_dir, tmp_path):
    raw = {
        "paths": {"model_dir": str(real_model_dir)},
        "pairs": {"L05_k12": {"L": 5, "k": 12}},
        "corpus": {"max_length": 32, "tokens": {"train": 192, "val": 64, "test": 64}},
        "collect": {"layers": [0, 5, 17], "batch_size": 4, "part_tokens": 96, "device": "cpu"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml", n_layers=18)
    store = ActivationStore.open(collect.main(params))
    assert store.d_model == 640 and store.layers == [0, 5, 17]
    assert store.manifest.model.n_layers == 18
    assert store.manifest.corpus.kind == "embedded"
    report = validate.main(params)
    assert report.success

    model, tok, _ = load_prepared(real_model_dir)
    group = store.open_part("test", 0)
    pos = np.asarray(group["position"][:])
    starts = list(np.flatnonzero(pos == 0)) + [len(pos)]
    ids = np.asarray(group["token_id"][starts[0] : starts[1]])
    assert ids[0] == tok.bos_token_id == 2
    with torch.no_grad():
        hs = base_model(model)(input_ids=torch.tensor(ids[None]), output_hidden_states=True).hidden_states
    for layer in (0, 5):
        stored = np.asarray(group[layer_key(layer)][starts[0] : starts[1]])
        np.testing.assert_allclose(stored, hs[layer + 1][0].numpy(), rtol=1e-4, atol=1e-3 * np.abs(stored).max())
    last = torch.from_numpy(np.asarray(group[layer_key(17)][starts[0] : starts[1]]))
    # layer 17 is the raw block output: its norm is huge, HF's last hidden state is after the final norm
    assert last.norm(dim=-1).mean() > 50 * hs[18][0].norm(dim=-1).mean()
    torch.testing.assert_close(base_model(model).norm(last), hs[18][0], rtol=1e-3, atol=1e-3)
