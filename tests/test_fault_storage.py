"""Storage faults while the featurizer runs: no offset is committed for rows that are not on disk,
consumption pauses and retries, and when storage comes back every image is in Parquet exactly once.

Two ways the Parquet sink fails (we run as root, so chmod would not stop a write):

* ``failing-writer``: the featurizer's ``sink.stage`` raises ``OSError(ENOSPC)`` for its first
  calls (what a full or read-only volume does), then works again on its own;
* ``full-tmpfs``: the data directory is a 256 KiB tmpfs filled to the last byte, a real "No space
  left on device" from the kernel, until the test deletes the filler file (skipped with the reason
  where mounting is not permitted).

Committed offsets are read by a separate client of the same group (it never joins it), exactly
what a restarted featurizer would resume from.

A third test covers a storage fault during a rebalance: featurizer A is paused when featurizer B
leaves, so A is handed B's partitions mid-pause; they must wait for A's storage like the others.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.dataset as pads
import pytest
from kafka import TopicPartition

from consumers.featurizer import Featurizer, features_dir
from consumers.scorer import Scorer
from pipeline.model.featurize import default_cache
from pipeline.kafka.kafka_io import make_consumer, make_producer
from pipeline.storage.parquet_reader import read_features
from producers.produce import ImageProducer
from schemas.messages import decode_label, make_image_message
from tests.stream_helpers import WorkerThread, read_topic, train_model, unique_settings

pytestmark = pytest.mark.stream

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
FAILED = "sink write failed; pausing consumption and retrying"
RECOVERED = "sink recovered; consumption resumed"


@pytest.fixture(scope="module")
def trained_registry(kafka_settings, tmp_path_factory, effnet, cache_dir) -> str:
    tmp = tmp_path_factory.mktemp("storage-model")
    settings = dataclasses.replace(kafka_settings, registry_dir=str(tmp / "registry"))
    train_model(settings, effnet, EXAMPLES / "train", default_cache(cache_dir))
    return settings.registry_dir


# --------------------------------------------------------------------------- faults


class FailingWriter:
    """``sink.stage`` raises ENOSPC for its first ``failures`` calls, then writes for real."""

    name = "failing-writer"
    exact = True  # it fails exactly ``failures`` times

    def __init__(self, failures: int = 2):
        self.failures = failures
        self.calls = 0

    def prepare(self, settings) -> None:
        pass

    def install(self, worker: Featurizer) -> None:
        real = worker.sink.stage

        def stage(starts, ends):
            self.calls += 1
            if self.calls <= self.failures:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(worker.sink.root))
            return real(starts, ends)

        worker.sink.stage = stage

    def end(self) -> None:
        """Nothing to do: storage comes back by itself after ``failures`` calls."""

    def cleanup(self) -> None:
        pass


class FullTmpfs:
    """The data directory on a tiny tmpfs, filled up; :meth:`end` frees it."""

    name = "full-tmpfs"
    exact = False  # fails until end(), which the test calls during the first backoff

    def __init__(self):
        self.mountpoint: Path | None = None
        self.filler: Path | None = None

    def prepare(self, settings) -> None:
        mountpoint = Path(settings.data_dir)
        mountpoint.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({(done.stderr or done.stdout).strip()}); "
                        "the failing-writer variant covers the same path")
        self.mountpoint = mountpoint
        self.filler = mountpoint / "filler"
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        with pytest.raises(OSError):  # really full: not even a directory fits
            for i in range(64):
                (mountpoint / f"probe-{i}").write_bytes(b"x" * 4096)

    def install(self, worker: Featurizer) -> None:
        pass

    def end(self) -> None:
        for p in self.mountpoint.glob("probe-*"):
            p.unlink()
        self.filler.unlink()

    def cleanup(self) -> None:
        if self.mountpoint is not None:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


# --------------------------------------------------------------------------- helpers


def _wait_all_committed(settings, observer, partitions, n_images: int) -> None:
    """Wait until the group's committed offset is the end of every images partition."""
    records = read_topic(settings, settings.images_topic, lambda rs: len(rs) >= n_images)
    ends = {p: 0 for p in range(4)}
    for r in records:
        ends[r.partition] = max(ends[r.partition], r.offset + 1)
    _wait_for("every offset committed", lambda: {p: v or 0 for p, v in _committed(
        observer, partitions).items()} == ends, timeout=60)


