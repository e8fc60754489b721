"""``python -m pipeline.cli`` with bench-only patches, to measure proposed stream changes
without editing the stream code (see ``bench/stream.py``'s variants).

    BENCH_CONSUMER_OVERRIDES  JSON merged into pipeline.kafka_io.CONSUMER_DEFAULTS
                              (e.g. {"max_partition_fetch_bytes": 16777216})
    BENCH_PRECISION           precision for every backbone the command loads (pipeline.precision)
    BENCH_TOPUP_POLL=1        a poll that returned fewer than max_poll_records is topped up with
                              what is already fetched (poll(timeout_ms=0)) before it is processed
"""

from __future__ import annotations

import json
import os
import sys


def _topping_up_consumer():
    from kafka import KafkaConsumer

    class ToppingUpConsumer(KafkaConsumer):
        """poll() that fills a partial batch from records already fetched (no waiting)."""

        def poll(self, timeout_ms=0, max_records=None, update_offsets=True):
            got = super().poll(timeout_ms=timeout_ms, max_records=max_records, update_offsets=update_offsets)
            limit = max_records or self.config["max_poll_records"]
            count = sum(len(v) for v in got.values())
            while 0 < count < limit:
                more = super().poll(timeout_ms=0, max_records=limit - count, update_offsets=update_offsets)
                extra = sum(len(v) for v in more.values())
                if not extra:
                    break
                for tp, records in more.items():
                    got.setdefault(tp, []).extend(records)
                count += extra
            return got

    return ToppingUpConsumer


def _patch() -> None:
    if os.environ.get("BENCH_TOPUP_POLL") == "1":
        from pipeline import kafka_io

        kafka_io.KafkaConsumer = _topping_up_consumer()
    overrides = os.environ.get("BENCH_CONSUMER_OVERRIDES")
    if overrides:
        from pipeline import kafka_io

        kafka_io.CONSUMER_DEFAULTS.update(json.loads(overrides))
    precision = os.environ.get("BENCH_PRECISION")
    if precision:
        from pipeline.nets import factory

        original = factory.load_backbone

        def load_backbone(*args, **kwargs):
            if kwargs.get("precision") is None:
                kwargs["precision"] = precision
            return original(*args, **kwargs)

        factory.load_backbone = load_backbone


if __name__ == "__main__":
    _patch()
    from pipeline.cli import main

    sys.exit(main())
