"""Stage `causal` (DESIGN §3 "Causal check"): does the transport operator carry what the model needs?

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
final hidden states, computed in `loss_chunk_tokens`-row chunks through the LM head (+ the model's
final logit softcapping) so the 262k-vocab logits never exist all at once. Two token scopes:
`all` (every predicted token of the sequence) and `after` (predictions made at or after the first
patched position — the only ones a patch can change in a causal model; earlier rows are taken from
the clean pass, which is exact, and skip the LM head).

Per condition vs clean: token-weighted Δ log-perplexity with a paired bootstrap 95 % CI over
sequences, and the recovered share of the zero-ablation damage, 1 − Δ(ato)/Δ(zero), with its CI
from the same resamples.

Outputs: `<reports>/causal/<pair>.json` (numbers only: headline flat keys + per position set and
condition), `<reports>/causal/<pair>_sequences.json` (per-sequence values and which sequences),
`<reports>/figures/<pair>_causal.png`, MLflow metrics `causal_*` on the pair's run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import AtoError
from ..math.bootstrap import paired_bootstrap, paired_bootstrap_recovered, weighted_mean
from ..params import Pair, Params
from ..store import ActivationStore, write_json_atomic

SPLIT = "test"  # the only split this stage reads: never used for fitting or tuning
CONDITIONS = ("clean", "ato", "identity", "zero", "bias_only", "train_mean")
PATCHED = CONDITIONS[1:]
SCOPES = ("all", "after")

ValueFn = Callable[[torch.Tensor], torch.Tensor]  # x_L rows [m, d] → patch values [m, d]


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


def load_sequences(store: ActivationStore, n_sequences: int, seq_len: int, split: str = SPLIT) -> HeldOut:
    """The first `n_sequences` sequences of `split` with at least `seq_len` tokens, cut to `seq_len`.

    Only the per-token arrays are read (no residuals), part by part, stopping as soon as enough
    sequences are complete. Sequences may cross part boundaries. Too few → `CausalError` naming the
    store, split and counts, before any model runs.
    """
    names = ("token_id", "position", "special", "doc_id")
    cols: dict[str, list[np.ndarray]] = {k: [] for k in names}
    chosen: list[int] = []
    n_seen_seqs = 0
    n_read = 0
    parts = store.parts(split)
    for index in range(len(parts)):
        group = store.open_part(split, index)
        try:
            for k in names:
                cols[k].append(np.asarray(group[k][:]))
        except Exception as exc:  # a corrupt chunk fails its crc32c check here
            raise CausalError(f"{parts[index]}: reading the token arrays failed: {exc}") from exc
        n_read += len(cols["token_id"][-1])
        position = np.concatenate(cols["position"])
        starts = np.flatnonzero(position == 0)
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
    data = {k: np.concatenate(v) for k, v in cols.items()}
    rows = np.asarray(chosen[:n_sequences])[:, None] + np.arange(seq_len)[None, :]
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
        offsets=[int(s) for s in chosen[:n_sequences]],
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


def position_mask(spec: list[int] | str, seq_len: int, name: str = "") -> torch.Tensor:
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


def check_position_sets(position_sets: dict[str, list[int] | str], seq_len: int) -> dict[str, torch.Tensor]:
    if not position_sets:
        raise CausalError("causal.position_sets: empty; give at least one set (e.g. `all: all`)")
    return {name: position_mask(spec, seq_len, name) for name, spec in position_sets.items()}


# --------------------------------------------------------------------------------------------
# Forward passes and chunked loss


def lm_head_and_softcap(model: nn.Module) -> tuple[nn.Module, float | None]:
    head = model.get_output_embeddings()
    if head is None:
        raise CausalError(f"{type(model).__name__}: no LM head (get_output_embeddings() is None)")
    cap = getattr(model.config, "final_logit_softcapping", None)
    return head, (float(cap) if cap else None)


def chunked_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Per-row next-token NLL: hidden [m, d] final hidden states, targets [m] → float32 [m].

    Logits exist for at most `chunk_rows` rows at a time (the LM head dominates memory); computed
    in float32 like transformers' own loss (`ForCausalLMLoss` upcasts logits).
    """
    head, cap = lm_head_and_softcap(model)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        stop = min(start + chunk_rows, hidden.shape[0])
        logits = head(hidden[start:stop]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        out[start:stop] = nn.functional.cross_entropy(logits, targets[start:stop], reduction="none")
        del logits
    return out


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, d] of the body (final norm included), no LM head."""
    from ..models import base_model

    body = base_model(model)
    mask = torch.ones_like(input_ids)
    out = body(input_ids=input_ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_nll(model: nn.Module, input_ids: torch.Tensor, chunk_rows: int, hidden: torch.Tensor | None = None,
              from_col: int = 0, base: torch.Tensor | None = None) -> torch.Tensor:
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


def patched_token_nll(model: nn.Module, input_ids: torch.Tensor, layer_in: int, layer_out: int,
                      patch: torch.Tensor, value_fn: ValueFn, chunk_rows: int,
                      clean_nll: torch.Tensor | None = None) -> torch.Tensor:
    """NLL [B, T-1] of one forward where residual `layer_out` at `patch` [B, T] (bool) is replaced
    by `value_fn(x_layer_in[patch])`, x captured from the same forward."""
    from ..models import capture_residuals, patch_residual

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
# Aggregation


@dataclass
class SetResult:
    """Per-sequence NLL sums for one position set: {condition: {scope: float64 [n]}} + counts."""

    name: str
    spec: list[int] | str
    mask: torch.Tensor  # [T] positions of the set
    nll_sum: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    count: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SCOPES})
    n_patched: list[int] = field(default_factory=list)
    first_patched: list[int] = field(default_factory=list)


def summarise(results: dict[str, SetResult], n_resamples: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(nested numbers-only summary per set, per-sequence detail) from the per-sequence sums."""
    summary: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    for name, res in results.items():
        counts = {s: np.asarray(res.count[s], dtype=np.float64) for s in SCOPES}
        means = {
            c: {s: _safe_div(np.asarray(res.nll_sum[c][s]), counts[s]) for s in SCOPES} for c in CONDITIONS
        }
        entry: dict[str, Any] = {
            "n_patched_tokens": int(sum(res.n_patched)),
            "first_patched_position": int(min(res.first_patched)) if res.first_patched else -1,
            "n_tokens_all": int(counts["all"].sum()),
            "n_tokens_after": int(counts["after"].sum()),
        }
        deltas = {c: {s: means[c][s] - means["clean"][s] for s in SCOPES} for c in PATCHED}
        for c in CONDITIONS:
            row: dict[str, float] = {}
            for s in SCOPES:
                row[f"logppl_{s}"] = weighted_mean(means[c][s], counts[s])
                if c != "clean":
                    m, lo, hi = paired_bootstrap(deltas[c][s], n_resamples, seed, weights=counts[s])
                    row.update({f"delta_{s}_mean": m, f"delta_{s}_lo": lo, f"delta_{s}_hi": hi})
            entry[c] = row
        rec: dict[str, float] = {}
        for s in SCOPES:
            m, lo, hi = paired_bootstrap_recovered(deltas["ato"][s], deltas["zero"][s], n_resamples, seed,
                                                   weights=counts[s])
            rec.update({f"{s}_mean": m, f"{s}_lo": lo, f"{s}_hi": hi})
        entry["recovered"] = rec
        summary[name] = entry
        detail[name] = {
            "positions": res.spec,
            "n_patched": res.n_patched,
            "first_patched_position": res.first_patched,
            "n_tokens": {s: [int(v) for v in res.count[s]] for s in SCOPES},
            "mean_nll": {c: {s: [_finite(v) for v in means[c][s]] for s in SCOPES} for c in CONDITIONS},
        }
    return summary, detail


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """Flat top-level keys for the position set `all` (else the first set): `ato_delta_all`, …"""
    name = "all" if "all" in summary else next(iter(summary))
    entry = summary[name]
    flat: dict[str, float] = {}
    for s in SCOPES:
        flat[f"clean_logppl_{s}"] = entry["clean"][f"logppl_{s}"]
        for c in PATCHED:
            flat[f"{c}_logppl_{s}"] = entry[c][f"logppl_{s}"]
            flat[f"{c}_delta_{s}"] = entry[c][f"delta_{s}_mean"]
            flat[f"{c}_delta_{s}_lo"] = entry[c][f"delta_{s}_lo"]
            flat[f"{c}_delta_{s}_hi"] = entry[c][f"delta_{s}_hi"]
        flat[f"recovered_{s}"] = entry["recovered"][f"{s}_mean"]
        flat[f"recovered_{s}_lo"] = entry["recovered"][f"{s}_lo"]
        flat[f"recovered_{s}_hi"] = entry["recovered"][f"{s}_hi"]
    return flat


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _json_clean(obj: Any) -> Any:
    """NaN/inf → null, so the JSON stays valid (a zero-ablation Δ of 0 makes `recovered` undefined)."""
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, float):
        return _finite(obj)
    return obj


