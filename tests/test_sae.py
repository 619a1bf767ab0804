"""Stage `sae`: sparse TopK loss == sae-lens' loss, scale fold-back, save/reload, stage outputs,
determinism, and the offline failure of `source: pretrained`."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ato.params import SaeParams
from conftest import load_tiny_params, tiny_model

TARGETS = (1, 3)  # target layers of conftest.TINY_PARAMS' pairs
STORE_LAYERS = (0, 1, 3)  # every layer those pairs need: their train statistics give the SAE gates' ȳ


SPLIT_SEQUENCES = {"train": 40, "val": 12, "test": 6}


def make_model_store(project: Path, layers=STORE_LAYERS, seqs: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A small activation store holding the tiny model's real residuals of random word sequences
    (written with ato.store.write_part + a manifest, as `ato collect` would), and its pair statistics
    (`ato stats`, for the project's params.yaml pairs)."""
    from ato.artifacts import ValidationVerdict, write_json_atomic
    from ato.models import base_model, capture_residuals, run_captured
    from ato.stages import stats
    from ato.store import (
        MANIFEST,
        STORE_FORMAT,
        ActivationStore,
        layer_key,
        manifest_sha256,
        part_digests,
        write_part,
    )

    seqs = SPLIT_SEQUENCES if seqs is None else seqs
    model = tiny_model()
    rng = np.random.default_rng(seed)
    root = project / "data" / "activations"
    splits = {}
    doc = 0
    for split, n_seq in seqs.items():
        arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("token_id", "doc_id", "position", "special")}
        resid: dict[int, list[np.ndarray]] = {n: [] for n in layers}
        for _ in range(n_seq):
            length = int(rng.integers(10, 24))
            ids = np.concatenate([[2], rng.integers(4, 44, length - 1)]).astype(np.int32)
            with torch.no_grad(), capture_residuals(model, list(layers)) as cap:
                run_captured(base_model(model), input_ids=torch.as_tensor(ids[None], dtype=torch.long))
            for n in layers:
                resid[n].append(cap[n][0].numpy().astype(np.float32))
            arrays["token_id"].append(ids)
            arrays["doc_id"].append(np.full(length, doc, np.int32))
            arrays["position"].append(np.arange(length, dtype=np.int32))
            arrays["special"].append(ids == 2)
            doc += 1
        data = {k: np.concatenate(v) for k, v in arrays.items()}
        data.update({layer_key(n): np.concatenate(resid[n]) for n in layers})
        write_part(root / split, 0, data, chunk_tokens=64)
        n_tok = len(data["token_id"])
        splits[split] = {
            "tokens": n_tok,
            "special_tokens": int(data["special"].sum()),
            "sequences": n_seq,
            "documents": n_seq,
            "parts": ["part-00000.zarr"],
            "part_tokens": [n_tok],
        }
    manifest = {
        "format": STORE_FORMAT,
        "model": {
            "name": "tiny-gemma3",
            "source": "tiny",
            "model_type": "gemma3_text",
            "weights_digest": None,
            "n_layers": 4,
            "d_model": 32,
        },
        "tokenizer": {"bos_token_id": 2, "pad_token_id": 0, "vocab_size": 128, "special_ids": [0, 1, 2, 3]},
        "layers": list(layers),
        "d_model": 32,
        "dtype": "float32",
        "hook": "block output",
        "corpus": {},
        "splits": splits,
        "fingerprint": f"synthetic-{seed}",
        "content_digest": f"synthetic-content-{seed}",
    }
    write_json_atomic(root / MANIFEST, manifest)
    # Stages refuse unvalidated stores; this synthetic store is consistent by construction
    # (tests/test_validate.py covers the real check), so record it as validated, bound to its bytes.
    store = ActivationStore.open(root)
    verdict = ValidationVerdict(
        success=True, store=str(root), store_digest=store.digest, n_expectations=0, n_failed=0, results=[],
        failures=[], manifest_sha256=manifest_sha256(root), part_sha256=part_digests(store),
    )  # fmt: skip
    verdict.write(project / "reports" / "validation" / "validation.json")
    stats.main(load_tiny_params(project))
    return root


