"""The operator artifact (docs/contracts.md#operator): `<dir>/operator.safetensors` (W [d_out, d_in],
b [d_out]) + `config.json`. ŷ = x Wᵀ + b in the original, unstandardised coordinates. Never pickled.

Variants (`operator_variant`, `ato.math.variants`): reduced-rank, identity + rank-r update,
SVD-truncated, Procrustes and identity maps of a fitted operator, each an `Operator` of its own, saved
beside it as `<dir>/variants/<name>/` (the same two files) by `ato fit` (`fit.variants`).

Public API::

    from ato import load_operator
    op = load_operator("models/operators/L06_k1", expect={"model_digest": ..., "d_model": 640})
    y_hat = op(x)            # x: [..., d_in] tensor on any device
    op64 = load_operator("models/operators/L06_k1", variant="rank64")
    op = load_operator("models:/ato-gemma-3-270m-L06_k1@rank64")   # from the MLflow registry
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import atomic_path, write_json_atomic
from .artifacts.operator import OperatorConfig
from .errors import AtoError

WEIGHTS = "operator.safetensors"
CONFIG = "config.json"
VARIANTS = "variants"  # <operator dir>/variants/<name>/: the operator's variants, same two files
REGISTRY_SCHEME = "models:/"


class OperatorError(AtoError):
    pass


@dataclass
class Operator:
    W: torch.Tensor  # [d_out, d_in]
    b: torch.Tensor  # [d_out]
    config: OperatorConfig  # a plain dict (config.json's keys) is checked into one

    def __post_init__(self) -> None:
        self.config = as_operator_config(self.config)

    def __repr__(self) -> str:
        """One line: pair, variant, model, α and test R² (never the tensors)."""
        c = self.config
        L, T = c.layer_in, c.layer_out
        pair = f"L{L:02d}_k{T - L}" if isinstance(L, int) and isinstance(T, int) else f"{L}→{T}"
        r2 = (c.metrics or {}).get("test_r2")
        parts = [
            pair + (f" {self.variant}" if self.variant else ""),
            f"model={c.model!r}",
            f"d={self.W.shape[1]}",
            f"method={c.method}",
            f"α={three_significant(c.alpha)}",
            f"test R²={r2:.4f}" if isinstance(r2, (int, float)) else "test R²=?",
        ]
        return f"Operator({', '.join(parts)})"

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Operator:
        return Operator(self.W.to(device, dtype), self.b.to(device, dtype), dataclasses.replace(self.config))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """ŷ = x Wᵀ + b on x's device and dtype."""
        W, b = self.W, self.b
        if W.device != x.device or W.dtype != x.dtype:
            W, b = W.to(x.device, x.dtype), b.to(x.device, x.dtype)
        return torch.nn.functional.linear(x, W, b)

    def predict_numpy(self, x: np.ndarray) -> np.ndarray:
        W = self.W.double().numpy()
        return (np.asarray(x, dtype=np.float64) @ W.T + self.b.double().numpy()).astype(np.float32)

    @property
    def layer_in(self) -> int:
        return int(self.config.layer_in)

    @property
    def layer_out(self) -> int:
        return int(self.config.layer_out)

    @property
    def variant(self) -> str | None:
        """The variant name (`rank64`, …) or None for the fitted operator itself."""
        return self.config.variant

    def save(self, directory: str | Path) -> Path:
        return save_operator(directory, self.W.detach().cpu(), self.b.detach().cpu(), self.config)


def as_operator_config(config: OperatorConfig | Mapping[str, Any]) -> OperatorConfig:
    """`config` itself, or a plain dict of config.json's keys checked into an `OperatorConfig`."""
    return config if isinstance(config, OperatorConfig) else OperatorConfig.from_dict(config, "operator config")


def three_significant(value: Any) -> str:
    """α as a person reads it: three significant digits (`0.000123`, `45.6`, `1.23e+04`)."""
    return f"{value:.3g}" if isinstance(value, (int, float)) else "?"


