"""``python -m pipeline.cli`` with bench-only patches, to measure proposed stream changes
without editing the stream code (see ``bench/stream.py``'s variants).

    BENCH_CONSUMER_OVERRIDES  JSON merged into pipeline.kafka_io.CONSUMER_DEFAULTS
                              (e.g. {"max_partition_fetch_bytes": 1048576})
    BENCH_PARALLEL_DECODE     decode threads of pipeline.inference (default: its default_parallelism())

Precision and model threads need no patch: they are the featurizer's ``--precision`` and
``--model-threads`` options.
"""

from __future__ import annotations

import json
import os
import sys


def _patch() -> None:
    overrides = os.environ.get("BENCH_CONSUMER_OVERRIDES")
    if overrides:
        from pipeline import kafka_io

        kafka_io.CONSUMER_DEFAULTS.update(json.loads(overrides))
    parallel = os.environ.get("BENCH_PARALLEL_DECODE")
    if parallel:
        from pipeline import inference

        inference.default_parallelism = lambda: int(parallel)


if __name__ == "__main__":
    _patch()
    from pipeline.cli import main

    sys.exit(main())
