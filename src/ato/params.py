"""Typed parameters, one dataclass per `params.yaml` section.

Every stage reads its own section (plus `paths` and, where it works per pair, `pairs`).
Unknown keys, wrong types and impossible values raise `ParamsError` naming the key, before any
compute starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import AtoError

SPLITS = ("train", "val", "test")


class ParamsError(AtoError, ValueError):
    """A params file is malformed; the message names the key at fault."""


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class Paths:
    """Where every stage reads and writes; relative paths are relative to the project root."""

    model_dir: str = "models/base"  # float32 safetensors copy of the model + tokenizer
    store: str = "data/activations"  # activation store root (docs/contracts.md#store)
    stats: str = "data/stats"  # sufficient statistics per split and pair
    sae_dir: str = "models/sae"  # one sae-lens directory per target layer
    features: str = "data/features"  # ranked SAE feature ids per layer
    operators: str = "models/operators"  # one directory per (L, k)
    atlas: str = "data/atlas"  # atlas → the ridge map of every atlas pair (maps.safetensors)
    reports: str = "reports"
    mlflow_uri: str = "sqlite:///mlruns/mlflow.db"
    mlflow_artifacts: str = "mlruns/artifacts"
    mlflow_experiment: str = "ato"
    optuna_storage: str = "sqlite:///data/optuna.db"


@dataclass
class Pair:
    """One transport operator: residual after block `L` → residual after block `L + k`."""

    L: int
    k: int

    @property
    def name(self) -> str:
        return pair_name(self.L, self.k)

    @property
    def target(self) -> int:
        return self.L + self.k


@dataclass
class PrepareParams:
    """Stage `prepare`: where the model comes from."""

    source: str = "embedded"  # "embedded" (PyPI GGUF), an HF hub id, or a local directory
    gguf_file: str | None = None  # GGUF file name inside a local `source` directory, if any
    revision: str | None = None  # hub revision for an HF id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # the token every sequence begins with: "auto" = the one the tokenizer adds, else its document
    # separator (<|endoftext|>), else its eos; or a token of the vocabulary, e.g. "<|endoftext|>"
    sequence_start: str = "auto"


@dataclass
class CorpusParams:
    """Documents, their split by document, and tokenisation (read by `collect`)."""

    source: str = "embedded"  # "embedded" (Wikipedia leads), a .txt/.jsonl file or dir, or "hf:<dataset>"
    language: str = "en-us"  # embedded corpus language file
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"  # field holding the text in JSONL / HF records
    split_seed: int = 0
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    max_length: int = 128  # tokens per sequence, BOS included
    packing: bool = False  # pack documents into full-length rows instead of truncating each
    tokens: dict[str, int] = field(
        default_factory=lambda: {"train": 65536, "val": 16384, "test": 24576}
    )  # token budget per split (BOS and real tokens; padding is never counted)


@dataclass
class CollectParams:
    """Stage `collect`: residual capture into the activation store."""

    layers: list[int] | Literal["all"] = "all"
    batch_size: int = 8  # sequences per forward pass
    part_tokens: int = 8192  # tokens per store part (the unit of resumption)
    chunk_tokens: int = 2048  # zarr chunk rows inside a part's single shard
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage dtype of residuals


@dataclass
class ValidateParams:
    """Stage `validate`: thresholds for the great-expectations suite."""

    max_nan: int = 0
    max_inf: int = 0
    max_zero_row_fraction: float = 0.0
    min_mean_norm: float = 1e-3  # per layer and part
    max_mean_norm: float = 1e7
    max_abs_value: float = 1e8


@dataclass
class StatsParams:
    """Stage `stats`: streaming sufficient statistics per pair and split."""

    include_bos: bool = False  # BOS/special tokens are excluded from every fit and score by default
    chunk_tokens: int = 8192
    engine: Literal["local", "dask"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the local engine forms the float64 Grams
    dask_workers: int = 2
    dask_scheduler: str | None = None  # address of a running dask.distributed scheduler


@dataclass
class TuneParams:
    """Stage `tune`: Optuna search of the ridge penalty per pair."""

    alpha_min: float = 1e-3
    alpha_max: float = 1e7
    n_trials: int = 40
    seed: int = 0
    standardize: bool = False  # scale X per dimension before the penalty
    objective: Literal["val", "kfold"] = "val"  # exact val-split R², or blocked K-fold on train
    kfold: int = 5
    n_workers: int = 1  # worker processes sharing the RDB storage
    curve_points: int = 64  # α grid for the recorded α → R² curve


@dataclass
class FitParams:
    """Stage `fit`: refit at the chosen α, save, track, register."""

    method: Literal["ridge", "ols", "lasso", "elasticnet"] = "ridge"
    sklearn_subsample: int = 20000  # tokens for lasso/elastic-net (scikit-learn) fits
    sklearn_alpha: float = 1.0  # penalty for lasso/elastic-net (scikit-learn's scaling)
    l1_ratio: float = 0.5
    register: bool = True  # register in the MLflow model registry with alias `champion`
    alias: str = "champion"
    # operator variants saved beside the operator (<dir>/variants/<name>/) and registered as aliases
    # `@<name>`: rank<r> (reduced-rank regression), svd<r> (SVD-truncated), procrustes, identity
    variants: list[str] = field(default_factory=lambda: ["rank64", "svd64", "procrustes", "identity"])


@dataclass
class SaeGates:
    """Quality an SAE must reach on VAL tokens for feature-level numbers built on it to count as
    reliable (docs/method.md#features); a miss marks them unreliable, it does not stop the run."""

    min_fve: float = 0.80  # fraction of variance explained
    max_dead: float = 0.05  # fraction of latents never active on the VAL tokens
    min_ce_recovered: float = 0.90  # CE-loss recovered with the reconstruction spliced in
    ce_reference: Literal["zero", "mean"] = "zero"  # ablation the CE-loss recovered is measured against


@dataclass
class SaeParams:
    """Stage `sae`: pretrained (sae-lens release) or trained on TRAIN-split residuals."""

    source: Literal["train", "pretrained"] = "train"
    release: str = "gemma-scope-2b-pt-res-canonical"
    sae_id_template: str = "layer_{n}/width_16k/canonical"
    architecture: Literal["jumprelu", "topk"] = "topk"
    width: int = 1024  # latents
    k: int = 64  # active latents for TopK
    l1_coefficient: float = 5.0  # sparsity penalty for JumpReLU
    tokens: int = 131072  # distinct TRAIN tokens per target layer: the store's first, the rest streamed from the model
    forward_batch_size: int = 16  # sequences per forward pass when streaming SAE tokens
    steps: int = 800  # training steps (lr warm-up over the first 5 %, decay to 0 over the last 20 %)
    batch_tokens: int = 1024  # tokens per step
    lr: float = 1e-3
    seed: int = 0
    eval_sequences: int = 16  # VAL sequences for CE-loss recovered / KL (0: skip the downstream check)
    eval_seq_len: int = 64  # tokens per such sequence
    dense_threshold: float = 0.1  # a latent active on more than this fraction of VAL tokens counts as dense
    gates: SaeGates = field(default_factory=SaeGates)
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class SelectWeights:
    """Importance (≥ 0) of each selection criterion; its sign is fixed (README "Feature selection")."""

    rate_band: float = 1.0  # activation: rate inside select.rate_band around mean L0 / d_sae (+)
    token_entropy: float = 1.0  # coherence: entropy of its tokens / that of as many random tokens (lower is better)
    vocab_focus: float = 0.5  # logit-lens kurtosis of the decoder direction (+)
    redundancy: float = 1.0  # max |cos| with another live decoder row (lower is better)
    causal_effect: float = 1.0  # exact KL(clean ‖ ablated) per ablated activation, exact_budget candidates (+)


@dataclass
class SelectParams:
    """Stage `select`: feature selection criteria, the exact-ablation budget and the kept fraction."""

    keep_fraction: float = 0.025  # kept: round(keep_fraction · d_sae), ranked first among the exact_budget candidates
    weights: SelectWeights = field(default_factory=SelectWeights)
    rate_band: list[float] = field(default_factory=lambda: [0.1, 10.0])  # [lo, hi] × mean L0 / d_sae
    min_activation_rate: float = 1e-4  # below: not scored (ranked last)
    max_tokens: int = 16384  # tokens scored per layer
    causal_sequences: int = 32  # pool of held-out VAL sequences for the exact ablations
    exact_budget: int = 128  # best candidates by the other criteria whose exact ablation Δ enters the score
    exact_sequences: int = 1  # pool sequences each candidate is ablated in (those where it first fires earliest)
    causal_horizon: int | None = 8  # predictions scored after the first ablated activation (null: to the end)
    top_contexts: int = 5
    context_window: int = 8
    neuronpedia: bool = False  # fetch explanations online (never in the default run)
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EvaluateParams:
    """Stage `evaluate`: residual and feature-space scores, CCA ceiling, efficiency."""

    transported_r2: float = 0.5  # feature R² at or above this → transported
    min_active_tokens: int = 20  # fewer active test tokens → no verdict
    n_ranks: int = 24
    subspace_fraction: float = 0.9
    null_replicates: int = 8  # Wishart replicates of the subspace null and of η's linear reference (~1 s each
    # at d = 640); the null is independent x and y at the pair's n and d (docs/statistics.md#heldout)
    null_seed: int = 0  # seed of both simulations


@dataclass
class CausalParams:
    """Stage `causal`: perplexity under transport patching."""

    n_sequences: int = 144  # held-out test sequences; 144 keeps the 95 % half-width of Δ(ATO) ≤ 0.05 nats
    # on the k = 1 pairs (planned from a 160-sequence pilot: docs/statistics.md#intervals)
    seq_len: int = 64
    batch_size: int = 8
    position_sets: dict[str, list[int] | Literal["all"]] = field(
        default_factory=lambda: {"all": "all"}  # each further set costs as much as `all`
    )
    bootstrap_resamples: int = 2000
    interval: Literal["studentized_hull", "studentized", "t", "bca", "percentile"] = "studentized_hull"  # over
    # sequences; the default keeps ≥ 0.93 coverage at nominal 0.95 for skewed and heavy-tailed effects
    headline_reference: Literal["train_mean", "zero", "identity"] = "train_mean"  # "recovered" is measured
    # against this condition's damage (mean ablation by default: zero ablation is a degenerate reference)
    seed: int = 0
    loss_chunk_tokens: int = 256  # LM-head rows per chunk: bounds logits memory
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class LanguagesParams:
    """Stage `languages`: the English-fitted operators on other languages' text; per-language maps compared."""

    sources: dict[str, str] = field(
        default_factory=lambda: {"fr-fr": "embedded", "es-es": "embedded"}
    )  # language → text: `embedded` (the embedded package's summaries_<language>.json) or a .txt/.jsonl path;
    # the reference language is the store's (corpus.language); every corpus.* setting but source applies
    fit_tokens: int = 12288  # per language: tokens of its TRAIN documents the per-language maps are fitted on
    test_tokens: int = 4096  # per language: tokens of its TEST documents every map is scored on
    alpha_scaling: Literal["per_token", "absolute"] = "per_token"  # per_token: the operator's α · n / n_operator
    overlap_rank: int = 32  # r: top singular directions of each map's update (W − I)S compared across languages
    shared_threshold: float = 0.9  # principal cos² at or above which a direction counts as shared
    causal_sequences: int = 16  # test sequences per language patched with the operators (intervals over them)
    causal_seq_len: int = 32  # tokens per causal sequence (the LM head over every prediction dominates the cost)
    causal_own: bool = False  # also patch with each language's own map (one more LM-head pass per pair and language)
    batch_size: int = 8  # sequences per forward pass
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class AtlasParams:
    """Stage `atlas`: every stored layer pair (L, L + k ≤ L + k_max) from one joint Gram, five operators
    side by side, the model's mean Jacobian, and a causal Δ on a few pairs (docs/method.md#atlas)."""

    k_max: int = 4  # pairs (L, L + k) for every stored layer L and 1 ≤ k ≤ k_max (L + k a stored layer)
    tokens: dict[str, int] = field(
        default_factory=lambda: {"train": 32768, "test": 8192}
    )  # first tokens of each split in the joint float64 pass (BOS excluded like stats); 0: the whole split
    chunk_tokens: int = 2048  # rows per streamed chunk (memory ≈ chunk × layers × d_model × 8 bytes)
    alpha: float | None = None  # one ridge α for every pair; null: each pair's GCV choice on the grid below
    alpha_min: float = 1e-3  # GCV grid (log-spaced)
    alpha_max: float = 1e7
    alpha_points: int = 41
    subspace_fraction: float = 0.9  # held-out subspace size: smallest r with this share of Σρ⁺²
    null_replicates: int = 8  # Wishart replicates of the subspace null (independent x, y at the atlas's n, d)
    eta_replicates: int = 0  # Wishart replicates of η's linear reference per pair (0: the analytic value only)
    seed: int = 0  # null, η reference, Jacobian sign draws, causal intervals
    jacobian_layers: list[int] | Literal["all"] = "all"  # input layers L whose pairs get the mean Jacobian
    jacobian_sequences: int = 2  # TRAIN sequences the Jacobian is averaged over (BOS excluded)
    jacobian_seq_len: int = 48  # tokens per Jacobian sequence
    jacobian_directions: int = 8  # r input directions probed: top right singular subspace of L's ridge maps
    # (≥ d_model: the whole matrix); every Jacobian number is restricted to it
    jacobian_chunk: int = 64  # tangents per vmapped jvp call (memory vs speed)
    causal_pairs: list[str] = field(default_factory=lambda: ["L05_k1"])  # atlas pairs patched with every
    # operator (Δ log-perplexity on TEST sequences, intervals over sequences); [] for none
    causal_sequences: int = 16  # test sequences per causal pair
    causal_seq_len: int = 32
    causal_batch_size: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the joint Gram, the Jacobian and the causal passes
    threads: int = 1  # torch intra-op threads of the Jacobian and causal passes on CPU (0: torch's default); one
    # was 2–5× faster than two on the shared 2-core machine (their many small ops spin-wait for a busy core)


@dataclass
class ReportParams:
    """Stage `report` (and the resolution of every stage's PNG figures)."""

    dpi: int = 120
    ranks: list[int] = field(default_factory=lambda: [1, 10, 100])  # ranks r at which the summary
    # quotes η(r) and ceiling(r); the largest swept rank ≤ r is used (evaluate.n_ranks sets the sweep)
    causal_scope: Literal["all", "after"] = "after"  # causal tokens summarised: every prediction, or
    # those at/after the first patched position (the only ones a patch can change)


@dataclass
class Params:
    paths: Paths = field(default_factory=Paths)
    pairs: dict[str, Pair] = field(default_factory=dict)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    corpus: CorpusParams = field(default_factory=CorpusParams)
    collect: CollectParams = field(default_factory=CollectParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    stats: StatsParams = field(default_factory=StatsParams)
    tune: TuneParams = field(default_factory=TuneParams)
    fit: FitParams = field(default_factory=FitParams)
    sae: SaeParams = field(default_factory=SaeParams)
    select: SelectParams = field(default_factory=SelectParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    causal: CausalParams = field(default_factory=CausalParams)
    atlas: AtlasParams = field(default_factory=AtlasParams)
    languages: LanguagesParams = field(default_factory=LanguagesParams)
    report: ReportParams = field(default_factory=ReportParams)
    root: Path = Path(".")  # directory relative paths resolve against (the params file's)

    def path(self, key: str) -> Path:
        """Absolute path for a `paths` entry."""
        value = Path(getattr(self.paths, key))
        return value if value.is_absolute() else self.root / value

    def mlflow_uri(self) -> str:
        return resolve_sqlite_uri(self.paths.mlflow_uri, self.root)

    def optuna_storage(self) -> str:
        return resolve_sqlite_uri(self.paths.optuna_storage, self.root)

    def target_layers(self) -> list[int]:
        return sorted({p.target for p in self.pairs.values()})

    def needed_layers(self) -> list[int]:
        return sorted({p.L for p in self.pairs.values()} | set(self.target_layers()))


SQLITE_PREFIX = "sqlite:///"


def resolve_sqlite_uri(uri: str, root: Path) -> str:
    """`sqlite:///relative/path.db` resolved against `root` (absolute `sqlite:////…` and other
    schemes pass through unchanged)."""
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        return SQLITE_PREFIX + str((root / uri[len(SQLITE_PREFIX) :]).resolve())
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a resolved `sqlite:///` URI, else None."""
    return Path(uri[len(SQLITE_PREFIX) :]) if uri.startswith(SQLITE_PREFIX) else None


def pair_name(L: int, k: int) -> str:
    return f"L{L:02d}_k{k}"


_PAIR_NAME = re.compile(r"^L(\d{2,})_k(\d+)$")


# --------------------------------------------------------------------------------------------
# Parsing


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(value, option, key)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(f"{key}: {value!r} is not any of {_type_name(annotation)}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if annotation is type(None):
        if value is not None:
            raise ParamsError(f"{key}: expected null, got {value!r}")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        number = _written_number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        number = _written_number(value)
        if number is None:
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        return float(number)
    if annotation is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    raise ParamsError(f"{key}: unsupported type {annotation}")  # pragma: no cover


def _written_number(value: Any) -> int | float | None:
    """A number as a person writes it: YAML's own ints and floats, and strings such as `1e-3` or
    `5E+2` that PyYAML (YAML 1.1) leaves as strings; None for anything else (booleans, words, nan)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        for parse in (int, float):
            try:
                number = parse(text)
            except ValueError:
                continue
            return number if math.isfinite(number) else None
    return None


def _type_name(annotation: Any) -> str:
    return " | ".join(getattr(a, "__name__", repr(a)) for a in typing.get_args(annotation))


def _build(cls: type, raw: Any, key: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{key}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ParamsError(f"unknown key {key + '.' if key else ''}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}" if key else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ParamsError(f"{key}: {exc}") from None


def parse_params(raw: dict[str, Any], root: Path = Path("."), n_layers: int | None = None) -> Params:
    """Build and check `Params` from a parsed YAML mapping."""
    if not isinstance(raw, dict):
        raise ParamsError("params: expected a mapping at the top level")
    raw = dict(raw)
    pairs_raw = raw.pop("pairs", None)
    params = _build(Params, raw, "")
    params.root = Path(root)
    params.pairs = _parse_pairs(pairs_raw)
    check_params(params, n_layers)
    return params


def _parse_pairs(raw: Any) -> dict[str, Pair]:
    if not raw:
        raise ParamsError("pairs: the pair list is empty; give at least one `LNN_kK: {L: .., k: ..}`")
    if not isinstance(raw, dict):
        raise ParamsError("pairs: expected a mapping like `L06_k1: {L: 6, k: 1}`")
    pairs: dict[str, Pair] = {}
    for name, value in raw.items():
        pair = _build(Pair, value, f"pairs.{name}")
        pair.L = _coerce(pair.L, int, f"pairs.{name}.L")
        pair.k = _coerce(pair.k, int, f"pairs.{name}.k")
        if pair.L < 0:
            raise ParamsError(f"pairs.{name}.L: must be >= 0, got {pair.L}")
        if pair.k < 1:
            raise ParamsError(f"pairs.{name}.k: must be >= 1, got {pair.k}")
        if name != pair.name:
            raise ParamsError(f"pairs.{name}: key must be {pair.name} for L={pair.L}, k={pair.k}")
        pairs[name] = pair
    return pairs


def check_params(params: Params, n_layers: int | None = None) -> None:
    """Value checks that types alone cannot express. `n_layers` adds depth checks."""
    if not params.prepare.sequence_start.strip():
        raise ParamsError("prepare.sequence_start: empty; use `auto` or a token such as <|endoftext|>")
    c = params.corpus
    if set(c.split_fractions) != set(SPLITS):
        raise ParamsError(f"corpus.split_fractions: needs exactly the keys {list(SPLITS)}")
    if any(v <= 0 for v in c.split_fractions.values()) or abs(sum(c.split_fractions.values()) - 1) > 1e-6:
        raise ParamsError("corpus.split_fractions: must be positive and sum to 1")
    if set(c.tokens) != set(SPLITS):
        raise ParamsError(f"corpus.tokens: needs exactly the keys {list(SPLITS)}")
    for split, n in c.tokens.items():
        if n <= 0:
            raise ParamsError(f"corpus.tokens.{split}: must be positive, got {n}")
    if c.max_length < 2:
        raise ParamsError("corpus.max_length: must be at least 2")
    positive = {
        "collect.batch_size": params.collect.batch_size,
        "collect.part_tokens": params.collect.part_tokens,
        "collect.chunk_tokens": params.collect.chunk_tokens,
        "stats.chunk_tokens": params.stats.chunk_tokens,
        "tune.n_trials": params.tune.n_trials,
        "stats.dask_workers": params.stats.dask_workers,
        "tune.n_workers": params.tune.n_workers,
        "tune.curve_points": params.tune.curve_points,
        "sae.width": params.sae.width,
        "sae.steps": params.sae.steps,
        "sae.batch_tokens": params.sae.batch_tokens,
        "sae.tokens": params.sae.tokens,
        "sae.forward_batch_size": params.sae.forward_batch_size,
        "sae.eval_seq_len": params.sae.eval_seq_len,
        "causal.n_sequences": params.causal.n_sequences,
        "causal.seq_len": params.causal.seq_len,
        "causal.batch_size": params.causal.batch_size,
        "causal.bootstrap_resamples": params.causal.bootstrap_resamples,
        "evaluate.n_ranks": params.evaluate.n_ranks,
        "evaluate.null_replicates": params.evaluate.null_replicates,
        "languages.fit_tokens": params.languages.fit_tokens,
        "languages.test_tokens": params.languages.test_tokens,
        "languages.overlap_rank": params.languages.overlap_rank,
        "languages.causal_sequences": params.languages.causal_sequences,
        "languages.batch_size": params.languages.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ParamsError(f"{key}: must be positive, got {value}")
    if not 0 < params.tune.alpha_min < params.tune.alpha_max:
        raise ParamsError("tune.alpha_min/alpha_max: need 0 < alpha_min < alpha_max")
    if params.tune.objective == "kfold" and params.tune.kfold < 2:
        raise ParamsError("tune.kfold: needs at least 2 folds")
    for key, value in {
        "select.max_tokens": params.select.max_tokens,
        "select.causal_sequences": params.select.causal_sequences,
    }.items():
        if value <= 0:
            raise ParamsError(f"{key}: must be positive, got {value}")
    if params.select.exact_budget < 0 or params.select.exact_sequences < 1:
        raise ParamsError("select.exact_budget / exact_sequences: need exact_budget >= 0 and exact_sequences >= 1")
    if params.select.causal_horizon is not None and params.select.causal_horizon < 1:
        raise ParamsError("select.causal_horizon: must be >= 1 or null (to the end of the sequence)")
    band = params.select.rate_band
    if len(band) != 2 or not 0 < band[0] <= band[1]:
        raise ParamsError(f"select.rate_band: needs [lo, hi] with 0 < lo <= hi, got {band}")
    bad = {k: v for k, v in dataclasses.asdict(params.select.weights).items() if not v >= 0}
    if bad:
        raise ParamsError(f"select.weights: importances must be >= 0 (the sign of each criterion is fixed), got {bad}")
    if params.sae.architecture == "topk" and not 0 < params.sae.k <= params.sae.width:
        raise ParamsError(f"sae.k: must be in 1..sae.width ({params.sae.width}), got {params.sae.k}")
    if params.report.dpi <= 0 or not params.report.ranks or any(r < 1 for r in params.report.ranks):
        raise ParamsError("report.dpi / report.ranks: dpi must be positive and ranks a non-empty list of ranks >= 1")
    if not 0 < params.select.keep_fraction <= 1:
        raise ParamsError("select.keep_fraction: must be in (0, 1]")
    if params.collect.layers != "all":
        if not params.collect.layers:
            raise ParamsError("collect.layers: empty; use `all` or a list of layers")
        if any(n < 0 for n in params.collect.layers):
            raise ParamsError("collect.layers: layers are 0-based and non-negative")
        missing = sorted(set(params.needed_layers()) - set(params.collect.layers))
        if missing:
            raise ParamsError(f"collect.layers: pairs need layer(s) {missing}, which are not collected")
    _check_position_sets(params.causal)
    _check_atlas(params.atlas)
    _check_languages(params)
    if n_layers is not None:
        check_depth(params, n_layers)


def _check_position_sets(causal: CausalParams) -> None:
    """Refuse a position set holding a position whose patch cannot change any scored prediction
    (BOS at 0, or the last position, whose own next-token prediction is not scored): such a set
    would report a causal effect of exactly zero (docs/method.md#causal)."""
    from .math.positions import unscorable_positions

    for name, positions in causal.position_sets.items():
        if positions != "all" and not positions:
            raise ParamsError(f"causal.position_sets.{name}: empty")
        bad = unscorable_positions(positions, causal.seq_len)
        if bad:
            raise ParamsError(
                f"causal.position_sets.{name}: position(s) {bad} cannot change any scored prediction "
                f"(patchable positions are 1..{causal.seq_len - 2} for seq_len {causal.seq_len}: 0 is BOS, "
                f"and the last position's own prediction is not scored)"
            )


def _check_languages(params: Params) -> None:
    lp = params.languages
    if not lp.sources:
        raise ParamsError("languages.sources: empty; name at least one language to compare (e.g. fr-fr: embedded)")
    if params.corpus.language in lp.sources:
        raise ParamsError(f"languages.sources: {params.corpus.language} is the reference (corpus.language)")
    if not 0 < lp.shared_threshold <= 1:
        raise ParamsError(f"languages.shared_threshold: must be in (0, 1], got {lp.shared_threshold}")
    if lp.causal_seq_len < 2:
        raise ParamsError(f"languages.causal_seq_len: must be at least 2, got {lp.causal_seq_len}")


def _check_atlas(a: AtlasParams) -> None:
    positive = {
        "atlas.k_max": a.k_max,
        "atlas.chunk_tokens": a.chunk_tokens,
        "atlas.alpha_points": a.alpha_points,
        "atlas.null_replicates": a.null_replicates,
        "atlas.jacobian_sequences": a.jacobian_sequences,
        "atlas.jacobian_directions": a.jacobian_directions,
        "atlas.jacobian_chunk": a.jacobian_chunk,
        "atlas.causal_sequences": a.causal_sequences,
        "atlas.causal_batch_size": a.causal_batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ParamsError(f"{key}: must be positive, got {value}")
    if set(a.tokens) != {"train", "test"} or any(v < 0 for v in a.tokens.values()):
        raise ParamsError(f"atlas.tokens: needs train and test token counts >= 0 (0: the whole split), got {a.tokens}")
    if a.alpha is not None and a.alpha <= 0:
        raise ParamsError(f"atlas.alpha: must be positive or null (GCV), got {a.alpha}")
    if not 0 < a.alpha_min < a.alpha_max:
        raise ParamsError("atlas.alpha_min/alpha_max: need 0 < alpha_min < alpha_max")
    if not 0 < a.subspace_fraction <= 1:
        raise ParamsError(f"atlas.subspace_fraction: must be in (0, 1], got {a.subspace_fraction}")
    if a.eta_replicates < 0 or a.threads < 0:
        raise ParamsError("atlas.eta_replicates / atlas.threads: must be >= 0")
    if a.jacobian_seq_len < 2 or a.causal_seq_len < 3:
        raise ParamsError("atlas.jacobian_seq_len / causal_seq_len: need at least 2 / 3 tokens (BOS + tokens)")
    bad = [name for name in a.causal_pairs if not _PAIR_NAME.match(name)]
    if bad:
        raise ParamsError(f"atlas.causal_pairs: {bad} are not pair names like L05_k1")


def check_depth(params: Params, n_layers: int) -> None:
    """Pairs and layers must exist in a model with `n_layers` decoder blocks."""
    for name, pair in params.pairs.items():
        if pair.L + pair.k > n_layers - 1:
            raise ParamsError(
                f"pairs.{name}: L + k = {pair.L + pair.k} is beyond the model's last layer {n_layers - 1}"
            )
    if params.collect.layers != "all":
        bad = [n for n in params.collect.layers if n >= n_layers]
        if bad:
            raise ParamsError(f"collect.layers: {bad} beyond the model's last layer {n_layers - 1}")


def load_params(path: str | Path = "params.yaml", n_layers: int | None = None) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_params(raw or {}, root=path.resolve().parent, n_layers=n_layers)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def section_dict(section: Any) -> dict[str, Any]:
    """A params section as a plain dict (for logging and fingerprints); reads every key of it."""
    if isinstance(section, _TracedSection):
        section._log.add(section._prefix)
        section = section._target
    return dataclasses.asdict(section)


# --------------------------------------------------------------------------------------------
# Tracing which params a stage reads (tests/test_dvc_truth.py compares them with dvc.yaml)

TRACE_ENV = "ATO_PARAMS_TRACE"  # file the CLI appends each stage's params reads to, when set


class _TracedSection:
    """Read-through view of a params section that records every key read as `section.key`."""

    def __init__(self, target: Any, prefix: str, log: set[str]):
        self._target, self._prefix, self._log = target, prefix, log

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or callable(value):
            return value
        self._log.add(f"{self._prefix}.{name}")
        return value


class _TracedPairs(dict[str, Pair]):
    """`pairs` that records `pairs.<name>` for one pair looked up and `pairs` for the whole set."""

    def __init__(self, pairs: dict[str, Pair], log: set[str]):
        super().__init__(pairs)
        self._log = log

    def __getitem__(self, name: str) -> Pair:
        self._log.add(f"pairs.{name}")
        return super().__getitem__(name)

    def _all(self) -> None:
        self._log.add("pairs")

    def __iter__(self):
        self._all()
        return super().__iter__()

    def __len__(self) -> int:
        self._all()
        return super().__len__()

    def __contains__(self, name: object) -> bool:
        self._log.add(f"pairs.{name}")
        return super().__contains__(name)

    def keys(self):
        self._all()
        return super().keys()

    def values(self):
        self._all()
        return super().values()

    def items(self):
        self._all()
        return super().items()


def traced(params: Params) -> tuple[Params, set[str]]:
    """A copy of `params` whose sections record every key read, and the set they record into."""
    log: set[str] = set()
    view = dataclasses.replace(params)
    for f in dataclasses.fields(Params):
        if f.name == "pairs":
            view.pairs = _TracedPairs(params.pairs, log)
        elif f.name != "root":
            setattr(view, f.name, _TracedSection(getattr(params, f.name), f.name, log))
    return view, log
