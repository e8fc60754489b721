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
import threading
import time
from typing import Any, Sequence

import pytest
from kafka import TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment, ConsumerProtocolSubscription

from consumers.worker import StreamWorker
from devrig import fresh_settings, read_records
from pipeline.kafka.kafka_io import close_producer, make_producer

pytestmark = pytest.mark.stream


class _Copier(StreamWorker):
    """The smallest stage: every input record to the features topic, in the checkpoint's transaction."""

    stage = "copier"

    def process(self, messages: Sequence[Any]) -> None:
        for m in messages:
            self.send(self.settings.features_topic, m.key, m.value, [])


def _process_without_committing(worker: StreamWorker, until_offset: int, timeout: float = 60.0,
                                partition: int = 0) -> None:
    """The loop's turns (poll, arm, process, collect) minus its checkpoints."""
    tp = TopicPartition(worker.topic, partition)
    deadline = time.monotonic() + timeout
    while worker.ckpt.pending.get(tp, 0) < until_offset:
        assert time.monotonic() < deadline, "the records were never processed"
        messages = worker.admission.admit(worker._poll(200))
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


def test_records_behind_the_committed_offset_are_never_done_again(kafka_settings, tmp_path):
    """After a rebalance a worker can hold records of a partition below its committed offset (a
    position kafka-python kept, records polled just before it). Re-arming at them moved the
    committed offset back and did them twice; now the worker skips to the committed offset."""
    settings = dataclasses.replace(fresh_settings(kafka_settings, tmp_path, prefix="behind", partitions=1),
                                   guarantee="exactly-once")
    producer = make_producer(settings)
    for i in range(6):
        producer.send(settings.images_topic, f"v{i}".encode(), key=f"k{i}".encode())
    producer.flush()
    worker = _Copier(settings, settings.images_topic, settings.featurizer_group)
    tp = TopicPartition(settings.images_topic, 0)
    try:
        _process_without_committing(worker, until_offset=6)
        assert worker.checkpoint() is True and worker.consumer.committed(tp) == 6
        worker.attempts.forget([tp])  # what a rebalance does: the partition is armed again at its next poll
        worker.consumer.seek(tp, 2)  # ...at a position older than its committed offset
        deadline = time.monotonic() + 30
        while worker.consumer.position(tp) < 6 and time.monotonic() < deadline:
            assert worker.admission.admit(worker._poll(200)) == []
        assert worker.consumer.committed(tp) == 6 and worker.consumer.position(tp) == 6
        producer.send(settings.images_topic, b"v6", key=b"k6")
        producer.flush()
        _process_without_committing(worker, until_offset=7)
        assert worker.checkpoint() is True and worker.consumer.committed(tp) == 7
    finally:
        worker.consumer.close(autocommit=False)
        close_producer(worker.ckpt.producer)
        close_producer(producer)
    keys = [r.key for r in read_records(settings, settings.features_topic, timeout=20, quiet_s=2)]
    assert sorted(keys) == [f"k{i}".encode() for i in range(7)]


def test_offsets_of_a_refused_commit_never_ride_on_the_next_transaction(kafka_settings, needs_apache_kafka, tmp_path):
    """A zombie's commit is refused (its generation is stale); once it has rejoined, its next
    transaction must carry its own offsets only. kafka-python 3.0.12 kept the refused ones and
    sent them along: the rejoined zombie moved a partition it no longer owned back to an old
    offset (the cluster suite's zombie scenario: 11 -> 6, and those records done twice)."""
    settings = dataclasses.replace(fresh_settings(kafka_settings, tmp_path, prefix="refused", partitions=2),
                                   guarantee="exactly-once")
    producer = make_producer(settings)
    for i in range(12):
        producer.send(settings.images_topic, f"v{i}".encode(), key=f"k{i}".encode(), partition=i % 2)
    assert close_producer(producer)
    worker = _Copier(settings, settings.images_topic, settings.featurizer_group)
    tp0, tp1 = (TopicPartition(settings.images_topic, p) for p in (0, 1))
    try:
        _process_without_committing(worker, until_offset=6, partition=0)
        _process_without_committing(worker, until_offset=6, partition=1)
        real = worker.consumer.group_metadata
        stale = real()._replace(generation_id=real().generation_id - 1)  # what a zombie's snapshot holds
        worker.consumer.group_metadata = lambda: stale
        assert worker.checkpoint() is False  # refused by the group coordinator: ILLEGAL_GENERATION
        worker.consumer.group_metadata = real
        assert worker.consumer.committed(tp0) == 0 and worker.consumer.committed(tp1) == 0  # the arming markers
        worker.consumer.pause(tp0)  # the next transaction covers partition 1 only
        _process_without_committing(worker, until_offset=6, partition=1)
        assert worker.checkpoint() is True
        assert worker.consumer.committed(tp1) == 6
        assert worker.consumer.committed(tp0) == 0, "the refused commit's offset for partition 0 was sent again"
    finally:
        worker.consumer.close(autocommit=False)
        close_producer(worker.ckpt.producer)