# --------------------------------------------------------------------------------------------
# The experiment


@dataclass
class PairInputs:
    pair: Pair
    W: torch.Tensor
    b: torch.Tensor
    mean_y: torch.Tensor


def run_pair(model: nn.Module, held: HeldOut, inputs: PairInputs, masks: dict[str, torch.Tensor],
             specs: dict[str, list[int] | str], batch_size: int, chunk_rows: int,
             clean_cache: dict[int, torch.Tensor] | None = None, progress: bool = True) -> dict[str, SetResult]:
    """Every batch × position set × condition forward for one pair; per-sequence NLL sums.

    `clean_cache` (batch start → clean NLL) lets several pairs share the clean passes.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pair = inputs.pair
    values = condition_values(inputs.W.to(device), inputs.b.to(device), inputs.mean_y.to(device))
    results = {n: SetResult(n, specs[n], m, {c: {s: [] for s in SCOPES} for c in CONDITIONS})
               for n, m in masks.items()}
    n = held.tokens.shape[0]
    starts = list(range(0, n, batch_size))
    clean_cache = {} if clean_cache is None else clean_cache
    total = len(starts) * (1 + len(masks) * len(PATCHED))
    bar = tqdm(total=total, desc=f"causal {pair.name}", unit="fwd", disable=not progress)
    with torch.inference_mode():
        for start in starts:
            ids = held.tokens[start : start + batch_size].to(device)
            special = held.special[start : start + batch_size].to(device)
            if start not in clean_cache:
                clean_cache[start] = token_nll(model, ids, chunk_rows)
            clean = clean_cache[start]
            bar.update(1)
            B, T = ids.shape
            cols = torch.arange(T - 1, device=device)
            for name, mask in masks.items():
                patch = mask.to(device)[None, :] & ~special
                patch[:, 0] = False  # BOS is never patched, whatever the set says
                has = patch.any(1)
                first = torch.where(has, patch.int().argmax(1), torch.full_like(has, T, dtype=torch.long))
                after = cols[None, :] >= first[:, None]  # predictions a patch can change
                res = results[name]
                res.n_patched += patch.sum(1).tolist()
                res.first_patched += [int(f) for f, h in zip(first.tolist(), has.tolist()) if h]
                res.count["all"] += [T - 1] * B
                res.count["after"] += after.sum(1).tolist()
                per_cond = {"clean": clean}
                for cond in PATCHED:
                    per_cond[cond] = patched_token_nll(model, ids, pair.L, pair.target, patch, values[cond],
                                                       chunk_rows, clean_nll=clean)
                    bar.update(1)
                for cond, nll in per_cond.items():
                    nll64 = nll.double()
                    res.nll_sum[cond]["all"] += nll64.sum(1).tolist()
                    res.nll_sum[cond]["after"] += (nll64 * after).sum(1).tolist()
    bar.close()
    return results


def _load_mean_y(params: Params, pair: str, d_model: int) -> torch.Tensor:
    """ȳ over the train split (BOS excluded by default) from the `stats` stage's file."""
    try:
        from .stats import load_pair_stats
    except ImportError:  # the stats stage module is not there: read its documented file format
        load_pair_stats = _read_pair_stats
    try:
        stats = load_pair_stats(params, "train", pair)
    except AtoError:
        raise
    except (FileNotFoundError, OSError, KeyError, ValueError) as exc:
        raise CausalError(
            f"{params.path('stats') / 'train' / (pair + '.safetensors')}: cannot read the train statistics "
            f"of {pair} ({exc}); run `ato stats`"
        ) from exc
    mean_y = torch.as_tensor(np.asarray(stats.mean_y, dtype=np.float32))
    if mean_y.shape != (d_model,) or not torch.isfinite(mean_y).all():
        raise CausalError(f"train statistics of {pair}: mean_y has shape {tuple(mean_y.shape)} or non-finite "
                          f"values; expected finite [{d_model}]")
    return mean_y


