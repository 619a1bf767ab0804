"""The atlas's outputs: `AtlasResult` records, reports/atlas/metrics.json, pairs.csv and atlas.md."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ato.accumulate import BandedGramAccumulator
from ato.artifacts import AtlasBudget, AtlasPair, AtlasResult, LocalGlobal, OperatorScore
from ato.atlas.causal import REFERENCE
from ato.atlas.fitting import operators
from ato.kinds import kinds_for
from ato.math.atlas import PairFit
from ato.math.intervals import Interval
from ato.params import AtlasParams
from ato.store import ActivationStore


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
            **{k: int(v) if k in ("directions", "n_probe_tokens", "n_probe_sequences") else v for k, v in e.items()}  # type: ignore[arg-type]
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
        orthogonal_procrustes_score=fit.orthogonal_score,
        peer_linearity=fit.peer_linearity,
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
        transport_directions=float(fit.directions.count),
        transport_directions_share=fit.directions.share,
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


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _median(values: list[float]) -> float:
    finite = _finite(values)
    return float(np.median(finite)) if finite else math.nan


def _spread(values: list[float]) -> dict[str, float]:
    """median, min and max over the finite values: the aggregate over L that one extreme layer cannot
    move (identity R² reaches −12.8 at L = 0, which drags a mean below every other layer's value)."""
    finite = _finite(values)
    if not finite:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": float(np.median(finite)), "min": min(finite), "max": max(finite)}


def _per_k(result: AtlasResult) -> dict[int, list[AtlasPair]]:
    return {k: [p for p in result.pairs if p.k == k] for k in sorted({p.k for p in result.pairs})}


def _gain_weighted(p: AtlasPair) -> float:
    """R²_w(ridge) − R²_w(identity): the variance-weighted counterpart of `gain_over_identity`."""
    return p.operators["ridge"].r2_weighted - p.operators["identity"].r2_weighted


def _aggregated(ps: list[AtlasPair]) -> dict[str, list[float]]:
    """Every number metrics.json aggregates over L, by its key: each operator's R² and R²_w, the gains."""
    out = {f"r2_{op}": [p.operators[op].r2 for p in ps] for op in operators()}
    out |= {f"r2_weighted_{op}": [p.operators[op].r2_weighted for p in ps] for op in operators()}
    out["gain_over_identity"] = [p.gain_over_identity for p in ps]
    out["gain_over_identity_weighted"] = [_gain_weighted(p) for p in ps]
    out["eta_ratio"] = [p.eta_ratio for p in ps]
    out["heldout_subspace_size_excess"] = [p.heldout_subspace_size_excess for p in ps]
    out["transport_directions"] = [p.transport_directions for p in ps]
    out["orthogonal_procrustes_score"] = [p.orthogonal_procrustes_score for p in ps]
    out["peer_linearity"] = [p.peer_linearity for p in ps]
    locs = [p.local for p in ps if p.local is not None]
    out["jacobian_rel_diff"] = [lg.rel_diff for lg in locs]
    out["jacobian_rel_diff_update"] = [lg.rel_diff_update for lg in locs]
    return out


def atlas_metrics(result: AtlasResult) -> dict[str, Any]:
    """reports/atlas/metrics.json: per k, the median over L of the headline numbers with its range
    (`<name>_median`, `_min`, `_max`; numbers only)."""
    out: dict[str, Any] = {"n_pairs": len(result.pairs), "n_train_tokens": result.budget.n_train_tokens}
    for k, ps in _per_k(result).items():
        out[f"k{k}"] = {
            f"{name}_{stat}": value
            for name, values in _aggregated(ps).items()
            for stat, value in _spread(values).items()
        }
    out["seconds"] = dict(result.seconds)
    return out


def table_columns() -> tuple[str, ...]:
    """The columns of reports/atlas/pairs.csv."""
    return (
        "pair", "L", "k", "alpha",
        *(f"r2_{op}" for op in operators()), *(f"r2_weighted_{op}" for op in operators()),
        "gain_over_identity", "gain_over_identity_weighted", "orthogonal_procrustes_score", "peer_linearity",
        "eta_test", "eta_expected", "eta_ratio",
        "heldout_subspace_size", "heldout_subspace_size_null", "heldout_subspace_size_excess",
        "transport_directions", "transport_directions_share",
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
             *(p.operators[op].r2_weighted for op in operators()),
             p.gain_over_identity, _gain_weighted(p), p.orthogonal_procrustes_score, p.peer_linearity,
             p.eta_test, p.eta_expected, p.eta_ratio,
             p.heldout_subspace_size, p.heldout_subspace_size_null, p.heldout_subspace_size_excess,
             p.transport_directions, p.transport_directions_share, *loc]
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
        "## Medians over L (the README's table)",
        "",
        *readme_table(result),
        "",
        *_summary_section(result),
        *_pairs_section(result),
        *_jacobian_section(result),
        *_causal_section(result),
    ]
    return "\n".join(lines) + "\n"


