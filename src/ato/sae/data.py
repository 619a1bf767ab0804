"""Training tokens for the SAEs (docs/method.md#features): the store's TRAIN split first (no forward
pass needed), then residuals streamed from the model over further TRAIN-split documents of the same
corpus, forward only up to the deepest target layer, held in memory for the training epochs.

Why stream instead of a second store: an SAE needs several times the operator store's tokens, but
only at the target layers; a DVC-tracked copy would add ~2.5 kB per token and layer to the disk (and
again to the DVC cache) for data that one forward pass rebuilds bit for bit. Holding it in memory
lets every training step reuse it over several epochs, which on a CPU is far cheaper than the
forward pass that produced it.

Disjointness: the corpus is split by document (`ato.corpus.split_of`), so every token here comes
from a TRAIN document; VAL (quality report) and TEST (operators' held-out scores, causal patching)
documents are never read. The streamed documents continue the TRAIN sequence stream where the
store's TRAIN split stopped: the sequences the store holds (and the one it holds only a trimmed
prefix of) are skipped, so no token is counted twice.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ato.corpus import Corpus, TokenSequence, sequences_for_split
from ato.models import base_model, capture_residuals, run_captured
from ato.store import ActivationStore

from .errors import SaeError

log = logging.getLogger(__name__)

READ_CHUNK_TOKENS = 8192
MAX_BUFFER_BYTES = 8 << 30  # in-memory training tokens, all target layers together
UNLIMITED = 10**12  # a token budget the corpus always runs out of first


@dataclass
class SaeData:
    """Non-special TRAIN-split residuals of every target layer, row-aligned across layers."""

    tokens: dict[int, torch.Tensor]  # layer → float32 [n, d] raw residuals
    from_store: int  # rows read from the activation store's TRAIN split
    from_model: int  # rows streamed from the model
    documents: int  # TRAIN documents forwarded for the streamed rows
    forward_seconds: float  # wall time of the streamed forward passes (0 when none)

    @property
    def n_tokens(self) -> int:
        return self.from_store + self.from_model

    def cost(self) -> dict[str, int | float | None]:
        """Data-source numbers worth recording (SaeInfo, MLflow, bench)."""
        rate = self.from_model / self.forward_seconds if self.forward_seconds > 0 else None
        return {
            "data_tokens": self.n_tokens,
            "data_tokens_from_store": self.from_store,
            "data_tokens_from_model": self.from_model,
            "data_forward_seconds": self.forward_seconds,
            "data_forward_tokens_per_s": rate,
        }


def store_tokens(store: ActivationStore, layers: list[int], n: int) -> dict[int, np.ndarray]:
    """The first `n` non-special TRAIN residuals of each layer (fewer if the split is smaller)."""
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    got = 0
    if n > 0:
        for chunk in store.iter_chunks("train", layers, READ_CHUNK_TOKENS):
            take = min(len(chunk[layers[0]]), n - got)
            for layer in layers:
                out[layer].append(chunk[layer][:take])
            got += take
            if got >= n:
                break
    d = store.d_model
    return {layer: np.concatenate(v) if v else np.zeros((0, d), np.float32) for layer, v in out.items()}


def check_corpus(store: ActivationStore, corpus: Corpus) -> None:
    """The streamed documents must be split exactly as the store's were, or TRAIN could reach into
    VAL/TEST documents."""
    m, c = store.manifest.corpus, corpus.params
    recorded = (m.digest, m.split_seed, m.split_fractions, m.max_length, m.packing)
    current = (corpus.digest, c.split_seed, c.split_fractions, c.max_length, c.packing)
    if recorded != current:
        raise SaeError(
            f"{store.root}: the store was collected from corpus/split {recorded}, but the corpus params give "
            f"{current}; SAE tokens streamed now could overlap its VAL/TEST documents. Rerun `ato collect` "
            "or set sae.tokens ≤ the store's TRAIN tokens"
        )


def further_sequences(corpus: Corpus, tokenizer: Any, skip_tokens: int) -> Iterator[TokenSequence]:
    """TRAIN sequences after the first `skip_tokens` tokens of the TRAIN sequence stream (the store's
    TRAIN split); the sequence the store cut short is skipped whole."""
    unlimited = copy.copy(corpus)  # same documents and split, no TRAIN budget
    unlimited.params = dataclasses.replace(corpus.params, tokens={**corpus.params.tokens, "train": UNLIMITED})
    seen = 0
    for seq in sequences_for_split(unlimited, tokenizer, "train"):
        seen += len(seq.token_ids)
        if seen > skip_tokens:
            if seen - len(seq.token_ids) >= skip_tokens:
                yield seq


@torch.no_grad()
def forward_batch(model: Any, seqs: list[TokenSequence], layers: list[int], pad_id: int) -> dict[int, torch.Tensor]:
    """Residuals of the non-special tokens of a right-padded batch, row-major by sequence; the
    forward stops after the deepest of `layers`."""
    device = next(model.parameters()).device
    width = max(len(s.token_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    keep = torch.zeros((len(seqs), width), dtype=torch.bool)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.token_ids)] = torch.tensor(s.token_ids)
        mask[i, : len(s.token_ids)] = 1
        keep[i, : len(s.token_ids)] = ~torch.tensor(s.special, dtype=torch.bool)
    with capture_residuals(model, layers, stop_early=True) as captured:
        run_captured(base_model(model), input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        return {layer: captured[layer][keep.to(device)].float().cpu() for layer in layers}


def model_tokens(
    model: Any, seqs: Iterator[TokenSequence], layers: list[int], n: int, pad_id: int, batch_size: int
) -> tuple[dict[int, torch.Tensor], int, float]:
    """Up to `n` non-special residuals per layer from `seqs`; (rows, documents, seconds)."""
    from tqdm import tqdm

    d = int(model.config.hidden_size)
    out = {layer: torch.empty((n, d), dtype=torch.float32) for layer in layers}
    got, docs, t0 = 0, 0, time.perf_counter()
    with tqdm(total=n, unit="tok", unit_scale=True, desc="sae data", mininterval=2.0) as bar:
        while got < n:
            # a block of sequences sorted by length: less padding, same rows whatever the batch order
            block = [s for _, s in zip(range(batch_size * 8), seqs)]
            if not block:
                break
            block.sort(key=lambda s: len(s.token_ids))
            for start in range(0, len(block), batch_size):
                acts = forward_batch(model, block[start : start + batch_size], layers, pad_id)
                take = min(len(acts[layers[0]]), n - got)
                for layer in layers:
                    out[layer][got : got + take] = acts[layer][:take]
                got += take
                docs += len({s.doc_ids[0] for s in block[start : start + batch_size]})
                bar.update(take)
                if got >= n:
                    break
    return {layer: t[:got] for layer, t in out.items()}, docs, time.perf_counter() - t0


def gather(
    store: ActivationStore,
    layers: list[int],
    n_tokens: int,
    model: Any | None = None,
    tokenizer: Any | None = None,
    corpus: Corpus | None = None,
    batch_size: int = 16,
) -> SaeData:
    """`n_tokens` TRAIN residuals per layer: the store's first, then the model's (module docstring)."""
    need_bytes = n_tokens * store.d_model * 4 * len(layers)
    if need_bytes > MAX_BUFFER_BYTES:
        raise SaeError(
            f"sae.tokens={n_tokens} × d_model {store.d_model} × {len(layers)} target layers needs "
            f"{need_bytes / 2**30:.1f} GiB in memory (limit {MAX_BUFFER_BYTES / 2**30:.0f} GiB); lower sae.tokens"
        )
    stored = store_tokens(store, layers, n_tokens)
    n_store = len(stored[layers[0]])
    tokens = {layer: torch.from_numpy(a) for layer, a in stored.items()}
    missing = n_tokens - n_store
    if missing <= 0:
        return SaeData(tokens, n_store, 0, 0, 0.0)
    if model is None or tokenizer is None or corpus is None:
        raise SaeError(f"sae.tokens={n_tokens} > the store's {n_store} TRAIN tokens, and no model to stream from")
    check_corpus(store, corpus)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = further_sequences(corpus, tokenizer, store.n_tokens("train"))
    streamed, docs, seconds = model_tokens(model, seqs, layers, missing, pad_id, batch_size)
    n_model = len(streamed[layers[0]])
    if n_model < missing:
        log.warning(
            "sae.tokens=%d: the corpus's TRAIN documents hold only %d more tokens; training on %d",
            n_tokens,
            n_model,
            n_store + n_model,
        )
    tokens = {layer: torch.cat([tokens[layer], streamed[layer]]) for layer in layers}
    return SaeData(tokens, n_store, n_model, docs, seconds)


def shuffled_batches(data: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of `data` rows, reshuffled every epoch (seeded)."""
    if len(data) == 0:
        raise SaeError("no SAE training tokens")
    rng = np.random.default_rng(seed)
    order = np.zeros(0, dtype=np.int64)
    while True:
        while len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(data))])
        idx, order = order[:batch], order[batch:]
        yield data[torch.from_numpy(idx)]
