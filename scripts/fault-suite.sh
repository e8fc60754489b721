#!/usr/bin/env bash
# The fault-injection suite (docs/faults.md): photos stream through a private broker while the
# featurizer is SIGKILLed 10 times, the scorer 10 times, and the broker killed and restarted 4
# times; prints the summary (missing, duplicate rows on disk, duplicate labels read_committed)
# and writes it as JSON. Exits non-zero unless it is clean.
#
#   bash scripts/fault-suite.sh --broker kafka|tansu --guarantee exactly-once|at-least-once \
#        [--images N] [--summary PATH]
#
# --broker kafka-cluster (as root: test hosts are network namespaces) runs the cluster scenarios
# instead: three Apache Kafka nodes, partition leaders and the active controller SIGKILLed, a
# featurizer's host cut off, a zombie featurizer, the scorer's links slow and reset (docs/cluster.md).
#
# More options: --help (--only broker_restarts, --keep, --featurizer-kills N, --leader-kills N, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import pipeline, localbucket, tensorflow" 2>/dev/null; then
  EXTRAS=test,durable bash scripts/setup.sh
fi
. .venv/bin/activate
exec python -m tests.faults.long_suite "$@"