def test_sparse_topk_loss_matches_sae_lens():
    """The sparse training step (`SparseTopKTrainingSAE`) == sae-lens' dense `TopKTrainingSAE` step:
    loss, each loss term, reconstruction, activations and every gradient."""
    from sae_lens import TopKTrainingSAE
    from sae_lens.saes.sae import TrainStepInput

    from ato.sae.training import SparseTopKTrainingSAE, build_training_sae

    sae = build_training_sae(SaeParams(width=64, k=4), 16)
    assert isinstance(sae, SparseTopKTrainingSAE)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    x = torch.randn(32, 16) * 3
    for dead in (None, torch.rand(64) < 0.3, torch.rand(64) < 0.05):
        step = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
        )
        ref = TopKTrainingSAE.training_forward_pass(sae, step)  # sae-lens' own (dense) pass
        ref.loss.backward()
        g_ref = {n: p.grad.clone() for n, p in sae.named_parameters()}
        sae.zero_grad()
        out = sae.training_forward_pass(step)
        out.loss.backward()
        torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=1e-5)
        assert set(out.losses) == set(ref.losses)
        for name in ref.losses:
            torch.testing.assert_close(out.losses[name].detach(), ref.losses[name].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.sae_out.detach(), ref.sae_out.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.feature_acts, ref.feature_acts.detach(), rtol=1e-5, atol=1e-5)
        for name, p in sae.named_parameters():
            torch.testing.assert_close(p.grad, g_ref[name], rtol=1e-4, atol=1e-5)
        sae.zero_grad()


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_scale_fold_back(arch):
    """The saved (raw-space) SAE equals the training SAE run on scaled inputs, rescaled."""
    from ato.sae.training import build_training_sae, to_inference_sae

    tsae = build_training_sae(SaeParams(architecture=arch, width=48, k=5), 16)
    with torch.no_grad():
        tsae.W_enc.normal_(0, 0.3)
        tsae.W_dec.normal_(0, 0.3)
        tsae.b_enc.normal_(0, 0.2)
        tsae.b_dec.normal_(0, 0.5)
        if arch == "jumprelu":
            tsae.threshold.uniform_(0.05, 0.4)
    scale = 2.5e-3  # residuals with norms ~1e3
    x = torch.randn(64, 16) * 800
    sae = to_inference_sae(tsae, scale)
    with torch.no_grad():
        acts_train = tsae.encode(x * scale)
        acts_raw = sae.encode(x)
        assert torch.equal(acts_raw > 0, acts_train > 0)  # same active set
        torch.testing.assert_close(
            acts_raw,
            acts_train / scale * tsae.W_dec.norm(dim=-1) if arch == "jumprelu" else acts_train / scale,
            rtol=1e-4,
            atol=1e-3,
        )
        torch.testing.assert_close(sae.decode(acts_raw), tsae.decode(acts_train) / scale, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48))
    assert sae.cfg.normalize_activations == "none"


def test_train_save_reload_identical_and_topk_exact(tmp_path):
    from sae_lens import SAE

    from ato.sae.quality import evaluate_sae
    from ato.sae.training import input_scale, train_sae

    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(40, 24, generator=g)

    def batch(n):
        codes = torch.rand(n, 40, generator=g) * (torch.rand(n, 40, generator=g) < 0.1)
        return (codes @ dirs) * 500 + 3000.0

    def stream():
        while True:
            yield batch(128)

    sp = SaeParams(width=64, k=6, steps=60, batch_tokens=128, lr=3e-3)
    sample = batch(1024)
    scale = input_scale(sample)
    sae, info = train_sae(stream(), 24, sp, scale, b_dec_init=sample.mean(0), progress=False)
    x = batch(512)
    ev = evaluate_sae(sae, [x])
    assert ev.fve > 0.5, ev
    with torch.no_grad():
        acts = sae.encode(x)
    assert torch.all((acts > 0).sum(-1) == sp.k)  # TopK: exactly k active
    sae.save_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(str(tmp_path / "sae"))
    assert type(loaded).__name__ == "TopKSAE"
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), acts)
        assert torch.equal(loaded.decode(acts), sae.decode(acts))


STAGE_OVERRIDES = {"sae.steps": 40, "sae.lr": 0.01}  # conftest: 500 TRAIN tokens (no streaming), 4 × 8 VAL tokens


def _train_hash(x: torch.Tensor, sp: SaeParams) -> bytes:
    from ato.sae.data import shuffled_batches
    from ato.sae.training import input_scale, train_sae

    sae, _ = train_sae(shuffled_batches(x, sp.batch_tokens, seed=1), x.shape[1], sp, input_scale(x), progress=False)
    return b"".join(t.detach().numpy().tobytes() for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec))


