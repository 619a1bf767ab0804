"""Residual patching on held-out text: the forward passes and loss accounting behind `ato causal`.

On held-out TEST-split sequences (never val/train), in one forward pass per batch and condition, the
residual after block L is captured by a hook and the residual after block L+k is overwritten, at a
chosen set of positions, with the condition's value:

    clean       no patch
    ato         W x_L + b            (the fitted operator on this very forward's x_L)
    identity    x_L                  (pure carry-over, no transport map)
    zero        0                    (ablation: the damage reference)
    bias_only   b                    (the operator with its input removed)
    train_mean  ȳ_train              (the train-split mean of y; BOS excluded like every fit)

BOS (position 0) and other special tokens are never patched. The loss is the next-token NLL from the
final hidden states through the chunked LM head (`ato.models.chunked_nll`, with the model's final
logit softcapping), so the 262k-vocab logits never exist all at once. Two token scopes: `all` (every
predicted token) and `after` (predictions at or after the first patched position — the only ones a
patch can change in a causal model; earlier rows are taken from the clean pass, which is exact, and
skip the LM head). Per condition vs clean: token-weighted Δ log-perplexity with a paired bootstrap
95 % CI over sequences, and the recovered share 1 − Δ(ato)/Δ(zero). See docs/method.md#causal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ato.artifacts import (
    CleanScores,
    PatchedScores,
    PositionSetSummary,
    RecoveredShare,
    SequenceDetail,
)
from ato.artifacts.causal import CONDITIONS, PATCHED, SCOPES
from ato.errors import AtoError
from ato.math.bootstrap import paired_bootstrap, paired_bootstrap_recovered, weighted_mean
from ato.models import capture_residuals, chunked_nll, final_hidden, patch_residual
from ato.store import ActivationStore

SPLIT = "test"  # the only split the causal check reads: never used for fitting or tuning
ValueFn = Callable[[torch.Tensor], torch.Tensor]  # x_L rows [m, d] → patch values [m, d]
PositionSpec = list[int] | str  # a list of positions, or "all"

__all__ = [
    "CONDITIONS",
    "PATCHED",
    "SCOPES",
    "SPLIT",
    "CausalError",
    "HeldOut",
    "PairPatch",
    "SetResult",
    "check_position_sets",
    "condition_values",
    "load_sequences",
    "patched_token_nll",
    "position_mask",
    "run_pair",
    "summarise_set",
    "token_nll",
]


class CausalError(AtoError):
    """Bad causal-stage input (positions, sequences, operator, statistics); names what is at fault."""


# --------------------------------------------------------------------------------------------
# Held-out sequences


@dataclass
class HeldOut:
    """`n` test sequences of exactly `seq_len` tokens, each BOS-led (position 0)."""

    tokens: torch.Tensor  # int64 [n, T]
    special: torch.Tensor  # bool [n, T]
    offsets: list[int]  # row of each sequence's first token in the split (concatenated parts)
    doc_ids: list[int]


TOKEN_COLUMNS = ("token_id", "position", "special", "doc_id")


def load_sequences(store: ActivationStore, n_sequences: int, seq_len: int, split: str = SPLIT) -> HeldOut:
    """The first `n_sequences` sequences of `split` with at least `seq_len` tokens, cut to `seq_len`.

    Only the per-token arrays are read (no residuals), part by part, stopping as soon as enough
    sequences are complete. Sequences may cross part boundaries. Too few → `CausalError` naming the
    store, split and counts, before any model runs.
    """
    cols: dict[str, list[np.ndarray]] = {k: [] for k in TOKEN_COLUMNS}
    chosen: list[int] = []
    n_seen_seqs = n_read = 0
    parts = store.parts(split)
    for index in range(len(parts)):
        group = store.open_part(split, index)
        try:
            for k in TOKEN_COLUMNS:
                cols[k].append(np.asarray(group[k][:]))
        except Exception as exc:  # a corrupt chunk fails its crc32c check here
            raise CausalError(f"{parts[index]}: reading the token arrays failed: {exc}") from exc
        n_read += len(cols["token_id"][-1])
        starts = np.flatnonzero(np.concatenate(cols["position"]) == 0)
        chosen, n_seen_seqs = _qualifying(starts, n_read, seq_len, n_sequences)
        if len(chosen) >= n_sequences:
            break
    if len(chosen) < n_sequences:
        raise CausalError(
            f"{store.root}: the {split!r} split has only {len(chosen)} sequence(s) with at least "
            f"causal.seq_len={seq_len} tokens (of {n_seen_seqs} sequences, {n_read} tokens), but "
            f"causal.n_sequences={n_sequences} are needed; lower causal.seq_len / causal.n_sequences "
            "or collect longer/more test text (corpus.max_length, corpus.tokens.test)"
        )
    return _cut(store, split, {k: np.concatenate(v) for k, v in cols.items()}, chosen[:n_sequences], seq_len)


def _cut(store: ActivationStore, split: str, data: dict[str, np.ndarray], chosen: list[int], seq_len: int) -> HeldOut:
    rows = np.asarray(chosen)[:, None] + np.arange(seq_len)[None, :]
    positions = data["position"][rows]
    if not np.array_equal(positions, np.broadcast_to(np.arange(seq_len), positions.shape)):
        bad = int(np.flatnonzero((positions != np.arange(seq_len)).any(1))[0])
        raise CausalError(
            f"{store.root}/{split}: sequence starting at row {chosen[bad]} has non-contiguous positions "
            f"{positions[bad][:8].tolist()}…; the store is inconsistent (re-run `ato collect`)"
        )
    return HeldOut(
        tokens=torch.as_tensor(data["token_id"][rows].astype(np.int64)),
        special=torch.as_tensor(data["special"][rows].astype(bool)),
        offsets=[int(s) for s in chosen],
        doc_ids=[int(d) for d in data["doc_id"][rows[:, 0]]],
    )


def _qualifying(starts: np.ndarray, n_read: int, seq_len: int, wanted: int) -> tuple[list[int], int]:
    """Starts whose first `seq_len` tokens are read and belong to that one sequence."""
    chosen: list[int] = []
    nxt = np.append(starts[1:], np.iinfo(np.int64).max)
    for s, e in zip(starts.tolist(), nxt.tolist()):
        if s + seq_len <= min(e, n_read):
            chosen.append(s)
            if len(chosen) >= wanted:
                break
    return chosen, len(starts)


# --------------------------------------------------------------------------------------------
# Position sets


def position_mask(spec: PositionSpec, seq_len: int, name: str = "") -> torch.Tensor:
    """bool [seq_len]: positions a set patches. "all" = every position but 0 (BOS)."""
    mask = torch.zeros(seq_len, dtype=torch.bool)
    if spec == "all":
        mask[1:] = True
        return mask
    if isinstance(spec, str) or not spec:
        raise CausalError(f"causal.position_sets.{name}: expected `all` or a non-empty list of positions")
    bad = [p for p in spec if not 1 <= int(p) < seq_len]
    if bad:
        raise CausalError(
            f"causal.position_sets.{name}: position(s) {bad} outside 1..{seq_len - 1} "
            f"(causal.seq_len={seq_len}; 0 is BOS and is never patched)"
        )
    mask[torch.as_tensor([int(p) for p in spec])] = True
    return mask


def check_position_sets(position_sets: dict[str, Any], seq_len: int) -> dict[str, torch.Tensor]:
    if not position_sets:
        raise CausalError("causal.position_sets: empty; give at least one set (e.g. `all: all`)")
    return {name: position_mask(spec, seq_len, name) for name, spec in position_sets.items()}


# --------------------------------------------------------------------------------------------
# Forward passes


def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    chunk_rows: int,
    hidden: torch.Tensor | None = None,
    from_col: int = 0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL [B, T-1]: column j is −log p(token j+1 | tokens ≤ j).

    Columns < `from_col` are copied from `base` (the clean NLL) and skip the LM head: a patch at
    positions ≥ from_col cannot change them in a causal model.
    """
    if hidden is None:
        hidden = final_hidden(model, input_ids)
    B, T = input_ids.shape
    nll = torch.empty(B, T - 1, dtype=torch.float32, device=input_ids.device)
    if from_col > 0:
        if base is None:
            raise ValueError("from_col > 0 needs the clean NLL as `base`")
        nll[:, :from_col] = base[:, :from_col]
    if from_col < T - 1:
        h = hidden[:, from_col : T - 1].reshape(-1, hidden.shape[-1])
        y = input_ids[:, from_col + 1 :].reshape(-1)
        nll[:, from_col:] = chunked_nll(model, h, y, chunk_rows).view(B, T - 1 - from_col)
    return nll