def _both(s: OperatorScore) -> str:
    """R² (uniform over dimensions) / R²_w (variance-weighted): one cell, the two side by side."""
    return f"{_f(s.r2)} / {_f(s.r2_weighted)}"


def _spread_cell(values: list[float], spec: str = ".3f") -> str:
    """median (min … max) over L."""
    s = _spread(values)
    return f"{_f(s['median'], spec)} ({_f(s['min'], spec)} … {_f(s['max'], spec)})" if _finite(values) else "—"


def readme_table(result: AtlasResult) -> list[str]:
    """The README's "What the atlas shows" table: per k, medians over L of R² / R²_w of each operator
    and of the references (noise: the median of E[J]'s sign noise and token-sampling error, combined in
    quadrature)."""
    out = [
        "| k: R² / R²_w | " + " | ".join(k.column("atlas") for k in kinds_for("atlas")) + " | η / η_linear "
        "| directions carrying transport | ‖(W − E[J])V‖/‖WV‖ (noise) |",
        "|---" * (len(operators()) + 4) + "|",
    ]
    for k, ps in _per_k(result).items():
        ops = " | ".join(
            " / ".join(_f(_median([getattr(p.operators[op], attr) for p in ps])) for attr in ("r2", "r2_weighted"))
            for op in operators()
        )
        locs = [p.local for p in ps if p.local is not None]
        noise = _median([g.sequence_noise for g in locs])
        diff = f"{_f(_median([g.rel_diff for g in locs]))} ({_f(noise)})" if locs else "—"
        out.append(
            f"| {k} | {ops} | {_f(_median([p.eta_ratio for p in ps]))} | "
            f"{_f(_median([p.transport_directions for p in ps]), '.0f')} | {diff} |"
        )
    return out


def _summary_section(result: AtlasResult) -> list[str]:
    out = [
        "## Per k: median over L (min … max)",
        "",
        "| k | pairs | R² | " + " | ".join(operators()) + " | ridge − identity |",
        "|---|---|---" + "|---" * (len(operators()) + 1) + "|",
    ]
    for k, ps in _per_k(result).items():
        for label, attr, gain in (
            ("uniform", "r2", [p.gain_over_identity for p in ps]),
            ("weighted", "r2_weighted", [_gain_weighted(p) for p in ps]),
        ):
            ops = " | ".join(_spread_cell([getattr(p.operators[op], attr) for p in ps]) for op in operators())
            out.append(f"| {k} | {len(ps)} | {label} | {ops} | {_spread_cell(gain)} |")
    out += [
        "",
        "| k | η / η_linear | directions carrying transport | their share of the ceiling |",
        "|---|---|---|---|",
        *(
            f"| {k} | {_spread_cell([p.eta_ratio for p in ps])} | "
            f"{_spread_cell([p.transport_directions for p in ps], '.0f')} | "
            f"{_spread_cell([p.transport_directions_share for p in ps], '.4f')} |"
            for k, ps in _per_k(result).items()
        ),
        "",
        "**How to read.** Residual R² on the test tokens, two ways: *uniform* averages the R² of each residual "
        "dimension (every dimension counts alike, however little it varies), *weighted* is 1 − SSE/SST over all "
        "dimensions (each dimension counts by its variance, so a few high-variance dimensions dominate). They "
        "disagree, even in the direction of a difference between pairs, whenever a map does well on the "
        "high-variance dimensions and badly on the many low-variance ones or the reverse; a claim holds only "
        "where both agree. Every aggregate over L is the median with its range (min … max): one extreme layer "
        "(the identity's R² at L = 0 is far below −1) would drag a mean past every other layer's value. The "
        "identity is the carried-over residual; ridge − identity is what a fitted linear map adds to "
        "mere carrying. η / η_linear ≈ 1 means the ridge map reaches what an exactly linear relation would at this "
        "n and d; < 1 is evidence of transport no linear map captures. Directions carrying transport: of the d "
        "canonical directions (from train), those whose correlation measured on test passes a one-sided step-down "
        "test (Holm–Šidák, family-wise α = 0.05) against independent x and y, and their share of the ceiling's Σρ² "
        "(docs/statistics.md#directions): how many directions transport spreads over, a lower bound in that no "
        "direction carrying nothing is counted (95 %). The atlas takes the test tokens as independent (within a "
        "sequence they are not), so its count is somewhat optimistic; the summary's is at the effective n, with "
        "an interval. The held-out subspace size in the table of every pair (the directions holding the subspace "
        "fraction of Σρ⁺², beside its Wishart null) describes the shape of the spectrum only: it does not grow "
        "with the number of directions that carry transport, so its distance from the null is no count.",
        "",
    ]
    return out


