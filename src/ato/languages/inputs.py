"""What the language comparison reads: each language's text (fit, test and causal sequences, split by
document with the corpus' seeded rule) and the English operators and SAE features it scores."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ato.artifacts import (
    SaeInfo,
)
from ato.corpus import Corpus, CorpusError, TokenSequence, sequences_for_split
from ato.errors import AtoError
from ato.evaluate.features import SaeFeatures
from ato.params import CorpusParams, Params, section_dict
from ato.store import ActivationStore

Map = tuple[np.ndarray, np.ndarray]  # (W [d, d], b [d]) float64


_UNLIMITED = 1 << 40  # a token budget no corpus reaches: the causal sequences stop by count instead


class LanguagesError(AtoError):
    """Inputs of the language comparison that do not fit; the message names the language or file."""


@dataclass
class Inputs:
    store: ActivationStore
    model: Any
    tokenizer: Any
    pairs: dict[str, tuple[int, int]]  # name → (L, L + k)
    operators: dict[str, Map]
    operator_alpha: dict[str, float]
    operator_tokens: dict[str, float]
    features: dict[int, SaeFeatures]
    sae_info: dict[int, SaeInfo]  # target layer → its SAE's quality record


@dataclass
class Text:
    """One language's text: fit and test sequences (None: read from the store) and causal sequences."""

    source: str
    fit: list[TokenSequence] | None
    test: list[TokenSequence] | None
    causal: list[TokenSequence]


# --------------------------------------------------------------------------------------------
# Text of one language


def language_corpus(
    corpus: CorpusParams, language: str, source: str, fit_tokens: int, test_tokens: int
) -> CorpusParams:
    """The reference corpus settings (split rule, max_length, packing) with another source/language and
    the comparison's budgets: train → fit, test → test (val is never read)."""
    return dataclasses.replace(
        corpus, source=source, language=language, tokens={"train": fit_tokens, "val": 1, "test": test_tokens}
    )


def split_sequences(corpus: Corpus, tokenizer: Any, split: str, language: str) -> list[TokenSequence]:
    seqs = list(sequences_for_split(corpus, tokenizer, split))
    if not seqs:
        raise LanguagesError(f"language {language} ({corpus.params.source}): no {split} documents")
    return seqs


def causal_sequences(corpus: Corpus, tokenizer: Any, n: int, seq_len: int, language: str) -> list[TokenSequence]:
    """The first `n` TEST-split sequences of at least `seq_len` tokens, cut to `seq_len` (for the
    reference language the same sequences `ato causal` takes from the store)."""
    unlimited = copy.copy(corpus)  # same documents; only the token budget differs
    unlimited.params = dataclasses.replace(corpus.params, tokens={**corpus.params.tokens, "test": _UNLIMITED})
    out: list[TokenSequence] = []
    for seq in sequences_for_split(unlimited, tokenizer, "test"):
        if len(seq.token_ids) >= seq_len:
            out.append(TokenSequence(*(getattr(seq, f.name)[:seq_len] for f in dataclasses.fields(seq))))
            if len(out) == n:
                return out
    raise LanguagesError(
        f"language {language}: only {len(out)} test sequences have ≥ {seq_len} tokens, "
        f"{n} needed (languages.causal_sequences / languages.causal_seq_len)"
    )


def language_texts(params: Params, tokenizer: Any) -> dict[str, Text]:
    """Reference language first (fit/test from the store), then `languages.sources` in order."""
    lp = params.languages
    reference = CorpusParams(**section_dict(params.corpus))
    n_causal, seq_len = lp.causal_sequences, lp.causal_seq_len
    ref_corpus = Corpus(reference, params.root)
    texts = {
        reference.language: Text(
            "store", None, None, causal_sequences(ref_corpus, tokenizer, n_causal, seq_len, reference.language)
        )
    }
    for lang, source in lp.sources.items():
        try:
            corpus = Corpus(language_corpus(reference, lang, source, lp.fit_tokens, lp.test_tokens), params.root)
        except CorpusError as exc:  # it names corpus.*; the user wrote languages.sources
            raise LanguagesError(f"languages.sources.{lang} = {source!r}: {exc}") from None
        texts[lang] = Text(
            source,
            split_sequences(corpus, tokenizer, "train", lang),
            split_sequences(corpus, tokenizer, "test", lang),
            causal_sequences(corpus, tokenizer, n_causal, seq_len, lang),
        )
    return texts
