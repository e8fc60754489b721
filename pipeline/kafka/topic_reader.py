"""Reading a topic without a consumer group: the one way, for every reader that is not a stage.

``deeper labels``, the UI, the development rig and the tests' invariant all read topics this way:
no group (nothing committed, no rebalance, nothing a stage's group could be disturbed by), every
partition assigned by hand, from the beginning, ``read_committed`` like every consumer here.
Where a topic ends is never taken from the broker's "latest" offsets alone: some
Kafka-protocol brokers under-report them (Tansu, docs/broker.md), so callers stop on what they
were waiting for or on quiet.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import Settings
from pipeline.kafka.client import KafkaConsumer, TopicPartition
from pipeline.kafka.kafka_io import make_consumer

#: How often a reader asks again for a topic that does not exist yet.
TOPIC_POLL_S = 0.2


def topic_partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions now, in order (empty while it does not exist yet)."""
    found = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(found)]


def await_partitions(consumer: KafkaConsumer, topic: str, timeout: float) -> list[TopicPartition]:
    """The topic's partitions, asking until it exists or ``timeout`` passed (at least once)."""
    deadline = time.monotonic() + timeout
    while True:
        partitions = topic_partitions(consumer, topic)
        if partitions or time.monotonic() >= deadline:
            return partitions
        time.sleep(TOPIC_POLL_S)


def open_topic_reader(settings: Settings, topic: str, timeout: float = 0.0, **overrides: Any) -> KafkaConsumer | None:
    """A group-less consumer assigned to every partition of ``topic``, at the beginning.

    Waits up to ``timeout`` for the topic to exist; None (and nothing left open) if it does
    not. ``overrides`` go to :func:`make_consumer` (fetch sizes, ``max_poll_records``...).
    The caller closes the consumer.
    """
    consumer = make_consumer(settings, None, [], **overrides)
    partitions = await_partitions(consumer, topic, timeout)
    if not partitions:
        consumer.close()
        return None
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    return consumer