def _read_pair_stats(params: Params, split: str, pair: str):
    from safetensors.torch import load_file

    from ..math.stats import PairStats

    path = params.path("stats") / split / f"{pair}.safetensors"
    if not path.exists():
        raise CausalError(f"{path}: missing train statistics for {pair}; run `ato stats`")
    return PairStats.from_tensors(load_file(str(path)))


def prepare_inputs(params: Params, names: list[str], info: dict[str, Any]) -> dict[str, PairInputs]:
    """Load and check every pair's operator and train mean before any forward pass."""
    from ..operators import load_operator

    out: dict[str, PairInputs] = {}
    n_layers, d = int(info["n_layers"]), int(info["d_model"])
    for name in names:
        pair = params.pairs[name]
        if pair.target > n_layers - 1:
            raise CausalError(f"pairs.{name}: layer {pair.target} beyond the model's last layer {n_layers - 1}")
        op = load_operator(params.path("operators") / name, expect={
            "model_digest": info["weights_digest"], "d_model": d, "layer_in": pair.L, "layer_out": pair.target})
        out[name] = PairInputs(pair, op.W.float(), op.b.float(), _load_mean_y(params, name, d))
    return out


def main(params: Params, pair: str | None = None) -> dict[str, dict[str, float]]:
    """Run the causal check for `pair` (None: every pair); returns the headline values per pair."""
    from ..models import load_prepared, resolve_device

    cp = params.causal
    names = list(params.pairs) if pair is None else [pair]
    unknown = [n for n in names if n not in params.pairs]
    if unknown:
        raise CausalError(f"pair {unknown[0]} is not in params.pairs ({', '.join(params.pairs)})")
    if cp.n_sequences < 1 or cp.seq_len < 2 or cp.batch_size < 1 or cp.loss_chunk_tokens < 1:
        raise CausalError("causal.n_sequences/batch_size/loss_chunk_tokens must be ≥ 1 and causal.seq_len ≥ 2")
    # Everything that can be wrong is checked before the first forward pass.
    masks = check_position_sets(cp.position_sets, cp.seq_len)
    store = ActivationStore.open(params.path("store"))
    held = load_sequences(store, cp.n_sequences, cp.seq_len)
    device = resolve_device(cp.device)
    model, _tok, info = load_prepared(params.path("model_dir"), device=str(device))
    store_model = store.manifest.get("model", {}).get("weights_digest")
    if store_model is not None and store_model != info["weights_digest"]:
        raise CausalError(
            f"{store.root}: the store was collected with model weights {str(store_model)[:12]}…, but "
            f"{params.path('model_dir')} has {info['weights_digest'][:12]}…; its token ids may not fit this model"
        )
    vocab = int(model.config.vocab_size)
    if int(held.tokens.max()) >= vocab:
        raise CausalError(f"{store.root}/{SPLIT}: token id {int(held.tokens.max())} ≥ the model's vocab {vocab}")
    inputs = prepare_inputs(params, names, info)

    clean_cache: dict[int, torch.Tensor] = {}
    headlines: dict[str, dict[str, float]] = {}
    for name in names:
        t0 = time.perf_counter()
        results = run_pair(model, held, inputs[name], masks, dict(cp.position_sets), cp.batch_size,
                           cp.loss_chunk_tokens, clean_cache)
        seconds = time.perf_counter() - t0
        headlines[name] = write_outputs(params, name, held, results, seconds)
    return headlines


