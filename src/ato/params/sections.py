"""Typed parameters, one dataclass per `params.yaml` section, every default visible here.

Every stage reads its own section (plus `paths` and, where it works per pair, `pairs`). Reading and
checking params.yaml is in `loading`; recording which keys a stage reads, in `trace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import AtoError

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
    context_operators: str = "models/context"  # context → one directory of context maps per pair
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
    # `@<name>`: rank<r> (reduced-rank regression), update<r> (identity + best rank-r update), svd<r>
    # (SVD-truncated), procrustes, identity
    variants: list[str] = field(
        default_factory=lambda: ["rank64", "update16", "update64", "update256", "procrustes", "identity"]
    )
    # register a variant whose test R²_w is below the identity map's (default: saved, logged, not registered)
    register_below_identity: bool = False


@dataclass
class SaeGates:
    """Quality an SAE must reach on VAL tokens for feature-level numbers built on it to count as
    reliable (docs/method.md#features); a miss marks them unreliable, it does not stop the run."""

    min_fve: float = 0.80  # fraction of variance explained
    max_dead: float = 0.05  # fraction of latents never active on the VAL tokens
    min_ce_recovered: float = 0.90  # CE-loss recovered with the reconstruction spliced in
    # ablation the CE-loss recovered is measured against: mean = ȳ_train (`artifacts.read_train_means`), the
    # causal stage's; zero flatters every splice (zeroing a residual of norm ~1e4 destroys everything)
    ce_reference: Literal["zero", "mean"] = "mean"


@dataclass
class SaeParams:
    """Stage `sae`: pretrained (sae-lens release) or trained on TRAIN-split residuals."""

    source: Literal["train", "pretrained"] = "train"
    release: str = "gemma-scope-2b-pt-res-canonical"
    sae_id_template: str = "layer_{n}/width_16k/canonical"
    architecture: Literal["jumprelu", "topk"] = "topk"
    width: int = 1024  # latents
    k: int = 128  # active latents for TopK (64 left layer 12 at CE recovered 0.871 vs mean ablation)
    l1_coefficient: float = 5.0  # sparsity penalty for JumpReLU
    tokens: int = 131072  # distinct TRAIN tokens per target layer: the store's first, the rest streamed from the model
    forward_batch_size: int = 16  # sequences per forward pass when streaming SAE tokens
    steps: int = 1200  # training steps (lr warm-up over the first 5 %, decay to 0 over the last 20 %)
    batch_tokens: int = 1024  # tokens per step
    lr: float = 2e-3  # peak learning rate
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

    transported_r2: float = 0.5  # a feature whose R² interval lies wholly at/above this → transported, wholly
    # below → synthesised, straddling it → undetermined
    min_active_tokens: int = 20  # fewer active test tokens → no verdict
    feature_interval: Literal["document_bootstrap"] = "document_bootstrap"  # per-feature R² intervals (and
    # those of counts' fractions and medians): percentile, resampling test documents (docs/statistics.md)
    feature_resamples: int = 1000
    feature_level: float = 0.95
    feature_seed: int = 0
    n_ranks: int = 24
    subspace_fraction: float = 0.9
    null_replicates: int = 8  # Wishart replicates of the subspace null and of η's linear reference (~1 s each
    # at d = 640); the null is independent x and y at the pair's n and d (docs/statistics.md#heldout)
    null_seed: int = 0  # seed of both simulations and of the learning curve's bootstrap
    curve_blocks: int = 16  # train documents cut into this many blocks (a multiple of 8): the learning
    # curve's nested subsets (1/8 … all of them) and the units of its bootstrap (docs/statistics.md#learning-curve)
    curve_resamples: int = 16  # bootstrap resamples of the blocks (~0.5 s each at d = 640): the sd of η∞ has
    # a relative error of about 1/√(2(resamples − 1)), 18 % at 16


@dataclass
class CausalParams:
    """Stage `causal`: perplexity under transport patching."""

    n_sequences: int = 112  # held-out test sequences; 112 plans the 95 % half-width of Δ(ATO) ≤ 0.05 nats
    # on the k = 1 pairs (from a 160-sequence pilot, σ at its 80 % bound: docs/statistics.md#intervals)
    seq_len: int = 64
    batch_size: int = 8
    position_sets: dict[str, list[int] | Literal["all"]] = field(
        default_factory=lambda: {"all": "all"}  # each further set costs as much as `all`
    )
    bootstrap_resamples: int = 2000
    interval: Literal["studentized_hull", "studentized", "t", "bca", "percentile"] = "studentized_hull"  # over
    # sequences; the default keeps ≥ 0.93 coverage at nominal 0.95 for skewed and heavy-tailed effects
    headline_reference: Literal["mean_update", "train_mean", "zero", "identity"] = "mean_update"  # "recovered"
    # is measured against this condition's damage: the mean update removes the computation and keeps the
    # context (mean ablation erases both, so the identity alone "recovers" most of it)
    seed: int = 0
    loss_chunk_tokens: int = 256  # LM-head rows per chunk: bounds logits memory
    lm_head_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # the LM-head matmul of both causal stages
    # (logits and log-softmax stay float32); bfloat16 only where the device runs it natively, else float32
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
    lm_head_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # the causal passes' LM-head matmul, as causal's
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
    jacobian_lags: int = 2  # m: E[∂y_t/∂x_{t−ℓ}] for ℓ ≤ m from the same jvps (as the lagged context map's lags)
    causal_pairs: list[str] = field(default_factory=lambda: ["L05_k1"])  # atlas pairs patched with every
    # operator (Δ log-perplexity on TEST sequences, intervals over sequences); [] for none
    causal_sequences: int = 16  # test sequences per causal pair
    causal_seq_len: int = 32
    causal_batch_size: int = 8
    lm_head_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # the causal passes' LM-head matmul, as causal's
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the joint Gram, the Jacobian and the causal passes
    threads: int = 1  # torch intra-op threads of the Jacobian and causal passes on CPU (0: torch's default); one
    # was 2–5× faster than two on the shared 2-core machine (their many small ops spin-wait for a busy core)


@dataclass
class ContextParams:
    """Stage `context`: maps that also read other positions of layer L (lagged, prefix, routed by the
    model's attention) and the carried / moved / computed budget of every pair (docs/method.md#context-maps)."""

    lags: int = 2  # m: lagged inputs x_{t−1} … x_{t−m}
    tokens: dict[str, int] = field(
        default_factory=lambda: {"train": 0, "val": 0, "test": 0}
    )  # first tokens of each split forwarded (whole sequences, store order); 0: the whole split
    alpha_min: float = 1e-3  # Optuna search of each kind's ridge α on exact validation R²_w (as `tune`)
    alpha_max: float = 1e7
    n_trials: int = 24  # trials per pair and kind (every trial reuses one eigendecomposition)
    seed: int = 0  # the α search's sampler
    curve_fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])  # nested train
    # fractions (of the train sequences, store order) of the learning curve; the last must be 1
    interval: Literal["studentized_hull", "studentized", "t", "bca", "percentile"] = "studentized_hull"  # every
    # value's interval over test sequences (`ato.math.intervals`, as causal.interval: the hull held `moved` at
    # 0.945 of nominal 0.95 with heavy-tailed noise where the percentile bootstrap held 0.915)
    bootstrap_resamples: int = 1000  # resamples of those intervals
    level: float = 0.95  # interval level
    bootstrap_seed: int = 0
    batch_size: int = 8  # sequences per forward pass
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the forward pass and the Grams
    gram_dtype: Literal["float32", "float64"] = "float32"  # each batch's products, formed about a shift (the
    # first batch's means) and summed in float64: float32 runs at 5-6x the float64 GEMM rate here; R²_w at
    # the tuned α agrees with float64's within 1e-6 (tests/test_context_precision.py)
    jacobian_sequences: int = 4  # TRAIN sequences of the lagged Jacobians beside W_ℓ (0: not probed); the
    # noise's unit (docs/statistics.md#jacobian-noise); cost linear in it
    jacobian_seq_len: int = 48  # tokens per such sequence
    jacobian_directions: int = 4  # r: top right singular vectors of the lagged map the Jacobians are taken on
    # (3r + 3 jvp tangents per pair: r = 4 and 4 sequences keep the six default pairs near 20 s of CPU)


@dataclass
class ReportParams:
    """Stage `report` (and the resolution of every stage's PNG figures)."""

    dpi: int = 120
    ranks: list[int] = field(default_factory=lambda: [1, 10, 100])  # ranks r at which the summary
    # quotes η(r) and ceiling(r); the largest swept rank ≤ r is used (evaluate.n_ranks sets the sweep)
    causal_scope: Literal["all", "after"] = "after"  # causal tokens summarised: every prediction, or
    # those at/after the first patched position (the only ones a patch can change)
    profile: str = "default"  # the params profile of the run (`scripts/repro.sh --profile quick`): any other
    # than "default" opens the summary with a smoke-run banner


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
    context: ContextParams = field(default_factory=ContextParams)
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
