"""Benchmark of the causal check on the real prepared model (models/base), before and after issue 11's
sharing of work, in the same run.

1. Cost per sequence and per condition, on the same first `--before-sequences` held-out sequences:
   - before: the old per-pair design, every condition of one pair (clean, ato, identity, zero,
     bias_only, train_mean) as full forwards in one run (`ato.causal.run_pair(share_prefix=False)`);
   - after: clean, zero and train_mean once per target layer (`causal_reference`), and the pair's ato,
     identity and bias_only replaying only the blocks after L+k from one traced clean forward
     (`causal`). The per-sequence NLL sums of both designs are checked to be identical.
   - issue 23: the pair's traced clean forward with every batch traced in full and its replay checked
     (before) vs the prefix ≤ T only after the first batch (`ato.causal.trace_prefix`), same sums checked
     (use --before-sequences > --batch-size: the first batch is always traced in full).
2. Issue 14: the public splice (`ato.splice`, the one implementation the stages now use) against the
   internal hook it replaced (capture + patch hooks, as `ato.causal.patched_token_nll` had them), on the
   same batch and operator: wall time of the patched body forward, interleaved repeats, medians, with
   an A/A comparison of the old hook against itself as the noise floor; the NLLs are checked equal.
   `--only-splice` runs just this part.
3. The whole new stages on a throw-away project: `ato causal_reference` for one target layer and
   `ato causal` for its three pairs (L = T−1, T−2, T−3) at `--sequences` sequences, each pair's
   stage timed like its own DVC process (model load included, interpreter start not), and the
   projected total for the default six pairs (two target layers).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/causal.py [--model-dir models/base] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _docs(n: int) -> list[str]:
    from ato.corpus import Corpus
    from ato.params import CorpusParams

    return [d.text for d, _ in zip(Corpus(CorpusParams()), range(n))]


def _machine() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), "
        f"torch threads {torch.get_num_threads()}"
    )


def _store(root: Path, tok, info, test: list[list[int]], layers: list[int]) -> None:
    """Test-split token arrays and a manifest: all the causal stages read from the store."""
    from ato.artifacts import write_json_atomic
    from ato.store import write_part

    seq_len = len(test[0])
    arrays = {
        "token_id": np.concatenate(test).astype(np.int32),
        "doc_id": np.repeat(np.arange(len(test)), seq_len).astype(np.int32),
        "position": np.tile(np.arange(seq_len), len(test)).astype(np.int32),
    }
    arrays["special"] = np.isin(arrays["token_id"], tok.all_special_ids)
    store = root / "data" / "activations"
    write_part(store / "test", 0, arrays, 1024)
    n = len(arrays["token_id"])
    model = {k: getattr(info, k) for k in ("name", "source", "model_type", "weights_digest", "n_layers", "d_model")}
    split = {"tokens": n, "special_tokens": int(arrays["special"].sum()), "sequences": len(test)}
    write_json_atomic(
        store / "manifest.json",
        {
            "format": "ato-activation-store/1",
            "model": model,
            "tokenizer": {
                "bos_token_id": tok.bos_token_id,
                "pad_token_id": tok.pad_token_id,
                "vocab_size": len(tok),
                "special_ids": sorted(tok.all_special_ids),
            },
            "layers": layers,
            "d_model": info.d_model,
            "dtype": "float32",
            "hook": "bench",
            "corpus": {},
            "fingerprint": "bench",
            "content_digest": "bench",
            "splits": {"test": {**split, "documents": len(test), "parts": ["part-00000.zarr"], "part_tokens": [n]}},
        },
    )


def build_project(root: Path, model, tok, info, model_dir: Path, target: int, docs: list[str], args) -> Path:
    """Test-split tokens, train statistics and a ridge operator for the pairs (T−1, 1), (T−2, 2), (T−3, 3)."""
    import yaml

    from ato.artifacts import Layout, PairStatsMeta, write_pair_stats
    from ato.corpus import tokenize_document
    from ato.math.ridge import ridge_fit
    from ato.math.stats import PairStats
    from ato.models import base_model, capture_residuals, run_captured
    from ato.operators import save_operator
    from ato.params import load_params, pair_name

    n = args.sequences
    tokenized = (tokenize_document(tok, t, args.seq_len) for t in docs[: 4 * n])
    test = [ids for ids in tokenized if len(ids) == args.seq_len][:n]
    if len(test) < n:
        raise SystemExit(f"only {len(test)} corpus documents reach {args.seq_len} tokens; need {n}")
    pairs = {pair_name(target - k, k): (target - k, k) for k in (1, 2, 3)}
    layers = sorted({target - k for k in (1, 2, 3)} | {target})
    _store(root, tok, info, test, layers)
    stats = {name: PairStats.zeros(info.d_model, info.d_model) for name in pairs}
    with torch.inference_mode():
        for text in docs[4 * n : 4 * n + 24]:
            with capture_residuals(model, layers) as cap:
                run_captured(base_model(model), input_ids=torch.tensor([tokenize_document(tok, text, 128)]))
            for name, (L, k) in pairs.items():
                stats[name].update(cap[L][0, 1:], cap[L + k][0, 1:])  # BOS excluded, as in the stats stage
    causal = {"n_sequences": n, "seq_len": args.seq_len, "batch_size": args.batch_size, "device": "cpu"}
    raw = {
        "paths": {"model_dir": str(model_dir)},
        "pairs": {name: {"L": L, "k": k} for name, (L, k) in pairs.items()},
        "causal": causal,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    layout = Layout.from_params(load_params(root / "params.yaml"))
    for name, (L, k) in pairs.items():
        meta = PairStatsMeta("bench", False, "train", name, L, L + k)
        write_pair_stats(layout.pair_stats("train", name), stats[name], meta)
        W, b = ridge_fit(stats[name], alpha=1e3)
        config = {"model": info.name, "model_digest": info.weights_digest, "layer_in": L, "layer_out": L + k}
        config |= {"alpha": 1e3, "method": "ridge", "d_model": info.d_model, "n_train_tokens": int(stats[name].n)}
        save_operator(layout.operator(name), W, b, {**config, "store_digest": "bench"})
        _context_maps(layout, name, L, k, W, b, info)
    return root / "params.yaml"


def _context_maps(layout, name: str, L: int, k: int, W, b, info) -> None:
    """The pair's context maps, which `ato causal` patches as condition `context`: the operator on x_t,
    every other input block weighted zero (a timing needs their shape, not a fit; lags as params' default)."""
    import numpy as np

    from ato.artifacts import ContextOperatorConfig, write_context_operator
    from ato.params import ContextParams
    from ato.store import ActivationStore

    d, lags = info.d_model, ContextParams().lags
    blocks = ["x_t", *(f"x_t-{lag}" for lag in range(1, lags + 1)), "prefix", *(f"z_{j}" for j in range(1, k + 1))]
    kinds = {"ato": [0], "context": list(range(len(blocks)))}
    maps = {kind: (np.hstack([W] + [np.zeros((d, d))] * (len(c) - 1)), np.array(b)) for kind, c in kinds.items()}
    config = ContextOperatorConfig(
        pair=name, L=L, k=k, lags=lags, d_model=d, blocks=blocks, kinds=kinds, alphas=dict.fromkeys(kinds, 1e3),
        absent_inputs="fill", routed_inputs="z", n_train_tokens=1, model_digest=info.weights_digest,
        store_digest=ActivationStore.open(layout.store).digest, n_layers=info.n_layers,
    )  # fmt: skip
    write_context_operator(layout.context_operator(name), config, maps, np.zeros(d))


def per_condition(model, info, params, n_before: int) -> dict[str, dict[str, float]]:
    """Seconds per sequence of each condition, before and after, on the first `n_before` sequences."""
    from ato import causal as causal_lib
    from ato.artifacts import Layout, read_pair_stats
    from ato.causal import conditions as conditions_module
    from ato.stages import causal
    from ato.store import ActivationStore

    cp, layout = params.causal, Layout.from_params(params)
    held = causal_lib.load_sequences(ActivationStore.open(layout.store), n_before, cp.seq_len)
    name = next(iter(params.pairs))
    pair = causal.prepare_inputs(params, [name], info)[name]
    mean_y = torch.as_tensor(np.asarray(read_pair_stats(layout.pair_stats("train", name)).mean_y, np.float32))
    masks = causal_lib.check_position_sets(cp.position_sets, cp.seq_len)
    specs = dict(cp.position_sets)
    kw = {"batch_size": cp.batch_size, "chunk_rows": cp.loss_chunk_tokens, "progress": False}
    before: dict[str, float] = {}
    old = causal_lib.run_pair(model, held, pair, mean_y, masks, specs, share_prefix=False, timings=before, **kw)
    ref_t: dict[str, float] = {}
    ref, clean = causal_lib.run_conditions(
        model, held, pair.layer_out, causal_lib.reference_conditions(mean_y), masks, specs, timings=ref_t, **kw
    )

    def pair_run(timings: dict[str, float]) -> dict:
        conditions = causal_lib.pair_conditions(pair)
        run, _ = causal_lib.run_conditions(
            model, held, pair.layer_out, conditions, masks, specs, clean_nll=clean, timings=timings, **kw
        )
        return run

    pair_t: dict[str, float] = {}
    new = pair_run(pair_t)
    full_t: dict[str, float] = {}  # issue 23: the same with every batch traced in full (no `trace_prefix`)
    prefix = conditions_module.trace_prefix
    conditions_module.trace_prefix = lambda *_: None
    try:
        full = pair_run(full_t)
    finally:
        conditions_module.trace_prefix = prefix
    for set_name, res in old.items():
        assert full[set_name].nll_sum == new[set_name].nll_sum, f"{set_name}: prefix traces change the sums"
        for cond in res.nll_sum:
            other = ref[set_name] if cond in ("clean", "zero", "train_mean") else new[set_name]
            assert res.nll_sum[cond] == other.nll_sum[cond], f"{set_name}/{cond}: the designs differ"
    scale = 1.0 / n_before
    return {
        "before": {k: v * scale for k, v in before.items()},
        "after_reference": {k: v * scale for k, v in ref_t.items()},
        "after_pair": {k: v * scale for k, v in pair_t.items()},
        "after_pair_full_traces": {k: v * scale for k, v in full_t.items()},
    }


def print_conditions(t: dict[str, dict[str, float]], n_before: int, pairs_per_target: int) -> dict[str, float]:
    from ato.artifacts.causal import all_conditions

    print(f"\ncost per sequence and condition (seconds; first {n_before} sequences, every position set)")
    print(f"{'condition':12s} {'before':>9s} {'after':>9s}  where (after)")
    for cond in all_conditions():
        where = "after_reference" if cond in ("clean", "zero", "train_mean") else "after_pair"
        note = "once per target layer" if where == "after_reference" else "per pair, prefix shared"
        if cond == "clean":
            note = "traced forward + LM head once; each pair re-traces (below)"
        print(f"{cond:12s} {t['before'].get(cond, 0):9.3f} {t[where].get(cond, 0):9.3f}  {note}")
    print(
        f"{'(pair trace)':12s} {t['after_pair_full_traces']['clean']:9.3f} {t['after_pair']['clean']:9.3f}  "
        "traced clean body: every batch in full + replay check (before) / after the first batch only the "
        "prefix ≤ T (after, `trace_prefix`; needs --before-sequences > --batch-size)"
    )
    before_pair = sum(t["before"].values())
    after_pair = sum(t["after_pair"].values()) + sum(t["after_reference"].values()) / pairs_per_target
    print(
        f"per pair and sequence: before {before_pair:.3f} s, after {after_pair:.3f} s "
        f"(reference shared by {pairs_per_target} pairs) → {before_pair / after_pair:.2f}× less"
    )
    return {
        "before_s_per_pair_seq": before_pair,
        "after_s_per_pair_seq": after_pair,
        "pair_trace_full_s_per_seq": t["after_pair_full_traces"]["clean"],
        "pair_trace_prefix_s_per_seq": t["after_pair"]["clean"],
    }


def _old_internal_hook(model, ids, layer_in, layer_out, patch, value_fn):
    """The causal stage's hook path before issue 14 (HEAD's `patched_token_nll`, minus the LM head)."""
    from ato.models import capture_residuals, final_hidden, patch_residual

    rows = patch.nonzero(as_tuple=True)
    with capture_residuals(model, [layer_in], stop_early=False) as captured:

        def replace(hidden):
            return hidden.index_put(rows, value_fn(captured[layer_in][rows]).to(hidden.dtype))

        with patch_residual(model, layer_out, replace):
            return final_hidden(model, ids)


def _splice_operator(args, info):
    from ato.operators import Operator, load_operator

    path = Path(args.operator)
    if (path / "config.json").exists():
        op = load_operator(path, expect={"model_digest": info.weights_digest})
        return op, f"{path} (layers {op.layer_in}→{op.layer_out})"
    g = torch.Generator().manual_seed(0)
    d = info.d_model
    config = {"layer_in": 5, "layer_out": 6, "d_model": d, "model_digest": info.weights_digest, "model": info.name}
    W = torch.eye(d) + torch.randn(d, d, generator=g) / d
    return Operator(W, torch.zeros(d), config), "a random operator at layers 5→6 (no fitted operator found)"


def splice_overhead(model, tok, info, docs: list[str], args) -> dict[str, float]:
    """Median seconds of the patched body forward: old internal hook vs public `ato.splice` (interleaved)."""
    import ato
    from ato import causal as causal_lib
    from ato.corpus import tokenize_document
    from ato.models import final_hidden

    op, where = _splice_operator(args, info)
    rows = [ids for ids in (tokenize_document(tok, t, args.seq_len) for t in docs) if len(ids) == args.seq_len]
    ids = torch.tensor(rows[: args.batch_size])
    patch = torch.ones_like(ids, dtype=torch.bool)
    patch[:, 0] = False
    W, b = op.W.float(), op.b.float()

    def value(x):
        return torch.nn.functional.linear(x, W, b)

    def old():
        return _old_internal_hook(model, ids, op.layer_in, op.layer_out, patch, value)

    def new():
        with ato.splice(model, op, positions=patch):  # model check (digest from ato_model.json) included
            return final_hidden(model, ids)

    # wall time, and this thread's CPU time (torch runs on the calling thread with --threads 1): on a shared
    # machine the CPU time is what other processes disturb least
    runs: dict[str, list[float]] = {"old": [], "old_again": [], "public": []}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        assert torch.equal(old(), new()), "the public splice computes another forward than the old hook"
        nll_old = causal_lib.patched_token_nll(model, ids, op.layer_in, op.layer_out, patch, value, 512)
        with ato.splice(model, op, positions=patch):
            assert torch.equal(causal_lib.token_nll(model, ids, 512), nll_old)
        for _ in range(args.splice_repeats):  # interleaved, so drift in the machine's load hits all three
            for name, fn in (("old", old), ("public", new), ("old_again", old)):
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append(time.thread_time() - c0)
                runs[name].append(time.perf_counter() - t0)
        entry = _entry_cost(model, op, patch, ids)
    print(f"\npublic splice vs the internal hook it replaced: {ids.shape[0]} × {ids.shape[1]} tokens, {where}")
    print(f"  medians of {args.splice_repeats} interleaved repeats of the patched body forward (s):")
    print(f"    {'':10s} {'wall':>8s} {'(range)':>17s} {'CPU':>8s} {'(range)':>17s}")
    for k in ("old", "old_again", "public"):
        w, c = runs[k], cpu[k]
        print(
            f"    {k:10s} {statistics.median(w):8.4f} ({min(w):7.4f}–{max(w):7.4f}) "
            f"{statistics.median(c):8.4f} ({min(c):7.4f}–{max(c):7.4f})"
        )
    result: dict[str, float] = {}
    for label, data in (("wall", runs), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in data.items()}
        overhead = 100 * (med["public"] / med["old"] - 1)
        noise = 100 * (med["old_again"] / med["old"] - 1)
        print(f"  {label}: public splice overhead {overhead:+.2f} % (budget ≤ 2 %); A/A noise {noise:+.2f} %")
        result |= {f"splice_{label}_old_s": med["old"], f"splice_{label}_public_s": med["public"]}
        result |= {f"splice_{label}_overhead_pct": overhead, f"splice_{label}_aa_noise_pct": noise}
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"  fixed cost of the public splice (model check, hooks in and out, per forward: mask → rows): "
        f"{1e3 * entry:.3f} ms = {100 * entry / med['old']:.4f} % of one forward"
    )
    print("  NLL and final hidden states: identical (checked above)")
    return result | {"splice_fixed_cost_ms": 1e3 * entry}