def test_training_is_bitwise_repeatable_across_thread_counts():
    """At a realistic size (d 640, width 1024, k 64) the threaded backward accumulated in thread order
    and two trainings drifted apart in the last bits; under deterministic kernels two threads give
    the single-thread bytes, and the caller's determinism setting is restored."""
    from ato.atlas import torch_threads

    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.standard_normal((8192, 640)) * rng.gamma(1.0, 1.0, 640)).astype(np.float32))
    sp = SaeParams(steps=40)
    with torch_threads(2):
        two = [_train_hash(x, sp) for _ in range(2)]
    with torch_threads(1):
        one = _train_hash(x, sp)
    assert two[0] == two[1] == one
    assert not torch.are_deterministic_algorithms_enabled()


def test_stage_trains_saves_reports(tiny_project):
    from sae_lens import SAE

    from ato.stages import sae as stage

    params = load_tiny_params(tiny_project, **STAGE_OVERRIDES)
    make_model_store(tiny_project)
    t0 = time.perf_counter()
    results = stage.main(params)
    assert time.perf_counter() - t0 < 40
    assert sorted(results) == list(TARGETS)
    first = {}
    for n in TARGETS:
        d = params.path("sae_dir") / f"layer_{n:02d}"
        info = json.loads((d / "ato_sae.json").read_text())
        for key in ("layer", "architecture", "d_in", "d_sae", "store_digest", "fve_val", "mean_l0", "dead_fraction"):
            assert key in info
        assert info["layer"] == n and info["d_in"] == 32 and info["d_sae"] == 64
        assert info["architecture"] == "topk" and info["store_digest"] == "synthetic-content-0"
        assert 0 < info["fve_val"] <= 1 and info["mean_l0"] <= 4 and 0 <= info["dead_fraction"] <= 1
        assert 0 <= info["dense_fraction"] <= 1 and info["dense_threshold"] == 0.1
        assert info["data_tokens"] == 500 and info["data_tokens_from_model"] == 0
        # downstream check (random model: ablations need not hurt, but they move the distribution)
        assert info["n_eval_sequences"] == 4 and info["n_eval_tokens"] == 4 * 6  # 7 predictions, BOS's not scored
        assert info["kl_sae"] >= 0 and info["kl_zero"] > 0 and info["kl_mean"] > 0
        assert info["gates"] == {"min_fve": 0.8, "max_dead": 0.05, "min_ce_recovered": 0.9, "ce_reference": "mean"}
        assert info["delta_sae"] == pytest.approx(info["ce_sae"] - info["ce_clean"]) and info["delta_sae_se"] >= 0
        assert info["reliable"] == (not info["gate_failures"])
        assert json.loads((params.path("reports") / "sae" / f"layer_{n:02d}.json").read_text()) == info
        sae = SAE.load_from_disk(str(d))
        assert sae.cfg.metadata.hook_name == f"blocks.{n}.hook_resid_post"
        first[n] = (d / "sae_weights.safetensors").read_bytes()
    assert results[TARGETS[0]].ce_clean == results[TARGETS[1]].ce_clean
    # deterministic: rerunning gives the same bytes
    stage.main(params)
    for n in TARGETS:
        assert (params.path("sae_dir") / f"layer_{n:02d}" / "sae_weights.safetensors").read_bytes() == first[n]


def test_gate_mean_ablation_uses_the_causal_reference_mean(tiny_project, monkeypatch):
    """The SAE gate's mean ablation splices in exactly causal_reference's ȳ_train: the mean of the
    store's whole TRAIN split without BOS, not of the SAE's 500 training tokens (the split has more)."""
    from ato.artifacts import Layout
    from ato.stages import causal_reference
    from ato.stages import sae as stage
    from ato.store import ActivationStore

    params = load_tiny_params(tiny_project, **{**STAGE_OVERRIDES, "sae.steps": 5})
    make_model_store(tiny_project)
    spliced: dict[int, torch.Tensor] = {}
    real_splice = stage.splice_quality

    def recording_splice(model, saes, means, *args):
        spliced.update(means)
        return real_splice(model, saes, means, *args)

    monkeypatch.setattr(stage, "splice_quality", recording_splice)
    stage.main(params)
    store = ActivationStore.open(params.path("store"))
    causal = causal_reference.target_means(Layout.from_params(params), params.pairs, 4, 32, store.digest)
    assert sorted(spliced) == sorted(causal) == list(TARGETS)
    for n in TARGETS:
        assert torch.equal(spliced[n], causal[n][1])
        rows = np.concatenate([c[n] for c in store.iter_chunks("train", [n])]).astype(np.float64)  # BOS dropped
        assert len(rows) > params.sae.tokens
        np.testing.assert_allclose(spliced[n].numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)
        assert not np.allclose(spliced[n].numpy(), rows[: params.sae.tokens].mean(0), rtol=1e-5, atol=1e-6)


