"""Files generated from the code, never edited by hand: dvc.yaml (from the stage table and each
stage's import closure), docs/contracts.md's record tables (from the records) and README.md's stage
table (from the stage table). `python -m
ato.generate` rewrites both; `--check` only says which differ (tests/test_generated.py)."""

from __future__ import annotations

from pathlib import Path

from .closure import SRC

ROOT = SRC.parent


def generated_files(root: Path = ROOT) -> dict[Path, str]:
    """Each generated file → the text it must hold."""
    from . import contracts, dvc_yaml, readme

    return {
        root / "dvc.yaml": dvc_yaml.render(root / "src"),
        root / "docs" / "contracts.md": contracts.generate(root),
        root / "README.md": readme.render(root),
    }
