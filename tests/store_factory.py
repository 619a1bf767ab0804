"""Small synthetic activation stores for tests (no model needed), plus helpers to damage them.

`build_store` writes a store in the exact layout `ato collect` produces (docs/contracts.md#store): zarr v3 parts
written with `ato.store.write_part` (one crc32c-checked shard per array) and a manifest whose
counts agree with the arrays. Residuals follow a noisy linear chain, layer l+1 = layer l · A_l +
noise, so stats / ridge tests can fit something real; BOS rows get a large constant-ish vector like
real models. Documents are split by document, each document one sequence starting with BOS at
position 0; parts hold whole sequences, like `collect`'s `plan_parts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import StoreManifest, ValidationVerdict
from ato.store import (
    MANIFEST,
    STORE_FORMAT,
    ActivationStore,
    bind_parts,
    directory_digest,
    layer_key,
    manifest_sha256,
    part_name,
    write_part,
)

SPLIT_DOCS = {"train": 12, "val": 4, "test": 4}
BOS_ID, PAD_ID, EOS_ID = 2, 0, 1
VOCAB = 64


@dataclass
class SyntheticStore:
    """What `build_store` wrote: the root, its manifest and every split's arrays concatenated."""

    root: Path
    manifest: dict[str, Any]
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # split → key → [n, …]

    def part(self, split: str, index: int = 0) -> Path:
        return self.root / split / self.manifest["splits"][split]["parts"][index]


def build_store(
    root: Path,
    *,
    layers: tuple[int, ...] = (0, 1, 2),
    d_model: int = 16,
    split_docs: dict[str, int] | None = None,
    max_length: int = 12,
    part_tokens: int = 40,
    chunk_tokens: int = 16,
    seed: int = 0,
) -> SyntheticStore:
    """Write a consistent store under `root` (created) and return its description."""
    rng = np.random.default_rng(seed)
    split_docs = split_docs or SPLIT_DOCS
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_layers = max(layers) + 1
    maps = [
        np.eye(d_model) * 0.9 + rng.normal(scale=0.3 / np.sqrt(d_model), size=(d_model, d_model))
        for _ in range(n_layers)
    ]
    bos_vec = rng.normal(size=d_model) * 20.0

    splits: dict[str, Any] = {}
    arrays_by_split: dict[str, dict[str, np.ndarray]] = {}
    next_doc = 0
    for split, n_docs in split_docs.items():
        seqs = []
        for _ in range(n_docs):
            length = int(rng.integers(4, max_length + 1))
            tokens = np.concatenate([[BOS_ID], rng.integers(4, VOCAB, size=length - 1)]).astype(np.int32)
            seqs.append(
                {
                    "token_id": tokens,
                    "doc_id": np.full(length, next_doc, np.int32),
                    "position": np.arange(length, dtype=np.int32),
                    "special": np.arange(length) == 0,
                }
            )
            next_doc += 1
        # group whole sequences into parts of at least `part_tokens` tokens (the last may be short)
        groups: list[list[dict]] = [[]]
        for seq in seqs:
            groups[-1].append(seq)
            if sum(len(s["token_id"]) for s in groups[-1]) >= part_tokens:
                groups.append([])
        groups = [g for g in groups if g]
        names, sizes, all_parts = [], [], []
        for index, group in enumerate(groups):
            part = {k: np.concatenate([s[k] for s in group]) for k in ("token_id", "doc_id", "position", "special")}
            n = len(part["token_id"])
            x = rng.normal(size=(n, d_model))
            for layer in range(n_layers):
                x = x @ maps[layer] + rng.normal(scale=0.1, size=(n, d_model))
                if layer in layers:
                    value = x.copy()
                    n_special = int(part["special"].sum())
                    value[part["special"]] = bos_vec * (layer + 1) + rng.normal(scale=0.01, size=(n_special, d_model))
                    part[layer_key(layer)] = value.astype(np.float32)
            write_part(root / split, index, part, chunk_tokens=chunk_tokens)
            names.append(part_name(index))
            sizes.append(n)
            all_parts.append(part)
        joined = {k: np.concatenate([p[k] for p in all_parts]) for k in all_parts[0]}
        arrays_by_split[split] = joined
        splits[split] = {
            "tokens": int(sum(sizes)),
            "special_tokens": int(joined["special"].sum()),
            "sequences": len(seqs),
            "documents": int(len(np.unique(joined["doc_id"]))),
            "parts": names,
            "part_tokens": sizes,
        }

    manifest = {
        "format": STORE_FORMAT,
        "model": {
            "name": "synthetic",
            "source": "synthetic",
            "model_type": "synthetic",
            "weights_digest": "0" * 64,
            "n_layers": n_layers,
            "d_model": d_model,
        },
        "tokenizer": {
            "bos_token_id": BOS_ID,
            "pad_token_id": PAD_ID,
            "vocab_size": VOCAB,
            "special_ids": [PAD_ID, EOS_ID, BOS_ID],
        },
        "layers": list(layers),
        "d_model": d_model,
        "dtype": "float32",
        "hook": "decoder block output (resid_post)",
        "corpus": {
            "source": "synthetic",
            "kind": "synthetic",
            "digest": "0" * 64,
            "split_rule": "synthetic",
            "split_seed": seed,
            "split_fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
            "max_length": max_length,
            "packing": False,
        },
        "splits": splits,
        "fingerprint": f"synthetic-{seed}",
    }
    manifest["content_digest"] = directory_digest(root)
    StoreManifest.from_dict(manifest, "build_store")  # what collect writes: a complete, typed manifest
    write_manifest(root, manifest)
    return SyntheticStore(root, manifest, arrays_by_split)


def write_passing_verdict(root: Path, path: Path) -> ValidationVerdict:
    """Record a store that is consistent by construction as validated, bound to its current bytes
    exactly as `ato validate` binds it (tests/test_validate.py covers the real checks)."""
    store = ActivationStore.open(root)
    digests, signatures = bind_parts(store)
    verdict = ValidationVerdict(
        success=True,
        store=str(root),
        store_digest=store.digest,
        n_expectations=0,
        n_failed=0,
        results=[],
        failures=[],
        manifest_sha256=manifest_sha256(store.root),
        part_sha256=digests,
        part_stat=signatures,
    )
    verdict.write(path)
    return verdict


# --------------------------------------------------------------------------------------------
# Damage helpers


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (Path(root) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def edit_manifest(root: Path, edit) -> dict[str, Any]:
    """Apply `edit(manifest)` (in place) to the manifest on disk; returns the new manifest."""
    manifest = json.loads((Path(root) / MANIFEST).read_text())
    edit(manifest)
    write_manifest(root, manifest)
    return manifest


def set_values(part: Path, key: str, index: Any, value: Any) -> None:
    """Overwrite `array[index] = value` inside an existing part (the shard is rewritten, checksums valid)."""
    import zarr

    group = zarr.open_group(str(part), mode="r+", zarr_format=3)
    group[key][index] = value


def shard_file(part: Path, key: str) -> Path:
    """The single shard file holding array `key` of a part."""
    files = sorted(p for p in (Path(part) / key / "c").rglob("*") if p.is_file())
    if len(files) != 1:
        raise AssertionError(f"{part}/{key}: expected one shard file, found {files}")
    return files[0]


def truncate_file(path: Path, keep_fraction: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte (default: in the middle of the file, i.e. inside chunk data)."""
    data = bytearray(Path(path).read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))
