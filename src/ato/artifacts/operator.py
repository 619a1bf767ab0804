"""The operator artifact's config.json (docs/contracts.md#operator) as a typed record.

The file has no `format` key: operators already in users' directories and registries were written
without one, so the unmarked file is format version 1, and `to_dict` writes exactly the keys it always
wrote. A later, incompatible format would add `"format": "ato-operator/<n>"`; this version refuses a
file that carries any `format` key rather than misread it.

Optional fields are written only when set, so a config written by hand (the nine required keys) or
by an older `ato fit` reads back and writes out unchanged. A variant's fields are written together
whenever `variant` is set (a full-rank variant records `rank: null`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ._io import ArtifactError, read_json


@dataclass
class OperatorConfig:
    FORMAT_VERSION: ClassVar[int] = 1  # the unmarked config.json; see the module docstring

    # --- required: what the map is and what it was fitted on (every operator has these)
    model: str  # the model label the operator was fitted on (`ato.artifacts.model.model_label`)
    model_digest: str | None  # sha256 of the prepared model's weights; None when unknown
    layer_in: int  # x: the residual after decoder block layer_in
    layer_out: int  # y: the residual after decoder block layer_out (the same token)
    alpha: float  # the penalty it was fitted with (ridge α; 0 for OLS and most variants)
    method: str  # ridge, ols, lasso, elasticnet; for a variant: rrr, identity_plus_rrr_update, svd_truncated, …
    d_model: int  # width of x and y; W is [d_model, d_model]
    n_train_tokens: int  # TRAIN tokens behind the fit
    store_digest: str  # content digest of the activation store the statistics came from

    # --- written by `ato fit`: how it was fitted and scored (absent in hand-made or older configs)
    k: int | None = None  # layer_out - layer_in
    standardize: bool | None = None  # ridge solved in standardised coordinates (W is saved unstandardised)
    n_layers: int | None = None  # decoder blocks of the model (splicing checks the model has as many)
    n_val_tokens: int | None = None  # VAL tokens of the α search
    include_bos: bool | None = None  # BOS rows were part of the statistics
    hook: str | None = None  # the residual convention of the store (`blocks.n.hook_resid_post`)
    equation: str | None = None  # ŷ = x Wᵀ + b, in words for a reader of the file
    variants: list[str] | None = None  # `fit.variants` saved beside the operator
    embedding_fingerprint: dict[str, Any] | None = None  # `ato.splicing.embedding_fingerprint` of the model
    metrics: dict[str, float] | None = None  # exact <split>_r2[_weighted] and identity_* from the pair statistics
    identity_test_r2_weighted: float | None = None  # the identity map's test R²_w (variants inherit it)

    # --- a variant's (`ato.operators.operator_variant`): written together whenever `variant` is set
    variant: str | None = None  # rank64, update16, svd32, procrustes, identity; None for the fitted operator
    rank: int | None = None  # the rank used (capped at d_model); None for full-rank kinds
    rank_requested: int | None = None  # the rank the name asked for
    procrustes_scale: float | None = None  # Procrustes' global gain; None for other kinds
    parent_method: str | None = None  # the fitted operator's method
    parent_weights_sha256: str | None = None  # the fitted operator's weights_sha256

    # --- set when saved (`ato.operators.save_operator`)
    weights_sha256: str | None = None  # sha256 of operator.safetensors; checked on every load

    VARIANT_FIELDS: ClassVar[tuple[str, ...]] = (
        "variant",
        "rank",
        "rank_requested",
        "procrustes_scale",
        "parent_method",
        "parent_weights_sha256",
    )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of config.json: required fields always, the others when set (a variant's all)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            always = f.name in REQUIRED or (self.variant is not None and f.name in self.VARIANT_FIELDS)
            if always or value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> OperatorConfig:
        """The config from its JSON object; `where` (the file) is named by every refusal: not an object,
        a `format` key (a newer format), an unknown key, a missing required key."""
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{where}: expected a JSON object for the operator config")
        if "format" in data:
            raise ArtifactError(
                f"{where}: operator config format {data['format']!r}; this ato reads version "
                f"{cls.FORMAT_VERSION} (no format key); upgrade ato"
            )
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            raise ArtifactError(f"{where}: unknown key {unknown[0]!r} in the operator config")
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise ArtifactError(f"{where}: the operator config lacks {missing[0]!r}")
        return cls(**data)

    @classmethod
    def read(cls, path: str | Path) -> OperatorConfig:
        return cls.from_dict(read_json(path, "operator config"), str(path))


FIELDS = frozenset(f.name for f in dataclasses.fields(OperatorConfig))
REQUIRED = tuple(f.name for f in dataclasses.fields(OperatorConfig) if f.default is dataclasses.MISSING)
