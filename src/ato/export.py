"""Export an operator as a self-describing folder in the layout model hubs use, and import it back.

An exported folder (`export_operator`; `ato export`) is publishable as it is, e.g. as a Hugging Face
model repository:

    operator.safetensors   the weights, byte for byte as fitted (W [d_out, d_in], b [d_out])
    config.json            the operator's config (model, weights digest, layers, α, method, data digest,
                           metrics …), unchanged: the folder is itself an operator directory
    README.md              the model card (`ato.model_card`): YAML front matter with the export digest,
                           then what the operator is, its data and metrics, and how to use it
    spectrum.png           singular values of W beside the identity's (`ato.plotting.operator`)
    <pair>_*.png           the pair's pipeline figures, where `--all` finds them

The export digest is sha256 over the weights' bytes and the canonical config (`operator_digest`); it
is written into the card. `import_operator` (`ato import`) recomputes it and refuses a folder whose
weights or config no longer match the card (or the digest the user expects), then copies the operator
atomically into an operator directory. The card itself may be edited freely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .artifacts import atomic_path, write_text_atomic
from .artifacts.operator import OperatorConfig
from .model_card import EXPORT_FORMAT, FRONT_MATTER, model_card
from .operators import (
    CONFIG,
    REGISTRY_SCHEME,
    VARIANTS,
    WEIGHTS,
    OperatorError,
    download_registered,
    identity_warning,
    load_operator,
)

log = logging.getLogger(__name__)

CARD = "README.md"
SPECTRUM = "spectrum.png"
FILE_MODE = 0o644  # exported files are ordinary files, whatever the mode of their source (DVC's cache is 0444)

__all__ = ["export_all", "export_operator", "import_operator", "operator_digest", "read_card"]


def operator_digest(directory: str | Path) -> str:
    """`sha256:<hex>` over the weights file's bytes and config.json's canonical JSON (sorted keys)."""
    directory = Path(directory)
    h = hashlib.sha256(f"{EXPORT_FORMAT}\n".encode())
    h.update(hashlib.sha256((directory / WEIGHTS).read_bytes()).digest())
    # the file's own content, not the typed record: the digest covers whatever the folder ships
    config = json.loads((directory / CONFIG).read_text())
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    return f"sha256:{h.hexdigest()}"


def _source_dir(source: str | Path, variant: str | None, tracking_uri: str | None = None) -> Path:
    registered = str(source).startswith(REGISTRY_SCHEME)
    directory = download_registered(str(source), tracking_uri) if registered else Path(source)
    if variant is not None:
        from .operators import variant_dir

        directory = variant_dir(directory, variant)
    return directory


def export_operator(
    source: str | Path,
    out: str | Path,
    *,
    variant: str | None = None,
    name: str | None = None,
    figures: list[Path] | None = None,
    extra_metrics: dict[str, float] | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Export the operator at `source` (a directory or `models:/<name>@<alias>`; `variant` picks one
    of its variants) to the folder `out`, written atomically. `name`: the repository name in the card
    (default: the folder's name); `figures`: more PNGs to ship and show; `extra_metrics`: evaluate's
    or causal's headline numbers (`pipeline_metrics`) to list beside the fit's."""
    from .plotting.operator import plot_spectrum

    directory = _source_dir(source, variant, tracking_uri)
    op = load_operator(directory)  # refuses tampered weights / config before anything is written
    out = Path(out)
    name = name or out.name
    with atomic_path(out) as tmp:
        tmp.mkdir()
        shipped = [SPECTRUM]
        for f in (WEIGHTS, CONFIG):
            _copy_plain(directory / f, tmp / f)
        plot_spectrum(op.W.double().numpy(), f"{name}: singular values of W", tmp / SPECTRUM)
        for fig in figures or []:
            if Path(fig).is_file():
                _copy_plain(Path(fig), tmp / Path(fig).name)
                shipped.append(Path(fig).name)
        warning = identity_warning(op.config, directory)
        card = model_card(op.config, name, operator_digest(tmp), shipped, extra_metrics or {}, warning)
        write_text_atomic(tmp / CARD, card)
        for path in tmp.iterdir():
            path.chmod(FILE_MODE)
    log.info("exported %s → %s", directory, out)
    return out


