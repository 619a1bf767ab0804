#!/usr/bin/env bash
# The test suite: set up the environment if needed, then run pytest (unit + integration).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
python -m pytest -q "$@"
