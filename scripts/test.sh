#!/usr/bin/env bash
# Install everything the tests need (once) and run the whole suite; hub-marked tests are skipped.
#   scripts/test.sh                 # all tests
#   scripts/test.sh -k api -x       # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y chromium
fi

.venv/bin/python -m ruff check .   # lint first: a lint error fails CI like a failing test (settings: ruff.toml)

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"   # tests never reach the Hub; hub tests are deselected below
status=0
# --durations: the slowest tests are listed at the end, to keep the whole suite well under 30 minutes on CI's
# 2-core machine
.venv/bin/python -m pytest -m "not hub" -p no:cacheprovider --durations=30 "$@" || status=$?
# pytest exit code 5 = "no tests collected" (e.g. a -k filter that matches nothing): not a failure of the code
if [ "$status" -eq 5 ]; then status=0; fi
exit "$status"
