"""Train one SAE on a layer's residuals with sae-lens' training classes (see docs/method.md#features).

sae-lens' own trainer (`SAETrainer`: Adam, gradient clipping at 1, linear lr warm-up and decay,
dead-latent tracking over a window of steps, which feeds TopK's AuxK loss) trains sae-lens'
`TopKTrainingSAE` (decoder norms folded into the activations during training,
`rescale_acts_by_decoder_norm`, and into the encoder on saving) or `JumpReLUTrainingSAE`, on
shuffled batches of TRAIN-split residuals (`ato.sae.data`; BOS/special tokens excluded). The TopK
subclass only replaces the dense decoder product of the training step by a sparse one (same loss
and gradients, tested; it saves the dense [batch, width] × [width, d] product, which matters at
widths of several thousand; bench/sae.py measures 1.0–1.4× the dense step's speed at width 1024).

Input scaling. Late-layer residual norms reach ~1e4, far from the unit-scale inputs SAE training
recipes assume, so training sees x' = s·x with s = √d / mean‖x‖ (mean over the first training
tokens; the `expected_average_only_in` recipe). After training the scale is folded back so that
the *saved* SAE works on raw residuals with unit-norm decoder rows:

    b_enc ← b_enc / s,  threshold ← threshold / s,  b_dec ← b_dec / s   (W_enc, W_dec unchanged)

which gives encode_raw(x) = encode_train(s·x) / s and decode_raw(encode_raw(x)) = decode_train(…)/s:
the same active set (TopK selection and JumpReLU gating are invariant to a common positive
factor), activations in raw residual units, reconstructions in raw space.

Reproducibility. With two or more CPU threads, some kernel of the training step accumulates in
thread order (not isolated: the backward passes of `embedding_bag`, `gather` and `topk` each repeat
on their own), so two processes trained the same SAE on the same batches to different last bits,
which 800 steps amplify into different latents (measured: 5 of the 26 kept features of layer 6
changed between two runs on one machine). Training therefore runs under
`torch.use_deterministic_algorithms`: bitwise identical across processes and equal to the
single-thread result (tests/test_sae.py), at no measurable cost (+0–5 % on 300 steps, within noise).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sae_lens import TopKTrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

from ato.params import SaeParams

from .errors import SaeError

SCALE_SAMPLE_TOKENS = 8192  # tokens used to estimate the input scale and the initial b_dec


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
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAEConfig

    common = _common_cfg(d_in, sp.width, device)
    if sp.architecture == "topk":
        if not 0 < sp.k <= sp.width:
            raise SaeError(f"sae.k: must be in 1..sae.width ({sp.width}), got {sp.k}")
        cfg = TopKTrainingSAEConfig(k=sp.k, rescale_acts_by_decoder_norm=True, aux_loss_coefficient=1.0, **common)
        return SparseTopKTrainingSAE(cfg)
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


def topk_losses(
    tsae: Any, x: torch.Tensor, dead_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`TopKTrainingSAE.training_forward_pass`'s losses (MSE, dead-latent auxiliary loss) with a
    sparse decoder: the dense pre-activations come from one matmul, but the reconstructions are
    `embedding_bag` sums over the k selected (and k_aux dead) latents instead of dense
    [batch, d_sae] @ [d_sae, d_in] products. Same value and gradients as sae-lens' dense pass
    (tested). Returns (mse, aux, sae_out, (selected ids, activations), hidden_pre)."""
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
    mse = ((sae_out - x) ** 2).sum(-1).mean()
    aux = mse.new_zeros(())
    if dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0:
        residual = (x - sae_out).detach()
        k_aux_full = x.shape[-1] // 2
        scale = min(num_dead / k_aux_full, 1.0)
        k_aux = min(k_aux_full, num_dead)
        masked = torch.where(dead_mask[None], hidden_pre, torch.full_like(hidden_pre, -torch.inf))
        top_aux = torch.topk(masked, k_aux, dim=-1, sorted=False)
        aux_coef = top_aux.values / norms[top_aux.indices] if norms is not None else top_aux.values
        recons = F.embedding_bag(top_aux.indices, W_dec, per_sample_weights=aux_coef, mode="sum")
        aux = cfg.aux_loss_coefficient * scale * ((recons - residual) ** 2).sum(-1).mean()
    return mse, aux, sae_out, (idx, vals), hidden_pre