def test_failing_gate_marks_the_sae_unreliable(tiny_project):
    """A gate the SAE cannot meet → reliable false, the shortfall named, in the record and in MLflow."""
    import mlflow

    from ato.stages import sae as stage

    gates = {"min_fve": 0.9999, "max_dead": 1.0, "min_ce_recovered": -1e9}
    params = load_tiny_params(tiny_project, **{**STAGE_OVERRIDES, "sae.steps": 10, "sae.gates": gates})
    make_model_store(tiny_project)
    results = stage.main(params)
    for info in results.values():
        assert not info.reliable
        assert len(info.gate_failures) == 1 and info.gate_failures[0].startswith(f"fve_val {info.fve_val:.3f} < 0.9999")
        assert "short by" in info.gate_failures[0]
    mlflow.set_tracking_uri(params.mlflow_uri())
    run = mlflow.search_runs(experiment_names=[params.paths.mlflow_experiment], output_format="list")[0]
    for n in TARGETS:
        assert run.data.tags[f"sae_reliable.layer_{n:02d}"] == "false"
        assert run.data.tags[f"sae_gate_failures.layer_{n:02d}"].startswith("fve_val")
        assert run.data.metrics[f"sae_layer_{n:02d}_reliable"] == 0.0
    # and passing every gate → reliable, no failures
    params = load_tiny_params(tiny_project, **{"sae.gates": {**gates, "min_fve": 0.0}})
    assert all(info.reliable and not info.gate_failures for info in stage.main(params).values())


def test_default_ce_gate_is_judged_against_mean_ablation(tiny_project, monkeypatch):
    """With the default gates, an SAE that recovers 0.99 of zero ablation's loss but only 0.50 of mean
    ablation's fails its CE gate (a gate judged against zero ablation would pass it)."""
    from ato.sae.quality import SpliceQuality
    from ato.stages import sae as stage

    params = load_tiny_params(tiny_project, **{**STAGE_OVERRIDES, "sae.steps": 5})
    make_model_store(tiny_project)
    assert params.sae.gates.ce_reference == "mean"
    planted = SpliceQuality(
        ce_clean=3.0,
        ce_sae=3.5,
        ce_zero=53.0,
        ce_mean=4.0,
        kl_sae=0.4,
        kl_zero=20.0,
        kl_mean=0.9,
        ce_recovered_zero=0.99,
        ce_recovered_mean=0.50,
        ce_recovered_zero_se=0.01,
        ce_recovered_mean_se=0.05,
        delta_sae=0.5,
        delta_sae_se=0.05,
        n_sequences=4,
        n_scored_tokens=24,
    )
    monkeypatch.setattr(stage, "splice_quality", lambda model, saes, *args: {n: planted for n in saes})
    for info in stage.main(params).values():
        assert any(f.startswith("ce_recovered_mean 0.500 < 0.9") for f in info.gate_failures)
        assert not info.reliable and info.delta_sae == 0.5


def test_splice_delta_is_the_sae_loss_over_clean_with_its_jackknife_error():
    """Δ SAE = (Σ CE_SAE − Σ CE_clean) / Σ scored tokens over sequences, and its leave-one-out error."""
    from ato.sae.quality import _summarise

    count = np.array([10.0, 20.0, 30.0])
    clean = np.array([25.0, 60.0, 81.0])
    sae = clean + np.array([5.0, 8.0, 18.0])  # Δ per sequence 0.5, 0.4, 0.6 nats/token
    per_seq = {"count": count, "clean": clean, "6/sae/ce": sae, "6/zero/ce": clean * 5, "6/mean/ce": clean * 2}
    per_seq |= {f"6/{name}/kl": np.ones(3) for name in ("sae", "zero", "mean")}
    out = _summarise(per_seq, 6)
    assert out.delta_sae == pytest.approx(31.0 / 60.0) == pytest.approx(out.ce_sae - out.ce_clean)
    loo = np.array([26.0 / 50.0, 23.0 / 40.0, 13.0 / 30.0])
    assert out.delta_sae_se == pytest.approx(np.sqrt(2 / 3 * ((loo - loo.mean()) ** 2).sum()))


