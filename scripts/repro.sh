#!/usr/bin/env bash
# The main job: set up the environment, then rebuild the whole pipeline on the embedded default.
# `--profile NAME` first writes params/NAME.yaml over params.yaml (README "How long": `quick` is a
# smoke run of a few minutes, marked as such in the summary; `git checkout params.yaml` undoes it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
if [[ "${1:-}" == "--profile" ]]; then
    [[ -f "params/${2:-}.yaml" ]] || { echo "repro.sh: no params/${2:-}.yaml (profiles: $(ls params))" >&2; exit 2; }
    .venv/bin/python scripts/apply_profile.py "params/$2.yaml" params.yaml
    shift 2
fi
dvc repro "$@"