class SparseTopKTrainingSAE(TopKTrainingSAE):
    """sae-lens' `TopKTrainingSAE` whose training step decodes sparsely (`topk_losses`); everything
    else — initialisation, config, state dict, sae-lens' `SAETrainer` — is sae-lens' own."""

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x = step_input.sae_in
        mse, aux, sae_out, (idx, vals), hidden_pre = topk_losses(self, x, step_input.dead_neuron_mask)
        with torch.no_grad():  # the trainer counts firings on the dense activations
            acts = torch.zeros_like(hidden_pre).scatter_(1, idx, vals)
        return TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            feature_acts=acts,
            hidden_pre=hidden_pre,
            loss=mse + aux,
            losses={"mse_loss": mse, "auxiliary_reconstruction_loss": aux},
        )


def lr_schedule(steps: int) -> dict[str, int]:
    """sae-lens scheduler settings: linear warm-up over the first 5 % of steps, constant, linear
    decay to 0 over the last 20 % (the SAELens / Anthropic recipe)."""
    return {"lr_warm_up_steps": max(1, steps // 20), "lr_decay_steps": max(1, steps // 5)}


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
    """Train one SAE with sae-lens' `SAETrainer` on raw-residual batches (scaled by `scale` on the
    way in); returns the raw-space inference SAE and training info. Bitwise deterministic for a given
    seed and batch sequence, across processes and thread counts (see the module docstring)."""
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(sp.seed)
    tsae = build_training_sae(sp, d_in, device)
    if b_dec_init is not None:
        with torch.no_grad():
            tsae.b_dec.data.copy_(b_dec_init.to(tsae.b_dec) * scale)
    cfg = SAETrainerConfig(
        total_training_samples=sp.steps * sp.batch_tokens,
        train_batch_size_samples=sp.batch_tokens,
        lr=sp.lr,
        lr_end=sp.lr,  # the constant phase's rate, where the final decay starts
        lr_scheduler_name="constant",
        **lr_schedule(sp.steps),
        device=str(device),
        dead_feature_window=dead_window_steps(sp),
        feature_sampling_window=sp.steps,
    )
    scaled = (b.to(device, torch.float32) * scale for b in batches)
    trainer = SAETrainer(cfg=cfg, sae=tsae, data_provider=scaled)
    t0 = time.perf_counter()
    with _quiet_progress(desc, progress), deterministic_algorithms():
        trainer.fit()
    seconds = time.perf_counter() - t0
    info = {
        "train_seconds": seconds,
        "train_tokens": sp.steps * sp.batch_tokens,
        "train_tokens_per_s": sp.steps * sp.batch_tokens / max(seconds, 1e-9),
        "train_l0": float(trainer.feature_sparsity.sum()),
        "train_dead_fraction": float(trainer.dead_neurons.float().mean()),
        "dead_window_steps": cfg.dead_feature_window,
        "input_scale": scale,
    }
    return to_inference_sae(tsae.cpu(), scale), info


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic kernels for the duration (thread-order-free accumulation); restores the
    caller's setting, also on exceptions."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: an op without a deterministic kernel (possible on CUDA) warns instead of failing;
    # on the CPU every op of the training step has one (no warning in the default run)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@contextmanager
def _quiet_progress(desc: str, progress: bool) -> Iterator[None]:
    """sae-lens' trainer draws its own tqdm bar; label it (or silence it in tests)."""
    import sae_lens.training.sae_trainer as trainer_module

    original = trainer_module.tqdm

    def bar(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "desc": desc, "disable": not progress, "mininterval": 2.0})

    trainer_module.tqdm = bar
    try:
        yield
    finally:
        trainer_module.tqdm = original
