"""The stage table: the one hand-kept description of the DVC pipeline. Per stage (in run order) the
artifacts it reads, the params it reads, and what it writes; whether it runs per pair comes from
`ato.cli.STAGES`.
Module deps are not listed here: `ato.generate.dvc_yaml` adds each stage's import closure. Paths are
templated from params.yaml's `paths` (`${paths.…}`) and `${key}` is the pair of a per-pair stage.
A note is written beside its line in dvc.yaml as a comment (why the entry is there)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    path: str  # a path (deps, outs) or a params key
    note: str = ""  # why it is there; a comment in dvc.yaml
    options: dict[str, str | bool] = field(default_factory=dict)  # DVC's per-output flags (cache, x, y…)


@dataclass(frozen=True)
class Stage:
    name: str  # `ato <name>`, and the dvc stage name (per pair, `foreach: ${pairs}`, where ato.cli says so)
    deps: list[Entry]  # artifacts it reads (its module deps are generated)
    params: list[Entry]  # every params key it reads (tests/test_dvc_pipeline.py records them)
    outs: list[Entry] = field(default_factory=list)
    metrics: list[Entry] = field(default_factory=list)
    plots: list[Entry] = field(default_factory=list)
    does: str = ""  # README's stage table: what it does (markdown)
    output: str = ""  # README's stage table: where its output lands (markdown)


def _e(path: str, note: str = "", **options: str | bool) -> Entry:
    return Entry(path, note, options)


def _report(path: str, note: str = "", **options: str | bool) -> Entry:
    """A report file or folder: small, kept in git, not in the DVC cache."""
    return Entry(path, note, {"cache": False, **options})


R = "${paths.reports}"
MODEL_LABEL = _e("prepare", "the model label of the MLflow runs (ato.artifacts.model.model_label)")
PATHS = _e("paths")
VALIDATED = _e(f"{R}/validation/validation.json", "only validated data reaches the fits")
STORE_TEST_TOKENS = _e("${paths.store}", "test-split token arrays + manifest only")


def _pair_stats(*splits: str) -> list[Entry]:
    return [_e(f"${{paths.stats}}/{split}/${{key}}.safetensors") for split in splits]


STAGES: list[Stage] = [
    Stage(
        "prepare",
        does=(
            "GGUF → float32 safetensors copy (loads in ~2 s instead of ~40 s), weights digest, the token every sequence"
            " begins with (`prepare.sequence_start`)"
        ),
        output="`models/base/`",
        deps=[],
        params=[_e("prepare"), _e("paths", "every path: `Layout.from_params` resolves them all")],
        outs=[_e("${paths.model_dir}")],
    ),
    Stage(
        "collect",
        does=(
            "residual after every decoder block (forward hooks; raw, not HF's post-norm last state) for 64k/16k/24k "
            "train/val/test tokens, split by document"
        ),
        output="`data/activations/` (zarr v3)",
        deps=[_e("${paths.model_dir}")],
        params=[_e("corpus"), _e("collect"), _e("pairs"), PATHS],
        outs=[
            _e("${paths.store}", "complete parts survive an interrupted run; collect resumes from them", persist=True)
        ],
    ),
    Stage(
        "validate",
        does=(
            "per-part, per-layer statistics + great-expectations suite (NaN/Inf, zero rows, shapes, counts, document "
            "overlap, norm band)"
        ),
        output="`reports/validation/`",
        deps=[_e("${paths.store}")],
        params=[_e("validate"), _e("stats.chunk_tokens"), MODEL_LABEL, PATHS],
        outs=[
            _report(f"{R}/validation/{name}")
            for name in ("validation.json", "validation.md", "stats.csv", "parts.csv", "splits.csv", "metrics.json")
        ],
    ),
    Stage(
        "stats",
        does="float64 sufficient statistics (n, Σx, Σy, XᵀX, XᵀY, YᵀY) per pair and split, one streaming pass",
        output="`data/stats/`",
        deps=[_e("${paths.store}"), VALIDATED],
        params=[_e("stats"), _e("pairs"), PATHS],
        outs=[_e("${paths.stats}")],
    ),
    Stage(
        "tune",
        does="Optuna (TPE, seeded) over the ridge α; objective = exact validation R² from the statistics",
        output="`reports/tuning/`",
        deps=[*_pair_stats("train", "val"), _e("${paths.store}/manifest.json")],
        params=[_e("tune"), _e("pairs.${key}"), _e("stats.include_bos"), MODEL_LABEL, PATHS],
        outs=[_report(f"{R}/tuning/${{key}}.json"), _report(f"{R}/tuning/${{key}}_alpha.png")],
        plots=[
            _report(
                f"{R}/tuning/${{key}}_curve.csv",
                x="alpha",
                y="val_r2",
                x_label="ridge penalty α (log scale in the PNG)",
                y_label="validation R²",
            )
        ],
    ),
    Stage(
        "fit",
        does="refit at the chosen α; safetensors + config.json; MLflow run + model registry",
        output="`models/operators/<pair>/`",
        deps=[
            *_pair_stats("train", "val"),
            _e("${paths.stats}/test/${key}.safetensors", "every operator and variant is scored on test too"),
            _e(f"{R}/tuning/${{key}}.json"),
            _e("${paths.store}/manifest.json"),
            _e("${paths.model_dir}", "the embedding fingerprint in config.json (ato.splice recognises the model)"),
        ],
        params=[
            _e("fit"),
            _e("tune.standardize", "the operator's coordinates"),
            _e("pairs.${key}"),
            _e("stats.include_bos"),
            MODEL_LABEL,
            PATHS,
        ],
        outs=[_e("${paths.operators}/${key}")],
    ),
    Stage(
        "sae",
        does=(
            "one TopK SAE per target layer, trained with sae-lens' `SAETrainer` on the store's train split plus further"
            " train documents streamed through the model up to the deepest target layer; quality on val (FVE, L0, "
            "dead/dense latents, CE-loss recovered and KL with the reconstruction spliced in) against gates that mark "
            "feature-level numbers unreliable ([SAEs](#saes))"
        ),
        output="`models/sae/layer_NN/`, `reports/sae/`",
        deps=[
            _e("${paths.store}"),
            _e("${paths.model_dir}"),
            _e(f"{R}/validation/validation.json"),
            _e("${paths.stats}/train", "ȳ_train of each target layer (mean ablation, as in causal_reference)"),
        ],
        params=[_e("sae"), _e("corpus"), _e("pairs"), PATHS],
        outs=[_e("${paths.sae_dir}"), _report(f"{R}/sae")],
    ),
    Stage(
        "select",
        does=(
            "per target layer, the sparse, coherent, focused, non-redundant SAE features that matter to the model: "
            "activation-rate band around mean L0/d_sae, token entropy, vocabulary focus, decoder redundancy, exact "
            "single-feature ablation (KL) of the best 128 candidates → 26 kept ([Feature "
            "selection](#feature-selection))"
        ),
        output="`data/features/`, `reports/select/`",
        deps=[_e("${paths.sae_dir}"), _e("${paths.model_dir}"), _e("${paths.store}")],
        params=[_e("select"), _e("pairs"), PATHS],
        outs=[
            _e("${paths.features}"),
            _report(f"{R}/select", "nested summaries (lists), so an output rather than a DVC metric"),
        ],
    ),
    Stage(
        "evaluate",
        does=(
            "R² (uniform, variance-weighted, per-dimension), baselines, feature-space R², transported vs synthesised, "
            "CCA ceiling, transport efficiency η(r) and its learning curve over train subsets, subspace size"
        ),
        output="`reports/metrics/<pair>.json`, figures",
        deps=[
            _e("${paths.operators}/${key}"),
            _e("${paths.sae_dir}"),
            _e("${paths.features}"),
            *_pair_stats("train", "val", "test"),
            _e("${paths.store}"),
        ],
        params=[
            _e("evaluate"),
            _e("pairs.${key}"),
            _e("stats.include_bos"),
            _e("stats.chunk_tokens"),
            _e("report.dpi"),
            MODEL_LABEL,
            PATHS,
        ],
        outs=[
            _report(f"{R}/evaluate/${{key}}/features.csv"),
            _report(f"{R}/evaluate/${{key}}/transport.json"),
            _report(f"{R}/figures/${{key}}_efficiency.png"),
            _report(f"{R}/figures/${{key}}_feature_r2.png"),
            _report(f"{R}/figures/${{key}}_dim_r2.png"),
            _report(f"{R}/metrics/${{key}}.json"),
        ],
        plots=[
            _report(
                f"{R}/evaluate/${{key}}/efficiency.csv",
                x="rank",
                y="eta_rrr_test",
                x_label="rank r",
                y_label="transport efficiency",
                title="${key} transport efficiency (reduced-rank map, test)",
            )
        ],
    ),
    Stage(
        "context",
        does=(
            "carried, moved or computed: maps reading layer L at positions s ≤ t (lagged, prefix mean, routed by the "
            "model's own attention patterns) beside the same-position ATO, from one forward pass per split; the "
            "variance budget per pair with document-bootstrap intervals, p/n, learning-curve extrapolation and the "
            "CCA ceiling of the context inputs"
        ),
        output="`reports/context/<pair>.json`, `models/context/<pair>/`",
        deps=[
            _e("${paths.store}", "the token arrays of every split (no residuals) + manifest"),
            VALIDATED,
            _e("${paths.stats}/train", "fill: each pair's train mean of layer L (mean_x)"),
            _e("${paths.model_dir}", "the forward pass: residuals and attention patterns"),
        ],
        params=[_e("context"), _e("pairs"), MODEL_LABEL, PATHS],
        outs=[
            _e("${paths.context_operators}", "per pair: context.safetensors + config.json"),
            _report(f"{R}/context"),
        ],
    ),
    Stage(
        "causal_reference",
        does=(
            "clean, zero- and mean-ablation log-perplexity of the held-out test sequences, once per target layer L+k "
            "(shared by the pairs with that target)"
        ),
        output="`reports/causal/reference/`",
        deps=[
            _e("${paths.model_dir}"),
            STORE_TEST_TOKENS,
            _e("${paths.stats}/train", "ȳ_train of each target layer (mean ablation)"),
        ],
        params=[_e("causal"), _e("pairs"), PATHS],
        outs=[_report(f"{R}/causal/reference", "layer_NN.json per target layer L+k, shared by its pairs")],
    ),
    Stage(
        "causal",
        does=(
            "log-perplexity under patching by the ATO, identity, bias-only, mean-update and context maps, against the "
            "shared clean / zero / mean-ablation references; Δ and recovered share with studentized intervals over "
            "sequences"
        ),
        output="`reports/causal/<pair>.json`, figures",
        deps=[
            _e("${paths.operators}/${key}"),
            _e("${paths.context_operators}/${key}", "the union context map spliced as condition `context`"),
            _e("${paths.stats}/train/${key}.safetensors", "x̄_train, ȳ_train: the mean update's shift"),
            _e("${paths.model_dir}"),
            STORE_TEST_TOKENS,
            _e(f"{R}/causal/reference"),
        ],
        params=[_e("causal"), _e("report.dpi"), _e("pairs.${key}"), MODEL_LABEL, PATHS],
        outs=[_report(f"{R}/causal/${{key}}_sequences.json"), _report(f"{R}/causal/${{key}}.json")],
        plots=[_report(f"{R}/figures/${{key}}_causal.png")],
    ),
    Stage(
        "languages",
        does=(
            "the English operators on French and Spanish text (the embedded package's other languages, streamed through"
            " the model into statistics): R² and R²_w (split by variance), canonical tracking, feature R², causal Δ"
            " beside each language's own map, a pooled map and the identity; transfer matrix and update-subspace"
            " overlaps of the per-language maps"
        ),
        output="`reports/languages/`, `reports/figures/languages_*.png`",
        deps=[
            _e("${paths.model_dir}"),
            _e(
                "${paths.store}",
                "the reference language's rows (first languages.fit_tokens / test_tokens of train / test)",
            ),
            _e("${paths.operators}", "every pair's English operator"),
            _e("${paths.sae_dir}"),
            _e("${paths.features}"),
        ],
        params=[
            _e("languages"),
            _e("corpus", "the split rule, max_length, packing of every language; corpus.language names the reference"),
            _e("pairs"),
            _e("stats.include_bos"),
            _e("stats.chunk_tokens"),
            _e("evaluate.min_active_tokens"),
            _e("evaluate.transported_r2"),
            _e("causal.interval"),
            _e("causal.bootstrap_resamples"),
            _e("causal.seed"),
            _e("causal.loss_chunk_tokens"),
            _e("report.dpi"),
            MODEL_LABEL,
            PATHS,
        ],
        outs=[
            _report(f"{R}/languages/transfer.json"),
            _report(f"{R}/figures/languages_overlap.png"),
            _report(f"{R}/languages/metrics.json"),
        ],
        plots=[
            _report(
                f"{R}/languages/scores.csv",
                template="bar_horizontal",
                x="r2_operator",
                y="language",
                x_label="residual R² of the English operator (test)",
                y_label="language",
                title="English operators on other languages",
            ),
            _report(f"{R}/figures/languages_transfer.png"),
            _report(f"{R}/figures/languages_scores.png"),
        ],
    ),
    Stage(
        "atlas",
        does=(
            "every stored layer pair (L, L + k), k ≤ 4, from one joint float64 Gram pass over the first 32k/8k "
            "train/test tokens: identity, Procrustes (plain, centred), ridge, reduced-rank and the model's mean "
            "Jacobian scored side by side; η and the held-out subspace size beside their references; E[J] vs the ridge "
            "map; causal Δ on a few pairs"
        ),
        output="`reports/atlas/`, `data/atlas/maps.safetensors`",
        deps=[
            _e("${paths.store}", "the first atlas.tokens tokens of train and test, every stored layer"),
            VALIDATED,
            _e("${paths.model_dir}", "the mean Jacobian and the causal passes"),
        ],
        params=[_e("atlas"), _e("stats.include_bos"), _e("report.dpi"), MODEL_LABEL, PATHS],
        outs=[
            _e("${paths.atlas}", "maps.safetensors: every atlas pair's ridge map (reused by other analyses)"),
            *(_report(f"{R}/atlas/{name}") for name in ("atlas.json", "atlas.md", "pairs.csv", "metrics.json")),
        ],
        plots=[_report(f"{R}/atlas/figures", "heatmaps.png, operators.png, spectra.png")],
    ),
    Stage(
        "report",
        does=(
            "every pair side by side: tables, heatmaps over (L, k), η(r) and ceiling(r) per k, η's learning curves, "
            "causal Δ with CIs, α curves; feature cards (top contexts, rate, verdict and feature R² per kept "
            "feature); every feature-level number of an SAE that missed its gates marked UNRELIABLE; a missing "
            "pair output is listed, not fatal"
        ),
        output="`reports/summary.md`, `reports/features.html`, `reports/figures/summary_*.png`, `reports/plots/`",
        deps=[
            *(_e(f"{R}/{name}") for name in ("metrics", "evaluate", "causal", "tuning", "sae")),
            _e("${paths.features}"),
        ],
        params=[
            _e("report"),
            _e("pairs"),
            MODEL_LABEL,
            _e("stats.include_bos"),
            _e("evaluate.transported_r2"),
            _e("evaluate.min_active_tokens"),
            _e("evaluate.subspace_fraction"),
            _e("evaluate.null_replicates"),
            PATHS,
        ],
        outs=[_report(f"{R}/summary.md"), _report(f"{R}/features.html"), _report(f"{R}/plots")],
        metrics=[_report(f"{R}/headline.json")],
        plots=[
            _report(f"{R}/figures/summary_{name}.png")
            for name in ("heatmaps", "efficiency", "causal", "alpha", "learning_curve")
        ],
    ),
]

# dvc.yaml's top-level plots, written as they stand.
COMPARISON_PLOTS = """\
# Comparison plots over all pairs (`dvc plots show`, `dvc plots diff`). The curves are long-format CSVs
# with a `pair` column that the project's template .dvc/plots/pairs.json colours by, so they follow
# `pairs:` without an edit here.
plots:
  - efficiency:
      template: pairs
      x: log10_rank
      y:
        reports/plots/efficiency.csv: eta_rrr_test
      x_label: log10 rank r
      y_label: η(r), reduced-rank map (test)
      title: Transport efficiency per pair
  - ceiling:
      template: pairs
      x: log10_rank
      y:
        reports/plots/efficiency.csv: ceiling
      x_label: log10 rank r
      y_label: CCA ceiling(r) (train)
      title: CCA ceiling per pair
  - alpha:
      template: pairs
      x: log10_alpha
      y:
        reports/plots/alpha.csv: val_r2
      x_label: log10 ridge penalty α
      y_label: validation R²
      title: α → validation R² per pair
  - residual_r2:
      template: bar_horizontal
      x: r2
      y:
        reports/plots/summary.csv: pair
      x_label: residual R² (test)
      y_label: pair
      title: Residual R² per pair
  - transported_fraction:
      template: bar_horizontal
      x: transported_fraction
      y:
        reports/plots/summary.csv: pair
      x_label: transported fraction
      y_label: pair
      title: Transported SAE features per pair
  - causal_ato_delta:
      template: bar_horizontal
      x: causal_ato_delta
      y:
        reports/plots/summary.csv: pair
      x_label: Δ log-ppl of the ATO patch (nats/token)
      y_label: pair
      title: Causal cost per pair
"""
