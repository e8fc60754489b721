#!/usr/bin/env bash
# Quickstart, tests: install (with test extras), then run the whole test suite against the real
# stack: real TensorFlow, a real local Kafka-protocol broker, real Parquet, headless Chromium.
# Arguments go to pytest. The broker is Tansu; DEEPER_TEST_BROKER=kafka runs Apache Kafka instead
# (needs Java 17+ and Maven), e.g. `DEEPER_TEST_BROKER=kafka bash scripts/test.sh -m stream`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian's chromium for the report rendering test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "   (chromium could not be installed; the browser test will be skipped)"
fi
EXTRAS=test bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
