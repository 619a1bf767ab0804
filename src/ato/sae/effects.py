"""Causal effect of SAE features on the model's next-token loss (see docs/method.md#features).

The effect of feature f is the change in mean next-token loss on held-out sequences when a_f·d_f is
subtracted from the layer-n residual at every non-special position where f is active. For all
features at once it is computed to FIRST ORDER: ΔL_f ≈ −Σ_t a_{t,f} (∂L/∂h_t · d_f), from one forward
+ backward pass per batch (exact ablation costs one forward per feature — ~2560 per layer — which
does not fit the CPU budget). `exact_effects` runs the exact ablation for a few features, so the
approximation's quality can be reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ato.math.features import first_order_ablation_effect

from .errors import FeatureScoreError

LOSS_CHUNK_TOKENS = 256  # LM-head rows per chunk: bounds the logits' memory (vocab 262k)
CAUSAL_BATCH = 4  # sequences per forward/backward pass

Sequence = tuple[np.ndarray, np.ndarray]  # (token ids, special flags) of one stored sequence


@torch.no_grad()
def decoder_directions(sae: Any) -> torch.Tensor:
    """[d_sae, d_in]: what one unit of each feature's activation adds to the reconstruction
    (decode(e_f) − decode(0), so any decoder-norm rescaling of the architecture is included)."""
    eye = torch.eye(sae.cfg.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    return sae.decode(eye) - sae.decode(torch.zeros_like(eye[:1]))


def sum_next_token_loss(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ next-token cross-entropy over the batch (pairs of real tokens), chunked over the LM head
    (checkpointed, so a backward pass keeps no full logits)."""
    from ato.models import chunked_nll, final_hidden

    hidden = final_hidden(model, ids, attn)
    valid = attn[:, 1:].bool() & attn[:, :-1].bool()
    nll = chunked_nll(model, hidden[:, :-1][valid], ids[:, 1:][valid], LOSS_CHUNK_TOKENS, checkpointed=True)
    return nll.sum(), int(valid.sum())


def pad_sequences(seqs: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and the mask of positions that may be ablated."""
    T = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    ablate = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (tok, special) in enumerate(seqs):
        ids[b, : len(tok)] = torch.as_tensor(tok, dtype=torch.long)
        attn[b, : len(tok)] = 1
        ablate[b, : len(tok)] = ~torch.as_tensor(special, dtype=torch.bool)
    return ids.to(device), attn.to(device), ablate.to(device)


def loss_and_residual_grad(
    model: nn.Module, layer: int, ids: torch.Tensor, attn: torch.Tensor
) -> tuple[float, int, torch.Tensor, torch.Tensor]:
    """One forward + backward pass: (Σ next-token loss, loss tokens, layer-`layer` residual, ∂loss/∂residual)."""
    from ato.models import patch_residual

    held: dict[str, torch.Tensor] = {}

    def grab(h: torch.Tensor) -> torch.Tensor:
        held["h"] = h.detach().requires_grad_(True)
        return held["h"]

    with torch.enable_grad(), patch_residual(model, layer, grab):
        loss, n = sum_next_token_loss(model, ids, attn)
        loss.backward()
    h, g = held["h"].detach(), held["h"].grad
    assert g is not None  # the loss depends on the patched residual
    return float(loss.detach()), n, h, g


def first_order_effects(
    model: nn.Module,
    sae: Any,
    layer: int,
    sequences: list[Sequence],
    batch_size: int = CAUSAL_BATCH,
    progress: bool = True,
) -> tuple[np.ndarray, float, int]:
    """First-order change of the mean next-token loss per feature (module docstring).
    Returns (effects [d_sae], clean mean loss, number of loss tokens)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    directions = decoder_directions(sae).to(device)
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    loss_sum, n_tok = 0.0, 0
    batches = range(0, len(sequences), batch_size)
    for i in tqdm(batches, desc=f"select layer {layer}: causal", disable=not progress):
        ids, attn, ablate = pad_sequences(sequences[i : i + batch_size], device)
        loss, n, h, g = loss_and_residual_grad(model, layer, ids, attn)
        with torch.no_grad():
            acts = sae.encode(h[ablate])
            total += first_order_ablation_effect(acts, g[ablate], directions).cpu()
        loss_sum += loss
        n_tok += n
    if n_tok == 0:
        raise FeatureScoreError(f"layer {layer}: the held-out sequences have no next-token pairs")
    return (total / n_tok).numpy(), loss_sum / n_tok, n_tok


@torch.no_grad()
def exact_effects(
    model: nn.Module,
    sae: Any,
    layer: int,
    sequences: list[Sequence],
    features: list[int],
    batch_size: int = CAUSAL_BATCH,
) -> np.ndarray:
    """Exact change of the mean next-token loss when each feature's a_f·d_f is removed at every
    non-special position where it is active (one forward pass per feature and batch)."""
    from ato.models import patch_residual

    device = next(model.parameters()).device
    directions = decoder_directions(sae).to(device)
    clean, ablated = 0.0, np.zeros(len(features))
    n_tok = 0
    for i in range(0, len(sequences), batch_size):
        ids, attn, ablate = pad_sequences(sequences[i : i + batch_size], device)
        loss, n = sum_next_token_loss(model, ids, attn)
        clean += float(loss)
        n_tok += n
        for j, f in enumerate(features):

            def remove(h: torch.Tensor, f: int = f, ablate: torch.Tensor = ablate) -> torch.Tensor:
                a = sae.encode(h)[..., f] * ablate
                return h - a[..., None] * directions[f]

            with patch_residual(model, layer, remove):
                ablated[j] += float(sum_next_token_loss(model, ids, attn)[0])
    return (ablated - clean) / max(n_tok, 1)
