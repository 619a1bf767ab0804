"""`ato <stage>`: parse params, dispatch to the stage's `main`. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

# Nothing in the default run may reach for the network.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

STAGES: dict[str, tuple[str, str, bool]] = {
    # name: (module, help, works per pair)
    "prepare": (
        "prepare",
        "float32 safetensors copy of the model + weights digest → paths.model_dir (params: prepare.*)",
        False,
    ),
    "collect": (
        "collect",
        "residuals of every requested block → zarr store paths.store, split by document "
        "(params: corpus.*, collect.*, pairs)",
        False,
    ),
    "validate": (
        "validate",
        "great-expectations checks of the store → reports/validation; fails on bad data "
        "(params: validate.*, stats.chunk_tokens)",
        False,
    ),
    "stats": (
        "stats",
        "float64 sufficient statistics per pair and split → paths.stats (params: stats.*, pairs)",
        False,
    ),
    "tune": (
        "tune",
        "Optuna search of the ridge α on exact validation R² → reports/tuning "
        "(params: tune.*, pairs, stats.include_bos)",
        True,
    ),
    "fit": (
        "fit",
        "refit at the chosen α → paths.operators; MLflow run + registry "
        "(params: fit.*, tune.standardize, pairs, stats.include_bos)",
        True,
    ),
    "sae": ("sae", "train or load one SAE per target layer → paths.sae_dir (params: sae.*, corpus.*, pairs)", False),
    "select": ("select", "score and rank SAE features → paths.features (params: select.*, pairs)", False),
    "evaluate": (
        "evaluate",
        "test-split R² + baselines, feature R², CCA ceiling, η(r), subspace → "
        "reports/metrics (params: evaluate.*, pairs, stats.include_bos, stats.chunk_tokens, report.dpi)",
        True,
    ),
    "context": (
        "context",
        "carried / moved / computed: context maps (lagged, prefix, routed by the model's attention) of every pair "
        "from one forward pass per split, α tuned on validation R²_w, budget with intervals over test sequences → "
        "reports/context, paths.context_operators (params: context.*, pairs)",
        False,
    ),
    "causal_reference": (
        "causal_reference",
        "clean, zero- and mean-ablation log-perplexity once per target layer → reports/causal/reference "
        "(params: causal.*, pairs)",
        False,
    ),
    "causal": (
        "causal",
        "log-perplexity under the pair's patches of block L+k vs its target's reference, intervals over "
        "sequences → reports/causal (params: causal.*, report.dpi, pairs)",
        True,
    ),
    "languages": (
        "languages",
        "the operators on French/Spanish text, per-language maps, transfer matrix, subspace overlaps, causal Δ → "
        "reports/languages (params: languages.*, corpus.*, pairs, stats.include_bos, stats.chunk_tokens, "
        "evaluate.min_active_tokens, evaluate.transported_r2, causal.interval, causal.bootstrap_resamples, "
        "causal.seed, causal.loss_chunk_tokens, report.dpi)",
        False,
    ),
    "atlas": (
        "atlas",
        "every stored layer pair (L, L+k ≤ L+k_max) from one joint Gram pass: five operators, η, subspace, "
        "mean Jacobian vs ridge, causal Δ on a few pairs → reports/atlas "
        "(params: atlas.*, stats.include_bos, report.dpi)",
        False,
    ),
    "report": (
        "report",
        "summary.md, comparison figures, plot CSVs over all pairs → reports/ "
        "(params: report.*, pairs, stats.include_bos, evaluate.transported_r2, evaluate.min_active_tokens, "
        "evaluate.subspace_fraction, evaluate.null_replicates)",
        False,
    ),
}


# Using operators downstream: name → (module, function(args) → exit code, help). No params file needed
# (except `export --all`).
TOOLS: dict[str, tuple[str, str, str]] = {
    "score": (
        "score",
        "score_command",
        "score an operator on your own documents: residual R² and Δ log-perplexity of the spliced model, "
        "beside the identity map, with intervals over documents (streamed)",
    ),
    "export": ("export", "export_command", "export operators as hub-style folders (weights, config, model card)"),
    "import": ("export", "import_command", "check an exported folder's digest and install it as an operator"),
}


TRACKING_URI_HELP = (
    "MLflow store holding models:/ operators (default: MLFLOW_TRACKING_URI, else paths.mlflow_uri of "
    "./params.yaml); a missing SQLite file is an error, never created"
)


def _add_tools(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("score", help=TOOLS["score"][2], description=TOOLS["score"][2])
    s.add_argument("--operator", required=True, help="operator directory or registry URI models:/<name>@<alias>")
    s.add_argument("--variant", default=None, help="a variant of the operator directory (rank64, procrustes, …)")
    s.add_argument("--text", required=True, help=".txt (documents separated by blank lines) or .jsonl (--text-field)")
    s.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    s.add_argument("--model", default="models/base", help="prepared model directory or HF model (default: models/base)")
    s.add_argument("--mode", default="replace", choices=["replace", "add-delta"], help="splice mode (default: replace)")
    s.add_argument("--max-length", type=int, default=256, help="tokens per window (default: 256)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    s.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        help="also write the scores as JSON to this file; without a file, JSON alone on stdout (the table on stderr)",
    )
    s.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    e = sub.add_parser("export", help=TOOLS["export"][2], description=TOOLS["export"][2])
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--operator", help="operator directory or registry URI models:/<name>@<alias>")
    what.add_argument("--all", action="store_true", help="every pair of --params and each of its variants")
    e.add_argument("--variant", default=None, help="with --operator: one of its variants")
    e.add_argument("--out", required=True, help="folder to write (with --all: one sub-folder per operator)")
    e.add_argument("--params", default="params.yaml", help="params file for --all (default: params.yaml)")
    e.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    i = sub.add_parser("import", help=TOOLS["import"][2], description=TOOLS["import"][2])
    i.add_argument("folder", help="a folder written by `ato export`")
    i.add_argument("--to", required=True, help="operator directory to create, e.g. models/operators/L05_k1")
    i.add_argument("--digest", default=None, help="the export digest you expect (sha256:…), e.g. as published")
    i.add_argument("--force", action="store_true", help="replace the --to folder if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ato",
        description="Activation transport operators: one subcommand per pipeline stage. Every path "
        "and setting comes from params.yaml (see the comments there); `dvc repro` runs them in order.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_module, help_text, per_pair) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        if per_pair:
            p.add_argument("--pair", default=None, help="one pair name such as L06_k1 (default: all pairs)")
    ui_help = "MLflow UI on 127.0.0.1 for paths.mlflow_uri; Ctrl-C or SIGTERM stops it"
    ui = sub.add_parser("ui", help=ui_help, description=ui_help)
    ui.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    _add_tools(sub)
    return parser


def configure_logging() -> None:
    """Stage messages go to stderr through `logging` (INFO; ATO_LOG_LEVEL overrides)."""
    level = os.environ.get("ATO_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "optuna", "great_expectations", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))


def fail(command: str, kind: str, message: object, code: int) -> int:
    sys.stderr.write(f"ato {command}: {kind}{message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    from .errors import AtoError
    from .params import TRACE_ENV, ParamsError, load_params, traced

    args = build_parser().parse_args(argv)
    if args.command in TOOLS:
        configure_logging()
        tool, function, _help = TOOLS[args.command]
        try:
            return getattr(importlib.import_module(f".{tool}", __package__), function)(args)
        except ParamsError as exc:
            return fail(args.command, "params error: ", exc, 2)
        except AtoError as exc:
            return fail(args.command, "error: ", exc, 1)
    try:
        params = load_params(args.params)
        if getattr(args, "pair", None) and args.pair not in params.pairs:
            raise ParamsError(f"--pair {args.pair}: not in pairs ({', '.join(params.pairs)})")
    except ParamsError as exc:
        return fail(args.command, "params error: ", exc, 2)
    configure_logging()
    if args.command == "ui":
        from .tracking import RunContext
        from .ui import serve_ui

        return serve_ui(RunContext.from_params(params), port=args.port)
    trace_file = os.environ.get(TRACE_ENV)
    if trace_file:
        params, reads = traced(params)
    module = importlib.import_module(f".stages.{STAGES[args.command][0]}", __package__)
    kwargs = {"pair": args.pair} if STAGES[args.command][2] else {}
    try:
        module.main(params, **kwargs)
    except ParamsError as exc:
        return fail(args.command, "params error: ", exc, 2)
    except AtoError as exc:
        return fail(args.command, "error: ", exc, 1)
    except KeyboardInterrupt:
        return fail(args.command, "", "interrupted; completed outputs are kept, rerun to resume", 130)
    if trace_file:
        record = {"stage": args.command, "pair": getattr(args, "pair", None), "params": sorted(reads)}
        with open(trace_file, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