def patched_token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    layer_in: int,
    layer_out: int,
    patch: torch.Tensor,
    value_fn: ValueFn,
    chunk_rows: int,
    clean_nll: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL [B, T-1] of one forward where residual `layer_out` at `patch` [B, T] (bool) is replaced
    by `value_fn(x_layer_in[patch])`, x captured from the same forward."""
    rows = patch.nonzero(as_tuple=True)
    if layer_out <= layer_in:
        raise ValueError(f"layer_out {layer_out} must come after layer_in {layer_in}")

    with capture_residuals(model, [layer_in], stop_early=False) as captured:

        def replace(hidden: torch.Tensor) -> torch.Tensor:
            values = value_fn(captured[layer_in][rows])
            return hidden.index_put(rows, values.to(hidden.dtype))

        with patch_residual(model, layer_out, replace):
            hidden = final_hidden(model, input_ids)
    from_col = int(patch.any(0).nonzero()[0]) if patch.any() else input_ids.shape[1] - 1
    if clean_nll is None:
        from_col = 0
    return token_nll(model, input_ids, chunk_rows, hidden=hidden, from_col=from_col, base=clean_nll)


def condition_values(W: torch.Tensor, b: torch.Tensor, mean_y: torch.Tensor) -> dict[str, ValueFn]:
    """The patch value of every patched condition, as a function of x_L at the patched rows."""
    return {
        "ato": lambda x: nn.functional.linear(x, W, b),
        "identity": lambda x: x,
        "zero": lambda x: torch.zeros_like(x),
        "bias_only": lambda x: b.expand(x.shape[0], -1),
        "train_mean": lambda x: mean_y.expand(x.shape[0], -1),
    }


# --------------------------------------------------------------------------------------------
# One pair: every batch × position set × condition


@dataclass
class PairPatch:
    """What one pair patches with: layers and the operator/mean the conditions need."""

    name: str  # pair name
    layer_in: int  # L
    layer_out: int  # L + k
    W: torch.Tensor  # [d, d] float32
    b: torch.Tensor  # [d]
    mean_y: torch.Tensor  # [d] train mean of y


@dataclass
class SetResult:
    """Per-sequence NLL sums of one position set: nll_sum[condition][scope] and token counts."""

    name: str
    spec: PositionSpec
    mask: torch.Tensor  # [T] positions of the set
    nll_sum: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {c: {s: [] for s in SCOPES} for c in CONDITIONS}
    )
    count: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SCOPES})
    n_patched: list[int] = field(default_factory=list)
    first_patched: list[int] = field(default_factory=list)


def run_pair(
    model: nn.Module,
    held: HeldOut,
    pair: PairPatch,
    masks: dict[str, torch.Tensor],
    specs: dict[str, PositionSpec],
    batch_size: int,
    chunk_rows: int,
    clean_cache: dict[int, torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, SetResult]:
    """Every batch × position set × condition forward for one pair; per-sequence NLL sums.

    `clean_cache` (batch start → clean NLL) lets several pairs share the clean passes.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    values = condition_values(pair.W.to(device), pair.b.to(device), pair.mean_y.to(device))
    results = {n: SetResult(n, specs[n], m) for n, m in masks.items()}
    starts = list(range(0, held.tokens.shape[0], batch_size))
    clean_cache = {} if clean_cache is None else clean_cache
    bar = tqdm(
        total=len(starts) * (1 + len(masks) * len(PATCHED)),
        desc=f"causal {pair.name}",
        unit="fwd",
        disable=not progress,
    )
    with torch.inference_mode():
        for start in starts:
            ids = held.tokens[start : start + batch_size].to(device)
            special = held.special[start : start + batch_size].to(device)
            if start not in clean_cache:
                clean_cache[start] = token_nll(model, ids, chunk_rows)
            bar.update(1)
            for result in results.values():
                _run_set(model, ids, special, clean_cache[start], pair, values, result, chunk_rows, bar.update)
    bar.close()
    return results


