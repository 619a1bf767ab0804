"""The pretrained path, offline: SAEs saved in the Gemma Scope 2 (Gemma-3: params.safetensors) and
Gemma Scope (Gemma-2: params.npz) on-disk formats in a local Hugging Face cache load through
`ato.sae.load_pretrained` / the `sae` stage with HF_HUB_OFFLINE=1, and get the same quality report
and gates as a trained SAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_tiny_params
from test_sae import TARGETS, make_model_store

D_IN, D_SAE = 32, 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
        "w_dec": rng.normal(size=(D_SAE, D_IN)).astype(np.float32) * 0.1,
        "b_enc": rng.normal(size=D_SAE).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=D_IN).astype(np.float32) * 0.1,
        "threshold": rng.uniform(0.05, 0.5, size=D_SAE).astype(np.float32),
    }


def _snapshot(cache, repo_id: str):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def save_gemma_scope_2(cache, layers) -> dict[int, dict[str, np.ndarray]]:
    """Gemma Scope 2 layout: google/gemma-scope-2-270m-pt/resid_post/layer_N_width_16k_l0_medium/."""
    from safetensors.numpy import save_file

    snap = _snapshot(cache, "google/gemma-scope-2-270m-pt")
    out = {}
    for n in layers:
        folder = snap / "resid_post" / f"layer_{n}_width_16k_l0_medium"
        folder.mkdir(parents=True)
        out[n] = _weights(n)
        save_file(out[n], str(folder / "params.safetensors"))
    return out


def save_gemma_scope(cache, release: str, layers) -> dict[int, dict[str, np.ndarray]]:
    """Gemma Scope layout: google/gemma-scope-2b-pt-res/layer_N/width_16k/average_l0_X/params.npz."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    entry = get_pretrained_saes_directory()[release]
    snap = _snapshot(cache, entry.repo_id)
    out = {}
    for n in layers:
        folder = snap / entry.saes_map[f"layer_{n}/width_16k/canonical"]
        folder.mkdir(parents=True)
        out[n] = _weights(n)
        np.savez(folder / "params.npz", **{("W_" + k[2:] if k.startswith("w_") else k): v for k, v in out[n].items()})
    return out


def _jumprelu(w: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    pre = x @ torch.from_numpy(w["w_enc"]) + torch.from_numpy(w["b_enc"])
    return pre * (pre > torch.from_numpy(w["threshold"]))


def test_gemma_scope_2_loads_offline_from_the_cache(offline_cache):
    from ato.sae import load_pretrained

    w = save_gemma_scope_2(offline_cache, [5])[5]  # Gemma Scope 2 covers layers 5, 9, 12, 15 of the 270M
    sae, where = load_pretrained("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_medium")
    assert where["repo_id"] == "google/gemma-scope-2-270m-pt"
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.d_in == D_IN and sae.cfg.d_sae == D_SAE
    assert sae.cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    x = torch.randn(20, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), _jumprelu(w, x))
        torch.testing.assert_close(
            sae.decode(sae.encode(x)), _jumprelu(w, x) @ torch.from_numpy(w["w_dec"]) + torch.from_numpy(w["b_dec"])
        )


def test_gemma_scope_for_gemma_2_loads_offline(offline_cache, monkeypatch):
    """Gemma Scope's converter takes d_in from the model name (2304 for Gemma-2-2B) and d_sae from the
    folder (16k); the override shrinks both to the tiny test width, everything else is the real path."""
    import sae_lens.saes.sae as sae_module

    from ato.sae import load_pretrained

    release = "gemma-scope-2b-pt-res-canonical"
    w = save_gemma_scope(offline_cache, release, [3])[3]
    monkeypatch.setattr(sae_module, "get_config_overrides", lambda *_: {"d_in": D_IN, "d_sae": D_SAE})
    sae, where = load_pretrained(release, "layer_3/width_16k/canonical")
    assert where["repo_id"] == "google/gemma-scope-2b-pt-res" and where["neuronpedia_id"]
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(20, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), _jumprelu(w, x))


def test_pretrained_stage_reports_quality_and_gates(tiny_project, offline_cache, monkeypatch):
    """The stage loads Gemma Scope SAEs for the target layers and gives them the same report and gates."""
    import sae_lens.saes.sae as sae_module

    from ato.stages import sae as stage

    release = "gemma-scope-2b-pt-res-canonical"
    save_gemma_scope(offline_cache, release, TARGETS)
    monkeypatch.setattr(sae_module, "get_config_overrides", lambda *_: {"d_in": D_IN, "d_sae": D_SAE})
    make_model_store(tiny_project)
    params = load_tiny_params(
        tiny_project, **{"sae.source": "pretrained", "sae.eval_sequences": 4, "sae.eval_seq_len": 8}
    )
    results = stage.main(params)
    for n in TARGETS:
        info = results[n]
        assert info.source == "pretrained" and info.architecture == "jumprelu" and info.d_sae == D_SAE
        assert info.sae_id == f"layer_{n}/width_16k/canonical" and info.train_seconds is None
        assert info.ce_recovered_zero is not None and info.kl_sae is not None and info.dense_fraction is not None
        # random weights reconstruct nothing: the FVE gate fails, with its shortfall
        assert not info.reliable and any(f.startswith("fve_val") for f in info.gate_failures)
        assert (params.path("sae_dir") / f"layer_{n:02d}" / "cfg.json").exists()


def test_a_layer_the_release_lacks_names_the_layers_it_has():
    from ato.sae import SaeError, resolve_pretrained

    with pytest.raises(SaeError, match=r"layers 5, 9, 12, 15"):
        resolve_pretrained("gemma-scope-2-270m-pt-res", "layer_6_width_16k_l0_medium")
