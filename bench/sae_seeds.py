"""SAE-seed stability: train each target layer's SAE with several seeds on this machine, match latents
across seeds, and say how many features — and how many feature verdicts — survive a change of seed.

    .venv/bin/python bench/sae_seeds.py [--params params.yaml] [--seeds 0 1 2] [--layers 12] [--cache F]

Each seed is trained exactly as `ato sae` trains (`ato.stages.sae.trained_sae` on the same gathered
TRAIN tokens; the seed sets the initialisation and the batch order), so the run's own seed reproduces
the run's SAE bit for bit on this machine. Latents are matched one-to-one to the first seed's by
decoder cosine (Hungarian assignment, `ato.math.sae_matching`). Per layer and seed it prints:

- the share of the first seed's live latents whose partner has decoder cosine ≥ 0.5 / 0.7 / 0.9, and
  the same over the run's kept features (`select`'s FeatureSet) when the run's SAE is the first seed's;
- verdict agreement: every latent of each seed is judged by `ato.math.metrics.interval_verdicts` on its point R²
  (the evaluate stage's rule and thresholds, `evaluate.transported_r2` / `min_active_tokens`) for
  each pair into the layer, on the TEST split with the pair's fitted operator; the share of matched
  pairs (cosine ≥ 0.7, both judged) whose verdicts agree.

Needs the run's store, pair statistics and operators (`ato fit`); `--cache` keeps the gathered
training tokens between calls (a safetensors file, written and read by this script only).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.7, 0.9)
VERDICT_COSINE = 0.7  # matched pairs whose verdicts are compared
TEST_CHUNK_TOKENS = 4096


def _gathered(params, store, layers, cache: Path | None):
    """{layer: float32 [n, d]} TRAIN tokens as the stage gathers them (from `cache` when it has them)."""
    from safetensors.torch import load_file, save_file

    from ato.corpus import Corpus
    from ato.models import load_prepared
    from ato.sae.data import SaeData, gather

    if cache is not None and cache.exists():
        tokens = {int(k): v for k, v in load_file(cache).items()}  # safetensors: nothing unpickled
        if all(n in tokens for n in layers):
            return SaeData({n: tokens[n] for n in layers}, len(tokens[layers[0]]), 0, 0, 0.0)
    if store.n_tokens("train") >= params.sae.tokens:  # the store alone holds them: no model needed
        data = gather(store, layers, params.sae.tokens)
    else:
        model, tokenizer, _ = load_prepared(params.path("model_dir"), params.sae.device)
        corpus = Corpus(params.corpus, params.root)
        data = gather(store, layers, params.sae.tokens, model, tokenizer, corpus, params.sae.forward_batch_size)
    if cache is not None:
        save_file({str(n): t.contiguous() for n, t in data.tokens.items()}, cache)
    return data


def _verdicts(sae, operator, store, layer: int, ev):
    """One verdict per latent of `sae` for `operator` (into `layer`) over the TEST split."""
    import numpy as np
    import torch

    from ato.math.metrics import FeatureR2Accumulator, interval_verdicts
    from ato.math.sae_matching import unit_rows

    directions = unit_rows(sae.W_dec.detach().double().numpy()).T  # [d, F]
    acc = FeatureR2Accumulator(directions.shape[1])
    for chunk in store.iter_chunks("test", [operator.layer_in, layer], TEST_CHUNK_TOKENS):
        x, y = chunk[operator.layer_in], chunk[layer]
        with torch.inference_mode():
            active = (sae.encode(torch.from_numpy(y)) > 0).numpy()
        acc.update(y, operator.predict_numpy(x), directions, active)
    scores = acc.result()
    enough = np.asarray(scores["active"]) >= ev.min_active_tokens
    point = np.asarray(scores["r2"])  # point verdicts (an interval of width 0): seeds are compared, not resampled
    return interval_verdicts(point, point, enough, ev.transported_r2), np.asarray(scores["active"] > 0)


def _kept(layout, layer: int, first_sae):
    """The run's kept features when the run's SAE is `first_sae` (same decoder), else None."""
    import torch

    from ato.artifacts import FeatureSet
    from ato.sae import load_sae

    if not (layout.sae(layer) / "cfg.json").exists() or not layout.feature_set(layer).exists():
        return None
    if not torch.equal(load_sae(layout.sae(layer)).W_dec, first_sae.W_dec):
        return None
    return FeatureSet.read(layout.feature_set(layer)).kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--layers", type=int, nargs="*", help="target layers (default: every target layer)")
    ap.add_argument("--cache", type=Path, help="file keeping the gathered training tokens between calls")
    args = ap.parse_args()
    import numpy as np
    import torch

    from ato.artifacts import Layout
    from ato.math.metrics import SYNTHESISED, TRANSPORTED
    from ato.math.sae_matching import match_features, verdict_agreement
    from ato.operators import load_operator
    from ato.params import load_params
    from ato.stages.sae import trained_sae
    from ato.store import ActivationStore

    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params(args.params)
    layout, layers = Layout.from_params(params), args.layers or params.target_layers()
    store = ActivationStore.open(layout.store)
    data = _gathered(params, store, layers, args.cache)
    pairs = {name: p for name, p in params.pairs.items() if p.target in layers}
    operators = {name: load_operator(layout.operator(name)) for name in pairs}
    judged = {TRANSPORTED, SYNTHESISED}
    print(f"seeds {args.seeds}; matched one-to-one to seed {args.seeds[0]} by decoder cosine (Hungarian)")
    for layer in layers:
        saes, seconds = {}, {}
        for seed in args.seeds:
            t0 = time.perf_counter()
            sp = dataclasses.replace(params.sae, seed=seed)
            saes[seed], _ = trained_sae(sp, data, layer, store, torch.device("cpu"))
            seconds[seed] = time.perf_counter() - t0
        verdicts = {
            (name, seed): _verdicts(saes[seed], operators[name], store, layer, params.evaluate)
            for name, p in pairs.items()
            if p.target == layer
            for seed in args.seeds
        }
        first = args.seeds[0]
        kept = _kept(layout, layer, saes[first])
        live = next(v for (_, s), v in verdicts.items() if s == first)[1]
        print(f"\nlayer {layer}: {int(live.sum())} of {len(live)} latents of seed {first} active on TEST")
        for seed in args.seeds[1:]:
            match = match_features(saes[first].W_dec.detach().numpy(), saes[seed].W_dec.detach().numpy())
            shares = " / ".join(f"{match.share_above(t, among=live):.3f}" for t in THRESHOLDS)
            line = f"  seed {seed} ({seconds[seed]:.0f} s): live latents matched at cos ≥ {THRESHOLDS}: {shares}"
            line += f"; median cos {np.nanmedian(match.cosine[live]):.3f}"
            if kept is not None:
                kept_shares = " / ".join(f"{match.share_above(t, among=np.asarray(kept)):.3f}" for t in THRESHOLDS)
                line += f"; the run's {len(kept)} kept features: {kept_shares}"
            print(line)
            for name in (n for n, p in pairs.items() if p.target == layer):
                (va, _), (vb, _) = verdicts[(name, first)], verdicts[(name, seed)]
                share, n = verdict_agreement(va, vb, match, judged, VERDICT_COSINE)
                counts = {s: int(sum(v == TRANSPORTED for v in verdicts[(name, s)][0])) for s in (first, seed)}
                print(
                    f"    {name}: verdicts agree on {share:.3f} of {n} matched pairs (cos ≥ {VERDICT_COSINE}, both "
                    f"judged); transported latents {counts[first]} (seed {first}) / {counts[seed]} (seed {seed})"
                )


if __name__ == "__main__":
    main()
