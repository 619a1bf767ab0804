"""Reading params.yaml into the typed sections: types checked against the dataclasses' annotations,
then the value checks types alone cannot express. Unknown keys, wrong types and impossible values
raise `ParamsError` naming the key, before any compute starts."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .sections import SPLITS, AtlasParams, CausalParams, ContextParams, Pair, Params, ParamsError

_PAIR_NAME = re.compile(r"^L(\d{2,})_k(\d+)$")


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
        "evaluate.feature_resamples": params.evaluate.feature_resamples,
        "evaluate.curve_resamples": params.evaluate.curve_resamples,
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
    if params.evaluate.curve_blocks < 8 or params.evaluate.curve_blocks % 8:
        raise ParamsError(f"evaluate.curve_blocks: a positive multiple of 8, got {params.evaluate.curve_blocks}")
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
    if not 0 < params.evaluate.feature_level < 1:
        raise ParamsError(f"evaluate.feature_level: must be in (0, 1), got {params.evaluate.feature_level}")
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
    _check_context(params.context)
    if n_layers is not None:
        check_depth(params, n_layers)


def _check_position_sets(causal: CausalParams) -> None:
    """Refuse a position set holding a position whose patch cannot change any scored prediction
    (BOS at 0, or the last position, whose own next-token prediction is not scored): such a set
    would report a causal effect of exactly zero (docs/method.md#causal)."""
    from ..math.positions import unscorable_positions

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


def _check_context(c: ContextParams) -> None:
    for key in ("lags", "n_trials", "bootstrap_resamples", "batch_size"):
        if getattr(c, key) < (0 if key == "lags" else 1):
            raise ParamsError(
                f"context.{key}: must be {'>= 0' if key == 'lags' else 'positive'}, got {getattr(c, key)}"
            )
    if not 0 < c.alpha_min < c.alpha_max:
        raise ParamsError("context.alpha_min/alpha_max: need 0 < alpha_min < alpha_max")
    fractions = c.curve_fractions
    if not fractions or fractions[-1] != 1 or any(not 0 < a < b for a, b in zip(fractions, fractions[1:])):
        raise ParamsError(f"context.curve_fractions: increasing fractions in (0, 1] ending at 1, got {fractions}")
    if not 0 < c.level < 1:
        raise ParamsError(f"context.level: must be in (0, 1), got {c.level}")


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
