"""The streaming pass of `ato context`: the store's token sequences of a split, forwarded once in
batches (`ato.routed.context_forward`: every pair's layers L and L + k and routed inputs from the same
forward), stacked into the context inputs of every pair (`ato.math.context.stack_context_inputs`) and
accumulated into float64 sufficient statistics of the union's inputs, one per slice of sequences.

Targets are the stored tokens that are not special (BOS excluded, as the statistics of `ato stats`);
an absent input (BOS, or before the sequence start) is `fill`, the train mean of layer L's non-BOS rows.
A split's test batches may be kept (their forward outputs, float32 on the CPU) so that every fitted
map is scored per sequence afterwards without a second forward pass.

The Grams are accumulated in float64 on the pass's device. Each batch's products are formed about a
shift (the first batch's column means): in float64, or with `context.gram_dtype: float32` in float32
(5–6× the GEMM rate on a CPU) — centring first is what makes float32 safe, since the uncentred rows
reach norms of ~4e4 and their products would lose the digits an R²_w difference of 1e-3 needs. The
sums about the shift are turned back into the uncentred `PairStats` in float64
(tests/test_context_stage.py::test_float32_products_give_the_float64_fits checks the fits agree)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .math.context import stack_context_inputs
from .math.stats import PairStats
from .residuals import pad_id_of
from .routed import ContextForward, context_forward
from .store import StoredSequence

__all__ = [
    "ContextPair",
    "GramAccumulator",
    "KeptBatch",
    "SplitPass",
    "pair_rows",
    "stream_split",
]


@dataclass(frozen=True)
class ContextPair:
    """A pair as the pass needs it."""

    name: str
    L: int
    k: int
    fill: torch.Tensor  # [d] float32: the train mean of layer L's non-BOS rows (an absent input)

    @property
    def target(self) -> int:
        return self.L + self.k


class GramAccumulator:
    """n, Σx, Σy, XᵀX, XᵀY, YᵀY in float64 on the pass's device; `PairStats` once the pass is done.

    Products are formed about a shift (the first batch's column means) in `product_dtype` and summed in
    float64; `pair_stats` adds the shift back exactly (module docstring). XᵀX is symmetric: only its
    upper triangle is formed, in row stripes of `stripe` columns (stripe i against the columns from its
    own on), ~0.55 of the full product's FLOPs at p = 4480; `pair_stats` mirrors it. Rows are buffered
    until `flush_rows` are in: folding each product into the float64 sums costs O(p²) however few the
    rows, which at one batch's ~760 rows cost as much as the product (`bench/context.py`)."""

    def __init__(
        self,
        p: int,
        d: int,
        device: torch.device,
        product_dtype: torch.dtype = torch.float64,
        stripe: int = 512,
        flush_rows: int = 2048,
    ):
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.product_dtype = product_dtype
        self.stripes = [(start, min(start + stripe, p)) for start in range(0, p, stripe)]
        self.flush_rows = flush_rows
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        self.n = 0.0
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None
        self.sum_x, self.sum_y = zeros(p), zeros(d)  # of the shifted rows
        self.xtx_upper = zeros(p, p)  # of the shifted rows: the stripes' blocks on and above the diagonal
        self.xty, self.yty = zeros(p, d), zeros(d, d)  # of the shifted rows

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Adds rows x [n, p], y [n, d]; their products are formed once `flush_rows` rows are buffered."""
        self._pending.append((x, y))
        self._pending_rows += int(x.shape[0])
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        x, y = torch.cat([x for x, _ in self._pending]), torch.cat([y for _, y in self._pending])
        self._pending, self._pending_rows = [], 0
        if self.shift_x is None or self.shift_y is None:
            self.shift_x = x.to(torch.float64).mean(0)
            self.shift_y = y.to(torch.float64).mean(0)
        x64, y64 = x.to(torch.float64) - self.shift_x, y.to(torch.float64) - self.shift_y
        self.n += float(x.shape[0])
        self.sum_x += x64.sum(0)  # sums in float64 whatever the products' dtype
        self.sum_y += y64.sum(0)
        xc, yc = x64.to(self.product_dtype), y64.to(self.product_dtype)
        for start, stop in self.stripes:
            self.xtx_upper[start:stop, start:] += (xc[:, start:stop].T @ xc[:, start:]).to(torch.float64)
        self.xty += (xc.T @ yc).to(torch.float64)
        self.yty += (yc.T @ yc).to(torch.float64)

    def pair_stats(self) -> PairStats:
        """The uncentred sums: Σ(a+s)(b+u)ᵀ = Σabᵀ + (Σa)uᵀ + s(Σb)ᵀ + n s uᵀ, in float64."""
        self._flush()

        def cpu(t: torch.Tensor) -> np.ndarray:
            return t.cpu().numpy()

        p, d = self.sum_x.shape[0], self.sum_y.shape[0]
        sx = self.shift_x if self.shift_x is not None else self.sum_x.new_zeros(p)
        sy = self.shift_y if self.shift_y is not None else self.sum_y.new_zeros(d)

        def uncentred(ab: torch.Tensor, sum_a: torch.Tensor, s: torch.Tensor, sum_b: torch.Tensor, u: torch.Tensor):
            return ab + torch.outer(sum_a, u) + torch.outer(s, sum_b) + self.n * torch.outer(s, u)

        upper = torch.triu(self.xtx_upper)
        xtx = upper + torch.triu(upper, 1).T
        return PairStats(
            self.n,
            cpu(self.sum_x + self.n * sx),
            cpu(self.sum_y + self.n * sy),
            cpu(uncentred(xtx, self.sum_x, sx, self.sum_x, sx)),
            cpu(uncentred(self.xty, self.sum_x, sx, self.sum_y, sy)),
            cpu(uncentred(self.yty, self.sum_y, sy, self.sum_y, sy)),
        )


@dataclass
class PaddedBatch:
    """Right-padded token ids of some sequences of a split."""

    sequences: list[int]  # indices into the split's sequences, one per row
    ids: torch.Tensor  # int64 [B, T]
    mask: torch.Tensor  # int64 [B, T]: 1 on real tokens
    lengths: torch.Tensor  # int64 [B]
    target: torch.Tensor  # bool [B, T]: real tokens that are not special (the rows every map predicts)


def padded_batches(seqs: Sequence[StoredSequence], batch_size: int, pad_id: int) -> Iterator[PaddedBatch]:
    """Batches of sequences of similar length (less padding), every sequence once."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        lengths = torch.tensor([len(seqs[i].token_ids) for i in chosen])
        width = int(lengths.max())
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        target = torch.zeros((len(chosen), width), dtype=torch.bool)
        for row, i in enumerate(chosen):
            ids[row, : lengths[row]] = torch.from_numpy(seqs[i].token_ids)
            target[row, : lengths[row]] = ~torch.from_numpy(seqs[i].special)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        yield PaddedBatch(chosen, ids, mask, lengths, target)


@dataclass
class PairRows:
    """One pair's target rows of a batch."""

    x: torch.Tensor  # [n, p] stacked inputs (the union's blocks)
    y: torch.Tensor  # [n, d] residual of layer L + k
    row_sequence: torch.Tensor  # int64 [n]: the batch row (sequence) each target row belongs to


def pair_rows(
    hidden: dict[int, torch.Tensor],
    routed: dict[tuple[int, int], torch.Tensor],
    pair: ContextPair,
    lags: int,
    lengths: torch.Tensor,
    target: torch.Tensor,
) -> PairRows:
    """The stacked inputs and targets of `pair` at a batch's target positions."""
    x = hidden[pair.L]
    stacked = stack_context_inputs(x, routed[(pair.L, pair.k)], lags, pair.fill.to(x.device), lengths.to(x.device))
    where = target.to(x.device)
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(where)[where]
    return PairRows(stacked[where], hidden[pair.target][where], rows)


@dataclass
class KeptBatch:
    """A batch's forward outputs kept (float32, CPU) to score the fitted maps per sequence later."""

    sequences: list[int]
    lengths: torch.Tensor
    target: torch.Tensor
    hidden: dict[int, torch.Tensor]
    routed: dict[tuple[int, int], torch.Tensor]

    def rows(self, pair: ContextPair, lags: int, device: torch.device) -> PairRows:
        hidden = {n: self.hidden[n].to(device) for n in (pair.L, pair.target)}
        routed = {(pair.L, pair.k): self.routed[(pair.L, pair.k)].to(device)}
        return pair_rows(hidden, routed, pair, lags, self.lengths, self.target)


@dataclass
class SplitPass:
    """One split's statistics per pair and slice, and what was kept."""

    stats: dict[str, list[PairStats]]  # pair → one union PairStats per slice (slice order)
    doc_ids: list[int]  # of each sequence, in the split's order (the index `KeptBatch.sequences` uses)
    kept: list[KeptBatch] = field(default_factory=list)
    tokens: int = 0  # target rows per pair
    forward_seconds: float = 0.0  # the forward passes alone (the rest: stacking and Grams)
    seconds: float = 0.0


def stream_split(
    model: Any,
    tokenizer: Any,
    seqs: Sequence[StoredSequence],
    pairs: Sequence[ContextPair],
    lags: int,
    batch_size: int,
    slice_of: np.ndarray,
    keep: bool = False,
    desc: str = "context",
    product_dtype: torch.dtype = torch.float64,
) -> SplitPass:
    """Forward `seqs` once and accumulate every pair's union statistics into slice `slice_of[i]` of
    sequence i; with `keep`, every batch's forward outputs are kept on the CPU (`KeptBatch`)."""
    device = next(model.parameters()).device
    n_slices = int(slice_of.max()) + 1 if len(slice_of) else 1
    d = int(model.config.hidden_size)
    accs = {
        pair.name: [GramAccumulator(d * (2 + lags + pair.k), d, device, product_dtype) for _ in range(n_slices)]
        for pair in pairs
    }
    result = SplitPass(stats={}, doc_ids=[s.doc_id for s in seqs])
    t0 = time.perf_counter()
    total = sum(int((~s.special).sum()) for s in seqs)
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, mininterval=2.0) as bar:
        for batch in padded_batches(seqs, batch_size, pad_id_of(tokenizer)):
            t_forward = time.perf_counter()
            fwd = context_forward(model, batch.ids.to(device), batch.mask.to(device), [(p.L, p.k) for p in pairs])
            result.forward_seconds += time.perf_counter() - t_forward
            slices = torch.as_tensor(slice_of[batch.sequences], device=device)
            for pair in pairs:
                rows = pair_rows(fwd.hidden, fwd.routed, pair, lags, batch.lengths, batch.target)
                row_slice = slices[rows.row_sequence]
                for s in row_slice.unique().tolist():
                    chosen = row_slice == s
                    accs[pair.name][s].update(rows.x[chosen], rows.y[chosen])
            if keep:
                result.kept.append(_kept(batch, fwd))
            n = int(batch.target.sum())
            result.tokens += n
            bar.update(n)
    result.stats = {name: [acc.pair_stats() for acc in slices_] for name, slices_ in accs.items()}
    result.seconds = time.perf_counter() - t0
    return result


def _kept(batch: PaddedBatch, fwd: ContextForward) -> KeptBatch:
    return KeptBatch(
        batch.sequences,
        batch.lengths,
        batch.target,
        {n: h.cpu() for n, h in fwd.hidden.items()},
        {key: z.cpu() for key, z in fwd.routed.items()},
    )


def nested_slices(n_sequences: int, fractions: Sequence[float]) -> np.ndarray:
    """Slice index of each train sequence (store order): slice j holds the sequences between fractions
    j − 1 and j, so the first j + 1 slices together are the nested fraction j of the learning curve."""
    bounds = np.round(np.asarray(fractions, dtype=np.float64) * n_sequences).astype(np.int64)
    return np.searchsorted(bounds, np.arange(n_sequences), side="right").astype(np.int64)