def _wait_for(what: str, condition: Callable[[], Any], timeout: float = 60, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _events(caplog, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


def _produce(settings, paths: list[Path]) -> set[str]:
    producer = ImageProducer(settings)
    for p in paths:
        assert producer.send_file(p) is not None
    summary = producer.flush()
    producer.close()
    assert summary.sent == len(paths) and not summary.failed
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _produce_to_every_partition(settings, paths: list[Path], partitions: int = 4) -> set[str]:
    """Photo i goes to partition i % partitions (valid image messages; only the partition is chosen)."""
    producer = make_producer(settings)
    for i, p in enumerate(paths):
        message = make_image_message(p.read_bytes(), str(p), "image/jpeg")
        producer.send(settings.images_topic, key=message.key(), value=message.data, headers=message.headers(),
                      partition=i % partitions)
    producer.flush()
    producer.close()
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _committed(observer, partitions: list[TopicPartition]) -> dict[int, int | None]:
    return {tp.partition: observer.committed(tp) for tp in partitions}


def _nothing_committed(observer, partitions: list[TopicPartition]) -> bool:
    """No offset moved past the start (the poison-attempt marker commits the start itself, 0)."""
    return all(v in (None, 0) for v in _committed(observer, partitions).values())


# --------------------------------------------------------------------------- the test


# the tmpfs and the rows on it are gone by teardown; the test itself checks nothing is lost or committed early
@pytest.mark.parametrize("fault", [FailingWriter, pytest.param(FullTmpfs, marks=pytest.mark.no_stream_invariant)],
                         ids=lambda f: f.name)
def test_featurizer_pauses_on_storage_faults_commits_nothing_and_loses_nothing(
        fault, kafka_settings, tmp_path, effnet, trained_registry, caplog):
    caplog.set_level(logging.INFO)
    settings = dataclasses.replace(unique_settings(kafka_settings, tmp_path), registry_dir=trained_registry)
    fault = fault()
    fault.prepare(settings)
    photos = sorted((EXAMPLES / "test").glob("*.jpg"))
    first, rest = photos[:4], photos[4:]
    partitions = [TopicPartition(settings.images_topic, p) for p in range(4)]
    observer = make_consumer(settings, settings.featurizer_group, [])  # never joins: only reads commits
    worker = Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1)
    fault.install(worker)
    featurizer = WorkerThread(worker)
    scorer = WorkerThread(Scorer(settings))
    try:
        sent = _produce(settings, first)
        failure = _wait_for("the first failed write", lambda: _events(caplog, FAILED))[0]
        assert "no space left on device" in failure.fields["error"].lower(), failure.fields
        assert failure.fields["retry_in_s"] > 0
        assert worker.consumer.paused(), "consumption was not paused"
        consumed = worker.inference.times.images
        assert consumed >= 1
        assert _nothing_committed(observer, partitions), "committed while failing"

        sent |= _produce(settings, rest)  # arrives while storage is down: must wait, not pile up
        time.sleep(2)
        assert featurizer.error is None and featurizer.thread.is_alive()
        if not _events(caplog, RECOVERED):
            assert worker.inference.times.images == consumed, "consumed while paused"
            assert worker.consumer.paused()
            assert _nothing_committed(observer, partitions), "committed while failing"

        fault.end()
        _wait_for("recovery", lambda: _events(caplog, RECOVERED), timeout=60)
        failures = len(_events(caplog, FAILED))
        assert failures == fault.failures if fault.exact else failures >= 1, "one failed write per retry"

        _wait_all_committed(settings, observer, partitions, len(photos))
        found = read_topic(settings, settings.labels_topic, lambda rs: sent <= {r.key.decode() for r in rs})
        labels = {r.key.decode(): decode_label(r.value) for r in found}
        assert featurizer.error is None and featurizer.thread.is_alive()
        assert scorer.error is None and scorer.thread.is_alive()
    finally:
        observer.close()
        try:
            featurizer.stop()
            scorer.stop()
            root = features_dir(settings)
            table = pads.dataset(root, format="parquet", partitioning="hive").to_table() if root.exists() else None
            features = read_features([root]) if table is not None and table.num_rows else None
            leftovers = [p for p in root.rglob("*") if p.name.startswith(".tmp-")]
        finally:
            fault.cleanup()
    assert set(labels) >= sent
    assert features is not None, "nothing reached Parquet"
    assert sorted(features.image_ids) == sorted(sent), "every image in Parquet exactly once through the reader"
    assert features.duplicates_dropped == 0
    assert table.num_rows == len(sent), "no row written twice either"
    assert leftovers == [], "a failed write left a temporary file behind"


class _SwitchableWriter:
    """``sink.stage`` raises ENOSPC while ``broken`` is set."""

    def __init__(self, worker: Featurizer):
        self.broken = False
        real = worker.sink.stage

        def stage(starts, ends):
            if self.broken:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(worker.sink.root))
            return real(starts, ends)

        worker.sink.stage = stage


