"""Stage `languages`: does linear transport carry across languages?

The English-fitted operators (`models/operators/<pair>`) are scored on French and Spanish text (the
embedded package's other languages, `languages.sources`) beside each language's own ridge map (fitted
at the English α on the same number of tokens), a map pooled over all languages, and the identity:
residual R² (uniform and variance-weighted), η beside an exactly linear map's, feature-space R² along the
target layer's kept SAE features (flagged when the SAE failed its quality gates), and causal Δ
log-perplexity with intervals over sequences beside mean ablation. The per-language maps are compared
by their transfer matrix and by the overlap of their update subspaces, beside the same language's
split-half overlap and random subspaces (`ato.languages`, `ato.math.transfer`,
docs/method.md#languages).

Other languages' residuals are streamed through the model with the collect hooks into float64
statistics; nothing large is written. The reference language is read from the activation store.

Outputs: `LanguageReport` (reports/languages/transfer.json), metrics.json (numbers only), scores.csv
(DVC plots), figures languages_{transfer, overlap, scores}.png; one MLflow child run `languages`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ato.artifacts import (
    LanguageReport,
    Layout,
    SaeInfo,
    atomic_group,
    write_csv_atomic,
    write_json_atomic,
)
from ato.artifacts.languages import SCORE_COLUMNS, score_rows
from ato.causal.summary import LEVEL
from ato.evaluate.features import load_sae_features
from ato.languages import (
    Inputs,
    LanguagesError,
    fit_pair,
    fit_statistics,
    language_causal,
    language_source,
    language_texts,
    pair_transfer,
    sae_notes,
    test_statistics,
)
from ato.params import Params
from ato.store import ActivationStore

log = logging.getLogger(__name__)

__all__ = ["LanguagesError", "main"]


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
        notes=sae_notes(inputs),
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
    from ato.lm_head import set_lm_head_dtype
    from ato.models import load_prepared, resolve_device
    from ato.operators import load_operator

    store = ActivationStore.open(layout.store)
    pairs = {name: (p.L, p.target) for name, p in params.pairs.items()}
    store.require_layers(sorted({layer for lt in pairs.values() for layer in lt}), "languages")
    model, tokenizer, info = load_prepared(layout.model_dir, str(resolve_device(params.languages.device)))
    set_lm_head_dtype(model, params.languages.lm_head_dtype)
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


# --------------------------------------------------------------------------------------------
# Outputs


def write_outputs(layout: Layout, params: Params, report: LanguageReport) -> list[Path]:
    from ato.plotting.languages import plot_overlap, plot_scores, plot_transfer

    dpi = params.report.dpi
    with atomic_group():  # the record, metrics, table and figures (two directories), or none
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
                f"{lang} R² (R²_w) op {s.r2_operator:.3f} ({s.r2w_operator:.3f}) / own {s.r2_own:.3f} "
                f"({s.r2w_own:.3f}) / id {s.r2_identity:.3f} ({s.r2w_identity:.3f}), "
                f"Δ op {s.delta_operator.mean:+.3f} ± {s.delta_operator.half_width:.3f}"
            )
        log.info("languages %s: %s", name, "; ".join(parts))
    log.info("languages: %d pairs × %d languages in %.0f s", len(report.pairs), len(report.languages), report.seconds)
