"""A stage's import closure inside `ato`, read statically from the AST (lazy function-level imports
included, `if TYPE_CHECKING:` blocks and PEP 562 `__getattr__` bodies resolved through `_LAZY`):
the source files dvc.yaml declares as the stage's deps."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]


def module_file(name: str, src: Path = SRC) -> Path | None:
    base = src / Path(*name.split("."))
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


def _import_target(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _imports(name: str, path: Path, src: Path) -> set[str]:
    """Modules of ours that module `name` (file `path`) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ato"}
        elif isinstance(node, ast.ImportFrom):
            target = _import_target(node, package)
            if target.split(".")[0] != "ato":
                continue
            found.add(target)
            target_file = module_file(target, src)
            lazy = _lazy_exports(target_file) if target_file and target_file.name == "__init__.py" else {}
            for alias in node.names:
                if module_file(f"{target}.{alias.name}", src):
                    found.add(f"{target}.{alias.name}")
                elif alias.name in lazy:
                    found.add(f"{target}.{lazy[alias.name]}")
    return found


def import_closure(module: str, src: Path = SRC) -> set[Path]:
    """Files of every `ato` module `module` needs at run time, parent packages included."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        path = module_file(name, src)
        if path is not None:
            todo += sorted(_imports(name, path, src))
    return {p for p in (module_file(n, src) for n in seen) if p is not None}
