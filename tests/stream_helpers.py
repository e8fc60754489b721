"""Helpers for streaming tests: run real workers in threads, read topics back, train models.

Workers run in threads of the test process so they share one loaded backbone (loading
TensorFlow per worker would cost seconds each); they still talk to the real broker through
real kafka-python clients, exactly as the ``deeper featurizer``/``deeper scorer`` processes do.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
from kafka import TopicPartition

from pipeline.config import Settings
from pipeline.featurize import featurize_photos
from pipeline.kafka_io import ensure_topics, make_consumer
from pipeline.photos import find_photos
from pipeline.registry import Registry
from pipeline.training import DEFAULT_LAYER, DEFAULT_SPEC, train_and_register


def unique_settings(base: Settings, tmp_path: Path, partitions: int = 4) -> Settings:
    """Fresh topics, groups, data dir and registry for one test, on the session's broker.

    Separate groups per test are hygiene, and needed on Tansu 0.6: after a two-member group
    empties, it never answers a new member's JoinGroup (docs/broker.md).
    """
    tag = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(
        base, images_topic=f"t-{tag}.images", features_topic=f"t-{tag}.features",
        labels_topic=f"t-{tag}.labels", dead_letter_topic=f"t-{tag}.dead-letters",
        featurizer_group=f"t-{tag}.featurizer", scorer_group=f"t-{tag}.scorer",
        data_dir=str(tmp_path / "data"), registry_dir=str(tmp_path / "registry"))
    ensure_topics(settings, {settings.images_topic: partitions, settings.features_topic: partitions,
                             settings.labels_topic: partitions, settings.dead_letter_topic: 1})
    return settings


def train_model(settings: Settings, backbone, train_dir: Path, cache=None, relabel: Callable | None = None,
                spec=DEFAULT_SPEC) -> str:
    """Train on ``train_dir`` (labels = folders) into the settings' registry; return the version."""
    result = featurize_photos(find_photos([train_dir], labels_from_folders=True), backbone, DEFAULT_LAYER,
                              cache=cache, progress=False)
    labels = [relabel(r.label) if relabel else r.label for r in result.rows]
    outcome = train_and_register([r.image_id for r in result.rows], labels, np.stack([r.vector for r in result.rows]),
                                 result.meta, spec, Registry(settings.registry_dir))
    return outcome.version


class WorkerThread:
    """Runs a StreamWorker's loop in a thread; ``stop()`` shuts it down like SIGTERM would."""

    def __init__(self, worker):
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc

    def stop(self, timeout: float = 60) -> None:
        self.worker.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error:
            raise self.error


def read_topic(settings: Settings, topic: str, until: Callable[[list[Any]], bool], timeout: float = 90
               ) -> list[Any]:
    """All records of ``topic`` from the beginning, polling until ``until(records)`` or timeout."""
    consumer = make_consumer(settings, None, [])
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            found = consumer.partitions_for_topic(topic)
            partitions = [TopicPartition(topic, p) for p in sorted(found)] if found else None
            if partitions is None:
                time.sleep(0.2)
        assert partitions, f"topic {topic} not found"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        while time.monotonic() < deadline and not until(records):
            for part in consumer.poll(timeout_ms=300).values():
                records.extend(part)
        return records
    finally:
        consumer.close()


def header(record, name: str) -> str | None:
    for k, v in record.headers or []:
        if k == name:
            return v.decode()
    return None
