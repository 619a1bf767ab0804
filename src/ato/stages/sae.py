"""Stage `sae`: one sparse autoencoder per target layer, in sae-lens disk format.

`sae.source: train` (default) trains a TopK or JumpReLU SAE per target layer with sae-lens'
training classes (`TopKTrainingSAE` / `JumpReLUTrainingSAE` and their `training_forward_pass`
losses, including TopK's dead-latent auxiliary loss) in a plain Adam loop over shuffled batches of
the store's TRAIN split (BOS/special tokens excluded). `sae.source: pretrained` loads
`SAE.from_pretrained(sae.release, sae.sae_id_template.format(n=n))` and saves it locally.

Input scaling. Late-layer residual norms reach ~1e4, far from the unit-scale inputs SAE training
recipes assume, so training sees x' = s·x with s = √d / mean‖x‖ (mean over the first training
tokens; the `expected_average_only_in` recipe). After training the scale is folded back so that
the *saved* SAE works on raw residuals with unit-norm decoder rows:

    b_enc ← b_enc / s,  threshold ← threshold / s,  b_dec ← b_dec / s   (W_enc, W_dec unchanged)

which gives encode_raw(x) = encode_train(s·x) / s and decode_raw(encode_raw(x)) = decode_train(…)/s:
the same active set (TopK selection and JumpReLU gating are invariant to a common positive
factor), activations in raw residual units, reconstructions in raw space.

Output per layer n: `<paths.sae_dir>/layer_NN/` (`cfg.json` + `sae_weights.safetensors`, read by
`SAE.load_from_disk`) and `ato_sae.json` {"layer", "architecture", "d_in", "d_sae", "store_digest",
"fve_val", "mean_l0", "dead_fraction", …}; `<paths.reports>/sae/layer_NN.json`; MLflow metrics
`sae_layer_NN_*` on the pipeline run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AtoError
from ..params import Params, SaeParams, section_dict
from ..store import ActivationStore, require_validated, write_json_atomic

SAE_INFO = "ato_sae.json"
SCALE_SAMPLE_TOKENS = 8192  # tokens used to estimate the input scale and the initial b_dec
SHUFFLE_BUFFER_BYTES = 1 << 30  # whole split in memory up to this size, else a streaming mixing buffer
EVAL_CHUNK_TOKENS = 4096


class SaeError(AtoError):
    """An SAE is missing, unreadable or cannot be obtained; the message says which and what to do."""


def sae_dir(params: Params, layer: int) -> Path:
    return params.path("sae_dir") / f"layer_{layer:02d}"


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


# --------------------------------------------------------------------------------------------
# Loading (used by select / evaluate)


def load_sae(params: Params, layer: int, device: str | torch.device = "cpu"):
    """The saved SAE of `layer` (sae-lens `SAE.load_from_disk`), in eval mode."""
    from sae_lens import SAE

    path = sae_dir(params, layer)
    if not (path / "cfg.json").exists():
        raise SaeError(f"{path}: no SAE for layer {layer} (no cfg.json); run `ato sae`")
    try:
        sae = SAE.load_from_disk(str(path), device=str(device))
    except Exception as exc:
        raise SaeError(f"{path}: cannot load the layer-{layer} SAE: {exc}") from exc
    return sae.eval()


def load_sae_info(params: Params, layer: int) -> dict[str, Any]:
    path = sae_dir(params, layer) / SAE_INFO
    if not path.exists():
        raise SaeError(f"{path}: missing; run `ato sae`")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Pure-ish helpers (no store, no tracking): tested directly


def input_scale(x: np.ndarray | torch.Tensor) -> float:
    """s = √d / mean‖x‖: after scaling, the mean token norm is √d."""
    x = torch.as_tensor(x, dtype=torch.float64)
    mean_norm = float(x.norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise SaeError(f"cannot scale SAE inputs: mean residual norm is {mean_norm}")
    return math.sqrt(x.shape[-1]) / mean_norm


def build_training_sae(sp: SaeParams, d_in: int, device: str | torch.device = "cpu"):
    """A fresh sae-lens training SAE for `sp.architecture` (seeded by the caller)."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=sp.width, dtype="float32", device=str(device),
                  apply_b_dec_to_input=True, normalize_activations="none")
    if sp.architecture == "topk":
        if not 0 < sp.k <= sp.width:
            raise SaeError(f"sae.k: must be in 1..sae.width ({sp.width}), got {sp.k}")
        cfg = TopKTrainingSAEConfig(k=sp.k, rescale_acts_by_decoder_norm=True, aux_loss_coefficient=1.0, **common)
        return TopKTrainingSAE(cfg)
    cfg = JumpReLUTrainingSAEConfig(l0_coefficient=sp.l1_coefficient, l0_warm_up_steps=max(1, sp.steps // 10),
                                    jumprelu_sparsity_loss_mode="step", **common)
    return JumpReLUTrainingSAE(cfg)


@torch.no_grad()
def to_inference_sae(training_sae, scale: float, metadata: dict[str, Any] | None = None):
    """Inference SAE (TopKSAE / JumpReLUSAE) working on raw residuals: decoder norms folded into the
    encoder, then the input scale `scale` folded back (module docstring)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    tsae = training_sae
    tcfg = tsae.cfg
    state = {k: v.detach().clone().float() for k, v in tsae.state_dict().items()}
    # decoder rows → unit norm (the active set is unchanged: TopK rescales by the norm, JumpReLU's
    # threshold is scaled with b_enc)
    norms = state["W_dec"].norm(dim=-1).clamp(min=1e-8)
    if tcfg.architecture() == "topk" and not getattr(tcfg, "rescale_acts_by_decoder_norm", False):
        norms = torch.ones_like(norms)  # without rescaling, folding would change the TopK selection
    state["W_dec"] = state["W_dec"] / norms[:, None]
    state["W_enc"] = state["W_enc"] * norms[None, :]
    state["b_enc"] = state["b_enc"] * norms
    if "threshold" in state:
        state["threshold"] = state["threshold"] * norms
    # fold the input scale back: raw-space activations and reconstructions
    state["b_enc"] = state["b_enc"] / scale
    state["b_dec"] = state["b_dec"] / scale
    if "threshold" in state:
        state["threshold"] = state["threshold"] / scale
    common = dict(d_in=tcfg.d_in, d_sae=tcfg.d_sae, dtype="float32", device="cpu",
                  apply_b_dec_to_input=True, normalize_activations="none")
    if tcfg.architecture() == "topk":
        sae = TopKSAE(TopKSAEConfig(k=tcfg.k, rescale_acts_by_decoder_norm=False, **common))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    for key, value in (metadata or {}).items():
        sae.cfg.metadata[key] = value
    sae.load_state_dict(state)
    return sae.eval()


def topk_training_loss(tsae, x: torch.Tensor, dead_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`TopKTrainingSAE.training_forward_pass`'s loss (MSE + dead-latent auxiliary loss) with a
    sparse decoder: the dense pre-activations come from one matmul, but the reconstructions are
    `embedding_bag` sums over the k selected (and k_aux dead) latents instead of dense
    [batch, d_sae] @ [d_sae, d_in] products. Same value and gradients as sae-lens' dense pass
    (tested), at about half its cost. Returns (loss, sae_out, (selected ids, activations))."""
    import torch.nn.functional as F

    cfg = tsae.cfg
    W_dec, b_dec = tsae.W_dec, tsae.b_dec
    norms = W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else None
    hidden_pre = (x - b_dec) @ tsae.W_enc + tsae.b_enc
    if norms is not None:
        hidden_pre = hidden_pre * norms
    top = torch.topk(hidden_pre, cfg.k, dim=-1, sorted=False)
    idx, vals = top.indices, top.values.relu()
    coef = vals / norms[idx] if norms is not None else vals
    sae_out = F.embedding_bag(idx, W_dec, per_sample_weights=coef, mode="sum") + b_dec
    loss = ((sae_out - x) ** 2).sum(-1).mean()
    if dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0:
        residual = (x - sae_out).detach()
        k_aux_full = x.shape[-1] // 2
        scale = min(num_dead / k_aux_full, 1.0)
        k_aux = min(k_aux_full, num_dead)
        masked = torch.where(dead_mask[None], hidden_pre, torch.full_like(hidden_pre, -torch.inf))
        aux = torch.topk(masked, k_aux, dim=-1, sorted=False)
        aux_coef = aux.values / norms[aux.indices] if norms is not None else aux.values
        recons = F.embedding_bag(aux.indices, W_dec, per_sample_weights=aux_coef, mode="sum")
        loss = loss + cfg.aux_loss_coefficient * scale * ((recons - residual) ** 2).sum(-1).mean()
    return loss, sae_out, (idx, vals)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 5 % of steps, constant, linear decay to 0 over the last 20 %."""
    warm = max(1, steps // 20)
    decay = max(1, steps // 5)
    if step < warm:
        return (step + 1) / warm
    if step >= steps - decay:
        return max(0.0, (steps - step) / decay)
    return 1.0


def train_sae(batches: Iterator[torch.Tensor], d_in: int, sp: SaeParams, scale: float,
              b_dec_init: torch.Tensor | None = None, device: str | torch.device = "cpu",
              desc: str = "sae", progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train one SAE on raw-residual batches (scaled by `scale` inside); returns the raw-space
    inference SAE and training info. Deterministic for a given seed and batch sequence."""
    from sae_lens.saes.sae import TrainStepInput
    from tqdm import tqdm

    torch.manual_seed(sp.seed)
    tsae = build_training_sae(sp, d_in, device)
    if b_dec_init is not None:
        with torch.no_grad():
            tsae.b_dec.data.copy_(b_dec_init.to(tsae.b_dec) * scale)
    opt = torch.optim.Adam(tsae.parameters(), lr=sp.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, sp.steps))
    coeff_cfg = tsae.get_coefficients()
    since_fired = torch.zeros(sp.width, device=device)
    # a latent is dead for the auxiliary losses once it has not fired for ~64k tokens
    dead_window = max(10, min(sp.steps // 4, math.ceil(65536 / sp.batch_tokens)))
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    bar = tqdm(range(sp.steps), desc=desc, disable=not progress, mininterval=1.0)
    tsae.train()
    for step in bar:
        x = next(batches).to(device, torch.float32) * scale
        coefficients = {}
        for name, c in coeff_cfg.items():
            value, warm = (c.value, c.warm_up_steps) if hasattr(c, "warm_up_steps") else (float(c), 0)
            coefficients[name] = value * min(1.0, (step + 1) / warm) if warm > 0 else value
        dead_mask = since_fired > dead_window
        if sp.architecture == "topk":
            loss, sae_out, (idx, vals) = topk_training_loss(tsae, x, dead_mask)
            fired_rows = torch.zeros(x.shape[0], sp.width, dtype=torch.bool, device=x.device)
            fired_rows.scatter_(1, idx, vals > 0)
        else:
            out = tsae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients=coefficients, dead_neuron_mask=dead_mask,
                n_training_steps=step, is_logging_step=False))
            loss, sae_out, fired_rows = out.loss, out.sae_out, out.feature_acts > 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tsae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        with torch.no_grad():
            since_fired += 1
            since_fired[fired_rows.any(0)] = 0
            if step % 20 == 0 or step == sp.steps - 1:
                mse = float(((sae_out - x) ** 2).sum(-1).mean())
                var = float(((x - x.mean(0)) ** 2).sum(-1).mean())
                last = {"fve": 1 - mse / max(var, 1e-12), "l0": float(fired_rows.sum(-1).float().mean()),
                        "loss": float(loss)}
                bar.set_postfix(fve=f"{last['fve']:.3f}", l0=f"{last['l0']:.1f}")
    info = {"train_seconds": time.perf_counter() - t0, "train_tokens": sp.steps * sp.batch_tokens,
            "train_fve_last_batch": last.get("fve"), "train_l0_last_batch": last.get("l0"),
            "dead_window_steps": dead_window, "input_scale": scale}
    return to_inference_sae(tsae.cpu(), scale), info