def worse_than_identity(test_r2_weighted: float, identity_test_r2_weighted: float) -> bool:
    """The rule for a map offered for splicing: it explains less of layer L+k's variance on the test
    split than leaving the residual alone (ŷ = x) does, so splicing it in does more harm than skipping
    the blocks. NaN on either side is not a verdict."""
    return bool(test_r2_weighted < identity_test_r2_weighted)


def identity_warning(config: OperatorConfig, directory: str | Path | None = None) -> str | None:
    """The warning a variant (or operator) carries when `worse_than_identity` says so, else None;
    None too when its scores or the identity's are not recorded."""
    own = (config.metrics or {}).get("test_r2_weighted")
    reference = identity_test_r2_weighted(config, directory)
    if not isinstance(own, (int, float)) or reference is None:
        return None
    what = f"variant {config.variant!r}" if config.variant else "this operator"
    return below_identity_warning(own, reference, what)


def below_identity_warning(r2_weighted: float, identity_r2_weighted: float, what: str = "this map") -> str | None:
    """The one wording of `worse_than_identity`'s verdict (registry description, model card, `ato score`),
    None when the map is not worse than the identity."""
    if not worse_than_identity(r2_weighted, identity_r2_weighted):
        return None
    return (
        f"WARNING: {what} explains less than the identity map: test R²_w {r2_weighted:.3f} < "
        f"{identity_r2_weighted:.3f} (ŷ = x); splicing it in is worse than skipping the blocks between the "
        "layers. Use @champion."
    )


def identity_test_r2_weighted(config: OperatorConfig, directory: str | Path | None = None) -> float | None:
    """The identity map's test R²_w for the operator's pair: recorded in its config by `ato fit`, or for
    a variant saved before that, in its parent's config (`<parent>/variants/<name>/`)."""
    value = config.identity_test_r2_weighted
    if value is None:
        value = (config.metrics or {}).get("identity_test_r2_weighted")
    if value is None and directory is not None and config.variant:
        parent_config = Path(directory).parent.parent / CONFIG
        if parent_config.is_file():
            value = (OperatorConfig.read(parent_config).metrics or {}).get("identity_test_r2_weighted")
    return float(value) if isinstance(value, (int, float)) else None


def save_operator(
    directory: str | Path,
    W: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor,
    config: OperatorConfig | Mapping[str, Any],
    variants: dict[str, Operator] | None = None,
) -> Path:
    """Write the artifact atomically: both files (and every variant's, under `variants/<name>/`) into
    a temporary directory, then one rename, so a reader sees the old operator or the new one, never
    weights of one with the config of the other."""
    directory = Path(directory)
    config = as_operator_config(config)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        _write_files(tmp, W, b, config)
        parent_sha = _sha256(tmp / WEIGHTS)
        for name, op in (variants or {}).items():
            (tmp / VARIANTS / name).mkdir(parents=True)
            variant_config = dataclasses.replace(op.config, parent_weights_sha256=parent_sha)
            _write_files(tmp / VARIANTS / name, op.W.detach().cpu(), op.b.detach().cpu(), variant_config)
    return directory