def _pairs_section(result: AtlasResult) -> list[str]:
    out = [
        "## Every pair",
        "",
        "Each operator's cell: R² (uniform) / R²_w (variance-weighted), test.",
        "",
        "| pair | α | " + " | ".join(operators()) + " | orthogonal Procrustes score | peer linearity (train, in "
        "sample) | ridge R²_w (test) | η (linear) | held-out size (null ± sd) |",
        "|---|---" + "|---" * (len(operators()) + 5) + "|",
    ]
    for p in result.pairs:
        ops = " | ".join(_both(p.operators[op]) for op in operators())
        out.append(
            f"| {p.pair} | {_f(p.alpha, '.3g')}{' (edge)' if p.alpha_at_edge else ''} | {ops} | "
            f"{_f(p.orthogonal_procrustes_score)} | {_f(p.peer_linearity)} | {_f(p.operators['ridge'].r2_weighted)} | "
            f"{_f(p.eta_test)} ({_f(p.eta_expected)}) | {p.heldout_subspace_size:.0f} "
            f"({_f(p.heldout_subspace_size_null, '.0f')} ± {_f(p.heldout_subspace_size_null_std, '.0f')}) |"
        )
    return [*out, "", *_peer_reading(result.budget.n_train_tokens, result.d_model), ""]


def _peer_reading(n_train: float, d: int) -> list[str]:
    return [
        "**How to read the linearity scores.** *Peer linearity* is Razzhigaev et al.'s score as their code "
        "(`llm-microscope`, `procrustes_similarity`) computes it: centre both layers, scale each to unit Frobenius "
        "norm, fit an unconstrained least-squares map and report 1 − its residual, i.e. the in-sample R²_w of "
        f"an ordinary linear map with intercept, here on the atlas's {n_train:,.0f} train tokens (d = {d}). In "
        "sample the fit takes part of its own noise for signal, raising R² by about (1 − R²)·d/n, and it reaches 1 "
        "whenever n ≤ d + 1: the literature's ≈ 0.99 is this in-sample number on samples small beside d, so it "
        "says how well a map fits its own rows, not that a map carries 99 % of the next layer. Compare it only "
        "at the same n; the ridge map's R²_w on test is the number that generalises. The *orthogonal Procrustes "
        "score* 2‖ÃᵀB̃‖_* − 1 is the same rows fitted by a scaled rotation only (no stretching): how far the "
        "layer change is a rigid motion; it is not the number the peer's code reports."
    ]


def _jacobian_section(result: AtlasResult) -> list[str]:
    probed = [p for p in result.pairs if p.local is not None]
    if not probed:
        return []
    r = probed[0].local.directions if probed[0].local else 0
    first = probed[0].local
    sequences = first.n_probe_sequences if first else 0
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
        f"### Its noise over {sequences} sequences, and the response to earlier positions",
        "",
        "| pair | ‖(W−E[J])V‖/‖WV‖ | noise (sequences as unit) | sequences for noise ≤ gap/2 | "
        "‖E[J_{t,t−ℓ}]V‖/‖E[J_tt]V‖, ℓ = 1… (noise) |",
        "|---|---|---|---|---|",
        *(_sequence_row(p.pair, p.local) for p in probed if p.local),
        "",
        *_jacobian_reading(),
    ]
    return out


def _sequence_row(pair: str, g: LocalGlobal) -> str:
    lags = ", ".join(f"{_f(v)} ({_f(e)})" for v, e in zip(g.lag_response, g.lag_noise)) or "—"
    return f"| {pair} | {_f(g.rel_diff)} | {_f(g.sequence_noise)} | {_f(g.sequences_for_gap, '.0f')} | {lags} |"


def _jacobian_reading() -> list[str]:
    return [
        "**How to read.** Stein's lemma with positions reads Cov(y_t, x_s) = Σ_u E[J_tu] Cov(x_u, x_s): "
        "the residuals of a sequence's positions are correlated, so the same-position slope W also carries "
        "what earlier positions send to t (W ≈ E[J_tt] + Σ_ℓ E[J_{t,t−ℓ}] Cov(x_{t−ℓ}, x_t) Σ⁻¹). A gap "
        "between W and E[J_tt] therefore arises even for a linear model, from correlated positions alone; "
        "comparing W with E[J_tt] is an approximation, exact only when the blocks do not mix positions or "
        "positions are uncorrelated. The right counterpart of E[J_{t,t−ℓ}] is the lagged context map's W_ℓ "
        "(`ato context`); the last table's lag responses say how far the blocks reach back. Only beyond "
        "that, a gap needs non-Gaussian inputs and non-linear computation. Read the gap against its noise "
        "with sequences as the unit (tokens of one sequence are not independent; the signs' and tokens' "
        "columns above are lower bounds): where the noise exceeds gap/2, the probe averaged too few "
        "sequences for the gap (`atlas.jacobian_sequences`; the column says how many would do, SE ∝ "
        "1/√sequences). A lag response whose noise exceeds half of it is not resolved: on the default "
        "run's six pairs 2 sequences resolve the gap but not the lag responses, which take ≈ 5–60 "
        "(docs/statistics.md#jacobian-noise). The second column divides by the computed part (W − I) "
        "only. Token variation ≈ 0 means one linear map is the local map everywhere; values ≥ 1 mean the "
        "local linear regime is narrower than the data. The three R²_w columns: how much of y the "
        "per-token linearisation explains, beside the global map.",
        "",
    ]


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