def write_outputs(params: Params, name: str, held: HeldOut, results: dict[str, SetResult],
                  seconds: float) -> dict[str, float]:
    import mlflow

    from ..tracking import log_flat_metrics, pair_run

    cp = params.causal
    pair = params.pairs[name]
    summary, detail = summarise(results, cp.bootstrap_resamples, cp.seed)
    flat = headline(summary)
    # forward tokens per second: every patched pass plus the clean one (shared between pairs)
    n_forward_tokens = cp.n_sequences * cp.seq_len * (1 + len(results) * len(PATCHED))
    report = {
        **flat,
        "L": pair.L, "k": pair.k, "n_sequences": cp.n_sequences, "seq_len": cp.seq_len,
        "seconds": seconds, "tokens_per_second": n_forward_tokens / max(seconds, 1e-9),
        "position_sets": summary,
    }
    out_dir = params.path("reports") / "causal"
    json_path = out_dir / f"{name}.json"
    seq_path = out_dir / f"{name}_sequences.json"
    write_json_atomic(json_path, _json_clean(report))
    write_json_atomic(seq_path, _json_clean({
        "pair": name, "split": SPLIT, "seq_len": cp.seq_len, "sequence_offsets": held.offsets,
        "doc_ids": held.doc_ids, "conditions": list(CONDITIONS), "scopes": {
            "all": "every predicted token (positions 1..T-1 predicted from 0..T-2)",
            "after": "predictions made at or after the sequence's first patched position"},
        "position_sets": detail}))
    fig_path = params.path("reports") / "figures" / f"{name}_causal.png"
    plot(summary, name, fig_path, dpi=params.report.dpi)
    metrics = {**{f"causal_{k}": v for k, v in flat.items()},
               **{f"causal_{k}": v for k, v in flatten(summary).items()},
               "causal_seconds": seconds}
    with pair_run(params, name, "causal"):
        log_flat_metrics(metrics)
        for path in (json_path, seq_path, fig_path):
            mlflow.log_artifact(str(path), artifact_path="causal")
    print(f"causal {name}: Δlog-ppl(all) ato {flat['ato_delta_all']:+.4f} "
          f"[{flat['ato_delta_all_lo']:+.4f}, {flat['ato_delta_all_hi']:+.4f}], zero {flat['zero_delta_all']:+.4f}, "
          f"recovered {flat['recovered_all']:.3f} → {json_path}", flush=True)
    return flat


