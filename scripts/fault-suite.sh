#!/usr/bin/env bash
# The long form of the fault-injection suite (docs/faults.md): 1000 photos per scenario through a
# durable local broker while the featurizer is SIGKILLed 10 times, the scorer 10 times, and the
# broker restarted 4 times; prints the summary and writes docs/faults-long-summary.json.
# Exits non-zero unless nothing was lost. Arguments go to `python -m tests.faults.long_suite`
# (e.g. --images 300 --featurizer-kills 4, --only broker_restarts, --keep, --raw-localbucket).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import pipeline, localbucket, tensorflow" 2>/dev/null; then
  EXTRAS=test,durable bash scripts/setup.sh
fi
. .venv/bin/activate
exec python -m tests.faults.long_suite "$@"
