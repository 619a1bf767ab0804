"""Assembling the record: one language's scores on a pair, a pair's transfer across languages, each
language's source, and the notes on unreliable SAEs."""

from __future__ import annotations

from typing import Any

import numpy as np

from ato.artifacts import (
    LanguageScores,
    LanguageSource,
    PairTransfer,
)
from ato.languages.causal import causal_scores
from ato.languages.inputs import Inputs, Text
from ato.languages.maps import PairFits, overlap_tables, transfer_scores
from ato.languages.streams import HalfStats, TestPass, feature_summary
from ato.math.ridge import r2_from_stats
from ato.math.stats import PairStats
from ato.math.transfer import (
    input_metric,
    pooled,
    transfer_matrix,
)
from ato.params import Params


def language_scores(
    params: Params, inputs: Inputs, name: str, lang: str, whole: PairStats, test: TestPass, fits: PairFits, sums: Any
) -> LanguageScores:
    ev = params.evaluate
    W_op = inputs.operators[name][0]
    recentred = (W_op, whole.mean_y - W_op @ whole.mean_x)  # the English W, this language's intercept (fit rows)
    maps = {"operator": inputs.operators[name], "recentred": recentred, "own": fits.own[lang], "pooled": fits.pooled}
    d = whole.sum_y.shape[0]
    maps_all = {**maps, "identity": (np.eye(d), np.zeros(d))}
    r2 = {pred: r2_from_stats(test.stats[name], *m) for pred, m in maps_all.items()}
    residual: dict[str, Any] = {f"r2_{p}": float(r2[p]["r2"]) for p in maps_all}
    residual |= {f"r2w_{p}": float(r2[p]["r2_weighted"]) for p in maps_all}
    # the recentred map shares the operator's W, and tracking ignores intercepts: its tracking is the operator's
    transfer = transfer_scores(test.stats[name], {k: maps[k] for k in ("operator", "own")})
    feats = {
        p: feature_summary(test.features[name][p], ev.min_active_tokens, ev.transported_r2)
        for p in ("operator", "own", "identity")
    }
    return LanguageScores(
        alpha=fits.alpha[lang],
        **residual,
        tracking_operator=transfer["tracking_operator"],
        tracking_own=transfer["tracking_own"],
        top_directions=int(transfer["top_directions"]),
        r2w_top_operator=transfer["r2w_top_operator"],
        r2w_rest_operator=transfer["r2w_rest_operator"],
        r2w_top_own=transfer["r2w_top_own"],
        r2w_rest_own=transfer["r2w_rest_own"],
        feature_r2_operator=feats["operator"]["median"],
        feature_r2_own=feats["own"]["median"],
        feature_r2_identity=feats["identity"]["median"],
        transported_fraction_operator=feats["operator"]["transported_fraction"],
        transported_fraction_own=feats["own"]["transported_fraction"],
        n_judged_features=int(feats["operator"]["n_judged"]),
        **causal_scores(sums, params),
    )


def pair_transfer(
    params: Params,
    inputs: Inputs,
    name: str,
    languages: list[str],
    fit: dict[str, HalfStats],
    fits: PairFits,
    tests: dict[str, TestPass],
    causal: dict[str, dict[str, dict[str, np.ndarray]]],
) -> PairTransfer:
    from threadpoolctl import threadpool_limits

    lp, pair = params.languages, params.pairs[name]
    wholes = {lang: fit[lang].pair(name)[0] for lang in languages}
    # many medium (d = 640) decompositions: one BLAS thread each is ~10× faster than two on a busy 2-core machine
    with threadpool_limits(limits=1, user_api="blas"):
        scores = {
            lang: language_scores(params, inputs, name, lang, wholes[lang], tests[lang], fits, causal[lang][name])
            for lang in languages
        }
        matrix = transfer_matrix(
            [fits.own[lang] for lang in languages], [tests[lang].stats[name] for lang in languages]
        )
        metric = input_metric(pooled(list(wholes.values())))
        ov = overlap_tables(fits, languages, metric, lp.overlap_rank, lp.shared_threshold)
    return PairTransfer(
        L=pair.L,
        k=pair.k,
        alpha_operator=inputs.operator_alpha[name],
        n_operator_tokens=inputs.operator_tokens[name],
        feature_reliable=bool(inputs.sae_info[pair.target].reliable),
        scores=scores,
        transfer_r2=matrix["r2"].tolist(),
        transfer_r2_weighted=matrix["r2_weighted"].tolist(),
        overlap_write=ov.write.tolist(),
        overlap_read=ov.read.tolist(),
        shared_write=ov.shared_write.tolist(),
        shared_dimension=ov.shared_dimension,
        overlap_random=ov.random,
    )


def language_source(
    text: Text, fit: HalfStats, test: TestPass, sums: dict[str, dict[str, np.ndarray]]
) -> LanguageSource:
    first = next(iter(sums.values()))
    name = next(iter(fit.halves[0].pairs))
    return LanguageSource(
        source=text.source,
        n_fit_tokens=int(fit.pair(name)[0].n),
        n_test_tokens=int(test.stats[name].n),
        fit_documents=len(fit.documents),
        test_documents=test.documents,
        causal_sequences=len(text.causal),
        clean_logppl=float(first["clean"].sum() / first["count"].sum()),
    )


def sae_notes(inputs: Inputs) -> list[str]:
    return [
        f"layer {T}: the SAE failed its quality gates ({'; '.join(info.gate_failures) or 'no gate result'}); "
        "feature-space R² of the pairs targeting it is unreliable"
        for T, info in sorted(inputs.sae_info.items())
        if not info.reliable
    ]
