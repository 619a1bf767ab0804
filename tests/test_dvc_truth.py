"""dvc.yaml tells the truth: every path is templated from params.yaml's `paths`, and the file names
it declares are the ones `ato.artifacts.Layout` writes. (Its module deps are generated from each
stage's import closure: tests/test_generated.py; the params each stage reads are recorded by running
the whole pipeline: tests/test_dvc_pipeline.py.)"""

from __future__ import annotations

from pathlib import Path

from dvc_truth import ROOT, expand, load_pipeline, stage_entries

STAGES, PARAMS = load_pipeline()
ENTRIES = stage_entries(STAGES, PARAMS)


def _under(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_paths_are_written_once():
    """No literal copy of a `paths.*` value in dvc.yaml: each is templated as ${paths.<key>}."""
    text = (ROOT / "dvc.yaml").read_text()
    for key, value in PARAMS["paths"].items():
        if "/" in str(value) and not str(value).startswith(("sqlite:", "postgresql:")):
            assert f" {value}" not in text and f"- {value}" not in text, f"paths.{key} ({value}) written literally"


def test_declared_outputs_match_the_layout():
    """Every per-pair and per-stage file the Layout names is declared by the stage that writes it."""
    from ato.artifacts import Layout
    from ato.params import load_params

    layout = Layout.from_params(load_params(ROOT / "params.yaml"))
    pair = next(iter(PARAMS["pairs"]))
    outs: dict[str, set[str]] = {}
    for name, (spec, key) in ENTRIES.items():
        declared = set()
        for kind in ("outs", "metrics", "plots"):
            for item in spec.get(kind, []) or []:
                declared.add(next(iter(item)) if isinstance(item, dict) else item)
        outs[name] = {expand(p, PARAMS, key) for p in declared}
    expected = {
        f"tune@{pair}": [layout.tuning(pair), layout.tuning_curve(pair)],
        f"fit@{pair}": [layout.operator(pair)],
        f"evaluate@{pair}": [layout.metrics(pair), layout.transport(pair)],
        f"causal@{pair}": [layout.causal(pair), layout.causal_sequences(pair)],
        "collect": [layout.store],
        "stats": [layout.stats],
        "sae": [layout.sae_dir],
        "select": [layout.features],
        "report": [layout.summary],
        "validate": [layout.validation],
    }
    for stage, paths in expected.items():
        for path in paths:
            rel = str(Path(path).resolve().relative_to(ROOT))
            assert _under(rel, sorted(outs[stage])), f"{stage}: {rel} is not among its declared outputs"
