"""The registry of affine map kinds: every map x_L → ŷ_{L+k} the pipeline fits, scores, patches or
draws is defined here once (docs/architecture.md#map-kinds).

A `MapKind` says what the map is (a one-line meaning for tables and figures), how it is built, whether
it is a causal condition (patched per pair or per target layer), how it is saved, and in which roles it
appears. A role is one place that iterates kinds: fit's variants, evaluate's predictors, the atlas's
operators, causal's patched conditions and the references "recovered" is measured against, the
languages comparison. `kinds_for(role)` lists a role's kinds in that role's order; `keys_for(role)`
their keys there. A role may know a kind under a historical key (atlas "ridge" for the operator,
evaluate "mean" for the train mean): those keys are in files and MLflow names, so they stay.

`register(kind)` adds a kind (a plugin, a test); the roles that build maps themselves ask the registry at
each use, so a kind registered later is included. Importing this module loads nothing heavy (not numpy).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ato.math.stats import PairStats

Role = Literal[
    "variant",  # `fit.variants`: maps built from the fitted operator and the pair's train statistics
    "evaluate",  # predictors scored on the test split by `ato evaluate` (reports/metrics/<pair>.json)
    "atlas",  # operators fitted and scored for every (L, k) by `ato atlas`
    "causal",  # conditions patched by `ato causal` / `ato causal_reference`, display order
    "recovered_against",  # references of "recovered" = 1 − Δ(ato)/Δ(reference)
    "atlas_reference",  # patched beside the atlas's operators for scale (not fitted, not scored)
    "languages_features",  # predictors of the languages comparison's feature scores
    "languages_causal",  # conditions patched by the languages comparison
]
BuiltFrom = Literal[
    "pair_stats",  # the pair's train statistics alone
    "operator",  # the fitted operator (and the pair's train statistics)
    "model",  # the model itself (its Jacobian)
    "language_stats",  # another language's train statistics
    "constant",  # no fit: a fixed map
    "context",  # the pair's context maps (`ato context`: layer L at positions s ≤ t, routed by attention)
]
Saved = Literal["operator", "recomputed"]  # an operator artifact, or rebuilt by each stage that uses it
Map = tuple["np.ndarray", "np.ndarray"]  # (W [d_out, d_in], b [d_out]): ŷ = W x + b
PatchValue = Callable[["torch.Tensor"], "torch.Tensor"]  # x_L at the patched rows [m, d] → patch values [m, d]


@dataclass(frozen=True)
class PatchInputs:
    """What a causal condition's patch value is built from, on the model's device: the pair's operator
    and train means for a condition patched per pair, the target layer's train mean for one patched per
    target layer."""

    W: torch.Tensor | None = None  # the pair's fitted operator [d, d] (per-pair conditions)
    b: torch.Tensor | None = None  # its intercept [d] (per-pair conditions)
    mean_y: torch.Tensor | None = None  # ȳ_train of the target layer [d] (both scopes)
    mean_x: torch.Tensor | None = None  # x̄_train of the input layer [d] (per-pair conditions)
    W_context: torch.Tensor | None = None  # the pair's union context map [d, p] (`ato context`; per pair)
    b_context: torch.Tensor | None = None  # its intercept [d]

    def need(self, name: Literal["W", "b", "mean_y", "mean_x", "W_context", "b_context"]) -> torch.Tensor:
        """The input `name`; absent (the condition's scope does not provide it) is a ValueError."""
        value: torch.Tensor | None = getattr(self, name)
        if value is None:
            raise ValueError(
                f"causal patch input {name!r} is not given in this scope "
                "(pair: W, b, mean_x, mean_y, W_context, b_context; target: mean_y)"
            )
        return value


@dataclass(frozen=True)
class Place:
    """A kind in one role: its position in the role's lists, and the key and label the role's files use
    where they differ from the kind's."""

    order: int  # position among the role's kinds (file and display order)
    key: str | None = None  # the role's key for this kind (None: the kind's name)
    label: str | None = None  # the role's label in figures (None: the kind's label)
    column: str | None = None  # the role's short name: table headers, compact figure text (None: the key)


@dataclass(frozen=True)
class MapKind:
    """One affine map kind, defined once."""

    name: str  # the registry name
    label: str  # short label in figures and tables
    meaning: str  # one line: what the map is
    built_from: BuiltFrom
    saved: Saved
    places: Mapping[Role, Place]  # the roles it appears in
    colour: str  # its colour in every figure
    causal: Literal["pair", "target"] | None = None  # a causal condition patched per pair or per target layer
    ranked: bool = False  # its name carries a rank in `fit.variants` (`rank<r>`, `update<r>`, `svd<r>`)
    method: str | None = None  # `method` in a variant's config.json
    variant_text: str | None = None  # a variant of this kind in its registry description ({rank}: its rank)
    # For a kind no stage builds itself (a plugin): its map from the pair's train statistics alone. The
    # built-in kinds are built by their stage's own code (e.g. the atlas shares one factorisation).
    build: Callable[[PairStats], Map] | None = None
    # For a causal kind: its patch value from the inputs of its scope (`causal`), asked by `ato causal` /
    # `ato causal_reference` at each run.
    patch: Callable[[PatchInputs], PatchValue] | None = None
    # What a causal kind's patch value reads at the patched rows: layer L's residual x_L, or the pair's
    # stacked context inputs [x_t, lags, prefix, z's] of the clean forward (`ato.causal.context`: they
    # read other positions and the attention patterns, which no function of x_L's rows sees).
    reads: Literal["x_L", "context"] = "x_L"

    def key(self, role: Role) -> str:
        """This kind's key in `role` (files, MLflow names, dict keys)."""
        place = self.places[role]
        return place.key or self.name

    def column(self, role: Role) -> str:
        """This kind's short name in `role`: table headers, compact figure text."""
        return self.places[role].column or self.key(role)

    def patch_value(self, inputs: PatchInputs) -> PatchValue:
        """This causal kind's patch value, built from `inputs`."""
        if self.patch is None:
            raise ValueError(f"map kind {self.name!r} has no causal patch")
        return self.patch(inputs)

    def label_in(self, role: Role) -> str:
        """This kind's figure label in `role`."""
        place = self.places.get(role)
        return (place.label if place else None) or self.label


_REGISTRY: dict[str, MapKind] = {}


def register(kind: MapKind) -> MapKind:
    """Add `kind`; a name or a role key already taken is a ValueError."""
    if kind.name in _REGISTRY:
        raise ValueError(f"map kind {kind.name!r} is already registered")
    for role in kind.places:
        if kind.key(role) in keys_for(role):
            raise ValueError(f"map kind {kind.name!r}: key {kind.key(role)!r} is already taken in role {role!r}")
    if "causal" in kind.places and (kind.causal is None or kind.patch is None):
        raise ValueError(f"map kind {kind.name!r}: a causal kind needs its scope (`causal`) and its `patch`")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a registered kind (tests that register a toy kind clean up with this)."""
    del _REGISTRY[name]


def get(name: str) -> MapKind:
    """The kind named `name`; an unknown name is a KeyError naming the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown map kind {name!r} (one of {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def kinds_for(role: Role) -> list[MapKind]:
    """The kinds appearing in `role`, in that role's order (ties: registration order)."""
    found = [k for k in _REGISTRY.values() if role in k.places]
    return sorted(found, key=lambda k: k.places[role].order)


def keys_for(role: Role) -> tuple[str, ...]:
    """The keys of `role`'s kinds, in its order."""
    return tuple(k.key(role) for k in kinds_for(role))


def causal_keys(scope: Literal["pair", "target"]) -> tuple[str, ...]:
    """The causal conditions patched per pair (`ato causal`) or per target layer (`ato causal_reference`)."""
    return tuple(k.key("causal") for k in kinds_for("causal") if k.causal == scope)


def by_key(role: Role, key: str) -> MapKind:
    """The kind `role` knows as `key`."""
    for kind in kinds_for(role):
        if kind.key(role) == key:
            return kind
    raise KeyError(f"no map kind has key {key!r} in role {role!r} (one of {', '.join(keys_for(role))})")


# --------------------------------------------------------------------------------------------
# fit.variants names


def variant_forms() -> str:
    """`rank<r>, update<r>, svd<r> (r ≥ 1), procrustes or identity`: the names fit.variants accepts, for messages."""
    kinds = kinds_for("variant")
    forms = [f"{k.key('variant')}<r>" for k in kinds if k.ranked]
    ranked = ", ".join(forms) + " (r ≥ 1)" if forms else ""
    plain = [k.key("variant") for k in kinds if not k.ranked]
    words = [*([ranked] if ranked else []), *plain]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


@dataclass(frozen=True)
class VariantSpec:
    """A parsed variant name: `rank64` → kind "rank", rank 64 (`ato.math.variants.variant_map` builds it)."""

    name: str
    kind: str  # the variant key of its map kind: rank, update, svd, procrustes or identity
    rank: int | None = None  # requested rank (ranked kinds only)


def parse_variant(name: str) -> VariantSpec:
    """`rank<r>`, `update<r>`, `svd<r>` (r ≥ 1), `procrustes` or `identity` (the variant role's keys); anything else is
    a ValueError naming the forms."""
    for kind in kinds_for("variant"):
        key = kind.key("variant")
        if kind.ranked:
            m = re.fullmatch(re.escape(key) + "([1-9][0-9]*)", name)
            if m:
                return VariantSpec(name, key, int(m.group(1)))
        elif name == key:
            return VariantSpec(name, key)
    raise ValueError(f"unknown operator variant {name!r}; expected {variant_forms()}")


def variant_text(method: str) -> str:
    """How a registry description names a variant whose config.json says `method` ({rank}: its rank);
    an unknown method names itself."""
    texts = {k.method: k.variant_text for k in kinds_for("variant") if k.method and k.variant_text}
    return texts.get(method, method)


def variant_method(spec_kind: str) -> str:
    """The `method` a variant of this kind records in its config.json."""
    method = by_key("variant", spec_kind).method
    if method is None:
        raise ValueError(f"variant kind {spec_kind!r} has no method")
    return method


# --------------------------------------------------------------------------------------------
# The built-in kinds' causal patches (torch is imported when a patch is built, not with the registry)


def _patch_operator(inputs: PatchInputs) -> PatchValue:
    from torch.nn.functional import linear

    W, b = inputs.need("W"), inputs.need("b")
    return lambda x: linear(x, W, b)


def _patch_input(_inputs: PatchInputs) -> PatchValue:
    return lambda x: x


def _patch_zero(_inputs: PatchInputs) -> PatchValue:
    import torch

    return lambda x: torch.zeros_like(x)


def _patch_bias(inputs: PatchInputs) -> PatchValue:
    b = inputs.need("b")
    return lambda x: b.expand(x.shape[0], -1)


def _patch_train_mean(inputs: PatchInputs) -> PatchValue:
    mean_y = inputs.need("mean_y")
    return lambda x: mean_y.expand(x.shape[0], -1)


def _patch_context(inputs: PatchInputs) -> PatchValue:
    from torch.nn.functional import linear

    W, b = inputs.need("W_context"), inputs.need("b_context")
    return lambda stacked: linear(stacked, W, b)  # rows of the stacked context inputs [m, p] → [m, d]


def _patch_mean_update(inputs: PatchInputs) -> PatchValue:
    shift = inputs.need("mean_y") - inputs.need("mean_x")  # the blocks' average update, computed once
    return lambda x: x + shift


# --------------------------------------------------------------------------------------------
# The built-in kinds. Keys given explicitly are historical: they name files' keys, columns and MLflow
# metrics of earlier runs, kept for artifact compatibility.

for _kind in (
    MapKind(
        name="ato",
        label="ATO  Wx+b",
        meaning="the fitted operator: ridge regression at the tuned α (fit.method)",
        built_from="pair_stats",
        saved="operator",
        colour="#1f77b4",
        causal="pair",
        patch=_patch_operator,
        places={
            "evaluate": Place(0),
            "atlas": Place(3, key="ridge", label="ridge  Wx+b", column="ridge"),  # historical atlas key
            "causal": Place(0),
            "languages_features": Place(0, key="operator"),  # historical languages key
            "languages_causal": Place(0, key="operator"),
        },
    ),
    MapKind(
        name="identity",
        label="identity  x",
        meaning="ŷ = x: pure carry-over, the baseline every fitted map is judged against",
        built_from="constant",
        saved="recomputed",
        colour="#2ca02c",
        causal="pair",
        patch=_patch_input,
        method="identity",
        variant_text="the identity map ŷ = x (pure carry-over: the baseline, not a fitted map)",
        places={
            "variant": Place(4),
            "evaluate": Place(1, column="identity"),
            "atlas": Place(0, column="identity"),
            "causal": Place(1),
            "recovered_against": Place(2, label="identity x_L", column="identity"),
            "languages_features": Place(2),
        },
    ),
    MapKind(
        name="train_mean",
        label="train mean  ȳ",
        meaning="ŷ = ȳ_train: mean ablation, the damage a map must undercut to carry anything",
        built_from="pair_stats",
        saved="recomputed",
        colour="#ff7f0e",
        causal="target",
        patch=_patch_train_mean,
        places={
            "evaluate": Place(2, key="mean", column="train mean"),  # historical evaluate key (metrics `mean_*`)
            "causal": Place(4),
            "recovered_against": Place(0, label="mean ablation ȳ_train", column="mean abl."),
            "atlas_reference": Place(0, label="mean ablation  ȳ"),
            "languages_causal": Place(2, key="mean"),  # historical languages key
        },
    ),
    MapKind(
        name="mean_update",
        label="mean update  x+ȳ−x̄",
        meaning="ŷ = x + (ȳ_train − x̄_train): carries the residual, drops the computation, adds its average",
        built_from="pair_stats",
        saved="recomputed",
        colour="#e6ab02",
        causal="pair",
        patch=_patch_mean_update,
        places={
            "causal": Place(5),
            "recovered_against": Place(3, label="mean update x_L+ȳ−x̄", column="mean upd."),
        },
    ),
    MapKind(
        name="ols",
        label="OLS",
        meaning="ridge with α = 0 on the train statistics",
        built_from="pair_stats",
        saved="recomputed",
        colour="#7f7f7f",
        places={"evaluate": Place(3, column="OLS")},
    ),
    MapKind(
        name="zero",
        label="zero",
        meaning="ŷ = 0: zero ablation of the target residual",
        built_from="constant",
        saved="recomputed",
        colour="#d62728",
        causal="target",
        patch=_patch_zero,
        places={"causal": Place(2), "recovered_against": Place(1, label="zero ablation", column="zero abl.")},
    ),
    MapKind(
        name="bias_only",
        label="bias only  b",
        meaning="ŷ = b: the fitted operator's intercept alone",
        built_from="operator",
        saved="recomputed",
        colour="#9467bd",
        causal="pair",
        patch=_patch_bias,
        places={"causal": Place(3)},
    ),
    MapKind(
        name="context",
        label="context  W[x, lags, prefix, z]+b",
        meaning="the union context map: x_t, lagged x, the prefix mean and the attention-routed z's of layer L",
        built_from="context",
        saved="operator",
        colour="#393b79",
        causal="pair",
        patch=_patch_context,
        reads="context",
        places={"causal": Place(6)},
    ),
    MapKind(
        name="procrustes",
        label="Procrustes  sRx",
        meaning="plain scaled orthogonal Procrustes ŷ = s R x (uncentred, no intercept)",
        built_from="pair_stats",
        saved="recomputed",
        colour="#8c564b",
        places={"atlas": Place(1, column="Procrustes")},
    ),
    MapKind(
        name="procrustes_centred",
        label="Procrustes, centred",
        meaning="similarity Procrustes ŷ = s Q (x − x̄) + ȳ: a rotation of the centred residual plus a global gain",
        built_from="pair_stats",
        saved="operator",
        colour="#e377c2",
        method="procrustes",
        variant_text="similarity Procrustes (a rotation plus a global gain)",
        # the variant's historical name; fit builds it with `ato.math.variants.procrustes_map`
        places={"variant": Place(3, key="procrustes"), "atlas": Place(2, column="Procrustes, centred")},
    ),
    MapKind(
        name="rrr",
        label="reduced rank",
        meaning="reduced-rank regression: the rank-r map maximising the whitened in-sample R² (the CCA ceiling(r))",
        built_from="pair_stats",
        saved="operator",
        colour="#17becf",
        ranked=True,
        method="rrr",
        variant_text="reduced-rank regression at rank {rank}",
        places={
            "variant": Place(0, key="rank"),
            "atlas": Place(4, column="reduced rank"),
        },  # the variant's historical name
    ),
    MapKind(
        name="update",
        label="identity + rank-r update",
        meaning=(
            "ŷ = x + Δ_r x + b: the identity plus the best rank-r change, Δ_r the reduced-rank regression of "
            "y − x on x in whitened coordinates (what the blocks carry kept, r directions of what they change)"
        ),
        built_from="pair_stats",
        saved="operator",
        colour="#aec7e8",
        ranked=True,
        method="identity_plus_rrr_update",
        variant_text="the identity plus the best rank-{rank} update (reduced-rank regression of y − x on x)",
        places={"variant": Place(1)},
    ),
    MapKind(
        name="svd",
        label="SVD-truncated",
        meaning=(
            "the fitted map's SVD truncated to rank r, intercept refitted at the train means (raw coordinates: "
            "ignores Σxx, can score below the identity; not a default variant)"
        ),
        built_from="operator",
        saved="operator",
        colour="#bcbd22",
        ranked=True,
        method="svd_truncated",
        variant_text="the champion's SVD truncated to rank {rank}",
        places={"variant": Place(2)},
    ),
    MapKind(
        name="jacobian",
        label="mean Jacobian E[J]",
        meaning="the ridge map with its action on the probed directions replaced by the model's mean Jacobian",
        built_from="model",
        saved="recomputed",
        colour="#d62728",
        places={"atlas": Place(5, column="E[J]")},
    ),
    MapKind(
        name="own",
        label="own-language map",
        meaning="the ridge map refitted on the other language's own train statistics",
        built_from="language_stats",
        saved="recomputed",
        colour="#17becf",
        places={"languages_features": Place(1), "languages_causal": Place(1)},
    ),
):
    register(_kind)
del _kind


# Not a kind but shown beside them: the unpatched model.
CLEAN_LABEL, CLEAN_COLOUR = "clean", "#7f7f7f"

__all__ = [
    "CLEAN_COLOUR",
    "CLEAN_LABEL",
    "MapKind",
    "PatchInputs",
    "PatchValue",
    "Place",
    "VariantSpec",
    "by_key",
    "causal_keys",
    "get",
    "keys_for",
    "kinds_for",
    "parse_variant",
    "register",
    "unregister",
    "variant_method",
    "variant_forms",
    "variant_text",
]