def _run_set(
    model: nn.Module,
    ids: torch.Tensor,
    special: torch.Tensor,
    clean: torch.Tensor,
    pair: PairPatch,
    values: dict[str, ValueFn],
    res: SetResult,
    chunk_rows: int,
    tick: Callable[[int], Any],
) -> None:
    """One batch of one position set: every patched condition's forward, sums appended to `res`."""
    B, T = ids.shape
    patch = res.mask.to(ids.device)[None, :] & ~special
    patch[:, 0] = False  # BOS is never patched, whatever the set says
    has = patch.any(1)
    first = torch.where(has, patch.int().argmax(1), torch.full_like(has, T, dtype=torch.long))
    after = torch.arange(T - 1, device=ids.device)[None, :] >= first[:, None]  # predictions a patch can change
    res.n_patched += patch.sum(1).tolist()
    res.first_patched += [int(f) for f, h in zip(first.tolist(), has.tolist()) if h]
    res.count["all"] += [T - 1] * B
    res.count["after"] += after.sum(1).tolist()
    per_cond = {"clean": clean}
    for cond in PATCHED:
        per_cond[cond] = patched_token_nll(
            model, ids, pair.layer_in, pair.layer_out, patch, values[cond], chunk_rows, clean_nll=clean
        )
        tick(1)
    for cond, nll in per_cond.items():
        nll64 = nll.double()
        res.nll_sum[cond]["all"] += nll64.sum(1).tolist()
        res.nll_sum[cond]["after"] += (nll64 * after).sum(1).tolist()


