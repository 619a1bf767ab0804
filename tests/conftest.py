"""Shared fixtures: seeded RNGs, tiny random-initialised HF models built from configs, a tiny
offline tokenizer, and a small prepared-model directory that the stages can load."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a of and in to is was for on as by with from at an that which are his her it this "
    "city river music science history king war born known first called also one two new"
).split()


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def tiny_config(kind: str):
    """A 4-layer, d=32 config of the given architecture (random weights, loads in milliseconds)."""
    from transformers import AutoConfig

    common = dict(vocab_size=128)
    if kind in ("gemma3", "gemma2"):  # the same tiny shape; only the model type differs
        return AutoConfig.for_model(
            "gemma3_text" if kind == "gemma3" else "gemma2",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            max_position_embeddings=256,
            bos_token_id=2,
            pad_token_id=0,
            eos_token_id=1,
            **common,
        )
    if kind == "llama":
        return AutoConfig.for_model(
            "llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            bos_token_id=2,
            pad_token_id=0,
            eos_token_id=1,
            **common,
        )
    if kind == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=4, n_head=2, n_positions=256, bos_token_id=2, eos_token_id=1, **common
        )
    if kind == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            max_position_embeddings=256,
            bos_token_id=2,
            eos_token_id=1,
            **common,
        )
    raise ValueError(kind)


def tiny_model(kind: str = "gemma3"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer(adds_bos: bool = True):
    """A word-level tokenizer built offline: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then WORDS; it puts
    <bos> before every text unless `adds_bos` is False (like SmolLM2's, which declares one but adds none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def save_prepared(model, tokenizer, directory: Path, name: str) -> Path:
    """What `ato prepare` leaves behind (weights, tokenizer, ato_model.json) for a given model."""
    from ato.artifacts import ModelInfo
    from ato.models import n_layers, weights_digest

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ModelInfo(
        name=name,
        source=name,
        model_type=model.config.model_type,
        architecture=type(model).__name__,
        n_layers=n_layers(model),
        d_model=int(model.config.hidden_size),
        vocab_size=int(model.config.vocab_size),
        dtype="float32",
        weights_digest=weights_digest(directory),
        bos_token_id=2,
    ).write(directory / "ato_model.json")
    return directory


def make_prepared_model(directory: Path, kind: str = "gemma3") -> Path:
    """What `ato prepare` leaves behind, for a tiny random model."""
    return save_prepared(tiny_model(kind), tiny_tokenizer(), directory, f"tiny-{kind}")


def make_corpus(path: Path, n_docs: int = 150, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": random_text(rng, rng.randint(8, 40))}) + "\n")
    return path


TINY_PARAMS = {
    "pairs": {"L00_k1": {"L": 0, "k": 1}, "L01_k2": {"L": 1, "k": 2}},
    "corpus": {"source": "corpus.jsonl", "max_length": 24, "tokens": {"train": 600, "val": 200, "test": 200}},
    "collect": {"batch_size": 4, "part_tokens": 256, "chunk_tokens": 64, "device": "cpu"},
    "tune": {"n_trials": 8, "curve_points": 8},
    "sae": {
        "width": 64,
        "k": 4,
        "steps": 20,
        "batch_tokens": 64,
        "tokens": 500,  # within the tiny stores' TRAIN split: no streaming unless a test asks for it
        "eval_sequences": 4,
        "eval_seq_len": 8,
        "device": "cpu",
    },
    "select": {"max_tokens": 512, "causal_sequences": 4, "keep_fraction": 0.25, "device": "cpu"},
    "evaluate": {"n_ranks": 8, "min_active_tokens": 2},
    "atlas": {
        "k_max": 2,
        "tokens": {"train": 0, "test": 0},
        "chunk_tokens": 128,
        "null_replicates": 2,
        "jacobian_sequences": 2,
        "jacobian_seq_len": 12,
        "jacobian_directions": 4,
        "causal_pairs": ["L00_k1"],
        "causal_sequences": 4,
        "causal_seq_len": 12,
        "causal_batch_size": 2,
        "device": "cpu",
    },
    "languages": {
        "sources": {"fr-fr": "fr.jsonl", "es-es": "es.jsonl"},  # written by the tests beside corpus.jsonl
        "fit_tokens": 400,
        "test_tokens": 200,
        "causal_sequences": 4,
        "causal_seq_len": 12,
        "overlap_rank": 4,
        "device": "cpu",
    },
    "context": {
        "n_trials": 4,
        "bootstrap_resamples": 200,
        "batch_size": 4,
        "device": "cpu",
        "jacobian_sequences": 3,
        "jacobian_seq_len": 12,
    },
    "causal": {
        "n_sequences": 4,
        "seq_len": 12,
        "batch_size": 2,
        "bootstrap_resamples": 100,
        "position_sets": {"all": "all", "few": [1, 3], "single_2": [2]},
        "device": "cpu",
    },
}


@pytest.fixture
def tiny_project(tmp_path: Path):
    """A project directory with a tiny prepared model, a JSONL corpus and a params.yaml."""
    import yaml

    make_prepared_model(tmp_path / "models" / "base")
    make_corpus(tmp_path / "corpus.jsonl")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return tmp_path


@pytest.fixture(scope="session")
def validated_tiny_project(tmp_path_factory) -> Path:
    """The tiny project collected and validated (with validate's MLflow run) once per session. Never
    changed: tests take a copy (`validated_copy`, `copy_project`)."""
    import yaml

    from ato.params import load_params
    from ato.stages import collect, validate

    project = tmp_path_factory.mktemp("validated")
    make_prepared_model(project / "models" / "base")
    make_corpus(project / "corpus.jsonl")
    (project / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    params = load_params(project / "params.yaml")
    collect.main(params)
    validate.main(params)
    return project


def copy_project(project: Path, destination: Path) -> Path:
    """A private copy of a project whose MLflow DB points at the copy's own artifact directory (the DB
    records absolute artifact locations: without this, the copy's runs would log into `project`)."""
    import shutil
    import sqlite3

    shutil.copytree(project, destination)
    db = destination / "mlruns" / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(project), str(destination)))
        con.close()
    return destination


@pytest.fixture
def validated_copy(validated_tiny_project, tmp_path) -> Path:
    """A private copy of the collected and validated tiny project (`validated_tiny_project`)."""
    return copy_project(validated_tiny_project, tmp_path / "project")


def load_tiny_params(project: Path, **overrides):
    """Params of a tiny project, with dotted overrides such as {"collect.part_tokens": 128}."""
    import yaml

    from ato.params import load_params

    raw = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(project / "params.yaml")


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> Path:
    """The embedded Gemma-3-270M, prepared once per session (reuses the project's models/base when
    `dvc repro` has built it; otherwise runs the real `prepare` stage, ~1 min)."""
    local = ROOT / "models" / "base"
    if (local / "ato_model.json").exists():
        return local
    from ato.params import parse_params
    from ato.stages import prepare

    out = tmp_path_factory.mktemp("real") / "base"
    prepare.main(parse_params({"pairs": {"L00_k1": {"L": 0, "k": 1}}, "paths": {"model_dir": str(out)}}))
    return out


# --------------------------------------------------------------------------------------------
# A toy map kind (`ato.kinds`), registered by the tests that show a new kind needs no other edit

TOY_KIND = "half_carry"  # ŷ = (x + ȳ_train) / 2: halfway between the identity and the train mean


def half_carry(train):
    """The toy kind's map from the pair's train statistics."""
    d_out, d_in = train.yty.shape[0], train.xtx.shape[0]
    return 0.5 * np.eye(d_out, d_in), 0.5 * train.mean_y


@pytest.fixture
def toy_kind():
    """The toy kind, registered for one test (evaluate and atlas roles) and removed after it."""
    from ato import kinds

    kind = kinds.MapKind(
        name=TOY_KIND,
        label="half carry  (x + ȳ)/2",
        meaning="halfway between carrying x over and the train mean",
        built_from="pair_stats",
        saved="recomputed",
        colour="#000000",
        places={"evaluate": kinds.Place(10, column="half carry"), "atlas": kinds.Place(10, column="half carry")},
        build=half_carry,
    )
    kinds.register(kind)
    yield kind
    kinds.unregister(TOY_KIND)


def write_context_maps(params, name: str, W, b, info) -> None:
    """The pair's context maps as `ato context` writes them: every kind is the operator on x_t, every other
    input block weighted zero (so the context condition must patch what the ATO patches)."""
    from ato.artifacts import ContextOperatorConfig, Layout, write_context_operator

    pair, lags, d = params.pairs[name], params.context.lags, info.d_model
    blocks = ["x_t", *(f"x_t-{lag}" for lag in range(1, lags + 1)), "prefix", *(f"z_{j}" for j in range(1, pair.k + 1))]
    on_x = {"ato": [0], "context": list(range(len(blocks)))}
    maps = {kind: (np.hstack([W] + [np.zeros((d, d))] * (len(cols) - 1)), np.array(b)) for kind, cols in on_x.items()}
    config = ContextOperatorConfig(
        pair=name, L=pair.L, k=pair.k, lags=lags, d_model=d, blocks=blocks, kinds=on_x,
        alphas=dict.fromkeys(on_x, 1.0), absent_inputs="fill", routed_inputs="z", n_train_tokens=1,
        store_digest="store-digest", model_digest=info.weights_digest, n_layers=info.n_layers,
    )  # fmt: skip
    write_context_operator(Layout.from_params(params).context_operator(name), config, maps, np.zeros(d))
