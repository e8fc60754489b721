"""Reading the labels topic: ``deeper labels`` and the demo's "labels arriving downstream" view.

This is what a downstream system sees. It reads without a consumer group from the earliest
offset and can wait for a given set of image ids; it never relies on "latest" offsets, which
some Kafka-protocol brokers report wrongly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Iterable

from pipeline.config import Settings
from pipeline.errors import DeeperError, SchemaError
from schemas.messages import LabelRecord, decode_label


def follow_labels(settings: Settings, expected_ids: Iterable[str] | None = None, timeout: float = 120.0,
                  on_label: Callable[[LabelRecord], None] | None = None, topic: str | None = None,
                  version: str | None = None,
                  on_invalid: Callable[[Any, SchemaError], None] | None = None) -> dict[str, LabelRecord]:
    """Read label records until every expected id has one (or ``timeout``); latest record wins.

    ``version`` keeps only labels from that classifier version (older runs' labels for the
    same photos are still on the topic). A record that fails validation (anyone who can write
    to the topic can forge one) is skipped, and handed to ``on_invalid`` to be counted.
    """
    from pipeline.kafka.topic_reader import open_topic_reader

    topic = topic or settings.labels_topic
    wanted = set(expected_ids) if expected_ids is not None else None
    consumer = open_topic_reader(settings, topic, timeout, enable_auto_commit=False)
    if consumer is None:
        raise DeeperError(f"topic {topic} does not exist on {settings.bootstrap_servers}")
    try:
        return _read_until(consumer, wanted, time.monotonic() + timeout, on_label, version, on_invalid)
    finally:
        consumer.close()


def _read_until(consumer, wanted: set[str] | None, deadline: float,
                on_label: Callable[[LabelRecord], None] | None, version: str | None,
                on_invalid: Callable[[Any, SchemaError], None] | None = None) -> dict[str, LabelRecord]:
    seen: dict[str, LabelRecord] = {}
    while time.monotonic() < deadline:
        for part in consumer.poll(timeout_ms=500).values():
            for m in part:
                try:
                    record = decode_label(m.value)
                except SchemaError as exc:
                    if on_invalid:
                        on_invalid(m, exc)
                    continue
                if wanted is not None and record.image_id not in wanted:
                    continue
                if version is not None and record.classifier_version != version:
                    continue
                first = record.image_id not in seen
                seen[record.image_id] = record
                if on_label and first:
                    on_label(record)
        if wanted is not None and wanted <= seen.keys():
            break
    return seen


def cmd_labels(args: argparse.Namespace) -> int:
    from consumers.startup import await_broker

    settings = Settings.from_env(labels_topic=args.labels_topic)
    await_broker(settings, args.wait)  # one clear error instead of a client timeout

    def show(record: LabelRecord) -> None:
        if args.format == "json":
            print(json.dumps(record.__dict__), flush=True)
        else:
            print(f"{record.label:<12} {record.source}  (model {record.classifier_version})", flush=True)

    invalid: list[str] = []

    def skip(m: Any, exc: SchemaError) -> None:
        invalid.append(f"{m.topic}/{m.partition}@{m.offset}")
        if len(invalid) <= 5:
            print(f"skipped an invalid label record at {invalid[-1]}: {exc}", file=sys.stderr)

    seen = follow_labels(settings, None, args.timeout, show, version=args.model_version, on_invalid=skip)
    skipped = f" ({len(invalid)} invalid records skipped)" if invalid else ""
    print(f"{len(seen)} labelled images{skipped}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    from consumers.startup import add_topic_option, add_wait_option

    p = sub.add_parser("labels", help="print label records from the labels topic")
    add_topic_option(p, "labels_topic", "topic to read labels from", "--topic")
    p.add_argument("--model-version", metavar="VERSION", default=None,
                   help="only labels from this classifier version, e.g. v0002 (default: every version)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="seconds to keep reading")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    add_wait_option(p, 10.0)
    p.set_defaults(func=cmd_labels)
