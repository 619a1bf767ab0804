"""Stage `collect`: residuals after the requested decoder blocks → the zarr activation store.

Resumable: parts are fixed by the token sequences alone (not by what ran before), each part is
written atomically, and a rerun with the same fingerprint keeps every complete part. A rerun with
other params/model/corpus starts the store afresh. Memory is bounded by `collect.part_tokens`.
The store's layout and manifest: docs/contracts.md#store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ato.artifacts import (
    ArtifactError,
    Layout,
    ManifestCorpus,
    ManifestModel,
    ManifestTokenizer,
    ModelInfo,
    SplitInfo,
    StoreManifest,
    read_json,
    write_json_atomic,
)
from ato.artifacts.manifest import STORE_FORMAT
from ato.corpus import SPLIT_RULE, Corpus, TokenSequence, as_arrays, sequences_for_split
from ato.models import load_prepared
from ato.params import SPLITS, CollectParams, CorpusParams, Params, check_depth, section_dict
from ato.residuals import collect_part, pad_id_of
from ato.store import (
    MANIFEST,
    ActivationStore,
    StoreError,
    complete_parts,
    layer_key,
    part_name,
    remove_temporaries,
    write_part,
)

log = logging.getLogger(__name__)

PROGRESS = "_progress.json"
HOOK = "resid_post: output of decoder block n via a forward hook (TransformerLens blocks.n.hook_resid_post)"
_FLOAT16_MAX = 65504.0


def plan_parts(seqs: list[TokenSequence], part_tokens: int) -> list[list[TokenSequence]]:
    """Group consecutive sequences into parts of at least `part_tokens` tokens (the last may be short).
    A sequence never straddles two parts."""
    parts: list[list[TokenSequence]] = []
    current: list[TokenSequence] = []
    size = 0
    for seq in seqs:
        current.append(seq)
        size += len(seq.token_ids)
        if size >= part_tokens:
            parts.append(current)
            current, size = [], 0
    if current:
        parts.append(current)
    return parts


def fingerprint(
    collect: CollectParams, corpus: CorpusParams, model_digest: str, corpus_digest: str, layers: list[int]
) -> str:
    """What determines the store's bytes; device is left out (results must not depend on it)."""
    settings = section_dict(collect)
    settings.pop("device")
    ident = {
        "model": model_digest,
        "corpus": corpus_digest,
        "corpus_params": section_dict(corpus),
        "collect": settings,
        "layers": layers,
        "format": STORE_FORMAT,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _to_storage(acts: np.ndarray, dtype: str, where: str) -> np.ndarray:
    if not np.isfinite(acts).all():
        raise StoreError(f"{where}: the model produced non-finite residuals")
    if dtype == "float16" and np.abs(acts).max() > _FLOAT16_MAX:
        raise StoreError(f"{where}: |x| up to {np.abs(acts).max():.3g} overflows float16; use dtype float32")
    if dtype == "bfloat16":
        raise StoreError("collect.dtype: zarr has no bfloat16; use float32 or float16")
    return acts.astype(dtype, copy=False)


def _part_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def _write_and_record(
    root: Path, split: str, index: int, arrays: dict[str, np.ndarray], chunk_tokens: int, progress: dict[str, Any]
) -> None:
    """Write one part atomically, then record its digest (a kill in between is healed on resume)."""
    digest = _part_digest(arrays)
    write_part(root / split, index, arrays, chunk_tokens, attrs={"sha256": digest, "split": split})
    progress["part_digests"][f"{split}/{part_name(index)}"] = digest
    write_json_atomic(root / PROGRESS, progress)


def _stored_digest(part: Path) -> str:
    import zarr

    return str(zarr.open_group(str(part), mode="r", zarr_format=3).attrs["sha256"])


def _prepare_root(root: Path, fp: str) -> dict[str, Any] | None:
    """Keep a compatible partial store (resume) or clear an incompatible one. Returns the progress
    record (`_progress.json`: fingerprint + digests of the parts written so far), or None when the
    store is already complete for this fingerprint."""
    progress_path = root / PROGRESS
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        try:
            if ActivationStore.open(root).manifest.fingerprint == fp:
                return None
        except StoreError:
            pass  # a foreign or damaged manifest: the store is rebuilt below
    try:
        progress = read_json(progress_path) if progress_path.exists() else {}
    except ArtifactError:
        progress = {}
    if progress.get("fingerprint") != fp:
        if root.exists():
            shutil.rmtree(root)
        progress = {"fingerprint": fp, "part_digests": {}}
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    remove_temporaries(root)
    write_json_atomic(progress_path, progress)
    return progress


@dataclass
class _Collector:
    """What every part of every split is collected with."""

    model: Any
    device: torch.device
    pad_id: int
    layers: list[int]
    settings: CollectParams
    root: Path
    progress: dict[str, Any]

    def split(self, split: str, seqs: list[TokenSequence], budget: int) -> SplitInfo:
        """Collect and write the split's missing parts; the split's manifest entry."""
        parts = plan_parts(seqs, self.settings.part_tokens)
        done = {q.name for q in complete_parts(self.root / split)}
        for name in done:  # killed between the part's rename and the progress write: read it back
            self.progress["part_digests"].setdefault(f"{split}/{name}", _stored_digest(self.root / split / name))
        todo = sum(len(s.token_ids) for i, part in enumerate(parts) if part_name(i) not in done for s in part)
        # One writer thread: part i is written (mostly disk I/O, GIL released) while part i+1 is
        # computed. At most two parts are in memory; parts are written and recorded in order.
        pending: Future[None] | None = None
        with (
            tqdm(total=todo, unit="tok", unit_scale=True, desc=f"collect {split}", dynamic_ncols=True) as bar,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ato-write") as writer,
        ):
            for i, part in enumerate(parts):
                if part_name(i) in done:
                    continue
                arrays = self._part_arrays(split, i, part, bar)
                if pending is not None:
                    pending.result()  # re-raises the previous part's write error here
                pending = writer.submit(
                    _write_and_record, self.root, split, i, arrays, self.settings.chunk_tokens, self.progress
                )
            if pending is not None:
                pending.result()
        return self._split_info(split, seqs, parts, budget)

    def _part_arrays(self, split: str, index: int, part: list[TokenSequence], bar: tqdm) -> dict[str, np.ndarray]:
        s = self.settings
        acts = collect_part(self.model, part, self.layers, self.pad_id, self.device, s.batch_size, bar)
        arrays = {
            layer_key(layer): _to_storage(a, s.dtype, f"{split}/{part_name(index)} layer {layer}")
            for layer, a in acts.items()
        }
        arrays.update(as_arrays(part))
        return arrays

    def _split_info(
        self, split: str, seqs: list[TokenSequence], parts: list[list[TokenSequence]], budget: int
    ) -> SplitInfo:
        stored = as_arrays(seqs)
        names = [part_name(i) for i in range(len(parts))]
        return SplitInfo(
            tokens=int(len(stored["token_id"])),
            special_tokens=int(stored["special"].sum()),
            sequences=len(seqs),
            documents=int(len(np.unique(stored["doc_id"]))),
            parts=names,
            part_tokens=[sum(len(s.token_ids) for s in part) for part in parts],
            part_sha256=[self.progress["part_digests"][f"{split}/{name}"] for name in names],
            budget=budget,
        )


def build_manifest(
    info: ModelInfo,
    tokenizer: Any,
    pad_id: int,
    layers: list[int],
    dtype: str,
    corpus: Corpus,
    splits: dict[str, SplitInfo],
    fp: str,
) -> StoreManifest:
    """The manifest of a finished store; its content digest chains every part's sha256 in split order."""
    c = corpus.params
    content = hashlib.sha256("".join(d for s in SPLITS for d in splits[s].part_sha256).encode()).hexdigest()
    return StoreManifest(
        model=ManifestModel(
            name=info.name,
            source=info.source,
            model_type=info.model_type,
            weights_digest=info.weights_digest,
            n_layers=info.n_layers,
            d_model=info.d_model,
        ),
        tokenizer=ManifestTokenizer(
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=pad_id,
            vocab_size=len(tokenizer),
            special_ids=sorted(tokenizer.all_special_ids),
        ),
        layers=layers,
        d_model=info.d_model,
        dtype=dtype,
        hook=HOOK,
        corpus=ManifestCorpus(
            **corpus.describe(),
            split_rule=SPLIT_RULE,
            split_seed=c.split_seed,
            split_fractions=c.split_fractions,
            max_length=c.max_length,
            packing=c.packing,
        ),
        splits=splits,
        fingerprint=fp,
        content_digest=content,
    )


def main(params: Params) -> Path:
    p, c, layout = params.collect, params.corpus, Layout.from_params(params)
    root = layout.store
    model, tokenizer, info = load_prepared(layout.model_dir, p.device)
    check_depth(params, info.n_layers)
    layers = list(range(info.n_layers)) if p.layers == "all" else sorted(set(p.layers))
    corpus = Corpus(c, params.root)
    fp = fingerprint(p, c, info.weights_digest, corpus.digest, layers)
    progress = _prepare_root(root, fp)
    if progress is None:
        log.info("collect: %s is complete and matches the params; nothing to do", root)
        return root
    pad_id = pad_id_of(tokenizer)
    collector = _Collector(model, next(model.parameters()).device, pad_id, layers, p, root, progress)
    t0 = time.perf_counter()
    splits: dict[str, SplitInfo] = {}
    for split in SPLITS:
        seqs = list(sequences_for_split(corpus, tokenizer, split))
        if not seqs:
            raise StoreError(f"corpus {c.source!r}: split {split!r} has no documents; lower its fraction or add text")
        splits[split] = collector.split(split, seqs, c.tokens[split])
    build_manifest(info, tokenizer, pad_id, layers, p.dtype, corpus, splits, fp).write(layout.manifest)
    (root / PROGRESS).unlink(missing_ok=True)
    total = sum(s.tokens for s in splits.values())
    log.info("collect: %d tokens × %d layers → %s in %.0fs", total, len(layers), root, time.perf_counter() - t0)
    return root
