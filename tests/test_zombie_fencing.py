"""A worker whose group membership is gone commits nothing (KIP-447 fencing, the client's half).

When a frozen worker (SIGSTOP, a GC pause, a cut-off host) wakes up after its session timeout,
its heartbeat is refused and kafka-python resets its generation to -1 and its member id to "".
The group coordinator checks transactional offsets against the generation they carry, but takes
those *without* one unchecked (what producers older than KIP-447 send): the zombie would commit
its outputs and offsets of partitions that have a new owner, and both would count. So the
checkpoint refuses to commit without a generation (consumers/checkpoint.py). The generation is
reset here through kafka-python's own transition, as its heartbeat does; the same story on a real
cluster, with real SIGSTOPs, is the zombie scenario of tests/faults/test_cluster.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import pytest
from kafka import TopicPartition

from consumers.worker import StreamWorker
from pipeline.app.devrig import fresh_settings, read_records
from pipeline.kafka.kafka_io import close_producer, make_producer

pytestmark = pytest.mark.stream


class _Copier(StreamWorker):
    """The smallest stage: every input record to the features topic, in the checkpoint's transaction."""

    stage = "copier"

    def process(self, messages: Sequence[Any]) -> None:
        for m in messages:
            self.send(self.settings.features_topic, m.key, m.value, [])


def _process_without_committing(worker: StreamWorker, until_offset: int, timeout: float = 60.0) -> None:
    """The loop's turns (poll, arm, process, collect) minus its checkpoints."""
    tp = TopicPartition(worker.topic, 0)
    deadline = time.monotonic() + timeout
    while worker.ckpt.pending.get(tp, 0) < until_offset:
        assert time.monotonic() < deadline, "the records were never processed"
        messages = worker._admit(worker._poll(200))
        if messages:
            worker.submit(messages)
        worker._collect(block=False)


def test_a_worker_that_lost_its_group_membership_commits_nothing(kafka_settings, broker_kind, tmp_path):
    settings = dataclasses.replace(fresh_settings(kafka_settings, tmp_path, prefix="zombie", partitions=1),
                                   guarantee="exactly-once")
    producer = make_producer(settings)
    for i in range(5):
        producer.send(settings.images_topic, f"v{i}".encode(), key=f"k{i}".encode())
    assert close_producer(producer)
    worker = _Copier(settings, settings.images_topic, settings.featurizer_group)
    tp = TopicPartition(settings.images_topic, 0)
    try:
        _process_without_committing(worker, until_offset=5)  # arming committed offset 0, outputs pending
        assert worker.consumer.committed(tp) == 0
        worker.consumer._coordinator.reset_generation()  # what kafka-python does when its heartbeat is refused
        assert worker.checkpoint() is False  # refused: its partitions may have a new owner
        assert worker.consumer.committed(tp) == 0
    finally:
        worker.consumer.close(autocommit=False)
        close_producer(worker.ckpt.producer)
    if broker_kind == "kafka":  # Tansu shows aborted records to read_committed readers (docs/broker.md)
        assert read_records(settings, settings.features_topic, timeout=10, quiet_s=2) == []
