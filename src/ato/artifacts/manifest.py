"""The activation store's manifest (`ato collect` → every later stage, through `ato.store.ActivationStore`):
`<store>/manifest.json`, written last, so a store without one is incomplete. docs/contracts.md#store
describes the parts it lists."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ._io import Record

STORE_FORMAT = "ato-activation-store/1"


@dataclass
class ManifestModel:
    """The model whose residuals the store holds (a subset of `ModelInfo`)."""

    name: str  # display name (ModelInfo.name)
    source: str  # prepare.source
    model_type: str  # HF config.model_type
    weights_digest: str | None  # ModelInfo.weights_digest (None only in hand-built test stores)
    n_layers: int  # decoder blocks of the model (the store may hold fewer layers)
    d_model: int  # residual width


@dataclass
class ManifestTokenizer:
    """The tokenizer that produced the stored token ids."""

    bos_token_id: int | None  # BOS id; stored BOS tokens have `special` set
    pad_token_id: int | None  # padding id used while collecting (never stored)
    vocab_size: int  # len(tokenizer): every stored token_id is below it
    special_ids: list[int]  # tokenizer.all_special_ids, sorted: what `special` flags


@dataclass
class ManifestCorpus:
    """Where the text came from and how it was split (provenance: no stage computes on it, validate
    checks positions against `max_length`). Hand-built test stores may leave fields out."""

    source: str | None = None  # corpus.source
    kind: str | None = None  # embedded | files | hf
    digest: str | None = None  # sha256 of the corpus files (or of the dataset identity for hf:)
    files: list[str] = field(default_factory=list)  # corpus file names
    split_rule: str | None = None  # how a document key maps to a split (ato.corpus.SPLIT_RULE)
    split_seed: int | None = None  # corpus.split_seed
    split_fractions: dict[str, float] = field(default_factory=dict)  # corpus.split_fractions
    max_length: int | None = None  # corpus.max_length: positions are below it
    packing: bool | None = None  # corpus.packing


@dataclass
class SplitInfo:
    """One split's parts and counts (`<store>/<split>/part-NNNNN.zarr`)."""

    tokens: int  # tokens stored in the split (all parts)
    special_tokens: int  # of which special (BOS …)
    sequences: int  # sequences (each starts at position 0)
    documents: int  # distinct doc_ids
    parts: list[str]  # part directory names, in order
    part_tokens: list[int]  # tokens per part, same order
    part_sha256: list[str] = field(default_factory=list)  # sha256 of each part's arrays as collect computed them
    budget: int | None = None  # corpus.tokens[split]: the budget the split was filled to


@dataclass
class StoreManifest(Record):
    """Everything a reader needs to trust and address the store's parts."""

    FORMAT = STORE_FORMAT
    PRODUCER = "collect"

    model: ManifestModel  # the model the residuals come from
    tokenizer: ManifestTokenizer  # the tokenizer of the stored token ids
    layers: list[int]  # stored layers (sorted); layer n = output of decoder block n
    d_model: int  # columns of every resid/layer_NN array
    dtype: str  # dtype of the residual arrays (collect.dtype)
    hook: str  # where the residual was captured (ato.stages.collect.HOOK)
    corpus: ManifestCorpus  # provenance of the text
    splits: dict[str, SplitInfo]  # train, val, test
    fingerprint: str  # sha256 of what determines the bytes (model, corpus, params); collect resumes on a match
    content_digest: str  # sha256 over every part's part_sha256: the store's identity in every downstream file


def type_problems(value: Any, annotation: Any = None, where: str = "") -> list[tuple[str, str | None]]:
    """(dotted key, problem or None) for every leaf field of a record such as `StoreManifest`,
    checked against its annotation: a manifest can be complete yet carry a string where an int belongs."""
    annotation = type(value) if annotation is None else annotation
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not dataclasses.is_dataclass(value):
            return [(where, f"expected an object, got {value!r:.80}")]
        hints = typing.get_type_hints(annotation)
        out: list[tuple[str, str | None]] = []
        for f in dataclasses.fields(annotation):
            key = f"{where}.{f.name}" if where else f.name
            out += type_problems(getattr(value, f.name), hints[f.name], key)
        return out
    if typing.get_origin(annotation) is dict and isinstance(value, dict):
        value_type = typing.get_args(annotation)[1]
        if dataclasses.is_dataclass(value_type):
            return [p for k, v in value.items() for p in type_problems(v, value_type, f"{where}.{k}")]
    ok = _is_instance(value, annotation)
    return [(where, None if ok else f"expected {_name(annotation)}, got {value!r:.80}")]


def _is_instance(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if origin is list:
        return isinstance(value, list) and all(_is_instance(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _is_instance(v, args[1]) for k, v in value.items()
        )
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
