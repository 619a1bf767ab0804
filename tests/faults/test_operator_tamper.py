"""Operators that do not belong to the current model/store, or whose file was damaged, must be
refused on load — by the stages that load them (evaluate, causal), with a message naming the key.

Protections exercised:
- `operators.load_operator(expect=…)` / `check_config`: model digest, store digest, d_model and
  layers are compared with what evaluate and causal are running on;
- the `weights_sha256` recorded in config.json at save and compared on load (byte flips in the data
  region, truncation), then the safetensors header parse, shape and finiteness checks.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ato.artifacts import ModelInfo
from ato.operators import OperatorError, load_operator, save_operator
from ato.params import load_params
from ato.stages import causal, evaluate, fit, stats
from ato.store import ActivationStore
from conftest import make_prepared_model, write_context_maps

PAIR = "L01_k2"


@pytest.fixture
def fitted(project):
    """A real OLS operator for L01_k2 fitted on the tiny collected store (no MLflow: cheap)."""
    params = load_params(project / "params.yaml")
    params.fit.method = "ols"
    stats.main(params)
    fitted = fit.fit_pair(params, PAIR)
    save_operator(params.path("operators") / PAIR, fitted.W, fitted.b, fitted.config)
    return params


def _weights(params) -> Path:
    return params.path("operators") / PAIR / "operator.safetensors"


def _data_start(path: Path) -> int:
    """safetensors: 8-byte little-endian header length, JSON header, then the raw tensor bytes."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _model_info(directory: Path) -> ModelInfo:
    return ModelInfo.read(directory / "ato_model.json")


def test_matching_operator_loads_and_predicts(fitted):
    store = ActivationStore.open(fitted.path("store"))
    op = load_operator(
        fitted.path("operators") / PAIR,
        expect={
            "store_digest": store.digest,
            "model_digest": store.manifest.model.weights_digest,
            "d_model": store.d_model,
            "layer_in": 1,
            "layer_out": 3,
        },
    )
    chunk = next(store.iter_chunks("val", [1, 3], 64))
    pred = op(torch.from_numpy(chunk[1]))
    assert torch.isfinite(pred).all() and pred.shape == (len(chunk[1]), 32)


def test_operator_of_another_model_is_refused_by_causal(fitted, tmp_path):
    other = _model_info(make_prepared_model(tmp_path / "other", kind="llama"))  # same d_model and depth
    assert other.weights_digest != _model_info(fitted.path("model_dir")).weights_digest
    with pytest.raises(OperatorError, match=r"model_digest=.*refit"):
        causal.prepare_inputs(fitted, [PAIR], other)
    # the matching model passes the same check (with the pair's context maps, which causal also reads)
    info = _model_info(fitted.path("model_dir"))
    op = load_operator(fitted.path("operators") / PAIR)
    write_context_maps(fitted, PAIR, op.W.numpy(), op.b.numpy(), info)
    assert PAIR in causal.prepare_inputs(fitted, [PAIR], info)


def test_operator_of_another_store_is_refused_by_evaluate(fitted):
    manifest_path = fitted.path("store") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["content_digest"] = "f" * 64  # the store was re-collected since the fit
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(OperatorError, match="store_digest"):
        evaluate.evaluate_pair(fitted, PAIR)


def test_operator_in_the_wrong_pair_directory_is_refused(fitted):
    ops = fitted.path("operators")
    shutil.copytree(ops / PAIR, ops / "L00_k1")  # an L1→L3 map where the L0→L1 one is expected
    with pytest.raises(OperatorError, match="layer_in"):
        evaluate.evaluate_pair(fitted, "L00_k1")
    with pytest.raises(OperatorError, match="layer_in"):
        causal.prepare_inputs(fitted, ["L00_k1"], _model_info(fitted.path("model_dir")))


def test_operator_of_another_width_is_refused(fitted):
    with pytest.raises(OperatorError, match="d_model"):
        load_operator(fitted.path("operators") / PAIR, expect={"d_model": 64})


@pytest.mark.parametrize("checksum", [True, False], ids=["with_sha256", "without_sha256"])
@pytest.mark.parametrize("cut", ["inside_data", "inside_header", "length_prefix"])
def test_truncated_weights_are_refused(fitted, cut, checksum):
    """Refused by the checksum; a config without one is refused outright (nothing to verify against)."""
    path = _weights(fitted)
    if not checksum:
        config_path = path.parent / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("weights_sha256", None)
        config_path.write_text(json.dumps(config))
    raw = path.read_bytes()
    start = _data_start(path)
    keep = {"inside_data": start + (len(raw) - start) // 2, "inside_header": start // 2, "length_prefix": 5}[cut]
    path.write_bytes(raw[:keep])
    with pytest.raises(OperatorError, match="sha256 differs" if checksum else "no weights_sha256"):
        load_operator(path.parent)


def test_truncated_config_is_refused(fitted):
    path = fitted.path("operators") / PAIR / "config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(OperatorError, match="config.json"):
        load_operator(path.parent)


def test_non_finite_weights_are_refused(fitted):
    """Saved with a NaN (so the checksum matches): the finiteness check must catch it."""
    op = load_operator(fitted.path("operators") / PAIR)
    W = op.W.clone().numpy()
    W[2, 5] = np.nan
    save_operator(fitted.path("operators") / PAIR, W, op.b.numpy(), op.config)
    with pytest.raises(OperatorError, match="non-finite"):
        load_operator(fitted.path("operators") / PAIR)


@pytest.mark.parametrize("byte", [1, 3], ids=["mantissa", "exponent"])
def test_flipped_data_byte_is_refused(fitted, byte):
    """The header stays valid and the value stays finite — only the recorded sha256 can tell."""
    path = _weights(fitted)
    raw = bytearray(path.read_bytes())
    raw[_data_start(path) + 4 * 100 + byte] ^= 0x01  # one bit of W[3, 4]
    path.write_bytes(bytes(raw))
    with pytest.raises(OperatorError, match="sha256"):
        load_operator(path.parent)


def test_loaded_operator_does_not_follow_later_writes_to_its_file(fitted):
    path = _weights(fitted)
    op = load_operator(path.parent)
    before = op.W.clone()
    raw = bytearray(path.read_bytes())
    raw[_data_start(path) + 3] ^= 0x01
    path.write_bytes(bytes(raw))  # in place (same inode), as an editor or `cp` over it would
    assert torch.equal(op.W, before)
