"""Style is enforced, not suggested: lint, format, types and the import contracts are clean, and the
lightweight entry points stay light. (The same checks run for contributors via .pre-commit-config.yaml.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHECKED = ["src", "tests", "bench"]


def run(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_ruff_check_is_clean():
    out = run(str(BIN / "ruff"), "check", "--no-cache", *CHECKED)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]


def test_ruff_format_is_clean():
    out = run(str(BIN / "ruff"), "format", "--check", "--no-cache", *CHECKED)
    assert out.returncode == 0, "files need `ruff format`:\n" + out.stdout[-5000:] + out.stderr[-2000:]


@pytest.mark.slow
def test_mypy_is_clean():
    out = run(sys.executable, "-m", "mypy", "--cache-dir", "/tmp/ato-mypy-cache", timeout=900)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]


def test_import_contracts_hold():
    """Stages never import each other; libraries never import stages; math imports nothing of ours."""
    out = run(str(BIN / "lint-imports"), "--no-cache")
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert "broken" not in out.stdout.lower().replace("0 broken", "")


def test_every_top_level_module_has_a_layer():
    """A new module or package of `ato` is placed in pyproject's layers contract before it lands, so
    no module escapes the import rules (lint-imports' `exhaustive` says the same, slower)."""
    import pkgutil
    import re
    import tomllib

    import ato

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    placed = {name for layer in layers for name in re.split(r"[|:]", layer.replace(" ", ""))}
    modules = {m.name for m in pkgutil.iter_modules(ato.__path__)}
    assert sorted(modules - placed) == [], "modules of ato in no layer of pyproject's import-linter contract"
    assert sorted(placed - modules) == [], "layers name modules that do not exist"


def test_no_print_in_the_library():
    """Messages go through logging (ruff's T20 rule covers src/; this names the offenders plainly)."""
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "src").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if line.lstrip().startswith("print(")
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "code",
    [
        "import ato",
        "from ato.cli import build_parser; build_parser()",
        "from ato.params import load_params; load_params('params.yaml')",
        "import ato.artifacts",
    ],
)
def test_light_entry_points_do_not_import_torch(code: str):
    out = run(sys.executable, "-c", f"{code}; import sys; print('torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"{code!r} imported torch"


def test_params_error_exits_without_torch(tmp_path: Path):
    """A bad params file fails fast, naming the key, before torch is imported."""
    bad = tmp_path / "params.yaml"
    bad.write_text("stats: {chunk_tokens: -1}\npairs: {L00_k1: {L: 0, k: 1}}\n")
    code = (
        "import sys; from ato.cli import main; rc = main(['stats', '--params', sys.argv[1]]); "
        "print(rc, 'torch' in sys.modules)"
    )
    out = run(sys.executable, "-c", code, str(bad))
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
    assert "stats.chunk_tokens" in out.stderr


def test_no_design_references_outside_the_repository():
    """Comments point at docs/ (the design of record), not at a document the repository lacks."""
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py") if "DESIGN §" in p.read_text()]
    assert hits == []
    for doc in ("method.md", "statistics.md", "conventions.md", "contracts.md", "architecture.md", "real-scale.md"):
        assert (ROOT / "docs" / doc).exists(), doc