# --------------------------------------------------------------------------------------------
# From per-sequence sums to the summary


def summarise_set(res: SetResult, n_resamples: int, seed: int) -> tuple[PositionSetSummary, SequenceDetail]:
    """Token-weighted log-perplexities, Δ vs clean with paired-bootstrap CIs and the recovered
    share of one position set; and its per-sequence detail."""
    counts = {s: np.asarray(res.count[s], dtype=np.float64) for s in SCOPES}
    means = {c: {s: _safe_div(np.asarray(res.nll_sum[c][s]), counts[s]) for s in SCOPES} for c in CONDITIONS}
    deltas = {c: {s: means[c][s] - means["clean"][s] for s in SCOPES} for c in PATCHED}
    patched = {}
    for c in PATCHED:
        row: dict[str, float] = {f"logppl_{s}": weighted_mean(means[c][s], counts[s]) for s in SCOPES}
        for s in SCOPES:
            m, lo, hi = paired_bootstrap(deltas[c][s], n_resamples, seed, weights=counts[s])
            row |= {f"delta_{s}_mean": m, f"delta_{s}_lo": lo, f"delta_{s}_hi": hi}
        patched[c] = PatchedScores(**row)
    recovered: dict[str, float] = {}
    for s in SCOPES:
        m, lo, hi = paired_bootstrap_recovered(
            deltas["ato"][s], deltas["zero"][s], n_resamples, seed, weights=counts[s]
        )
        recovered |= {f"{s}_mean": m, f"{s}_lo": lo, f"{s}_hi": hi}
    summary = PositionSetSummary(
        n_patched_tokens=int(sum(res.n_patched)),
        first_patched_position=int(min(res.first_patched)) if res.first_patched else -1,
        n_tokens_all=int(counts["all"].sum()),
        n_tokens_after=int(counts["after"].sum()),
        clean=CleanScores(**{f"logppl_{s}": weighted_mean(means["clean"][s], counts[s]) for s in SCOPES}),
        **patched,
        recovered=RecoveredShare(**recovered),
    )
    detail = SequenceDetail(
        positions=res.spec,
        n_patched=res.n_patched,
        first_patched_position=res.first_patched,
        n_tokens={s: [int(v) for v in res.count[s]] for s in SCOPES},
        mean_nll={c: {s: [float(v) for v in means[c][s]] for s in SCOPES} for c in CONDITIONS},
    )
    return summary, detail


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def flat_numbers(summary: PositionSetSummary, prefix: str) -> dict[str, float]:
    """Every number of a position-set summary as `<prefix><field>[_<subfield>]` (MLflow names)."""
    return _flatten(dataclasses.asdict(summary), prefix)


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out
