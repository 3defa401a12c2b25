#!/usr/bin/env bash
# Install the runtime dependencies (once) and start the app on http://127.0.0.1:7860 with the built-in model.
#   scripts/run.sh                      # arguments go to app.py, e.g. --model sd15 --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
exec .venv/bin/python app.py "$@"
