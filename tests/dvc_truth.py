"""What each stage really depends on, derived from the code: its import closure inside `ato`
(static, from the AST, lazy function-level imports included) and the params keys it reads (recorded
by running it with `ATO_PARAMS_TRACE`). tests/test_dvc_truth.py and tests/test_dvc_pipeline.py
compare them with dvc.yaml; `python tests/dvc_truth.py` prints each stage's module deps."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _lazy_exports(package_file: Path) -> dict[str, str]:
    """`_LAZY = {"Name": "submodule", …}` in a package __init__ (PEP 562 lazy exports)."""
    for node in ast.walk(ast.parse(package_file.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` and inside a module `__getattr__` (PEP 562
    lazy exports, resolved name by name through `_LAZY`)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            continue
        out.append(node)
        todo += list(ast.iter_child_nodes(node))
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Modules of ours that module `name` (file `path`) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ato"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "ato":
                continue
            found.add(target)
            target_file = module_file(target)
            lazy = _lazy_exports(target_file) if target_file and target_file.name == "__init__.py" else {}
            for alias in node.names:
                if module_file(f"{target}.{alias.name}"):
                    found.add(f"{target}.{alias.name}")
                elif alias.name in lazy:
                    found.add(f"{target}.{lazy[alias.name]}")
    return found


def import_closure(module: str) -> set[Path]:
    """Files of every `ato` module `module` needs at run time, parent packages included."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        path = module_file(name)
        if path is not None:
            todo += sorted(_imports(name, path))
    return {p for p in (module_file(n) for n in seen) if p is not None}


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


def declared_deps(spec: dict[str, Any], params: dict[str, Any], key: str | None) -> list[str]:
    return [expand(d, params, key) for d in _entries(spec.get("deps", []))]


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
