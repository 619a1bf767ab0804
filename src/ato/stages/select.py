"""Stage `select`: score every SAE feature of every target layer, rank, keep the best.

All scores use the SAE's real encoder (`sae.encode`: JumpReLU threshold / TopK), never a plain
ReLU, on TRAIN-split tokens (BOS/special excluded, at most `select.max_tokens`). Definitions in
`ato.math.features`; the model-dependent parts live here:

- vocab_focus: excess kurtosis of W_U · (N(d_f) − N(0)) with N the model's own final norm module
  (Gemma: x/rms(x)·(1+w); LayerNorm: centring, gain and bias — N(0) removes the bias). Applying N
  to the direction itself is the logit lens of a residual equal to d_f; kurtosis is invariant to
  the scalar 1/rms(·) the norm would apply to a real residual, so the choice of that scalar does
  not matter. The LM head's bias (if any) is ignored: it does not depend on the feature.
- causal_effect: change in mean next-token loss on `select.causal_sequences` VAL sequences when
  a_f·d_f is subtracted from the layer-n residual at every non-special position where f is active.
  Computed for all features at once to FIRST ORDER: ΔL_f ≈ −Σ_t a_{t,f} (∂L/∂h_t · d_f), from one
  forward + backward pass per batch (exact ablation costs one forward per feature — ~2560 per
  layer — which does not fit the CPU budget). For the `select.exact_check` features with the
  largest estimated |effect|, the exact ablation is also run and both numbers are reported
  (`<paths.reports>/select/layer_NN.json`, MLflow), so the approximation's quality is visible;
  tests compare both on a tiny model.

Outputs per layer n: `<paths.features>/layer_NN.json` {"layer", "ranked", "kept", "scores"},
`<paths.features>/layer_NN_contexts.json` (top activating token windows of the kept features),
`<paths.reports>/select/layer_NN.json` (summary + first-order-vs-exact check).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import AtoError
from ..math.features import (
    METRICS,
    FeatureAccumulator,
    composite_score,
    excess_kurtosis,
    first_order_ablation_effect,
    n_keep,
    rank_features,
)
from ..params import Params, section_dict
from ..store import ActivationStore, write_json_atomic

ENCODE_BATCH = 4096
LOSS_CHUNK_TOKENS = 256  # LM-head rows per chunk: bounds the logits' memory (vocab 262k)
CAUSAL_BATCH = 4  # sequences per forward/backward pass
NEURONPEDIA_API = "https://www.neuronpedia.org/api/feature"


class SelectError(AtoError):
    """Feature selection cannot run; the message names the layer, file or key at fault."""


# --------------------------------------------------------------------------------------------
# Model-side helpers


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied before the LM head."""
    from ..models import base_model

    base = base_model(model)
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(base, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise SelectError(f"cannot find the final norm of model_type={model.config.model_type!r}")


@torch.no_grad()
def decoder_directions(sae) -> torch.Tensor:
    """[d_sae, d_in]: what one unit of each feature's activation adds to the reconstruction
    (decode(e_f) − decode(0), so any decoder-norm rescaling of the architecture is included)."""
    eye = torch.eye(sae.cfg.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    return sae.decode(eye) - sae.decode(torch.zeros_like(eye[:1]))


@torch.no_grad()
def direction_logits(model: nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """W_U · (N(d) − N(0)) for rows d of `directions` → [m, vocab]."""
    norm = final_norm(model)
    w_u = model.get_output_embeddings().weight
    d = directions.to(w_u.device, w_u.dtype)
    normed = norm(d[None])[0] - norm(torch.zeros_like(d[:1])[None])[0]
    return normed @ w_u.T


@torch.no_grad()
def vocab_focus(model: nn.Module, directions: torch.Tensor, chunk: int = 128) -> np.ndarray:
    out = []
    for i in range(0, len(directions), chunk):
        out.append(excess_kurtosis(direction_logits(model, directions[i:i + chunk]).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _sum_next_token_loss(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ next-token cross-entropy over the batch (pairs of real tokens), chunked over the LM head."""
    from torch.utils.checkpoint import checkpoint

    from ..models import base_model

    hidden = base_model(model)(input_ids=ids, attention_mask=attn).last_hidden_state
    valid = attn[:, 1:].bool() & attn[:, :-1].bool()
    h = hidden[:, :-1][valid]
    targets = ids[:, 1:][valid]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def chunk_loss(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        logits = head(hc).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits, tc, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(h), LOSS_CHUNK_TOKENS):
        hc, tc = h[i:i + LOSS_CHUNK_TOKENS], targets[i:i + LOSS_CHUNK_TOKENS]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, hc, tc, use_reentrant=False)
        else:
            total = total + chunk_loss(hc, tc)
    return total, int(valid.sum())


def _pad(seqs: list[tuple[np.ndarray, np.ndarray]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and the mask of positions that may be ablated."""
    T = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    ablate = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (tok, special) in enumerate(seqs):
        ids[b, :len(tok)] = torch.as_tensor(tok, dtype=torch.long)
        attn[b, :len(tok)] = 1
        ablate[b, :len(tok)] = ~torch.as_tensor(special, dtype=torch.bool)
    return ids.to(device), attn.to(device), ablate.to(device)


def first_order_effects(model: nn.Module, sae, layer: int, sequences: list[tuple[np.ndarray, np.ndarray]],
                        batch_size: int = CAUSAL_BATCH, progress: bool = True) -> tuple[np.ndarray, float, int]:
    """First-order change of the mean next-token loss per feature (see module docstring).
    Returns (effects [d_sae], clean mean loss, number of loss tokens)."""
    from tqdm import tqdm

    from ..models import patch_residual

    device = next(model.parameters()).device
    directions = decoder_directions(sae).to(device)
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    loss_sum, n_tok = 0.0, 0
    for i in tqdm(range(0, len(sequences), batch_size), desc=f"select layer {layer}: causal", disable=not progress):
        ids, attn, ablate = _pad(sequences[i:i + batch_size], device)
        held: dict[str, torch.Tensor] = {}

        def grab(h: torch.Tensor) -> torch.Tensor:
            held["h"] = h.detach().requires_grad_(True)
            return held["h"]

        with torch.enable_grad(), patch_residual(model, layer, grab):
            loss, n = _sum_next_token_loss(model, ids, attn)
            loss.backward()
        h, g = held["h"].detach(), held["h"].grad
        with torch.no_grad():
            acts = sae.encode(h[ablate])
            total += first_order_ablation_effect(acts, g[ablate], directions).cpu()
        loss_sum += float(loss.detach())
        n_tok += n
    if n_tok == 0:
        raise SelectError(f"layer {layer}: the held-out sequences have no next-token pairs")
    return (total / n_tok).numpy(), loss_sum / n_tok, n_tok


@torch.no_grad()
def exact_effects(model: nn.Module, sae, layer: int, sequences: list[tuple[np.ndarray, np.ndarray]],
                  features: list[int], batch_size: int = CAUSAL_BATCH) -> np.ndarray:
    """Exact change of the mean next-token loss when each feature's a_f·d_f is removed at every
    non-special position where it is active (one forward pass per feature and batch)."""
    from ..models import patch_residual

    device = next(model.parameters()).device
    directions = decoder_directions(sae).to(device)
    clean, ablated = 0.0, np.zeros(len(features))
    n_tok = 0
    for i in range(0, len(sequences), batch_size):
        ids, attn, ablate = _pad(sequences[i:i + batch_size], device)
        loss, n = _sum_next_token_loss(model, ids, attn)
        clean += float(loss)
        n_tok += n
        for j, f in enumerate(features):
            def remove(h: torch.Tensor, f: int = f) -> torch.Tensor:
                a = sae.encode(h)[..., f] * ablate
                return h - a[..., None] * directions[f]

            with patch_residual(model, layer, remove):
                ablated[j] += float(_sum_next_token_loss(model, ids, attn)[0])
    return (ablated - clean) / max(n_tok, 1)


# --------------------------------------------------------------------------------------------
# Store-side helpers


def read_sequences(store: ActivationStore, split: str, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `n` sequences of a split as (token ids, special flags), BOS included. Sequences are
    stored contiguously; a new one starts where position == 0."""
    toks, specs, poss = [], [], []
    n_starts = 0
    for chunk in store.iter_chunks(split, [], 2048, include_special=True, with_tokens=True):  # no residuals
        toks.append(chunk["token_id"])
        specs.append(chunk["special"])
        poss.append(chunk["position"])
        n_starts += int((chunk["position"] == 0).sum())
        if n_starts > n:  # the n-th sequence is complete
            break
    if not toks:
        return []
    tok, spec, pos = np.concatenate(toks), np.concatenate(specs), np.concatenate(poss)
    starts = [int(s) for s in np.flatnonzero(pos == 0)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, len(tok)]
    return [(tok[a:b], spec[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a][:n]


def scan_features(sae, store: ActivationStore, layer: int, max_tokens: int, top_k: int,
                  device, progress: bool = True) -> tuple[FeatureAccumulator, dict[str, np.ndarray]]:
    """Encode up to `max_tokens` non-special TRAIN tokens; returns the accumulator and the token
    arrays of every row read (special rows included, for context windows)."""
    from tqdm import tqdm

    acc = FeatureAccumulator(sae.cfg.d_sae, top_k=top_k)
    rows: dict[str, list[np.ndarray]] = {"token_id": [], "position": [], "doc_id": []}
    offset = 0
    bar = tqdm(total=max_tokens, desc=f"select layer {layer}: encode", disable=not progress, mininterval=1.0)
    for chunk in store.iter_chunks("train", [layer], ENCODE_BATCH, include_special=True, with_tokens=True):
        m = len(chunk["token_id"])
        for key in rows:
            rows[key].append(chunk[key])
        keep = np.flatnonzero(~chunk["special"])[: max_tokens - acc.n]
        if len(keep):
            x = torch.from_numpy(chunk[layer][keep]).to(device)
            with torch.no_grad():
                acts = sae.encode(x)
            acc.update(acts, chunk["token_id"][keep], offset + keep)
            bar.update(len(keep))
        offset += m
        if acc.n >= max_tokens:
            break
    bar.close()
    if acc.n == 0:
        raise SelectError(f"{store.root}: no non-special TRAIN tokens for layer {layer}")
    return acc, {k: np.concatenate(v) for k, v in rows.items()}


def context_windows(acc: FeatureAccumulator, rows: dict[str, np.ndarray], features: list[int], window: int,
                    decode) -> list[dict[str, Any]]:
    """Top activating contexts of each feature: ±`window` tokens inside the same sequence, the
    max-activating token marked «like this» in `text`."""
    pos = rows["position"]
    starts = np.flatnonzero(pos == 0)
    n_rows = len(pos)
    out = []
    for f in features:
        contexts = []
        for value, i in acc.top_contexts(f):
            k = int(np.searchsorted(starts, i, side="right")) - 1
            seq_start = int(starts[k]) if k >= 0 else 0
            seq_end = int(starts[k + 1]) if k + 1 < len(starts) else n_rows
            lo, hi = max(seq_start, i - window), min(seq_end, i + window + 1)
            pieces = [decode(int(t)) for t in rows["token_id"][lo:hi]]
            j = i - lo
            text = "".join(pieces[:j]) + "«" + pieces[j] + "»" + "".join(pieces[j + 1:])
            contexts.append({"activation": value, "doc_id": int(rows["doc_id"][i]), "position": int(pos[i]),
                             "tokens": pieces, "max_index": j, "text": text})
        out.append({"feature": int(f), "contexts": contexts})
    return out


def _json_list(x: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in np.asarray(x, dtype=np.float64)]


# --------------------------------------------------------------------------------------------
# Neuronpedia (online, never in the default run)


def fetch_neuronpedia(neuronpedia_id: str | None, features: list[int], timeout: float = 10.0) -> dict[int, list[str]]:
    """Explanations per feature from the Neuronpedia API (`select.neuronpedia: true`)."""
    import json
    import urllib.error
    import urllib.request

    if not neuronpedia_id:
        raise SelectError("select.neuronpedia: the SAEs have no Neuronpedia id (only sae-lens pretrained "
                          "releases listed on Neuronpedia have one); set select.neuronpedia: false")
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}:
        raise SelectError("select.neuronpedia: true needs network access, but this run is offline "
                          "(HF_HUB_OFFLINE=1, the default of `ato`); export HF_HUB_OFFLINE=0 or set "
                          "select.neuronpedia: false")
    model_id, sae_set = neuronpedia_id.split("/", 1)
    out: dict[int, list[str]] = {}
    for f in features:
        url = f"{NEURONPEDIA_API}/{model_id}/{sae_set}/{f}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed https host)
                data = json.loads(resp.read().decode())
        except (urllib.error.URLError, TimeoutError, ValueError) as exc:
            raise SelectError(f"select.neuronpedia: fetching {url} failed ({exc}); check the network or set "
                              "select.neuronpedia: false") from exc
        out[f] = [e.get("description", "") for e in data.get("explanations") or []]
    return out


# --------------------------------------------------------------------------------------------
# Stage


def score_layer(params: Params, model: nn.Module, tokenizer, store: ActivationStore, sae, layer: int,
                progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(features JSON, contexts list, report) for one layer."""
    sp = params.select
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    acc, rows = scan_features(sae, store, layer, sp.max_tokens, sp.top_contexts, device, progress)
    rate = acc.activation_rate()
    eligible = rate >= sp.min_activation_rate
    if sp.min_activation_rate <= 0:
        eligible = rate > 0
    t_scan = time.perf_counter() - t0
    directions = decoder_directions(sae)
    focus = vocab_focus(model, directions.to(device))
    t_focus = time.perf_counter() - t0 - t_scan
    sequences = read_sequences(store, "val", sp.causal_sequences)
    if not sequences:
        raise SelectError(f"{store.root}: the VAL split has no sequences for the causal score")
    causal, clean_loss, n_loss = first_order_effects(model, sae, layer, sequences, progress=progress)
    causal = np.where(eligible, causal, np.nan)
    check_ids = [int(f) for f in np.argsort(-np.nan_to_num(np.abs(causal), nan=-1.0), kind="stable")
                 [: min(max(0, sp.exact_check), int(eligible.sum()))]]
    exact = exact_effects(model, sae, layer, sequences, check_ids) if check_ids else np.zeros(0)
    t_causal = time.perf_counter() - t0 - t_scan - t_focus
    entropy = acc.token_entropy()
    redundancy = acc.redundancy()
    metrics = {"activation_rate": rate, "token_entropy": entropy, "vocab_focus": focus,
               "redundancy": redundancy, "causal_effect": causal}
    composite = composite_score(metrics, sp.weights, eligible)
    ranked = rank_features(composite, eligible, rate)
    kept = ranked[: n_keep(sp.keep_fraction, sae.cfg.d_sae, int(eligible.sum()))] if eligible.any() else []
    features = {"layer": layer, "ranked": ranked, "kept": kept,
                "scores": {**{k: _json_list(v) for k, v in metrics.items()}, "composite": _json_list(composite)}}

    def decode(t: int) -> str:
        return tokenizer.decode([t])

    contexts = context_windows(acc, rows, kept, sp.context_window, decode)
    if kept:
        logits = direction_logits(model, directions[kept].to(device))
        top = torch.topk(logits, min(10, logits.shape[-1]), dim=-1).indices.cpu().tolist()
        for entry, toks in zip(contexts, top):
            entry["top_logit_tokens"] = [decode(t) for t in toks]
    kept_arr = np.asarray(kept, dtype=np.int64)
    rel_err = (np.abs(causal[check_ids] - exact) / np.maximum(np.abs(exact), 1e-12)) if check_ids else np.zeros(0)
    report = {
        "layer": layer, "n_tokens_scored": acc.n, "d_sae": sae.cfg.d_sae, "n_eligible": int(eligible.sum()),
        "n_kept": len(kept), "n_dead": int((rate == 0).sum()), "clean_val_loss": clean_loss,
        "n_causal_sequences": len(sequences), "n_causal_loss_tokens": n_loss,
        "causal_method": "first_order_gradient_x_contribution",
        "causal_check": {"features": check_ids, "first_order": _json_list(causal[check_ids]) if check_ids else [],
                         "exact": _json_list(exact), "relative_error": _json_list(rel_err)},
        "causal_check_max_relative_error": float(rel_err.max()) if len(rel_err) else None,
        "seconds": {"scan": t_scan, "vocab_focus": t_focus, "causal": t_causal,
                    "total": time.perf_counter() - t0},
        **{f"kept_mean_{k}": float(np.nanmean(v[kept_arr])) if len(kept_arr) and np.isfinite(v[kept_arr]).any()
           else None for k, v in metrics.items()},
    }
    return features, contexts, report


def main(params: Params) -> dict[int, dict[str, Any]]:
    from ..models import load_prepared, resolve_device
    from .sae import load_sae, load_sae_info

    sp = params.select
    unknown = sorted(set(sp.weights) - set(METRICS))
    if unknown:
        raise SelectError(f"select.weights.{unknown[0]}: unknown metric; known: {', '.join(METRICS)}")
    layers = params.target_layers()
    store = ActivationStore.open(params.path("store"))
    store.require_layers(layers, what="stage select")
    device = resolve_device(sp.device)
    model, tokenizer, info = load_prepared(params.path("model_dir"), str(device))
    model.requires_grad_(False)
    store_digest = store.manifest.get("model", {}).get("weights_digest")
    if store_digest and info.get("weights_digest") and store_digest != info["weights_digest"]:
        raise SelectError(f"{params.path('store')}: activations come from another model (weights digest "
                          f"{store_digest[:12]} ≠ {info['weights_digest'][:12]} of {params.path('model_dir')}); "
                          "rerun `ato collect`")
    out_dir = params.path("features")
    reports: dict[int, dict[str, Any]] = {}
    for n in layers:
        sae_info = load_sae_info(params, n)
        sae = load_sae(params, n, device)
        if sae.cfg.d_in != store.d_model:
            raise SelectError(f"layer {n}: SAE d_in={sae.cfg.d_in} but the store has d_model={store.d_model}")
        if sp.neuronpedia:  # fail before the expensive part
            fetch_neuronpedia(sae_info.get("neuronpedia_id"), [])
        print(f"select: layer {n}: scoring {sae.cfg.d_sae} features on ≤{sp.max_tokens} train tokens", flush=True)
        features, contexts, report = score_layer(params, model, tokenizer, store, sae, n)
        features["sae_store_digest"] = sae_info.get("store_digest")
        if sp.neuronpedia:
            explained = fetch_neuronpedia(sae_info.get("neuronpedia_id"), features["kept"])
            for entry in contexts:
                entry["neuronpedia_explanations"] = explained.get(entry["feature"], [])
        write_json_atomic(out_dir / f"layer_{n:02d}.json", features)
        write_json_atomic(out_dir / f"layer_{n:02d}_contexts.json", {"layer": n, "features": contexts})
        write_json_atomic(params.path("reports") / "select" / f"layer_{n:02d}.json", report)
        print(f"select: layer {n}: {report['n_eligible']} eligible, kept {report['n_kept']}; first-order vs "
              f"exact causal max rel. error {report['causal_check_max_relative_error']}; "
              f"{report['seconds']['total']:.0f}s", flush=True)
        reports[n] = report
    _track(params, reports)
    return reports


def _track(params: Params, reports: dict[int, dict[str, Any]]) -> None:
    import mlflow

    from ..tracking import log_flat_metrics, pipeline_run

    with pipeline_run(params, "select"):
        flat = {f"select.{k}": v for k, v in section_dict(params.select).items() if k != "weights"}
        flat.update({f"select.weights.{k}": v for k, v in params.select.weights.items()})
        mlflow.log_params(flat)
        metrics: dict[str, float] = {}
        for n, r in reports.items():
            for key in ("n_eligible", "n_kept", "n_dead", "clean_val_loss", "causal_check_max_relative_error",
                        *[f"kept_mean_{m}" for m in METRICS]):
                if isinstance(r.get(key), (int, float)):
                    metrics[f"select_layer_{n:02d}_{key}"] = r[key]
            metrics[f"select_layer_{n:02d}_seconds"] = r["seconds"]["total"]
        log_flat_metrics(metrics)
        for n in reports:
            mlflow.log_artifact(str(params.path("features") / f"layer_{n:02d}.json"), artifact_path="features")