def _copy_plain(source: str | Path, dest: str | Path) -> None:
    """The bytes only, not the mode: a read-only source (a DVC cache link) gives a normal file."""
    shutil.copyfile(source, dest)
    Path(dest).chmod(FILE_MODE)


def read_card(folder: str | Path) -> dict[str, Any]:
    """The YAML front matter of an exported folder's README.md."""
    import yaml

    path = Path(folder) / CARD
    if not path.is_file():
        raise OperatorError(f"{path}: missing; {folder} is not an exported operator (run `ato export`)")
    m = FRONT_MATTER.match(path.read_text(encoding="utf-8"))
    if not m:
        raise OperatorError(f"{path}: no YAML front matter (--- … ---) at the top")
    try:
        front = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as exc:
        raise OperatorError(f"{path}: unreadable front matter: {exc}") from None
    if not isinstance(front, dict) or not isinstance(front.get("ato"), dict):
        raise OperatorError(f"{path}: the front matter has no `ato:` block; not exported by `ato export`")
    return front


def import_operator(
    folder: str | Path, dest: str | Path, expect_digest: str | None = None, *, force: bool = False
) -> Path:
    """Check an exported folder (the card's digest, and `expect_digest` if given, against the files)
    and copy the operator into the operator directory `dest` (atomically; card and figures included).
    An existing `dest` is replaced only with `force`."""
    folder, dest = Path(folder), Path(dest)
    if dest.exists() and not force:
        raise OperatorError(f"{dest}: already exists; pass --force (force=True) to replace it")
    card = read_card(folder)["ato"]
    for f in (WEIGHTS, CONFIG):
        if not (folder / f).is_file():
            raise OperatorError(f"{folder / f}: missing; the export is incomplete")
    digest = operator_digest(folder)
    recorded = card.get("digest")
    if digest != recorded:
        raise OperatorError(
            f"{folder}: digest {digest} of {WEIGHTS} + {CONFIG} differs from {recorded} in {CARD}; "
            "the weights or the config were changed after export"
        )
    if expect_digest is not None and digest != _with_scheme(expect_digest):
        raise OperatorError(f"{folder}: digest {digest}, but {_with_scheme(expect_digest)} was expected")
    load_operator(folder)  # the weights match config.json's sha256 and are well formed
    with atomic_path(dest) as tmp:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(".*"), copy_function=_copy_plain)
    log.info("imported %s (%s) → %s", folder, digest, dest)
    return dest


def _with_scheme(digest: str) -> str:
    return digest if digest.startswith("sha256:") else f"sha256:{digest}"


def export_all(params: Any, out: str | Path) -> list[Path]:
    """Every fitted pair of `params` and each of its variants: `<out>/<registry name>[-<variant>]/`,
    with the pair's pipeline figures and its evaluate / causal headline numbers where they exist."""
    from .artifacts import Layout
    from .tracking import registry_name

    layout, out = Layout.from_params(params), Path(out)
    done: list[Path] = []
    for pair in params.pairs:
        directory = layout.operator(pair)
        if not (directory / CONFIG).is_file():
            log.warning("%s: no operator (run `ato fit --pair %s`); not exported", directory, pair)
            continue
        base = registry_name(
            OperatorConfig.read(directory / CONFIG).model, pair
        )  # the model label the operator was fitted on, as `ato fit`
        figures = [layout.pair_figure(pair, kind) for kind in ("efficiency", "causal")]
        extra = pipeline_metrics(layout, pair)
        done.append(export_operator(directory, out / base, figures=figures, extra_metrics=extra))
        for variant in sorted(p.name for p in (directory / VARIANTS).glob("*") if (p / CONFIG).is_file()):
            name = f"{base}-{variant}"
            done.append(export_operator(directory, out / name, variant=variant, name=name, figures=figures))
    return done


