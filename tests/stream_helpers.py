"""Helpers for streaming tests, on top of the development rig (:mod:`devrig`).

Workers run in threads of the test process (:class:`~devrig.WorkerThread`) so they
share one loaded backbone; they still talk to the real broker through real kafka-python
clients, exactly as the ``deeper featurizer``/``deeper scorer`` processes do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Settings
from devrig import WorkerThread, fresh_settings, header, read_records
from pipeline.learning.registry import Registry
from pipeline.learning.train_photos import train_from_photos
from pipeline.learning.training import DEFAULT_LAYER, DEFAULT_SPEC

__all__ = ["WorkerThread", "header", "read_topic", "train_model", "unique_settings"]


#: Every stream this test made: tests/conftest.py checks the invariant on each after the test.
STREAMS: list[Settings] = []


def unique_settings(base: Settings, tmp_path: Path, partitions: int = 4, **overrides: Any) -> Settings:
    """Fresh topics, groups, data dir and registry for one test, on the session's broker
    (``overrides``: other settings of this stream, e.g. ``features_uri``). The sink is Parquet
    unless ``sink="table"`` says otherwise: the stream tests written before the feature table
    check Parquet part files; ``tests/test_table_stream.py`` and the fault suite run the table."""
    overrides.setdefault("sink", "parquet")
    settings = dataclasses.replace(fresh_settings(base, tmp_path, prefix="t", partitions=partitions), **overrides)
    STREAMS.append(settings)
    return settings


def train_model(settings: Settings, backbone, train_dir: Path, cache=None, relabel: Callable | None = None,
                spec=DEFAULT_SPEC) -> str:
    """Train on ``train_dir`` (labels = folders) into the settings' registry; return the version."""
    trained = train_from_photos(train_dir, backbone, Registry(settings.registry_dir), DEFAULT_LAYER, spec,
                                relabel=relabel, cache=cache)
    return trained.outcome.version


def read_topic(settings: Settings, topic: str, until: Callable[[list[Any]], bool], timeout: float = 90
               ) -> list[Any]:
    """All committed records of ``topic`` from the beginning, until ``until(records)`` or timeout."""
    records = read_records(settings, topic, until, timeout=timeout)
    if not records and not until(records):
        raise AssertionError(f"topic {topic}: nothing read within {timeout:.0f} s")
    return records
