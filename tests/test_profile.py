"""The quick profile (`scripts/repro.sh --profile quick`): params/quick.yaml written over params.yaml
is valid params, keeps every other key and comment, and the summary it gives says it is a smoke run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ato.params import load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def apply(profile: Path, params: Path) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "apply_profile.py"
    return subprocess.run([sys.executable, str(script), str(profile), str(params)], capture_output=True, text=True)


def test_the_quick_profile_replaces_its_keys_and_keeps_the_rest(tmp_path):
    target = Path(shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml"))
    out = apply(ROOT / "params" / "quick.yaml", target)
    assert out.returncode == 0, out.stderr
    quick, default = load_params(target), load_params(ROOT / "params.yaml")
    profile = yaml.safe_load((ROOT / "params" / "quick.yaml").read_text())
    assert quick.report.profile == "quick" and default.report.profile == "default"
    assert sorted(quick.pairs) == sorted(profile["pairs"])  # replaced whole, not merged
    assert quick.corpus.tokens == profile["corpus"]["tokens"] and quick.sae.steps == profile["sae"]["steps"]
    assert (quick.causal.seq_len, quick.sae.width, quick.paths) == (
        default.causal.seq_len,
        default.sae.width,
        default.paths,
    )
    text = target.read_text()
    assert "# Transport atlas: every stored layer pair" in text and "gguf_file: null" in text  # comments, nulls kept


def test_a_profile_key_params_yaml_lacks_is_refused_naming_it(tmp_path):
    target = Path(shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml"))
    before = target.read_text()
    (tmp_path / "bad.yaml").write_text("corpus:\n  tokenz: 5\n")
    out = apply(tmp_path / "bad.yaml", target)
    assert out.returncode != 0 and "corpus.tokenz" in out.stderr
    assert target.read_text() == before


def test_the_summary_opens_with_a_smoke_banner_only_under_a_profile():
    from ato.reporting.markdown import render_summary
    from ato.reporting.settings import SummarySettings

    def summary(profile: str) -> str:
        params = parse_params({"pairs": {"L05_k1": {"L": 5, "k": 1}}, "report": {"profile": profile}})
        return render_summary(SummarySettings.from_params(params), [], {})

    quick, default = summary("quick"), summary("default")
    assert "SMOKE RUN" in quick.split("\n## ")[0].split("Model:")[0]  # before any number
    assert "SMOKE RUN" not in default
