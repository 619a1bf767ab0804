"""The transport atlas (the compute behind `ato atlas`): every stored layer pair (L, L + k ≤ L + k_max).

1. **One joint pass.** `accumulate_banded` streams each split once and forms the float64 Gram of
   every stored layer with the next k_max layers; every pair's `PairStats` are blocks of it.
2. **Fits from shared factors.** Each layer's covariance is decomposed once (`LayerFactors`); every
   pair gets its ridge map (α by GCV or fixed), scaled orthogonal Procrustes (plain, centred),
   reduced-rank regression at the held-out subspace size, η beside its linear reference and the
   held-out subspace size beside one shared Wishart null (`ato.math.atlas`).
3. **The model's mean Jacobian.** One traced forward of a few TRAIN sequences; per probed input
   layer L, one vmapped jvp pass through blocks L+1…L+k_max gives E[J] for every k at once, restricted
   to the top right singular subspace of L's ridge maps (`ato.math.jacobian`). Forward-mode AD needs
   the eager attention implementation, which the atlas's model copy is switched to.
4. **Causal Δ** on `atlas.causal_pairs`: residual L+k of held-out TEST sequences replaced by each
   operator's prediction (`ato.patching.run_conditions`, the existing patching API, with one
   `Condition` per operator), Δ log-perplexity with intervals over sequences.

Outputs are assembled into `ato.artifacts.AtlasResult`; `atlas_markdown` renders reports/atlas/atlas.md.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ato.accumulate import BandedGramAccumulator, accumulate_banded
from ato.artifacts import AtlasBudget, AtlasPair, AtlasResult, LocalGlobal, OperatorScore
from ato.errors import AtoError
from ato.kinds import keys_for, kinds_for
from ato.math.atlas import (
    LayerFactors,
    PairFit,
    alpha_grid,
    fit_pair,
    jacobian_map,
    local_vs_global,
    probe_directions,
    score,
)
from ato.math.heldout import cca_null
from ato.math.intervals import Interval, delta_interval
from ato.math.jacobian import JacobianProbe, probe
from ato.models import decoder_blocks, load_prepared
from ato.params import AtlasParams, pair_name
from ato.patching import Condition, load_sequences, position_mask, run_conditions, trace_body
from ato.store import ActivationStore

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
LOSS_CHUNK_ROWS = 256  # LM-head rows per chunk in the causal passes
REFERENCE = keys_for("atlas_reference")[0]  # train_mean: mean ablation, patched beside the operators for scale


def operators() -> tuple[str, ...]:
    """The atlas's operators (`ato.kinds`, asked at each use so a kind registered later is included):
    identity, procrustes, procrustes_centred, ridge, rrr, jacobian, then registered ones."""
    return keys_for("atlas")


def extra_builders() -> dict[str, Any]:
    """Registered operators built from the train statistics alone (the built-in ones are `fit_pair`'s own)."""
    return {k.key("atlas"): k.build for k in kinds_for("atlas") if k.build is not None}


__all__ = [
    "AtlasError",
    "atlas_markdown",
    "atlas_metrics",
    "atlas_result",
    "causal_atlas",
    "fit_atlas",
    "joint_grams",
    "load_model",
    "check_plan",
    "plan",
    "probe_atlas",
    "readme_table",
    "table",
    "torch_threads",
]


class AtlasError(AtoError):
    """Atlas inputs that do not fit together; the message names the layer, pair or param."""


# --------------------------------------------------------------------------------------------
# 1–2. The joint pass and the statistics-based fits


def joint_grams(
    store: ActivationStore, ap: AtlasParams, include_bos: bool, device: torch.device
) -> dict[str, BandedGramAccumulator]:
    """The banded joint Gram of every stored layer on train and test (first `atlas.tokens` tokens)."""
    layers = store.layers
    if len(layers) < 2:
        raise AtlasError(f"{store.root}: the atlas needs at least two stored layers, the store has {layers}")
    return {
        split: accumulate_banded(
            store, split, layers, ap.k_max, ap.chunk_tokens, include_bos, ap.tokens[split] or None, device
        )
        for split in SPLITS
    }


def fit_atlas(
    grams: dict[str, BandedGramAccumulator], ap: AtlasParams, workers: int | None = None
) -> dict[str, PairFit]:
    """Every pair of the band fitted on train and scored on test, layer decompositions shared.

    Every decomposition runs on one BLAS thread, `workers` (default: the CPUs) at a time: LAPACK's
    d = 640 SVD gains little from a second thread and loses badly when the cores are busy (9.6 s
    against 0.7 s on one thread, measured on the shared 2-core machine), so each core works on its
    own layer or pair instead. Results do not depend on the number of workers."""
    train, test = grams["train"], grams["test"]
    pairs, d = train.pairs, train.d
    xs, ys = {L for L, _ in pairs}, {T for _, T in pairs}
    factors = {n: LayerFactors.from_moments(*train.layer_moments(n)) for n in sorted(xs | ys)}

    def prepare(n: int) -> None:  # what the layer's pairs need, computed once (cached on the factors)
        f = factors[n]
        if n in xs:
            _ = (f.eigh, f.x_whitening)
        if n in ys:
            _ = f.y_whitening

    alphas: np.ndarray | float = (
        ap.alpha if ap.alpha is not None else alpha_grid(ap.alpha_min, ap.alpha_max, ap.alpha_points)
    )
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        # one null for every pair (same n and d), simulated while the layers are decomposed
        null_job = pool.submit(
            cca_null, int(train.n), int(test.n), d, d, ap.subspace_fraction, ap.null_replicates, ap.seed
        )
        list(pool.map(prepare, factors))
        null = null_job.result()
        jobs = {
            pool.submit(
                fit_pair, L, T, factors[L], factors[T], train.pair_stats(L, T), test.pair_stats(L, T), alphas,
                null, ap.eta_replicates, ap.seed, extra_builders(),
            ): pair_name(L, T - L)
            for L, T in pairs
        }  # fmt: skip
        done = {jobs[job]: job.result() for job in tqdm(as_completed(jobs), total=len(jobs), desc="atlas fits")}
    fits = {pair_name(L, T - L): done[pair_name(L, T - L)] for L, T in pairs}  # plan order
    return fits


# --------------------------------------------------------------------------------------------
# 3. The mean Jacobian


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n (0: unchanged) inside the block. The Jacobian's vmapped jvps and
    the causal replays are many small ops; with two threads on a busy 2-core CPU they spin-wait (measured
    2–5× slower than one thread, `atlas.threads`)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_model(model_dir: Path, device: torch.device) -> Any:
    """The prepared model with eager attention (forward-mode AD has no rule for fused SDPA kernels)
    and frozen weights."""
    model, _tokenizer, _info = load_prepared(model_dir, device=str(device))
    model.set_attn_implementation("eager")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def plan(layers: list[int], k_max: int) -> list[tuple[int, int]]:
    """(L, T) of every atlas pair: stored layers L < T ≤ L + k_max (the band of the joint Gram)."""
    return [(L, T) for L in sorted(layers) for T in sorted(layers) if L < T <= L + k_max]


def check_plan(ap: AtlasParams, pairs: list[tuple[int, int]]) -> list[int]:
    """The input layers to probe for the Jacobian; refuses, before any compute, causal pairs and
    Jacobian layers the atlas does not have."""
    names = {pair_name(L, T - L) for L, T in pairs}
    missing = [p for p in ap.causal_pairs if p not in names]
    if missing:
        raise AtlasError(f"atlas.causal_pairs: {missing} are not atlas pairs (stored layers, k ≤ atlas.k_max)")
    with_pairs = sorted({L for L, _ in pairs})
    if ap.jacobian_layers == "all":
        return with_pairs
    bad = sorted(set(ap.jacobian_layers) - set(with_pairs))
    if bad:
        raise AtlasError(f"atlas.jacobian_layers: {bad} have no atlas pairs (input layers: {with_pairs})")
    return sorted(set(ap.jacobian_layers))


def block_stack(model: Any, calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]], L: int, targets: list[int]):
    """f(h_L) = the residuals after blocks `targets` (> L), re-running blocks L+1… with the traced
    calls' other arguments (masks, position embeddings): a local version of `BodyTrace.replay` that
    returns intermediate residuals."""
    blocks, last = decoder_blocks(model), max(targets)

    def f(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for j in range(L + 1, last + 1):
            args, kwargs = calls[j]
            out = blocks[j](h, *args[1:], **kwargs) if args else blocks[j](**{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
            if j in targets:
                outs.append(h)
        return tuple(outs)

    return f


@dataclass
class ProbedPair:
    V: np.ndarray  # [d, r] probed directions
    probe: JacobianProbe


def probe_atlas(
    model: Any, store: ActivationStore, fits: dict[str, PairFit], layers: list[int], ap: AtlasParams
) -> dict[str, ProbedPair]:
    """E[J] (and everything `ato.math.jacobian.probe` estimates) for every pair of the probed layers."""
    device = next(model.parameters()).device
    held = load_sequences(store, ap.jacobian_sequences, ap.jacobian_seq_len, split="train")
    ids = held.tokens.to(device)
    mask = (~held.special).to(device)
    mask[:, 0] = False  # BOS: its residual is a fixed point the fits exclude
    targets = {L: sorted(f.T for f in fits.values() if f.L == L) for L in layers}
    with torch.no_grad():
        trace = trace_body(model, ids, sorted({*layers, *(t for ts in targets.values() for t in ts)}), min(layers) + 1)
    generator = torch.Generator().manual_seed(ap.seed)
    out: dict[str, ProbedPair] = {}
    for L in tqdm(layers, desc="atlas Jacobian", unit="layer"):
        ts = targets[L]
        V = probe_directions([fits[pair_name(L, T - L)].maps["ridge"][0] for T in ts], ap.jacobian_directions)
        f = block_stack(model, trace.calls, L, ts)
        x = trace.residuals[L]
        _check_replay(f, x, [trace.residuals[T] for T in ts], L, ts)
        probes = probe(f, x, torch.as_tensor(V, dtype=x.dtype, device=device), mask, generator, ap.jacobian_chunk)
        for T, p in zip(ts, probes):
            out[pair_name(L, T - L)] = ProbedPair(V, p)
    return out


def _check_replay(f: Callable[..., Any], x: torch.Tensor, want: list[torch.Tensor], L: int, ts: list[int]) -> None:
    """The re-run blocks must reproduce the traced residuals, or the Jacobian is of another function."""
    with torch.no_grad():
        got = f(x)
    for T, a, b in zip(ts, got, want):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())):
            raise AtlasError(
                f"re-running blocks {L + 1}..{T} from the traced calls does not reproduce layer {T}; "
                "this model's body does more between blocks than the atlas's Jacobian supports"
            )


def apply_jacobian(fits: dict[str, PairFit], probes: dict[str, ProbedPair], grams: dict[str, BandedGramAccumulator]):
    """Add the Jacobian operator (its test R²) and the local-vs-global numbers to the probed pairs."""
    for name, pp in probes.items():
        fit = fits[name]
        train, test = grams["train"].pair_stats(fit.L, fit.T), grams["test"].pair_stats(fit.L, fit.T)
        W, b = fit.maps["ridge"]
        W_J, b_J = jacobian_map(W, pp.V, pp.probe.mean.numpy(), train)
        fit.maps["jacobian"] = (W_J, b_J)
        fit.scores["jacobian"] = score(test, W_J, b_J)
        fit.extra.update(local_vs_global(W, b, pp.V, pp.probe))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# 4. Causal Δ


def causal_atlas(
    model: Any,
    store: ActivationStore,
    fits: dict[str, PairFit],
    grams: dict[str, BandedGramAccumulator],
    ap: AtlasParams,
) -> dict[str, dict[str, Interval]]:
    """Δ log-perplexity of every operator (and mean ablation) patched into layer L+k of TEST sequences."""
    if not ap.causal_pairs:
        return {}
    device = next(model.parameters()).device
    held = load_sequences(store, ap.causal_sequences, ap.causal_seq_len, split="test")
    masks = {"all": position_mask("all", ap.causal_seq_len)}
    out = {}
    for name in ap.causal_pairs:
        fit = fits[name]
        mean_y = torch.as_tensor(grams["train"].pair_stats(fit.L, fit.T).mean_y, dtype=torch.float32, device=device)
        conditions = [_linear_condition(op, fit.L, *fit.maps[op], device) for op in operators() if op in fit.maps]
        conditions.append(Condition(REFERENCE, None, _constant(mean_y)))
        results, _ = run_conditions(
            model, held, fit.T, conditions, masks, {"all": "all"}, ap.causal_batch_size, LOSS_CHUNK_ROWS,
            progress=False,
        )  # fmt: skip
        res = results["all"]
        clean, count = res.nll_sum["clean"]["after"], res.count["after"]
        out[name] = {
            c.name: delta_interval(res.nll_sum[c.name]["after"], clean, count, seed=ap.seed) for c in conditions
        }
    return out


def _constant(value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda rows: value.expand(rows.shape[0], -1)


def _linear_condition(name: str, layer_in: int, W: np.ndarray, b: np.ndarray, device: torch.device) -> Condition:
    Wt = torch.as_tensor(W, dtype=torch.float32, device=device)
    bt = torch.as_tensor(b, dtype=torch.float32, device=device)
    return Condition(name, layer_in, lambda x: torch.nn.functional.linear(x, Wt, bt))


# --------------------------------------------------------------------------------------------
# Records, metrics, tables


def _operator_score(fit: PairFit, op: str, causal: dict[str, Interval]) -> OperatorScore:
    s = fit.scores.get(op)
    c = causal.get(op)
    return OperatorScore(
        r2=s.r2 if s else math.nan,
        r2_weighted=s.r2_weighted if s else math.nan,
        causal_delta=c.estimate if c else math.nan,
        causal_low=c.low if c else math.nan,
        causal_high=c.high if c else math.nan,
    )


def pair_record(name: str, fit: PairFit, causal: dict[str, Interval]) -> AtlasPair:
    ops = {op: _operator_score(fit, op, causal) for op in operators()}
    if REFERENCE in causal:
        ops[REFERENCE] = _operator_score(fit, REFERENCE, causal)
    e = fit.extra
    local = None
    if e:
        local = LocalGlobal(
            **{k: int(v) if k in ("directions", "n_probe_tokens") else v for k, v in e.items()}  # type: ignore[arg-type]
        )
    lin, size = fit.linear, fit.heldout_size
    return AtlasPair(
        pair=name,
        L=fit.L,
        k=fit.T - fit.L,
        T=fit.T,
        alpha=fit.alpha,
        alpha_at_edge=fit.alpha_at_edge,
        operators=ops,
        gain_over_identity=fit.scores["ridge"].r2 - fit.scores["identity"].r2,
        procrustes_scale=fit.procrustes_scale,
        procrustes_centred_scale=fit.procrustes_centred_scale,
        procrustes_linearity=fit.linearity,
        ceiling=fit.ceiling,
        eta_test=lin.eta_test,
        eta_expected=lin.eta_expected,
        eta_expected_std=lin.eta_simulated_std,
        eta_ratio=lin.ratio,
        heldout_subspace_size=size.observed,
        heldout_subspace_size_null=size.null,
        heldout_subspace_size_null_std=size.null_std,
        heldout_subspace_size_excess=size.excess,
        rrr_rank=fit.rrr_rank,
        local=local,
    )


def atlas_result(
    store: ActivationStore,
    grams: dict[str, BandedGramAccumulator],
    fits: dict[str, PairFit],
    causal: dict[str, dict[str, Interval]],
    layers_probed: list[int],
    ap: AtlasParams,
    seconds: dict[str, float],
) -> AtlasResult:
    budget = AtlasBudget(
        k_max=ap.k_max,
        n_train_tokens=grams["train"].n,
        n_test_tokens=grams["test"].n,
        alpha_choice="gcv" if ap.alpha is None else "fixed",
        subspace_fraction=ap.subspace_fraction,
        null_replicates=ap.null_replicates,
        jacobian_layers=layers_probed,
        jacobian_tokens=ap.jacobian_sequences * (ap.jacobian_seq_len - 1) if layers_probed else 0,
        jacobian_directions=min(ap.jacobian_directions, store.d_model),
        causal_pairs=list(ap.causal_pairs),
        causal_sequences=ap.causal_sequences,
        causal_seq_len=ap.causal_seq_len,
    )
    return AtlasResult(
        model=store.manifest.model.name,
        store_digest=store.digest,
        d_model=store.d_model,
        layers=grams["train"].layers,
        budget=budget,
        seconds=seconds,
        pairs=[pair_record(name, fit, causal.get(name, {})) for name, fit in fits.items()],
    )


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def atlas_metrics(result: AtlasResult) -> dict[str, Any]:
    """reports/atlas/metrics.json: per k, means over L of the headline numbers (numbers only)."""
    out: dict[str, Any] = {"n_pairs": len(result.pairs), "n_train_tokens": result.budget.n_train_tokens}
    for k in sorted({p.k for p in result.pairs}):
        ps = [p for p in result.pairs if p.k == k]
        row = {f"r2_{op}": _mean([p.operators[op].r2 for p in ps]) for op in operators()}
        row["r2_weighted_ridge"] = _mean([p.operators["ridge"].r2_weighted for p in ps])
        row["gain_over_identity"] = _mean([p.gain_over_identity for p in ps])
        row["eta_ratio"] = _mean([p.eta_ratio for p in ps])
        row["heldout_subspace_size_excess"] = _mean([p.heldout_subspace_size_excess for p in ps])
        row["procrustes_linearity"] = _mean([p.procrustes_linearity for p in ps])
        locs = [p.local for p in ps if p.local is not None]
        row["jacobian_rel_diff"] = _mean([lg.rel_diff for lg in locs])
        row["jacobian_rel_diff_update"] = _mean([lg.rel_diff_update for lg in locs])
        out[f"k{k}"] = row
    out["seconds"] = dict(result.seconds)
    return out


def table_columns() -> tuple[str, ...]:
    """The columns of reports/atlas/pairs.csv."""
    return (
        "pair", "L", "k", "alpha",
        *(f"r2_{op}" for op in operators()),
        "r2_weighted_ridge", "gain_over_identity", "procrustes_linearity",
        "eta_test", "eta_expected", "eta_ratio",
        "heldout_subspace_size", "heldout_subspace_size_null", "heldout_subspace_size_excess",
        "jacobian_rel_diff", "jacobian_rel_diff_update", "jacobian_alignment", "jacobian_token_variation",
        "linearisation_r2", "ridge_r2_probe",
    )  # fmt: skip


def table(result: AtlasResult) -> list[list[Any]]:
    """One row of `table_columns()` per pair (reports/atlas/pairs.csv)."""
    rows = []
    for p in result.pairs:
        lg = p.local
        loc = (
            [lg.rel_diff, lg.rel_diff_update, lg.alignment, lg.token_variation, lg.linearisation_r2, lg.ridge_r2_probe]
            if lg
            else [math.nan] * 6
        )
        rows.append(
            [p.pair, p.L, p.k, p.alpha, *(p.operators[op].r2 for op in operators()),
             p.operators["ridge"].r2_weighted, p.gain_over_identity, p.procrustes_linearity,
             p.eta_test, p.eta_expected, p.eta_ratio,
             p.heldout_subspace_size, p.heldout_subspace_size_null, p.heldout_subspace_size_excess, *loc]
        )  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# reports/atlas/atlas.md


def _f(v: float, spec: str = ".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "—"


def atlas_markdown(result: AtlasResult) -> str:
    """The atlas's tables with their references and a short "how to read" each."""
    b = result.budget
    lines = [
        "# Transport atlas",
        "",
        f"{result.model}; {len(result.pairs)} pairs (every stored L, k ≤ {b.k_max}). {b.label()}.",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()) + ".",
        "",
        "## Means over L (the README's table)",
        "",
        *readme_table(result),
        "",
        *_summary_section(result),
        *_pairs_section(result),
        *_jacobian_section(result),
        *_causal_section(result),
    ]
    return "\n".join(lines) + "\n"


def readme_table(result: AtlasResult) -> list[str]:
    """The README's "What the atlas shows" table: per k, means over L (noise: the mean sign noise and
    token-sampling error of E[J], combined in quadrature)."""
    out = [
        "| k | " + " | ".join(k.column("atlas") for k in kinds_for("atlas")) + " | η / η_linear "
        "| held-out size − null | ‖(W − E[J])V‖/‖WV‖ (noise) |",
        "|---" * (len(operators()) + 4) + "|",
    ]
    for k in sorted({p.k for p in result.pairs}):
        ps = [p for p in result.pairs if p.k == k]
        ops = " | ".join(_f(_mean([p.operators[op].r2 for p in ps])) for op in operators())
        locs = [p.local for p in ps if p.local is not None]
        noise = _mean([math.hypot(g.estimate_noise, g.sampling_error) for g in locs])
        diff = f"{_f(_mean([g.rel_diff for g in locs]))} ({_f(noise)})" if locs else "—"
        out.append(
            f"| {k} | {ops} | {_f(_mean([p.eta_ratio for p in ps]))} | "
            f"{_f(_mean([p.heldout_subspace_size_excess for p in ps]), '.0f')} | {diff} |"
        )
    return out


def _summary_section(result: AtlasResult) -> list[str]:
    out = [
        "## Per k: mean over L (min … max)",
        "",
        "| k | pairs | " + " | ".join(f"R² {op}" for op in operators()) + " | R²(ridge) − R²(identity) | η / η_linear "
        "| held-out size − null |",
        "|---|---" + "|---" * (len(operators()) + 3) + "|",
    ]
    for k in sorted({p.k for p in result.pairs}):
        ps = [p for p in result.pairs if p.k == k]

        def cell(values: list[float]) -> str:
            v = [x for x in values if math.isfinite(x)]
            return f"{np.mean(v):.3f} ({min(v):.3f} … {max(v):.3f})" if v else "—"

        ops = " | ".join(cell([p.operators[op].r2 for p in ps]) for op in operators())
        out.append(
            f"| {k} | {len(ps)} | {ops} | {cell([p.gain_over_identity for p in ps])} | "
            f"{cell([p.eta_ratio for p in ps])} | {cell([p.heldout_subspace_size_excess for p in ps])} |"
        )
    out += [
        "",
        "**How to read.** Residual R² on the test tokens (uniform average over the residual's dimensions). "
        "The identity is the carried-over residual; R²(ridge) − R²(identity) is what a fitted linear map adds to "
        "mere carrying. η / η_linear ≈ 1 means the ridge map reaches what an exactly linear relation would at this "
        "n and d; < 1 is evidence of transport no linear map captures. Held-out subspace size: the canonical "
        "directions (from train) holding the subspace fraction of Σρ⁺² measured on test, beside the same statistic "
        "for independent x and y at the same n and d (Wishart null). Under the null the test correlations are noise "
        "spread over about half the directions, so its size is large; a size far below it says transport "
        "concentrates in fewer, measurable directions, one near it says no more shared structure than noise. The "
        "null takes tokens as independent (within a sequence they are not), so it is somewhat optimistic.",
        "",
    ]
    return out


def _pairs_section(result: AtlasResult) -> list[str]:
    out = [
        "## Every pair",
        "",
        "| pair | α | " + " | ".join(operators()) + " | R²_w ridge | Procrustes linearity | η (linear) | held-out size "
        "(null ± sd) |",
        "|---|---" + "|---" * (len(operators()) + 4) + "|",
    ]
    for p in result.pairs:
        ops = " | ".join(_f(p.operators[op].r2) for op in operators())
        out.append(
            f"| {p.pair} | {_f(p.alpha, '.3g')}{' (edge)' if p.alpha_at_edge else ''} | {ops} | "
            f"{_f(p.operators['ridge'].r2_weighted)} | {_f(p.procrustes_linearity)} | "
            f"{_f(p.eta_test)} ({_f(p.eta_expected)}) | {p.heldout_subspace_size:.0f} "
            f"({_f(p.heldout_subspace_size_null, '.0f')} ± {_f(p.heldout_subspace_size_null_std, '.0f')}) |"
        )
    return [*out, ""]


def _jacobian_section(result: AtlasResult) -> list[str]:
    probed = [p for p in result.pairs if p.local is not None]
    if not probed:
        return []
    r = probed[0].local.directions if probed[0].local else 0
    out = [
        f"## The mean Jacobian beside the ridge map (on the top-{r} right singular subspace V of L's ridge maps)",
        "",
        "| pair | ‖WV‖²/‖W‖² | ‖(W−E[J])V‖/‖WV‖ | … /‖(W−I)V‖ | total response | alignment (random) | "
        "update alignment | token variation | noise (signs, tokens) | R²_w J_t x_t | R²_w Σ_s J_ts x_s | R²_w Wx+b |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in probed:
        g = p.local
        assert g is not None
        out.append(
            f"| {p.pair} | {_f(g.w_captured)} | {_f(g.rel_diff)} | {_f(g.rel_diff_update)} | {_f(g.rel_diff_total)} | "
            f"{_f(g.alignment)} ({_f(g.alignment_null)}) | {_f(g.alignment_update)} | {_f(g.token_variation)} | "
            f"{_f(g.estimate_noise)}, {_f(g.sampling_error)} | {_f(g.linearisation_r2)} | "
            f"{_f(g.total_linearisation_r2)} | "
            f"{_f(g.ridge_r2_probe)} |"
        )
    out += [
        "",
        "**How to read.** For Gaussian x, Stein's lemma makes the least-squares slope equal E[J] exactly, "
        "whatever the blocks compute; a gap between W and E[J] therefore needs both non-Gaussian inputs and "
        "non-linear computation. Compare ‖(W−E[J])V‖ with the noise of the estimate (two sign draws); the "
        "second column divides by the computed part (W − I) only. Token variation ≈ 0 means one linear map is "
        "the local map everywhere; values ≥ 1 mean the local linear regime is narrower than the data. The last "
        "three columns: how much of y the per-token linearisation explains, beside the global map.",
        "",
    ]
    return out


def _causal_section(result: AtlasResult) -> list[str]:
    pairs = [p for p in result.pairs if math.isfinite(p.operators["ridge"].causal_delta)]
    if not pairs:
        return []
    ops = [*operators(), REFERENCE]
    out = [
        "## Causal Δ log-perplexity (nats/token, 95 % interval over sequences)",
        "",
        "| pair | " + " | ".join(ops) + " |",
        "|---" * (len(ops) + 1) + "|",
    ]
    for p in pairs:
        cells = []
        for op in ops:
            s = p.operators.get(op)
            cells.append(
                f"{_f(s.causal_delta)} [{_f(s.causal_low)}, {_f(s.causal_high)}]"
                if s and math.isfinite(s.causal_delta)
                else "—"
            )
        out.append(f"| {p.pair} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"`{REFERENCE}` is mean ablation (ŷ = ȳ_train): the damage a map must undercut to carry anything.",
        "",
    ]
    return out
