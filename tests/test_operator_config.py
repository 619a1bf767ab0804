"""The operator's config.json as a typed record (`ato.artifacts.operator.OperatorConfig`): configs in
the current, unmarked format read back and write out byte for byte; unknown keys and newer formats
are refused naming the file and the key."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from ato.artifacts import ArtifactError, write_json_atomic
from ato.artifacts.operator import OperatorConfig
from ato.operators import load_operator

# config.json of an operator and of one of its variants as `ato fit` writes them today (no format key;
# the fingerprint shortened): the format users already have in their directories and registries.
FITTED = {
    "alpha": 0.0,
    "d_model": 4,
    "embedding_fingerprint": {"row_norms": [0.0, 0.07376057, 0.1156553], "vocab_size": 128},
    "equation": "y_hat = x @ W.T + b",
    "hook": "resid_post: output of decoder block n via a forward hook (TransformerLens blocks.n.hook_resid_post)",
    "identity_test_r2_weighted": 0.381836180134417,
    "include_bos": False,
    "k": 2,
    "layer_in": 1,
    "layer_out": 3,
    "method": "ols",
    "metrics": {"identity_test_r2": 0.31938955189704665, "test_r2": 0.6326110076992739, "val_r2": None},
    "model": "tiny-gemma3",
    "model_digest": "1d591714c31b66825e590014623887dbde0a36b2f38e4d48bf76754cb4a9c6f7",
    "n_layers": 4,
    "n_train_tokens": 305,
    "n_val_tokens": 92,
    "standardize": False,
    "store_digest": "bcac291abfe1697c2a5e07a89af3412079a4ecbcb6f309407d87569fa5a251c2",
    "variants": ["rank64", "procrustes"],
    "weights_sha256": "cff7e2f3e7d99b25f98539b02484cef34b42e851a77ca9967fbae56a9565782f",
}
VARIANT = {
    **FITTED,
    "method": "rrr",
    "parent_method": "ols",
    "parent_weights_sha256": FITTED["weights_sha256"],
    "procrustes_scale": None,  # written as null for every kind but procrustes
    "rank": 3,
    "rank_requested": 64,
    "variant": "rank64",
}
# the nine required keys only, as a person or an early `ato fit` wrote them
HAND_MADE = {
    "alpha": 1.0,
    "d_model": 4,
    "layer_in": 5,
    "layer_out": 6,
    "method": "ridge",
    "model": "google/gemma-3-270m",
    "model_digest": None,
    "n_train_tokens": 1,
    "store_digest": "0000000000000000",
}


@pytest.mark.parametrize("data", [FITTED, VARIANT, HAND_MADE], ids=["fitted", "variant", "hand_made"])
def test_a_config_in_the_current_format_round_trips_byte_for_byte(tmp_path, data):
    original = tmp_path / "original.json"
    write_json_atomic(original, data)
    config = OperatorConfig.read(original)
    rewritten = tmp_path / "rewritten.json"
    write_json_atomic(rewritten, config.to_dict())
    assert rewritten.read_bytes() == original.read_bytes()
    assert config.layer_out == data["layer_out"] and config.variant == data.get("variant")


def test_an_old_operator_directory_loads(tmp_path):
    """Written by hand in the current format (no `format` key), not through `save_operator`."""
    directory = tmp_path / "L05_k1"
    directory.mkdir()
    save_file({"W": torch.eye(4), "b": torch.zeros(4)}, str(directory / "operator.safetensors"))
    sha = hashlib.sha256((directory / "operator.safetensors").read_bytes()).hexdigest()
    (directory / "config.json").write_text(json.dumps({**HAND_MADE, "weights_sha256": sha}))
    op = load_operator(directory, expect={"d_model": 4, "layer_in": 5})
    assert op.config.method == "ridge" and op.config.metrics is None and op.variant is None
    assert torch.equal(op.W, torch.eye(4))


def test_an_unknown_key_is_refused_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic(path, {**HAND_MADE, "learning_rate": 0.1})
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(path))}: unknown key 'learning_rate'"):
        OperatorConfig.read(path)


def test_a_missing_key_and_a_newer_format_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic(path, {k: v for k, v in HAND_MADE.items() if k != "store_digest"})
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(path))}: the operator config lacks 'store_digest'"):
        OperatorConfig.read(path)
    write_json_atomic(path, {**HAND_MADE, "format": "ato-operator/2"})
    with pytest.raises(
        ArtifactError, match=rf"{re.escape(str(path))}: operator config format 'ato-operator/2'; .*version 1"
    ):
        OperatorConfig.read(path)
