"""Stage `languages`: does linear transport carry across languages?

The English-fitted operators (`models/operators/<pair>`) are scored on French and Spanish text (the
embedded package's other languages, `languages.sources`) beside each language's own ridge map (fitted
at the English α on the same number of tokens), a map pooled over all languages, and the identity:
residual R² (uniform and variance-weighted), η beside an exactly linear map's, feature-space R² along the
target layer's kept SAE features (flagged when the SAE failed its quality gates), and causal Δ
log-perplexity with intervals over sequences beside mean ablation. The per-language maps are compared
by their transfer matrix and by the overlap of their update subspaces, beside the same language's
split-half overlap and random subspaces (`ato.crosslingual`, `ato.math.transfer`,
docs/method.md#languages).

Other languages' residuals are streamed through the model with the collect hooks into float64
statistics; nothing large is written. The reference language is read from the activation store.

Outputs: `LanguageReport` (reports/languages/transfer.json), metrics.json (numbers only), scores.csv
(DVC plots), figures languages_{transfer, overlap, scores}.png; one MLflow child run `languages`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ato.artifacts import (
    IntervalScore,
    LanguageReport,
    LanguageScores,
    LanguageSource,
    Layout,
    PairTransfer,
    SaeInfo,
    write_csv_atomic,
    write_json_atomic,
)
from ato.artifacts.languages import SCORE_COLUMNS, score_rows
from ato.corpus import Corpus, CorpusError, TokenSequence
from ato.crosslingual import (
    FeatureScorer,
    HalfStats,
    LanguagesError,
    Map,
    PairFits,
    TestPass,
    causal_sequences,
    causal_sums,
    eta_scores,
    feature_summary,
    fit_pair,
    forward_chunks,
    held_out,
    language_corpus,
    overlap_tables,
    split_sequences,
    store_chunks,
    test_pass,
)
from ato.math.intervals import Interval, delta_interval, recovered_interval
from ato.math.ridge import r2_from_stats
from ato.math.stats import PairStats
from ato.math.transfer import input_metric, pooled, transfer_matrix
from ato.params import CorpusParams, Params, section_dict
from ato.patching import LEVEL
from ato.scoring import SaeFeatures, load_sae_features
from ato.store import ActivationStore

log = logging.getLogger(__name__)

__all__ = ["LanguagesError", "main"]


@dataclass
class Inputs:
    store: ActivationStore
    model: Any
    tokenizer: Any
    pairs: dict[str, tuple[int, int]]  # name → (L, L + k)
    operators: dict[str, Map]
    operator_alpha: dict[str, float]
    operator_tokens: dict[str, float]
    features: dict[int, SaeFeatures]
    sae_info: dict[int, SaeInfo]  # target layer → its SAE's quality record


@dataclass
class Text:
    """One language's text: fit and test sequences (None: read from the store) and causal sequences."""

    source: str
    fit: list[TokenSequence] | None
    test: list[TokenSequence] | None
    causal: list[TokenSequence]


def main(params: Params) -> LanguageReport:
    t0 = time.perf_counter()
    lp, layout = params.languages, Layout.from_params(params)
    inputs = load_inputs(params, layout)
    texts = language_texts(params, inputs.tokenizer)
    languages = list(texts)
    fit = {lang: fit_statistics(params, inputs, lang, text) for lang, text in texts.items()}
    fits = {
        name: fit_pair(
            {lang: fit[lang].pair(name) for lang in languages},
            inputs.operator_alpha[name],
            inputs.operator_tokens[name],
            lp.alpha_scaling,
        )
        for name in inputs.pairs
    }
    log.info("languages: statistics and per-language maps in %.0f s", time.perf_counter() - t0)
    tests = {lang: test_statistics(params, inputs, lang, text, fits) for lang, text in texts.items()}
    causal = {lang: language_causal(params, inputs, fit[lang], text, fits, lang) for lang, text in texts.items()}
    log.info("languages: test pass and causal check done at %.0f s", time.perf_counter() - t0)
    pairs = {
        name: pair_transfer(params, inputs, name, languages, fit, fits[name], tests, causal) for name in inputs.pairs
    }
    report = LanguageReport(
        reference=params.corpus.language,
        languages=languages,
        sources={lang: language_source(text, fit[lang], tests[lang], causal[lang]) for lang, text in texts.items()},
        pairs=pairs,
        alpha_scaling=lp.alpha_scaling,
        overlap_rank=lp.overlap_rank,
        shared_threshold=lp.shared_threshold,
        causal_seq_len=lp.causal_seq_len,
        causal_scope="after",
        interval_method=params.causal.interval,
        interval_level=LEVEL,
        seconds=time.perf_counter() - t0,
        notes=_notes(inputs),
    )
    paths = write_outputs(layout, params, report)
    _log_mlflow(params, report, paths, inputs)
    _log_summary(report)
    return report


