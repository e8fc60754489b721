#!/usr/bin/env bash
# Create .venv (if missing) and install go-deeper into it. Idempotent; used by demo.sh and test.sh.
#   EXTRAS=test bash scripts/setup.sh   -> also the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
spec="."
if [ -n "${EXTRAS:-}" ]; then spec=".[${EXTRAS}]"; fi
echo "== installing go-deeper ($spec) and its dependencies (tensorflow-cpu is ~270 MB on first install)"
python -m pip install -q -e "$spec" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import pipeline, tensorflow, tf_slim, kafka, pyarrow, sklearn" \
  || { echo "installation failed" >&2; exit 1; }