# --------------------------------------------------------------------------------------------
# Figure


LABELS = {"ato": "ATO  Wx+b", "identity": "identity  x", "zero": "zero", "bias_only": "bias only  b",
          "train_mean": "train mean  ȳ"}
COLOURS = {"ato": "#1f77b4", "identity": "#2ca02c", "zero": "#d62728", "bias_only": "#9467bd",
           "train_mean": "#ff7f0e"}


def plot(summary: dict[str, Any], pair: str, path: Path, dpi: int = 120, scope: str = "after") -> Path:
    """One panel per position set: Δ log-perplexity vs clean per condition with its 95 % CI.

    A symmetric-log axis keeps the small ATO Δ and the large zero-ablation Δ readable together.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names) + 0.6, 4.4), sharey=True, squeeze=False)
    x = np.arange(len(PATCHED))
    for ax, name in zip(axes[0], names):
        entry = summary[name]
        mean = np.array([entry[c][f"delta_{scope}_mean"] for c in PATCHED])
        lo = np.array([entry[c][f"delta_{scope}_lo"] for c in PATCHED])
        hi = np.array([entry[c][f"delta_{scope}_hi"] for c in PATCHED])
        err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
        ax.bar(x, mean, color=[COLOURS[c] for c in PATCHED], yerr=err, capsize=4, edgecolor="black", linewidth=0.5)
        for xi, m in zip(x, mean):
            ax.annotate(f"{m:+.3g}", (xi, m), textcoords="offset points", xytext=(0, 3 if m >= 0 else -11),
                        ha="center", fontsize=8)
        rec = entry["recovered"]
        rec_txt = "n/a" if not math.isfinite(rec[f"{scope}_mean"]) else (
            f"{rec[f'{scope}_mean']:.1%} [{rec[f'{scope}_lo']:.1%}, {rec[f'{scope}_hi']:.1%}]")
        ax.set_title(f"positions: {name} ({entry['n_patched_tokens']} patched)\nrecovered {rec_txt}", fontsize=9)
        ax.set_xticks(x, [LABELS[c] for c in PATCHED], rotation=35, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"Δ log-perplexity vs clean (nats/token)\n{'tokens after first patch' if scope == 'after' else 'all tokens'}, 95% CI")
    fig.suptitle(f"{pair}: residual patching after block L+k (clean log-ppl "
                 f"{summary[names[0]]['clean'][f'logppl_{scope}']:.3f})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