def test_partitions_taken_over_while_paused_are_not_skipped(kafka_settings, tmp_path, effnet, trained_registry,
                                                            caplog):
    """Two featurizers share the images topic; A's storage fails, then B leaves the group, so A is
    handed B's partitions while it is paused. Those must wait for A's storage like the others."""
    caplog.set_level(logging.INFO)
    settings = dataclasses.replace(unique_settings(kafka_settings, tmp_path), registry_dir=trained_registry)
    photos = sorted((EXAMPLES / "train").rglob("*.jpg")) + sorted((EXAMPLES / "test").glob("*.jpg"))
    a = Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1)
    b = Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1)
    storage = _SwitchableWriter(a)
    dropped: list[Any] = []  # what A's consumer returned while A was paused (the loop ignores it)
    real_poll = a.consumer.poll

    def poll(*args, **kwargs):
        batch = real_poll(*args, **kwargs)
        if a.storage_pause.active:
            dropped.extend(r for part in batch.values() for r in part)
        return batch

    a.consumer.poll = poll
    partitions = [TopicPartition(settings.images_topic, p) for p in range(4)]
    observer = make_consumer(settings, settings.featurizer_group, [])
    threads = [WorkerThread(a), WorkerThread(b)]
    stopped = [False, False]
    try:
        _wait_for("both members assigned", lambda: a.consumer.assignment() and b.consumer.assignment()
                  and len(a.consumer.assignment() | b.consumer.assignment()) == 4)
        a_first = set(a.consumer.assignment())
        storage.broken = True
        sent = _produce(settings, photos[:10])
        _wait_for("A's failed write", lambda: _events(caplog, FAILED))
        threads[1].stop()  # B leaves cleanly: its partitions go to A, which is paused
        stopped[1] = True
        _wait_for("A owns every partition", lambda: len(a.consumer.assignment()) == 4)
        assert a.consumer.assignment() > a_first
        sent |= _produce(settings, photos[10:25])
        time.sleep(3)  # A keeps polling while paused
        storage.broken = False
        _wait_for("recovery", lambda: _events(caplog, RECOVERED), timeout=60)
        sent |= _produce_to_every_partition(settings, photos[25:])  # the stream goes on: later offsets get committed
        _wait_all_committed(settings, observer, partitions, len(photos))
        threads[0].stop()
        stopped[0] = True
    finally:
        observer.close()
        for thread, done in zip(threads, stopped):
            if not done:
                thread.stop()
    features = read_features([features_dir(settings)])
    missing = sent - set(features.image_ids)
    assert not missing, (f"{len(missing)} of {len(sent)} images never reached Parquet, yet every offset is "
                         f"committed; A's consumer returned {len(dropped)} records while paused")
