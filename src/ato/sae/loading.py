"""Load an SAE: a directory in sae-lens disk format (`cfg.json` + `sae_weights.safetensors`, what
`ato sae` writes), or a sae-lens pretrained release checked against the local cache first.

Pretrained releases load through sae-lens' own converters (`SAE.from_pretrained`): Gemma Scope
(Gemma-2, `params.npz`) and Gemma Scope 2 (Gemma-3, `params.safetensors` + optional `config.json`)
alike. Offline, sae-lens' Gemma Scope 2 converter would still probe the hub for the tensor shapes
(HTTP range requests on the safetensors header); `_local_shapes` answers that probe from the cached
file instead, so a cached SAE loads with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SaeError

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE

SAE_CATALOGUE_URL = "https://decoderesearch.github.io/SAELens/latest/pretrained_saes/"


def hook_name(layer: int) -> str:
    """TransformerLens / sae-lens hook of residual layer `layer` (see docs/conventions.md#layers)."""
    return f"blocks.{layer}.hook_resid_post"


def load_sae(directory: Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE saved in `directory` (sae-lens `SAE.load_from_disk`), in eval mode; a missing directory,
    or a damaged or foreign file in it, is a SaeError naming the directory or the file."""
    from sae_lens import SAE

    from ato.artifacts import ArtifactError, check_safetensors, read_json

    directory = Path(directory)
    if not (directory / "cfg.json").exists():
        raise SaeError(f"{directory}: no SAE here (no cfg.json); run `ato sae`")
    try:  # sae-lens' own errors on a damaged file name neither the file nor what to do
        read_json(directory / "cfg.json", "the SAE's sae-lens config; rerun `ato sae`")
        for weights in sorted(directory.glob("*.safetensors")):
            check_safetensors(weights, "the SAE's weights; rerun `ato sae`")
    except ArtifactError as exc:
        raise SaeError(str(exc)) from None
    try:
        sae = SAE.load_from_disk(str(directory), device=str(device))
    except Exception as exc:  # sae-lens raises many kinds on a bad directory
        raise SaeError(
            f"{directory / 'cfg.json'}: sae-lens cannot load the SAE from it: {exc!r}; rerun `ato sae`"
        ) from exc
    return sae.eval()


def resolve_pretrained(release: str, sae_id: str) -> dict[str, Any]:
    """Check a (release, sae_id) against sae-lens' directory — and, offline, against the local HF
    cache — *before* touching the hub, so a doomed run fails in seconds with what to do.
    Returns {"repo_id", "folder", "neuronpedia_id"}."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from ato.models import offline

    directory = get_pretrained_saes_directory()
    neuronpedia_id = None
    if release in directory:
        entry = directory[release]
        if sae_id not in entry.saes_map:
            raise SaeError(
                f"sae.sae_id_template gives {sae_id!r}, which release {release!r} does not have; "
                f"{_available(entry.saes_map, sae_id)}"
            )
        repo_id, folder = entry.repo_id, entry.saes_map[sae_id]
        neuronpedia_id = (entry.neuronpedia_id or {}).get(sae_id)
    elif "/" in release:
        repo_id, folder = release, sae_id
    else:
        raise SaeError(
            f"sae.release {release!r} is neither a sae-lens pretrained release nor a hub repo id "
            f"(owner/name); see {SAE_CATALOGUE_URL}"
        )
    if offline():
        _require_cached(release, sae_id, repo_id, folder)
    return {"repo_id": repo_id, "folder": folder, "neuronpedia_id": neuronpedia_id}


def _available(ids: dict[str, Any], sae_id: str) -> str:
    """Which layers the release has for the same id pattern (e.g. Gemma Scope 2 for Gemma-3-270M
    covers layers 5, 9, 12 and 15 only), else a few of its ids."""
    pattern = re.sub(r"layer_\d+", "layer_{n}", sae_id, count=1)
    layers = [n for n in range(200) if pattern != sae_id and pattern.format(n=n) in ids]
    if layers:
        return f"it has {pattern!r} for layers {', '.join(map(str, layers))} (choose pairs whose L + k is one of them)"
    return f"ids look like: {', '.join(list(ids)[:5])}, …"


def _require_cached(release: str, sae_id: str, repo_id: str, folder: str) -> None:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    cached = any((snap / folder).exists() for snap in cache.glob("*")) if cache.exists() else False
    if not cached:
        raise SaeError(
            f"sae.source=pretrained: SAE {release}/{sae_id} (hub repo {repo_id}, folder {folder}) is not in "
            f"the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading "
            "it. Run `HF_HUB_OFFLINE=0 ato sae` once on a machine with network access to cache it, or set "
            "sae.source: train to train SAEs on the activation store."
        )


def load_pretrained(release: str, sae_id: str, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """A sae-lens pretrained SAE in eval mode, and where it lives (`resolve_pretrained`)."""
    from sae_lens import SAE

    where = resolve_pretrained(release, sae_id)
    try:
        with _local_shapes():
            sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as exc:  # network, cache and format errors alike
        raise SaeError(f"loading pretrained SAE {release}/{sae_id} failed: {exc}") from exc
    return sae.eval(), where


@contextmanager
def _local_shapes() -> Iterator[None]:
    """While offline, sae-lens' safetensors shape probe reads the cached file's header."""
    import sae_lens.loading.pretrained_sae_loaders as loaders

    from ato.models import offline

    if not offline():
        yield
        return

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        from huggingface_hub import hf_hub_download
        from safetensors import safe_open

        path = hf_hub_download(repo_id, filename)  # from the cache (offline)
        with safe_open(path, framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}

    original = loaders.get_safetensors_tensor_shapes
    loaders.get_safetensors_tensor_shapes = shapes
    try:
        yield
    finally:
        loaders.get_safetensors_tensor_shapes = original
