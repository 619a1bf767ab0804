"""Train one SAE on a layer's residuals with sae-lens' training classes (see docs/method.md#features).

sae-lens' `TopKTrainingSAE` / `JumpReLUTrainingSAE` and their `training_forward_pass` losses
(including TopK's dead-latent auxiliary loss) run in a plain Adam loop over shuffled batches of the
store's TRAIN split (BOS/special tokens excluded).

Input scaling. Late-layer residual norms reach ~1e4, far from the unit-scale inputs SAE training
recipes assume, so training sees x' = s·x with s = √d / mean‖x‖ (mean over the first training
tokens; the `expected_average_only_in` recipe). After training the scale is folded back so that
the *saved* SAE works on raw residuals with unit-norm decoder rows:

    b_enc ← b_enc / s,  threshold ← threshold / s,  b_dec ← b_dec / s   (W_enc, W_dec unchanged)

which gives encode_raw(x) = encode_train(s·x) / s and decode_raw(encode_raw(x)) = decode_train(…)/s:
the same active set (TopK selection and JumpReLU gating are invariant to a common positive
factor), activations in raw residual units, reconstructions in raw space.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ato.params import SaeParams
from ato.store import ActivationStore

from .errors import SaeError

SCALE_SAMPLE_TOKENS = 8192  # tokens used to estimate the input scale and the initial b_dec
SHUFFLE_BUFFER_BYTES = 1 << 30  # whole split in memory up to this size, else a streaming mixing buffer
READ_CHUNK_TOKENS = 8192
LOG_EVERY = 20  # steps between the progress bar's FVE / L0 updates


def input_scale(x: np.ndarray | torch.Tensor) -> float:
    """s = √d / mean‖x‖: after scaling, the mean token norm is √d."""
    x = torch.as_tensor(x, dtype=torch.float64)
    mean_norm = float(x.norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise SaeError(f"cannot scale SAE inputs: mean residual norm is {mean_norm}")
    return math.sqrt(x.shape[-1]) / mean_norm


def _common_cfg(d_in: int, d_sae: int, device: str | torch.device) -> dict[str, Any]:
    return dict(
        d_in=d_in,
        d_sae=d_sae,
        dtype="float32",
        device=str(device),
        apply_b_dec_to_input=True,
        normalize_activations="none",
    )


def build_training_sae(sp: SaeParams, d_in: int, device: str | torch.device = "cpu") -> Any:
    """A fresh sae-lens training SAE for `sp.architecture` (seeded by the caller)."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    common = _common_cfg(d_in, sp.width, device)
    if sp.architecture == "topk":
        if not 0 < sp.k <= sp.width:
            raise SaeError(f"sae.k: must be in 1..sae.width ({sp.width}), got {sp.k}")
        cfg = TopKTrainingSAEConfig(k=sp.k, rescale_acts_by_decoder_norm=True, aux_loss_coefficient=1.0, **common)
        return TopKTrainingSAE(cfg)
    jcfg = JumpReLUTrainingSAEConfig(
        l0_coefficient=sp.l1_coefficient,
        l0_warm_up_steps=max(1, sp.steps // 10),
        jumprelu_sparsity_loss_mode="step",
        **common,
    )
    return JumpReLUTrainingSAE(jcfg)


@torch.no_grad()
def to_inference_sae(training_sae: Any, scale: float, metadata: dict[str, Any] | None = None) -> Any:
    """Inference SAE (TopKSAE / JumpReLUSAE) working on raw residuals: decoder norms folded into the
    encoder, then the input scale `scale` folded back (module docstring)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    tcfg = training_sae.cfg
    state = {k: v.detach().clone().float() for k, v in training_sae.state_dict().items()}
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
    common = _common_cfg(tcfg.d_in, tcfg.d_sae, "cpu")
    if tcfg.architecture() == "topk":
        sae = TopKSAE(TopKSAEConfig(k=tcfg.k, rescale_acts_by_decoder_norm=False, **common))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    for key, value in (metadata or {}).items():
        sae.cfg.metadata[key] = value
    sae.load_state_dict(state)
    return sae.eval()


def topk_training_loss(
    tsae: Any, x: torch.Tensor, dead_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`TopKTrainingSAE.training_forward_pass`'s loss (MSE + dead-latent auxiliary loss) with a
    sparse decoder: the dense pre-activations come from one matmul, but the reconstructions are
    `embedding_bag` sums over the k selected (and k_aux dead) latents instead of dense
    [batch, d_sae] @ [d_sae, d_in] products. Same value and gradients as sae-lens' dense pass
    (tested), at about half its cost. Returns (loss, sae_out, (selected ids, activations))."""
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


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 5 % of steps, constant, linear decay to 0 over the last 20 %."""
    warm = max(1, steps // 20)
    decay = max(1, steps // 5)
    if step < warm:
        return (step + 1) / warm
    if step >= steps - decay:
        return max(0.0, (steps - step) / decay)
    return 1.0


def _coefficients(coeff_cfg: dict[str, Any], step: int) -> dict[str, float]:
    """sae-lens' loss coefficients at `step`, with their linear warm-up."""
    out = {}
    for name, c in coeff_cfg.items():
        value, warm = (c.value, c.warm_up_steps) if hasattr(c, "warm_up_steps") else (float(c), 0)
        out[name] = value * min(1.0, (step + 1) / warm) if warm > 0 else value
    return out


def _forward(
    tsae: Any, x: torch.Tensor, sp: SaeParams, coeff_cfg: dict[str, Any], dead_mask: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, [batch, d_sae] fired mask) of one training step."""
    from sae_lens.saes.sae import TrainStepInput

    if sp.architecture == "topk":
        loss, sae_out, (idx, vals) = topk_training_loss(tsae, x, dead_mask)
        fired_rows = torch.zeros(x.shape[0], sp.width, dtype=torch.bool, device=x.device)
        fired_rows.scatter_(1, idx, vals > 0)
        return loss, sae_out, fired_rows
    step_input = TrainStepInput(
        sae_in=x,
        coefficients=_coefficients(coeff_cfg, step),
        dead_neuron_mask=dead_mask,
        n_training_steps=step,
        is_logging_step=False,
    )
    out = tsae.training_forward_pass(step_input)
    return out.loss, out.sae_out, out.feature_acts > 0


def _batch_quality(x: torch.Tensor, sae_out: torch.Tensor, fired_rows: torch.Tensor, loss: torch.Tensor) -> dict:
    mse = float(((sae_out - x) ** 2).sum(-1).mean())
    var = float(((x - x.mean(0)) ** 2).sum(-1).mean())
    return {"fve": 1 - mse / max(var, 1e-12), "l0": float(fired_rows.sum(-1).float().mean()), "loss": float(loss)}


def dead_window_steps(sp: SaeParams) -> int:
    """Steps without firing after which a latent counts as dead (~64k tokens) for the auxiliary losses."""
    return max(10, min(sp.steps // 4, math.ceil(65536 / sp.batch_tokens)))


def train_sae(
    batches: Iterator[torch.Tensor],
    d_in: int,
    sp: SaeParams,
    scale: float,
    b_dec_init: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    desc: str = "sae",
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train one SAE on raw-residual batches (scaled by `scale` inside); returns the raw-space
    inference SAE and training info. Deterministic for a given seed and batch sequence."""
    from tqdm import tqdm

    torch.manual_seed(sp.seed)
    tsae = build_training_sae(sp, d_in, device)
    if b_dec_init is not None:
        with torch.no_grad():
            tsae.b_dec.data.copy_(b_dec_init.to(tsae.b_dec) * scale)
    opt = torch.optim.Adam(tsae.parameters(), lr=sp.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, sp.steps))
    coeff_cfg = tsae.get_coefficients()
    since_fired = torch.zeros(sp.width, device=device)
    dead_window = dead_window_steps(sp)
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    bar = tqdm(range(sp.steps), desc=desc, disable=not progress, mininterval=1.0)
    tsae.train()
    for step in bar:
        x = next(batches).to(device, torch.float32) * scale
        loss, sae_out, fired_rows = _forward(tsae, x, sp, coeff_cfg, since_fired > dead_window, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tsae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        with torch.no_grad():
            since_fired += 1
            since_fired[fired_rows.any(0)] = 0
            if step % LOG_EVERY == 0 or step == sp.steps - 1:
                last = _batch_quality(x, sae_out, fired_rows, loss)
                bar.set_postfix(fve=f"{last['fve']:.3f}", l0=f"{last['l0']:.1f}")
    info = {
        "train_seconds": time.perf_counter() - t0,
        "train_tokens": sp.steps * sp.batch_tokens,
        "train_fve_last_batch": last.get("fve"),
        "train_l0_last_batch": last.get("l0"),
        "dead_window_steps": dead_window,
        "input_scale": scale,
    }
    return to_inference_sae(tsae.cpu(), scale), info


# --------------------------------------------------------------------------------------------
# Training data from the store


def token_batches(
    store: ActivationStore, split: str, layer: int, batch: int, seed: int, buffer_bytes: int = SHUFFLE_BUFFER_BYTES
) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of one layer's residuals (special tokens excluded).

    A split that fits in `buffer_bytes` is read once and reshuffled every epoch; a larger one is
    streamed through a mixing buffer of that size (shuffle, emit half, refill)."""
    rng = np.random.default_rng(seed)
    if store.n_tokens(split) * store.d_model * 4 <= buffer_bytes:
        return _in_memory_batches(store, split, layer, batch, rng)
    return _streamed_batches(store, split, layer, batch, rng, buffer_bytes)


def _in_memory_batches(
    store: ActivationStore, split: str, layer: int, batch: int, rng: np.random.Generator
) -> Iterator[torch.Tensor]:
    chunks = store.iter_chunks(split, [layer], READ_CHUNK_TOKENS)
    data = torch.from_numpy(np.concatenate([c[layer] for c in chunks]))
    if len(data) == 0:
        raise SaeError(f"{store.root}: split {split!r} has no non-special tokens for layer {layer}")
    order = np.zeros(0, dtype=np.int64)
    while True:
        while len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(data))])
        idx, order = order[:batch], order[batch:]
        yield data[torch.from_numpy(idx)]


def _streamed_batches(
    store: ActivationStore, split: str, layer: int, batch: int, rng: np.random.Generator, buffer_bytes: int
) -> Iterator[torch.Tensor]:
    d = store.d_model
    cap = max(batch * 2, buffer_bytes // (4 * d))
    buf = np.zeros((0, d), dtype=np.float32)
    while True:
        got = False
        for chunk in store.iter_chunks(split, [layer], READ_CHUNK_TOKENS):
            got = True
            buf = np.concatenate([buf, chunk[layer]])
            if len(buf) >= cap:
                buf = buf[rng.permutation(len(buf))]
                half = len(buf) // 2
                for i in range(0, half - batch + 1, batch):
                    yield torch.from_numpy(buf[i : i + batch].copy())
                buf = buf[(half // batch) * batch :]
        if not got:
            raise SaeError(f"{store.root}: split {split!r} is empty")
        if len(buf) >= batch:  # end of an epoch: emit what is buffered, keep the remainder
            buf = buf[rng.permutation(len(buf))]
            n_full = (len(buf) // batch) * batch
            for i in range(0, n_full, batch):
                yield torch.from_numpy(buf[i : i + batch].copy())
            buf = buf[n_full:]


def sample_tokens(store: ActivationStore, split: str, layer: int, n: int) -> np.ndarray:
    """The first `n` non-special residuals of `layer` on `split` (fewer if the split is smaller)."""
    out, got = [], 0
    for chunk in store.iter_chunks(split, [layer], min(n, READ_CHUNK_TOKENS)):
        out.append(chunk[layer])
        got += len(chunk[layer])
        if got >= n:
            break
    if not out:
        raise SaeError(f"{store.root}: split {split!r} has no non-special tokens for layer {layer}")
    return np.concatenate(out)[:n]