# --------------------------------------------------------------------------------------------
# Inputs


def load_inputs(params: Params, layout: Layout) -> Inputs:
    """Store, model, every pair's operator (checked against both) and each target layer's SAE features,
    all before the first forward pass."""
    from ato.models import load_prepared, resolve_device
    from ato.operators import load_operator

    store = ActivationStore.open(layout.store)
    pairs = {name: (p.L, p.target) for name, p in params.pairs.items()}
    store.require_layers(sorted({layer for lt in pairs.values() for layer in lt}), "languages")
    model, tokenizer, info = load_prepared(layout.model_dir, str(resolve_device(params.languages.device)))
    operators, alphas, tokens = {}, {}, {}
    for name, (L, T) in pairs.items():
        expect = {"model_digest": info.weights_digest, "d_model": info.d_model, "layer_in": L, "layer_out": T}
        op = load_operator(layout.operator(name), expect={**expect, "store_digest": store.digest})
        operators[name] = (op.W.double().numpy(), op.b.double().numpy())
        alphas[name] = float(op.config.alpha)
        tokens[name] = float(op.config.n_train_tokens)
    targets = sorted({T for _L, T in pairs.values()})
    features = {T: load_sae_features(layout.sae(T), layout.feature_set(T), T, store.d_model) for T in targets}
    sae_info = {T: SaeInfo.read(layout.sae_info(T)) for T in targets}
    return Inputs(store, model, tokenizer, pairs, operators, alphas, tokens, features, sae_info)


def language_texts(params: Params, tokenizer: Any) -> dict[str, Text]:
    """Reference language first (fit/test from the store), then `languages.sources` in order."""
    lp = params.languages
    reference = CorpusParams(**section_dict(params.corpus))
    n_causal, seq_len = lp.causal_sequences, lp.causal_seq_len
    ref_corpus = Corpus(reference, params.root)
    texts = {
        reference.language: Text(
            "store", None, None, causal_sequences(ref_corpus, tokenizer, n_causal, seq_len, reference.language)
        )
    }
    for lang, source in lp.sources.items():
        try:
            corpus = Corpus(language_corpus(reference, lang, source, lp.fit_tokens, lp.test_tokens), params.root)
        except CorpusError as exc:  # it names corpus.*; the user wrote languages.sources
            raise LanguagesError(f"languages.sources.{lang} = {source!r}: {exc}") from None
        texts[lang] = Text(
            source,
            split_sequences(corpus, tokenizer, "train", lang),
            split_sequences(corpus, tokenizer, "test", lang),
            causal_sequences(corpus, tokenizer, n_causal, seq_len, lang),
        )
    return texts


# --------------------------------------------------------------------------------------------
# Streams


def _chunks(params: Params, inputs: Inputs, text: Text, split: str, lang: str) -> Any:
    layers = sorted({layer for lt in inputs.pairs.values() for layer in lt})
    lp = params.languages
    if text.fit is None:  # the reference language: the store's own split
        budget = lp.fit_tokens if split == "train" else lp.test_tokens
        return store_chunks(inputs.store, split, layers, budget, params.stats.chunk_tokens)
    seqs = text.fit if split == "train" else text.test
    assert seqs is not None
    pad = inputs.tokenizer.pad_token_id if inputs.tokenizer.pad_token_id is not None else 0
    return forward_chunks(inputs.model, seqs, layers, pad, lp.batch_size, f"languages {lang} {split}")


def fit_statistics(params: Params, inputs: Inputs, lang: str, text: Text) -> HalfStats:
    acc = HalfStats(inputs.pairs, inputs.store.d_model, params.stats.include_bos)
    for chunk in _chunks(params, inputs, text, "train", lang):
        acc.update(chunk)
    return acc


def test_statistics(params: Params, inputs: Inputs, lang: str, text: Text, fits: dict[str, PairFits]) -> TestPass:
    maps = {name: {"operator": inputs.operators[name], "own": fits[name].own[lang]} for name in inputs.pairs}
    scorer = FeatureScorer(inputs.features, inputs.pairs, maps)
    chunks = _chunks(params, inputs, text, "test", lang)
    return test_pass(chunks, inputs.pairs, inputs.store.d_model, scorer, params.stats.include_bos)


