"""The stream into the feature table, on a real broker: one snapshot per checkpoint, each offset once.

Featurizers run in threads of this process (sharing the loaded EfficientNet-Lite0) with real
kafka-python clients, the real table sink and a real SQLite catalog. After each test the
invariant (tests/invariant.py, run by conftest) checks every committed image offset: exactly
one row in the table's current snapshot and one feature record, or one dead letter. Kills of
real processes (between the table commit and the Kafka commit, while writing data files) are
in ``tests/faults/test_table_faults.py``.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from kafka import TopicPartition

from consumers.featurizer import Featurizer
from devrig import WorkerThread
from devrig.readback import table_on_disk
from pipeline.kafka.kafka_io import make_consumer
from pipeline.storage import table as tables
from producers.produce import ImageProducer
from tests import image_builders
from tests.stream_helpers import unique_settings

pytestmark = pytest.mark.stream


def _produce(settings, n: int, seed: int) -> set[str]:
    producer = ImageProducer(settings)
    sent = set()
    for i in range(n):
        message = producer.send(image_builders.jpeg(seed=seed + i), f"photo-{seed + i}.jpg")
        sent.add(message.image_id)
    assert producer.flush().failed == {}
    producer.close()
    return sent


def _wait_rows(settings, ids: set[str], timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = table_on_disk(settings)["raw_ids"]
        if ids <= set(found):
            return found
        time.sleep(0.5)
    raise AssertionError(f"{len(ids - set(table_on_disk(settings)['raw_ids']))} photos never reached the table")


def _committed(settings) -> dict[TopicPartition, int]:
    consumer = make_consumer(settings, settings.featurizer_group, [])
    try:
        partitions = [TopicPartition(settings.images_topic, p)
                      for p in sorted(consumer.partitions_for_topic(settings.images_topic))]
        return {tp: c for tp in partitions if (c := consumer.committed(tp)) is not None}
    finally:
        consumer.close(autocommit=False)


def _table(settings):
    (name,) = tables.feature_tables(settings)
    return tables.load_named(settings, name)


def test_the_stream_commits_each_checkpoint_to_the_table_with_its_offsets(kafka_settings, tmp_path, effnet):
    settings = unique_settings(kafka_settings, tmp_path, partitions=2, sink="table")
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1))
    try:
        sent = _produce(settings, 20, seed=100)
        found = _wait_rows(settings, sent)
        sent |= _produce(settings, 6, seed=200)  # a second burst: a second round of commits
        found = _wait_rows(settings, sent)
    finally:
        featurizer.stop()
    assert sorted(found) == sorted(sent)  # each photo once
    table = _table(settings)
    snapshots = table.metadata.snapshots
    assert len(snapshots) >= 2 and all(s.summary[tables.WRITER] == "stream" for s in snapshots)
    assert tables.stored_offsets(table) == _committed(settings)  # the table and Kafka agree after a clean stop


def test_two_featurizers_share_the_partitions_and_the_table(kafka_settings, tmp_path, effnet):
    settings = unique_settings(kafka_settings, tmp_path, partitions=4, sink="table")
    workers = [Featurizer(settings, effnet, "prelogits", batch_size=4, roll_seconds=1) for _ in range(2)]
    threads = [WorkerThread(w) for w in workers]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(w.consumer.assignment() for w in workers):
            time.sleep(0.5)
        sent = _produce(settings, 24, seed=300)
        found = _wait_rows(settings, sent)
    finally:
        for t in threads:
            t.stop()
    assert all(w.inference.times.images > 0 for w in workers), "both featurizers did work"
    assert sorted(found) == sorted(sent)
    assert tables.stored_offsets(_table(settings)) == _committed(settings)


def test_a_locked_catalog_pauses_the_featurizer_and_it_resumes(kafka_settings, tmp_path, effnet, monkeypatch, caplog):
    """A catalog held by another process for longer than the busy timeout: the checkpoint fails,
    consumption pauses (as on a full disk) and resumes when the lock goes; nothing lost or doubled."""
    monkeypatch.setattr(tables, "SQLITE_BUSY_TIMEOUT_S", 0.5)
    caplog.set_level("INFO", logger="consumers.pause")
    settings = unique_settings(kafka_settings, tmp_path, partitions=2, sink="table")
    featurizer = Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1)
    thread = WorkerThread(featurizer)
    try:
        first = _produce(settings, 8, seed=400)
        _wait_rows(settings, first)
        lock = sqlite3.connect(tables.embedded_database(settings), timeout=5, check_same_thread=False)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            second = _produce(settings, 8, seed=500)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not featurizer.storage_pause.active:
                time.sleep(0.1)
            assert featurizer.storage_pause.active, "the featurizer never paused on the locked catalog"
            time.sleep(6)  # a retry meets the lock too
        finally:
            lock.rollback()
            lock.close()
        found = _wait_rows(settings, first | second)
    finally:
        thread.stop()
    assert sorted(found) == sorted(first | second)
    assert any("sink write failed" in r.getMessage() and "locked" in str(getattr(r, "fields", {}))
               for r in caplog.records)
    assert any(r.getMessage() == "sink recovered; consumption resumed" for r in caplog.records)