def _write_files(
    directory: Path, W: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, config: OperatorConfig
) -> None:
    from safetensors.torch import save_file

    W_t = torch.as_tensor(np.asarray(W, dtype=np.float32)).contiguous()
    b_t = torch.as_tensor(np.asarray(b, dtype=np.float32)).contiguous()
    if W_t.ndim != 2 or b_t.shape != (W_t.shape[0],):
        raise OperatorError(f"W must be [d_out, d_in] and b [d_out]; got {tuple(W_t.shape)}, {tuple(b_t.shape)}")
    save_file(
        {"W": W_t, "b": b_t},
        str(directory / WEIGHTS),
        metadata={"ato": json.dumps({"layer_in": config.layer_in, "layer_out": config.layer_out})},
    )
    saved = dataclasses.replace(config, weights_sha256=_sha256(directory / WEIGHTS))
    write_json_atomic(directory / CONFIG, saved.to_dict())


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_operator(
    directory: str | Path,
    expect: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    tracking_uri: str | None = None,
) -> Operator:
    """Load and check an operator: a directory, or a registry URI `models:/<name>@<alias>` (or
    `models:/<name>/<version>`; `tracking_uri`: see `registry_tracking_uri`). `variant` picks
    `<dir>/variants/<variant>/`. `expect` holds config values that must match (model digest, d_model,
    layers, store digest …); any mismatch is refused with a message naming the key."""
    if str(directory).startswith(REGISTRY_SCHEME):
        directory = download_registered(str(directory), tracking_uri)
    directory = Path(directory)
    if variant is not None:
        directory = variant_dir(directory, variant)
    config, W, b = _read_checked(directory)
    check_config(config, expect or {}, str(directory))
    return Operator(W, b, config).to(device)


def variant_dir(directory: Path, variant: str) -> Path:
    """`<directory>/variants/<variant>`, or an OperatorError naming the variants that exist."""
    path = Path(directory) / VARIANTS / variant
    if not (path / CONFIG).exists():
        found = sorted(p.name for p in (Path(directory) / VARIANTS).glob("*") if (p / CONFIG).exists())
        raise OperatorError(
            f"{directory}: no variant {variant!r} (has: {', '.join(found) or 'none'}); "
            "add it to fit.variants and rerun `ato fit`"
        )
    return path