def test_gate_failures_name_the_shortfall():
    from ato.params import SaeGates
    from ato.sae.quality import gate_failures

    gates = SaeGates()
    assert gate_failures(gates, 0.85, 0.01, 0.95) == []
    out = gate_failures(gates, 0.572, 0.387, 0.70)
    assert out == [
        "fve_val 0.572 < 0.8 (short by 0.228)",
        "dead_fraction 0.387 > 0.05 (over by 0.337)",
        "ce_recovered_mean 0.700 < 0.9 (short by 0.200)",
    ]
    assert gate_failures(gates, 0.9, 0.0, None) == ["ce_recovered_mean not measured (sae.eval_sequences: 0)"]
    assert gate_failures(gates, float("nan"), 0.0, 0.95)[0].startswith("fve_val nan")


def test_pretrained_offline_fails_fast(tiny_project, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from ato.errors import AtoError
    from ato.stages import sae as stage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    params = load_tiny_params(tiny_project, **{"sae.source": "pretrained"})
    t0 = time.perf_counter()
    with pytest.raises(AtoError) as err:
        stage.main(params)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "gemma-scope-2b-pt-res-canonical" in msg and "sae.source" in msg
    # an id the release does not have is named
    params = load_tiny_params(tiny_project, **{"sae.sae_id_template": "layer_{n}/width_1m/nope"})
    params.sae.source = "pretrained"
    with pytest.raises(AtoError, match="does not have"):
        stage.main(params)


def test_load_sae_names_the_directory(tmp_path):
    from ato.sae import SaeError, load_sae
    from ato.sae.training import build_training_sae, to_inference_sae

    missing = tmp_path / "models" / "sae" / "layer_07"
    with pytest.raises(SaeError, match=str(missing)):
        load_sae(missing)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text("{not json")
    with pytest.raises(SaeError, match=str(broken)):
        load_sae(broken)
    sae = to_inference_sae(build_training_sae(SaeParams(width=16, k=2), 8), 1.0)
    sae.save_model(tmp_path / "good")
    loaded = load_sae(tmp_path / "good", device=torch.device("cpu"))
    assert not loaded.training and torch.equal(loaded.W_dec, sae.W_dec)


def test_sae_info_keys_per_source(tmp_path):
    """The record writes the common and quality keys, plus the keys of its source only."""
    from ato.artifacts import ArtifactError, SaeInfo
    from ato.artifacts.sae import PRETRAINED_ONLY, TRAIN_ONLY

    common = dict(
        layer=6,
        architecture="topk",
        d_in=640,
        d_sae=2560,
        store_digest="abc",
        fve_val=0.85,
        mean_l0=32.0,
        dead_fraction=0.5,
        n_val_tokens=100,
        hook="blocks.6.hook_resid_post",
    )
    train_values = {key: 1 for key in TRAIN_ONLY}
    trained = SaeInfo(**common, source="train", **train_values, ce_recovered_zero=0.95, reliable=True)
    keys = set(trained.to_dict())
    shared = {f.name for f in dataclasses.fields(SaeInfo)} - set(TRAIN_ONLY) - set(PRETRAINED_ONLY)
    assert keys == {*shared, *TRAIN_ONLY, "format"} and not keys & set(PRETRAINED_ONLY)
    assert {"reliable", "gate_failures", "ce_recovered_zero", "dense_fraction", "kl_sae"} <= keys
    trained.write(tmp_path / "t.json")
    assert SaeInfo.read(tmp_path / "t.json") == trained
    metrics = trained.metrics()
    assert metrics["reliable"] == 1.0 and metrics["ce_recovered_zero"] == 0.95 and "kl_sae" not in metrics
    pre = SaeInfo(**common, source="pretrained", release="r", sae_id="s", repo_id="o/n", folder="f")
    assert set(pre.to_dict()) == {*shared, *PRETRAINED_ONLY, "format"}
    assert pre.metrics()["reliable"] == 0.0  # no gate result counts as unreliable
    pre.write(tmp_path / "p.json")
    assert SaeInfo.read(tmp_path / "p.json") == pre
    raw = json.loads((tmp_path / "t.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(ArtifactError, match="surprise"):
        SaeInfo.read(tmp_path / "bad.json")
