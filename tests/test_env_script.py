"""`source scripts/env.sh` in a person's shell: the environment is set up and the shell keeps its own
options (a sourced `set -euo pipefail` would close the terminal on the first failing command)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOW = 'echo "status=$status"; set -o | grep -E "errexit|nounset|pipefail"; false; echo still-here'


def _ready_venv(tmp_path: Path) -> Path:
    """A stand-in venv whose stamps match, so sourcing installs nothing."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "python").chmod(0o755)
    pinned = (ROOT / "requirements.txt").read_bytes() + (ROOT / "requirements.lock").read_bytes()
    (venv / ".ato-requirements.sha256").write_text(hashlib.sha256(pinned).hexdigest() + "\n")
    project = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".ato-project.sha256").write_text(project + "\n")
    return venv


def _shell(script: str, venv: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "--norc", "--noprofile", *flags, "-c", script],
        cwd=ROOT,
        env={**os.environ, "ATO_VENV": str(venv), **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _options(stdout: str) -> dict[str, str]:
    """`set -o` lines for the three strict-mode options: name → on/off."""
    rows = (line.split() for line in stdout.splitlines())
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0] in ("errexit", "nounset", "pipefail")}


def test_sourcing_leaves_an_interactive_shell_as_it_was(tmp_path):
    venv = _ready_venv(tmp_path)
    out = _shell(f"source scripts/env.sh; status=$?; {SHOW}; echo PATH=$PATH", venv, "-i")
    assert "status=0" in out.stdout and "still-here" in out.stdout, out.stderr
    assert _options(out.stdout) == {"errexit": "off", "nounset": "off", "pipefail": "off"}
    assert f"PATH={venv}/bin:" in out.stdout and "HF_HUB_OFFLINE" not in out.stderr
    assert "_ato_root" not in _shell("source scripts/env.sh; set", venv).stdout


def test_a_failed_install_returns_an_error_instead_of_closing_the_shell(tmp_path):
    venv = tmp_path / "no-venv"
    out = _shell(f"source scripts/env.sh; status=$?; {SHOW}", venv, "-i", PYTHON="false")
    assert "status=1" in out.stdout and "still-here" in out.stdout, out.stderr
    assert _options(out.stdout)["errexit"] == "off"


def test_strict_callers_keep_strict_mode_and_stop_on_a_failed_install(tmp_path):
    """scripts/repro.sh and scripts/test.sh run `set -euo pipefail` and then source the script."""
    strict = "set -euo pipefail; source scripts/env.sh; set -o | grep -E 'errexit|nounset|pipefail'; echo after"
    ok = _shell(strict, _ready_venv(tmp_path))
    assert ok.returncode == 0 and "after" in ok.stdout
    assert _options(ok.stdout) == {"errexit": "on", "nounset": "on", "pipefail": "on"}
    failed = _shell(strict, tmp_path / "no-venv", PYTHON="false")
    assert failed.returncode != 0 and "after" not in failed.stdout
