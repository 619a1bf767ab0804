"""Generated files are never kept by hand: the committed dvc.yaml and docs/contracts.md are byte for
byte what `python -m ato.generate` writes, and the generator follows the code it reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ato.generate import ROOT, dvc_yaml, generated_files
from ato.generate.__main__ import main as generate_main


@pytest.mark.parametrize("name", ["dvc.yaml", "docs/contracts.md", "README.md"])
def test_committed_file_is_the_generators_output(name: str):
    wanted = generated_files()[ROOT / name]
    assert (ROOT / name).read_text() == wanted, f"{name} is stale: run `python -m ato.generate`"


def test_a_new_import_reaches_the_stages_deps(tmp_path: Path):
    """The module deps follow the code: a stage that starts importing a module declares it."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    assert "src/ato/atlas/tables.py" not in dvc_yaml.module_deps("tune", src)
    stage = src / "ato" / "stages" / "tune.py"
    stage.write_text(stage.read_text() + "\n\ndef _probe() -> None:\n    from ato.atlas import tables  # noqa: F401\n")
    stages = yaml.safe_load(dvc_yaml.render(src))["stages"]
    assert "src/ato/atlas/tables.py" in stages["tune"]["do"]["deps"]
    assert "src/ato/atlas/tables.py" not in stages["fit"]["do"]["deps"]


def test_check_flags_a_stale_file_and_writing_fixes_it(tmp_path: Path):
    for name in ("dvc.yaml", "docs/contracts.md", "README.md", "src"):
        source, target = ROOT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    (tmp_path / "dvc.yaml").write_text((tmp_path / "dvc.yaml").read_text().replace("cmd: ato fit", "cmd: ato fitt"))
    assert generate_main(["--root", str(tmp_path), "--check"]) == 1
    assert generate_main(["--root", str(tmp_path)]) == 0
    assert generate_main(["--root", str(tmp_path), "--check"]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()


def test_cli_help_lists_the_params_dvc_yaml_declares():
    """`ato <stage> --help` names the params the stage reads: those of the stage table (dvc.yaml),
    less `paths` (every stage) and `prepare` where it only labels the MLflow runs."""
    import re

    from ato.cli import STAGES as CLI_STAGES
    from ato.generate.pipeline import MODEL_LABEL, STAGES

    for stage in STAGES:
        listed = re.search(r"\(params: ([^)]*)\)", CLI_STAGES[stage.name][1])
        assert listed, f"`ato {stage.name}` help lists no params"
        helped = {key.removesuffix(".*") for key in listed.group(1).split(", ")}
        declared = {e.path.removesuffix(".${key}") for e in stage.params if e.path != "paths" and e is not MODEL_LABEL}
        assert helped == declared, (
            f"`ato {stage.name}` help lists {sorted(helped)}, dvc.yaml declares {sorted(declared)}"
        )


def test_the_stage_table_has_every_cli_stage_in_order():
    from ato.cli import STAGES as CLI_STAGES
    from ato.generate.pipeline import STAGES

    assert [stage.name for stage in STAGES] == list(CLI_STAGES)


def test_the_readme_stage_table_follows_the_stage_table(tmp_path: Path):
    """README's stage table is rendered from the stage table: a stale row is rewritten, prose outside the
    markers is left as it was, and missing markers are an error naming the file."""
    from ato.generate import readme

    text = (ROOT / "README.md").read_text()
    (tmp_path / "README.md").write_text(text.replace("| `report` |", "| `report` | stale |", 1))
    assert readme.render(tmp_path) == text
    (tmp_path / "README.md").write_text("# no table here\n")
    with pytest.raises(ValueError, match="README.md: the stage-table markers are missing"):
        readme.render(tmp_path)
