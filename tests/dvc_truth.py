"""What each stage really depends on, derived from the code: its import closure inside `ato`
(`ato.generate.closure`, which also writes dvc.yaml's module deps) and the params keys it reads
(recorded by running it with `ATO_PARAMS_TRACE`). tests/test_dvc_truth.py and tests/test_dvc_pipeline.py
compare them with dvc.yaml; `python tests/dvc_truth.py` prints each stage's module deps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ato.generate.closure import import_closure

ROOT = Path(__file__).resolve().parents[1]


def load_pipeline(project: Path = ROOT) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        yaml.safe_load((project / "dvc.yaml").read_text())["stages"],
        yaml.safe_load((project / "params.yaml").read_text()),
    )


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def expand(text: str, params: dict[str, Any], key: str | None = None) -> str:
    """Substitute `${key}` (a foreach pair name) and `${a.b}` params references."""
    if key is not None:
        text = text.replace("${key}", key)
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(_lookup(params, m.group(1))), text)


def stage_entries(stages: dict[str, Any], params: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str | None]]:
    """dvc stage name (`tune@L05_k1`) → (its definition, the pair key or None)."""
    out: dict[str, tuple[dict[str, Any], str | None]] = {}
    for name, spec in stages.items():
        if "foreach" in spec:
            for key in _lookup(params, spec["foreach"].strip("${} ")):
                out[f"{name}@{key}"] = (spec["do"], key)
        else:
            out[name] = (spec, None)
    return out


def _entries(items: list[Any]) -> list[str]:
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]


def declared_params(spec: dict[str, Any], key: str | None) -> set[str]:
    return {p.replace("${key}", key or "") for p in _entries(spec.get("params", []))}


def templated_params(spec: dict[str, Any]) -> set[str]:
    """Params referenced as `${a.b}` in the stage's cmd, deps and outs (a change there reruns it)."""
    text = yaml.safe_dump({k: v for k, v in spec.items() if k != "params"})
    return {m for m in re.findall(r"\$\{([^}]+)\}", text) if m != "key"}


def covered(key: str, declared: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


if __name__ == "__main__":
    stages, _ = load_pipeline()
    for stage in stages:
        files = sorted(str(p.relative_to(ROOT)) for p in import_closure(f"ato.stages.{stage}"))
        print(f"{stage}:\n  " + "\n  ".join(files))