def _read_checked(directory: Path) -> tuple[OperatorConfig, torch.Tensor, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    for path in (config_path, weights_path):
        if not path.exists():
            raise OperatorError(f"{path}: missing; is {directory} an operator directory?")
    try:
        config = OperatorConfig.from_dict(json.loads(config_path.read_text()), str(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OperatorError(f"{config_path}: not valid JSON: {exc}") from None
    # Read once: the checksum and the tensors come from the same bytes, and the loaded operator
    # is a private copy (a memory map would change if the file were rewritten in place).
    data = weights_path.read_bytes()
    expected_sha = config.weights_sha256
    if expected_sha is None:
        raise OperatorError(f"{config_path}: no weights_sha256; re-save the operator with `ato fit`")
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise OperatorError(
            f"{weights_path}: sha256 differs from config.json's weights_sha256; "
            "the file was modified or tampered with after saving"
        )
    try:
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise OperatorError(f"{weights_path}: unreadable or tampered safetensors file: {exc}") from None
    if set(tensors) != {"W", "b"}:
        raise OperatorError(f"{weights_path}: expected tensors W and b, found {sorted(tensors)}")
    W, b = tensors["W"], tensors["b"]
    d = int(config.d_model)
    if W.shape != (d, d) or b.shape != (d,):
        raise OperatorError(
            f"{weights_path}: W {tuple(W.shape)} / b {tuple(b.shape)} do not match d_model={d} in {config_path}"
        )
    if not (torch.isfinite(W).all() and torch.isfinite(b).all()):
        raise OperatorError(f"{weights_path}: non-finite values in W or b")
    return config, W, b


def check_config(config: OperatorConfig, expect: dict[str, Any], where: str) -> None:
    """Every non-None value of `expect` (config.json keys, chosen by the caller) equals the config's."""
    recorded = config.to_dict()
    for key, value in expect.items():
        if value is None:
            continue
        if key not in recorded:
            raise OperatorError(f"{where}: config.json has no {key!r} to check against {value!r}")
        if recorded[key] != value:
            raise OperatorError(
                f"{where}: operator was fitted with {key}={recorded[key]!r} but the current "
                f"model/store has {key}={value!r}; refit it (`dvc repro`) or use the matching store"
            )


def registry_tracking_uri(tracking_uri: str | None = None) -> str:
    """Where the registry is: `tracking_uri`, else MLflow's own setting (`MLFLOW_TRACKING_URI`,
    `mlflow.set_tracking_uri`), else the project's `paths.mlflow_uri` from ./params.yaml, else MLflow's
    default. A SQLite database must exist: a lookup never creates an empty one."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    from .params import load_params, resolve_sqlite_uri, sqlite_file

    if tracking_uri:
        uri = resolve_sqlite_uri(tracking_uri, Path.cwd())
    elif is_tracking_uri_set():
        uri = mlflow.get_tracking_uri()
    elif Path("params.yaml").is_file():
        uri = load_params("params.yaml").mlflow_uri()
    else:
        uri = mlflow.get_tracking_uri()
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        raise OperatorError(
            f"no MLflow database at {database} (tracking URI {uri}); run the pipeline there first, or name the "
            "project's store with --tracking-uri / MLFLOW_TRACKING_URI (paths.mlflow_uri, e.g. sqlite:///mlruns/mlflow.db)"
        )
    return uri


def download_registered(uri: str, tracking_uri: str | None = None) -> Path:
    """The local directory of a registered operator (`models:/<name>@<alias>`), downloaded from MLflow
    (`registry_tracking_uri` says from where)."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    store = registry_tracking_uri(tracking_uri)
    try:
        # for this call only: part of a models:/ lookup reads MLflow's global URI whatever is passed, and
        # its unset default is ./mlflow.db, which the lookup would create
        with _use_tracking_uri(store):
            local = Path(mlflow.artifacts.download_artifacts(uri, tracking_uri=store, registry_uri=store))
    except mlflow.exceptions.MlflowException as exc:
        raise OperatorError(f"{uri}: not found in the registry at {store}: {exc}") from None
    # The shallowest copy of the weights: the registered operator itself, not one of its variants.
    candidates = sorted((p.parent for p in local.rglob(WEIGHTS)), key=lambda p: (len(p.parts), str(p)))
    if not candidates:
        raise OperatorError(f"{uri}: no {WEIGHTS} in the registered model")
    return candidates[0]


def load_registered_operator(name: str, alias: str = "champion", tracking_uri: str | None = None) -> Operator:
    """Download a registered operator's artifact from the MLflow registry and load it
    (`alias`: `champion`, or a variant's alias such as `rank64`)."""
    return load_operator(f"{REGISTRY_SCHEME}{name}@{alias}", tracking_uri=tracking_uri)


# --------------------------------------------------------------------------------------------
# Variants


def operator_variant(op: Operator, train: Any, name: str, cca: Any = None) -> Operator:
    """The variant `name` (`rank<r>`, `update<r>`, `svd<r>`, `procrustes`, `identity`; `ato.math.variants`) of the
    fitted operator `op`, built from its pair's TRAIN statistics (`ato.math.stats.PairStats`, e.g.
    `ato.artifacts.read_pair_stats(".../train/<pair>.safetensors")`). Its config is the parent's with
    the variant's name, method and rank, and the parent's weights digest."""
    from .kinds import parse_variant, variant_method
    from .math.variants import variant_map

    try:
        spec = parse_variant(name)
        vm = variant_map(spec, train, op.W.double().cpu().numpy(), cca)
    except ValueError as exc:
        where = f"{op.config.layer_in}→{op.config.layer_out}"
        raise OperatorError(f"variant {name!r} of the operator {where}: {exc}") from None
    config = dataclasses.replace(
        op.config,
        weights_sha256=None,  # the parent's weights and scores are not the variant's
        metrics=None,
        variant=name,
        method=variant_method(spec.kind),
        alpha=float(op.config.alpha) if spec.kind == "svd" else 0.0,
        rank=vm.rank,
        rank_requested=spec.rank,
        procrustes_scale=vm.scale,
        parent_method=op.config.method,
        parent_weights_sha256=op.config.weights_sha256,
    )
    W = torch.as_tensor(vm.W, dtype=torch.float32)
    b = torch.as_tensor(vm.b, dtype=torch.float32)
    return Operator(W, b, config)