def language_causal(
    params: Params, inputs: Inputs, fit: HalfStats, text: Text, fits: dict[str, PairFits], lang: str
) -> dict[str, dict[str, np.ndarray]]:
    """Per-sequence NLL sums of the causal check on this language's sequences."""
    maps = {name: {"operator": inputs.operators[name], "own": fits[name].own[lang]} for name in inputs.pairs}
    means = {T: fit.pair(name)[0].mean_y for name, (_L, T) in inputs.pairs.items()}
    cp = params.causal
    return causal_sums(
        inputs.model,
        held_out(text.causal),
        inputs.pairs,
        maps,
        means,
        params.languages.batch_size,
        cp.loss_chunk_tokens,
        params.languages.causal_own,
    )


# --------------------------------------------------------------------------------------------
# Assembling the record


def _interval(iv: Interval) -> IntervalScore:
    return IntervalScore(iv.estimate, iv.low, iv.high, iv.half_width)


def causal_scores(sums: dict[str, np.ndarray], params: Params) -> dict[str, Any]:
    cp = params.causal
    kw: dict[str, Any] = {"level": LEVEL, "method": cp.interval, "n_resamples": cp.bootstrap_resamples, "seed": cp.seed}
    clean, count = sums["clean"], sums["count"]
    rec = recovered_interval(sums["operator"], sums["mean"], clean, **kw)
    missing = IntervalScore(math.nan, math.nan, math.nan, math.nan)  # the own map unpatched (languages.causal_own)
    return {
        **{
            f"delta_{c}": _interval(delta_interval(sums[c], clean, count, **kw)) if c in sums else missing
            for c in ("operator", "own", "mean")
        },
        "recovered": _interval(rec),
        "recovered_bounded": math.isfinite(rec.low) and math.isfinite(rec.high),
    }


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
    eta = eta_scores(whole, test.stats[name], {k: maps[k] for k in ("operator", "recentred", "own")})
    feats = {
        p: feature_summary(test.features[name][p], ev.min_active_tokens, ev.transported_r2)
        for p in ("operator", "own", "identity")
    }
    return LanguageScores(
        alpha=fits.alpha[lang],
        **residual,
        ceiling=eta["ceiling"],
        eta_operator=eta["eta_operator"],
        eta_recentred=eta["eta_recentred"],
        eta_own=eta["eta_own"],
        eta_expected=eta["eta_expected"],
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


def _notes(inputs: Inputs) -> list[str]:
    return [
        f"layer {T}: the SAE failed its quality gates ({'; '.join(info.gate_failures) or 'no gate result'}); "
        "feature-space R² of the pairs targeting it is unreliable"
        for T, info in sorted(inputs.sae_info.items())
        if not info.reliable
    ]


# --------------------------------------------------------------------------------------------
# Outputs


def write_outputs(layout: Layout, params: Params, report: LanguageReport) -> list[Path]:
    from ato.plotting.languages import plot_overlap, plot_scores, plot_transfer

    dpi = params.report.dpi
    report.write(layout.languages)
    write_json_atomic(layout.languages_metrics, report.metrics())
    table = write_csv_atomic(layout.languages_scores, SCORE_COLUMNS, score_rows(report))
    figures = [
        plot_transfer(layout.languages_figure("transfer"), report, dpi),
        plot_overlap(layout.languages_figure("overlap"), report, dpi),
        plot_scores(layout.languages_figure("scores"), report, dpi),
    ]
    return [layout.languages, layout.languages_metrics, table, *figures]


def _log_mlflow(params: Params, report: LanguageReport, artifacts: list[Path], inputs: Inputs) -> None:
    import mlflow

    from ato.tracking import RunContext, child_run, log_flat_metrics, sae_reliability_tags

    flat = {
        f"{pair}/{lang}/{key}": value
        for pair, by_lang in report.metrics().items()
        for lang, row in by_lang.items()
        for key, value in row.items()
    }
    with child_run(RunContext.from_params(params), "languages"):
        mlflow.set_tags({"ato.languages": ",".join(report.languages)})
        for T, info in inputs.sae_info.items():
            mlflow.set_tags(sae_reliability_tags(info.reliable, info.gate_failures, T))
        log_flat_metrics({**flat, "languages_seconds": report.seconds})
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="languages")


def _log_summary(report: LanguageReport) -> None:
    for name, pair in report.pairs.items():
        parts = []
        for lang in report.languages:
            s = pair.scores[lang]
            parts.append(
                f"{lang} R² op {s.r2_operator:.3f} / own {s.r2_own:.3f} / id {s.r2_identity:.3f}, "
                f"Δ op {s.delta_operator.mean:+.3f} ± {s.delta_operator.half_width:.3f}"
            )
        log.info("languages %s: %s", name, "; ".join(parts))
    log.info("languages: %d pairs × %d languages in %.0f s", len(report.pairs), len(report.languages), report.seconds)
