#!/usr/bin/env bash
# The test suite: set up the environment if needed, then run pytest (unit + integration).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
# tests/test_feature_cards.py renders reports/features.html in headless Chromium (Debian's package);
# install it once if missing. If that fails, the test fails and says so (it is never skipped).
if ! command -v chromium >/dev/null 2>&1; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    { $sudo_cmd apt-get update -qq && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/dev/null || echo "scripts/test.sh: could not install chromium; tests/test_feature_cards.py will fail" >&2
fi
python -m pytest -q "$@"