EVALUATE_ROWS = {  # reports/metrics/<pair>.json key → the card's label
    "r2": "test R², streamed (evaluate)",
    "r2_weighted": "test R² variance-weighted, streamed (evaluate)",
    "identity_r2": "identity map ŷ = x, test R² (evaluate)",
    "ols_r2": "OLS (α = 0), test R² (evaluate)",
    "ceiling_full": "CCA ceiling: the best any linear map reaches (train)",
    "eta_test": "η: share of the CCA ceiling reached (test)",
    "cosine": "token cosine of ŷ and y (test)",
}
CAUSAL_ROWS = {  # reports/causal/<pair>.json headline key → the card's label
    "ato_delta_all": "causal Δ log-ppl, operator spliced in (nats/token)",
    "ato_delta_all_half_width": "causal Δ log-ppl, operator: 95 % half-width",
    "identity_delta_all": "causal Δ log-ppl, identity (blocks skipped)",
    "train_mean_delta_all": "causal Δ log-ppl, train-mean ablation",
    "recovered_all": "share of the identity's damage the operator recovers",
}


def pipeline_metrics(layout: Any, pair: str) -> dict[str, float]:
    """Evaluate's and causal's headline numbers (η, causal Δ …) for the card under readable labels,
    where the pair's reports exist and read."""
    from .artifacts import ArtifactError, CausalSummary, read_json

    out: dict[str, float] = {}
    try:
        m = read_json(layout.metrics(pair), "evaluate metrics")
        out |= {label: float(m[k]) for k, label in EVALUATE_ROWS.items() if isinstance(m.get(k), (int, float))}
    except ArtifactError:
        pass
    try:
        head = CausalSummary.read(layout.causal(pair)).headline_metrics()
        out |= {label: float(head[k]) for k, label in CAUSAL_ROWS.items() if isinstance(head.get(k), (int, float))}
    except (ArtifactError, KeyError, AttributeError):
        pass
    return out


# --------------------------------------------------------------------------------------------
# Commands (arguments: `ato.cli`)


def export_command(args: Any) -> int:
    import sys

    if args.all:
        from .params import load_params

        folders = export_all(load_params(args.params), args.out)
    else:
        extra = {} if args.variant else _reports_of(args.operator, args.params)
        folders = [
            export_operator(
                args.operator, args.out, variant=args.variant, extra_metrics=extra, tracking_uri=args.tracking_uri
            )
        ]
    for folder in folders:
        sys.stdout.write(f"{folder}  {read_card(folder)['ato']['digest']}\n")
    return 0


def _reports_of(operator: str, params_file: str) -> dict[str, float]:
    """`pipeline_metrics` of the operator's pair when it is the project's own fitted operator (its
    directory is the pair's `paths.operators` entry of `params_file`), else none: reports describe the
    operator the pipeline fitted, not a copy from elsewhere."""
    from .artifacts import Layout
    from .params import load_params, pair_name

    if str(operator).startswith(REGISTRY_SCHEME) or not Path(params_file).is_file():
        return {}
    if not (Path(operator) / CONFIG).is_file():
        return {}
    config = OperatorConfig.read(Path(operator) / CONFIG)
    params = load_params(params_file)
    pair = pair_name(config.layer_in, config.layer_out - config.layer_in)
    layout = Layout.from_params(params)
    if pair not in params.pairs or Path(operator).resolve() != layout.operator(pair).resolve():
        return {}
    return pipeline_metrics(layout, pair)


def import_command(args: Any) -> int:
    import sys

    dest = import_operator(args.folder, args.to, args.digest, force=args.force)
    sys.stdout.write(f"{dest}  {read_card(dest)['ato']['digest']}\n")
    return 0
