#!/usr/bin/env bash
# The main job: set up the environment, then rebuild the whole pipeline on the embedded default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
dvc repro "$@"