class _Handover(RangePartitionAssignor):
    """Range, except that a member whose subscription says ``taker`` gets the partitions in
    ``give``: the test chooses which partition moves to the member that joins."""

    name = "handover"
    give: set[int] = set()
    user_data = b""

    @classmethod
    def metadata(cls, topics):
        return ConsumerProtocolSubscription(cls.version, list(topics), cls.user_data)

    @classmethod
    def assign(cls, cluster, members):
        takers = [m.member_id for m in members if m.metadata.user_data == b"taker"]
        others = [m.member_id for m in members if m.member_id not in takers]
        if not takers or not others:
            return super().assign(cluster, members)
        split = {takers[0]: {}, others[0]: {}}
        for topic in {t for m in members for t in m.metadata.topics}:
            partitions = sorted(cluster.partitions_for_topic(topic) or [])
            split[takers[0]][topic] = [p for p in partitions if p in _Handover.give]
            split[others[0]][topic] = [p for p in partitions if p not in _Handover.give]
        return {m.member_id: ConsumerProtocolAssignment(cls.version, sorted(split.get(m.member_id, {}).items()), b"")
                for m in members}


class _Taker(_Handover):
    user_data = b"taker"


def test_records_polled_before_a_rebalance_are_done_by_the_partitions_next_owner_only(kafka_settings, tmp_path):
    """A turn's poll tops up with more polls, and a rebalance can run inside one of them, after
    records of a partition that moves away are already in hand. The worker did them anyway, next
    to the partition's new owner, and committed them with its new generation: each twice (the
    cluster suite's featurizer_cut scenario, 3 duplicates). Now the rebalance takes them back."""
    settings = dataclasses.replace(fresh_settings(kafka_settings, tmp_path, prefix="handover", partitions=2),
                                   guarantee="exactly-once")
    topic, group = settings.images_topic, settings.featurizer_group
    first = _Copier(settings, topic, group, partition_assignment_strategy=[_Handover])
    second: list[_Copier] = []
    threads: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 60
        while len(first.consumer.assignment()) < 2:  # the first member owns both partitions of the empty topic
            assert time.monotonic() < deadline, "the first member never got its partitions"
            assert first._poll(200) == []
        producer = make_producer(settings)
        for i in range(10):
            producer.send(topic, f"v{i}".encode(), key=f"k{i}".encode(), partition=i % 2)
        assert close_producer(producer)
        real_poll_once = first._poll_once

        def poll_once(timeout_ms: int, max_records: int) -> list[Any]:
            got = real_poll_once(timeout_ms, max_records)
            if got and not second:  # records in hand: a second member joins and takes their partition
                _Handover.give = {got[0].partition}
                second.append(_Copier(settings, topic, group, partition_assignment_strategy=[_Taker]))
                threads.append(threading.Thread(target=second[0].run, kwargs={"max_idle_seconds": 8.0}, daemon=True))
                threads[0].start()
                wait_until = time.monotonic() + 30
                while not first.consumer._coordinator.need_rejoin():  # the heartbeat has seen the join
                    assert time.monotonic() < wait_until, "the group never started rebalancing"
                    time.sleep(0.05)
            return got

        first._poll_once = poll_once
        first.run(max_idle_seconds=8.0)
        threads[0].join(timeout=60)
        assert not threads[0].is_alive()
    finally:
        _Handover.give = set()
        for worker in [first, *second]:
            worker.stop_event.set()
    keys = sorted(r.key for r in read_records(settings, settings.features_topic, timeout=20, quiet_s=2))
    assert keys == sorted(f"k{i}".encode() for i in range(10))