@torch.no_grad()
def evaluate_sae(sae, chunks: Iterator[np.ndarray | torch.Tensor], device: str | torch.device = "cpu") -> dict[str, float]:
    """Fraction of variance explained (1 − Σ‖x−x̂‖² / Σ‖x−x̄‖²), mean L0 and dead fraction (never
    active) of `sae` over raw-residual chunks."""
    n, sse, l0 = 0, 0.0, 0.0
    s1 = s2 = None
    fired = None
    for x in chunks:
        x = torch.as_tensor(x, dtype=torch.float32, device=device)
        acts = sae.encode(x)
        rec = sae.decode(acts)
        sse += float(((rec - x).double() ** 2).sum())
        xd = x.double()
        s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
        s2 = (xd * xd).sum(0) if s2 is None else s2 + (xd * xd).sum(0)
        active = acts > 0
        l0 += float(active.sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
        n += x.shape[0]
    if n == 0:
        raise SaeError("no tokens to evaluate the SAE on")
    sst = float((s2 - s1 * s1 / n).sum())
    return {"fve": 1.0 - sse / max(sst, 1e-300), "mean_l0": l0 / n,
            "dead_fraction": 1.0 - float(fired.float().mean()), "n_tokens": n}


def check_roundtrip(sae, path: Path, x: torch.Tensor) -> None:
    """Reload the saved SAE and insist on identical encodings (catches a lossy save)."""
    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        a, b = sae.to("cpu").encode(x), loaded.encode(x)
    if not torch.equal(a, b):
        raise SaeError(f"{path}: reloaded SAE encodes differently (max |Δ| {float((a - b).abs().max()):.3g})")


# --------------------------------------------------------------------------------------------
# Data


def token_batches(store: ActivationStore, split: str, layer: int, batch: int, seed: int,
                  buffer_bytes: int = SHUFFLE_BUFFER_BYTES) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of one layer's residuals (special tokens excluded).

    A split that fits in `buffer_bytes` is read once and reshuffled every epoch; a larger one is
    streamed through a mixing buffer of that size (shuffle, emit half, refill)."""
    rng = np.random.default_rng(seed)
    d = store.d_model
    if store.n_tokens(split) * d * 4 <= buffer_bytes:
        data = torch.from_numpy(np.concatenate([c[layer] for c in store.iter_chunks(split, [layer], 8192)]))
        if len(data) == 0:
            raise SaeError(f"{store.root}: split {split!r} has no non-special tokens for layer {layer}")
        order = np.zeros(0, dtype=np.int64)
        while True:
            while len(order) < batch:
                order = np.concatenate([order, rng.permutation(len(data))])
            idx, order = order[:batch], order[batch:]
            yield data[torch.from_numpy(idx)]
    cap = max(batch * 2, buffer_bytes // (4 * d))
    buf = np.zeros((0, d), dtype=np.float32)
    while True:
        got = False
        for chunk in store.iter_chunks(split, [layer], 8192):
            got = True
            buf = np.concatenate([buf, chunk[layer]])
            if len(buf) >= cap:
                buf = buf[rng.permutation(len(buf))]
                half = len(buf) // 2
                for i in range(0, half - batch + 1, batch):
                    yield torch.from_numpy(buf[i:i + batch].copy())
                buf = buf[(half // batch) * batch:]
        if not got:
            raise SaeError(f"{store.root}: split {split!r} is empty")
        if len(buf) >= batch:  # end of an epoch: emit what is buffered, keep the remainder
            buf = buf[rng.permutation(len(buf))]
            n_full = (len(buf) // batch) * batch
            for i in range(0, n_full, batch):
                yield torch.from_numpy(buf[i:i + batch].copy())
            buf = buf[n_full:]


def _sample(store: ActivationStore, split: str, layer: int, n: int) -> np.ndarray:
    out, got = [], 0
    for chunk in store.iter_chunks(split, [layer], min(n, 8192)):
        out.append(chunk[layer])
        got += len(chunk[layer])
        if got >= n:
            break
    if not out:
        raise SaeError(f"{store.root}: split {split!r} has no non-special tokens for layer {layer}")
    return np.concatenate(out)[:n]


# --------------------------------------------------------------------------------------------
# Pretrained


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}


def resolve_pretrained(release: str, sae_id: str) -> dict[str, Any]:
    """Check a (release, sae_id) against sae-lens' directory — and, offline, against the local HF
    cache — *before* touching the hub, so a doomed run fails in seconds with what to do."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    neuronpedia_id = None
    if release in directory:
        entry = directory[release]
        if sae_id not in entry.saes_map:
            some = ", ".join(list(entry.saes_map)[:5])
            raise SaeError(f"sae.sae_id_template gives {sae_id!r}, which release {release!r} does not have "
                           f"(ids look like: {some}, …)")
        repo_id, folder = entry.repo_id, entry.saes_map[sae_id]
        neuronpedia_id = (entry.neuronpedia_id or {}).get(sae_id)
    elif "/" in release:
        repo_id, folder = release, sae_id
    else:
        raise SaeError(f"sae.release {release!r} is neither a sae-lens pretrained release nor a hub repo id "
                       "(owner/name); see https://decoderesearch.github.io/SAELens/latest/pretrained_saes/")
    if _offline():
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
    return {"repo_id": repo_id, "folder": folder, "neuronpedia_id": neuronpedia_id}


def load_pretrained(release: str, sae_id: str, device: str = "cpu"):
    from sae_lens import SAE

    where = resolve_pretrained(release, sae_id)
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as exc:
        raise SaeError(f"loading pretrained SAE {release}/{sae_id} failed: {exc}") from exc
    return sae.eval(), where


# --------------------------------------------------------------------------------------------
# Stage


def main(params: Params) -> dict[int, dict[str, Any]]:
    from ..models import resolve_device

    sp = params.sae
    layers = params.target_layers()
    if sp.source == "pretrained":  # fail fast for every layer before any work
        ids = {n: sp.sae_id_template.format(n=n) for n in layers}
        for n in layers:
            resolve_pretrained(sp.release, ids[n])
    store = ActivationStore.open(params.path("store"))
    require_validated(store, params.path("reports") / "validation" / "validation.json")
    store.require_layers(layers, what="stage sae")
    device = resolve_device(sp.device)
    results: dict[int, dict[str, Any]] = {}
    for n in layers:
        out_dir = sae_dir(params, n)
        meta = {"hook_name": hook_name(n), "model_name": store.manifest["model"].get("name"),
                "ato_store_digest": store.digest}
        extra: dict[str, Any] = {"source": sp.source}
        if sp.source == "pretrained":
            sae, where = load_pretrained(sp.release, ids[n], device=str(device))
            if sae.cfg.d_in != store.d_model:
                raise SaeError(f"pretrained SAE {sp.release}/{ids[n]} has d_in={sae.cfg.d_in}, but layer {n} "
                               f"of the store has d_model={store.d_model}: wrong release for this model")
            extra.update({"release": sp.release, "sae_id": ids[n], **where})
        else:
            print(f"sae: layer {n}: training {sp.architecture} SAE, width {sp.width}, {sp.steps} steps × "
                  f"{sp.batch_tokens} tokens on {device}", flush=True)
            sample = torch.from_numpy(_sample(store, "train", n, SCALE_SAMPLE_TOKENS))
            scale = input_scale(sample)
            batches = token_batches(store, "train", n, sp.batch_tokens, seed=sp.seed + 1000 * n)
            sae, info = train_sae(batches, store.d_model, sp, scale, b_dec_init=sample.mean(0), device=device,
                                  desc=f"sae layer {n}")
            for key, value in meta.items():
                sae.cfg.metadata[key] = value
            sae.cfg.metadata["ato_input_scale"] = scale
            extra.update({k: v for k, v in info.items()})
            extra.update({k: getattr(sp, k) for k in ("width", "k", "l1_coefficient", "steps", "batch_tokens",
                                                      "lr", "seed")})
        sae = sae.to("cpu").eval()
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save_model(tmp)
        probe = torch.from_numpy(_sample(store, "val", n, 256))
        check_roundtrip(sae, tmp, probe)
        ev = evaluate_sae(sae.to(device), (c[n] for c in store.iter_chunks("val", [n], EVAL_CHUNK_TOKENS)), device)
        record = {"layer": n, "architecture": sae.cfg.architecture(), "d_in": int(sae.cfg.d_in),
                  "d_sae": int(sae.cfg.d_sae), "store_digest": store.digest, "fve_val": ev["fve"],
                  "mean_l0": ev["mean_l0"], "dead_fraction": ev["dead_fraction"], "n_val_tokens": ev["n_tokens"],
                  "hook": hook_name(n), **extra}
        write_json_atomic(tmp / SAE_INFO, record)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)
        write_json_atomic(params.path("reports") / "sae" / f"layer_{n:02d}.json", record)
        print(f"sae: layer {n}: FVE(val) {ev['fve']:.3f}, mean L0 {ev['mean_l0']:.1f}, dead "
              f"{ev['dead_fraction']:.1%} → {out_dir}", flush=True)
        results[n] = record
    _track(params, results)
    return results


def _track(params: Params, results: dict[int, dict[str, Any]]) -> None:
    import mlflow

    from ..tracking import log_flat_metrics, pipeline_run

    with pipeline_run(params, "sae"):
        mlflow.log_params({f"sae.{k}": v for k, v in section_dict(params.sae).items()})
        metrics = {}
        for n, r in results.items():
            for key in ("fve_val", "mean_l0", "dead_fraction", "train_seconds", "input_scale"):
                if isinstance(r.get(key), (int, float)):
                    metrics[f"sae_layer_{n:02d}_{key}"] = r[key]
        log_flat_metrics(metrics)
        for n in results:
            mlflow.log_artifact(str(sae_dir(params, n) / SAE_INFO), artifact_path=f"sae/layer_{n:02d}")