def _entry_cost(model, op, patch, ids, n: int = 200) -> float:
    """Seconds the public splice adds beyond the forward itself: entering and leaving the context (model
    check with the digest read, hooks) plus the per-forward mask → rows step, measured without a forward."""
    import ato
    from ato.splicing import position_mask

    t0 = time.perf_counter()
    for _ in range(n):
        with ato.splice(model, op, positions=patch):
            position_mask(patch, *ids.shape).nonzero(as_tuple=True)
    return (time.perf_counter() - t0) / n


def whole_stages(params_path: Path, clean_s_per_seq: float) -> dict[str, float]:
    """`ato causal_reference` then `ato causal --pair` for each pair, timed; projected six-pair total."""
    from ato.artifacts import CausalReference, Layout
    from ato.params import load_params
    from ato.stages import causal, causal_reference

    params = load_params(params_path)
    t0 = time.perf_counter()
    causal_reference.main(params)
    ref_wall = time.perf_counter() - t0
    layer = next(iter(params.pairs.values())).target
    ref_layer = CausalReference.read(Layout.from_params(params).causal_reference(layer)).seconds
    walls, loops = {}, {}
    for name in params.pairs:
        t0 = time.perf_counter()
        loops[name] = causal.main(params, pair=name)[name].seconds
        walls[name] = time.perf_counter() - t0
    n = params.causal.n_sequences
    second_target = ref_layer - clean_s_per_seq * n  # a second target layer reuses the clean loss
    projected = ref_wall + second_target + 6 * statistics.mean(walls.values())
    print(f"\nwhole stages, {n} sequences × {params.causal.seq_len} tokens, target layer {layer}:")
    print(f"  causal_reference (1 target layer): wall {ref_wall:.1f} s (forward loop {ref_layer:.1f} s)")
    for name in walls:
        print(f"  causal --pair {name}: wall {walls[name]:.1f} s (forward loop {loops[name]:.1f} s)")
    print(
        f"  projected default (6 pairs, 2 target layers): {projected:.0f} s = {projected / 60:.1f} min "
        "(an upper bound: pairs with a later target replay fewer blocks; plus ~5 s interpreter start per process)"
    )
    return {"reference_wall_s": ref_wall, "pair_wall_s": statistics.mean(walls.values()), "projected_s": projected}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "base"))
    ap.add_argument("--target", type=int, default=6, help="target layer T = L+k (pairs T−1, T−2, T−3)")
    ap.add_argument("--sequences", type=int, default=32, help="causal.n_sequences for the whole-stage run")
    ap.add_argument("--before-sequences", type=int, default=8, help="sequences for the per-condition comparison")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-stages", action="store_true", help="only the per-condition comparison")
    ap.add_argument("--only-splice", action="store_true", help="only the public splice vs internal hook comparison")
    ap.add_argument("--splice-repeats", type=int, default=15, help="interleaved repeats for the splice comparison")
    ap.add_argument(
        "--operator",
        default=str(ROOT / "models" / "operators" / "L05_k1"),
        help="operator for the splice comparison (default: models/operators/L05_k1; random if absent)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ato.models import load_prepared
    from ato.params import load_params

    model_dir = Path(args.model_dir)
    model, tok, info = load_prepared(model_dir, "cpu")
    print(f"causal bench: {info.name}; {_machine()}")
    result: dict[str, float] = {}
    docs = _docs(400)
    result |= splice_overhead(model, tok, info, docs, args)
    if args.only_splice:
        print(f"machine after: {_machine()}")
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        params_path = build_project(Path(tmp), model, tok, info, model_dir, args.target, docs, args)
        times = per_condition(model, info, load_params(params_path), args.before_sequences)
        result |= print_conditions(times, args.before_sequences, pairs_per_target=3)
        if not args.skip_stages:
            result |= whole_stages(params_path, times["after_reference"]["clean"])
    print(f"machine after: {_machine()}")
    print(json.dumps({k: round(v, 3) for k, v in result.items()}))


if __name__ == "__main__":
    main()
