#!/usr/bin/env bash
# Quickstart, main job: install, then run the streaming demo end to end on the bundled photos.
# Uses $KAFKA_BOOTSTRAP_SERVERS if set, otherwise starts (and stops) a local broker on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec deeper demo "$@"
