"""Poison across restarts: count the runs that died on a partition's committed offset.

A message that kills the process itself (a segfault or out-of-memory in a native decoder)
can't be dead-lettered by the process it kills. Without a count that survives the process,
every restart would take the same message again and the partition would stop for ever. So
every committed offset carries a small JSON in its metadata::

    {"v": 1, "attempts": N}   N = runs that started processing at this offset and never
                              committed past it (1 while a run is working on it, 0 after a
                              clean shutdown)

When a partition is first fetched after an assignment, the worker reads that count (:meth:
`Attempts.arm`), adds one and commits it *before* processing anything. Then:

- ``attempts == 0``: a clean hand-over; process normally.
- ``1 <= attempts < max``: a run died somewhere after this offset. Go *careful*: one message
  at a time, each followed by a checkpoint, for as many messages as could have been in
  flight, so a killer is found at an exact offset.
- ``attempts >= max``: the message at this offset killed ``max`` runs: dead-letter it as
  ``poison`` without touching it, and go on.

Some brokers drop commit metadata (Tansu 0.6 stores the offset only, docs/broker.md); the
worker notices on the first arming (the metadata it just committed doesn't come back) and
keeps the counts in a small file of its data directory instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.kafka.client import TopicPartition
from pipeline.logs import event
from pipeline.storage import write_bytes_atomic

log = logging.getLogger(__name__)

METADATA_VERSION = 1


def encode(attempts: int) -> str:
    """The metadata committed with an offset."""
    return json.dumps({"v": METADATA_VERSION, "attempts": attempts}, separators=(",", ":"))


def decode(metadata: str | None) -> int | None:
    """Attempts recorded in ``metadata``; None when it holds none (another tool's, or empty)."""
    if not metadata:
        return None
    try:
        data = json.loads(metadata)
        return int(data["attempts"]) if isinstance(data, dict) and data.get("v") == METADATA_VERSION else None
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Armed:
    """A partition's state after arming: where this run started and how careful it must be."""

    start: int
    attempts: int  # runs before this one that died here
    careful_until: int  # process one message at a time below this offset

    def careful(self, offset: int) -> bool:
        return offset < self.careful_until


class LocalCounts:
    """The fallback store: ``{"topic/partition": [offset, attempts]}`` in one JSON file."""

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> dict[str, list[int]]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, tp: TopicPartition, offset: int) -> int | None:
        entry = self._read().get(f"{tp.topic}/{tp.partition}")
        return int(entry[1]) if entry and int(entry[0]) == offset else None

    def put(self, tp: TopicPartition, offset: int, attempts: int) -> None:
        """Record a count; a full or read-only disk costs the poison protection, never the stream."""
        data = self._read()
        data[f"{tp.topic}/{tp.partition}"] = [offset, attempts]
        try:
            write_bytes_atomic(self.path, json.dumps(data).encode())
        except OSError as exc:
            event(log, "cannot keep poison counts on disk; a message that kills the process may be retried "
                       "without limit", logging.ERROR, path=str(self.path), error=repr(exc))


class Attempts:
    """Arms partitions and decides: normal, careful or poison."""

    def __init__(self, max_attempts: int, careful_window: int, local_path: Path):
        self.max_attempts = max(1, max_attempts)
        self.careful_window = careful_window
        self.local = LocalCounts(local_path)
        self.broker_keeps_metadata: bool | None = None  # learnt on the first arming
        self.armed: dict[TopicPartition, Armed] = {}

    def prior(self, tp: TopicPartition, offset: int, metadata: str | None) -> int:
        """Runs that died at ``offset`` before this one."""
        recorded = decode(metadata)
        if recorded is None and self.broker_keeps_metadata is not True:
            recorded = self.local.get(tp, offset)
        return recorded or 0

    def arm(self, tp: TopicPartition, start: int, prior: int) -> Armed:
        careful_until = start + self.careful_window if prior else start
        armed = Armed(start, prior, careful_until)
        self.armed[tp] = armed
        if prior:
            event(log, "a previous run died after this offset; processing one message at a time",
                  logging.WARNING, topic=tp.topic, partition=tp.partition, offset=start, attempts=prior,
                  careful_until=careful_until)
        return armed

    def is_poison(self, armed: Armed, offset: int) -> bool:
        return offset == armed.start and armed.attempts >= self.max_attempts

    def learn(self, tp: TopicPartition, offset: int, attempts: int, read_back: str | None) -> None:
        """After committing an arming marker: does the broker keep commit metadata?"""
        if self.broker_keeps_metadata is None:
            self.broker_keeps_metadata = decode(read_back) == attempts
            if not self.broker_keeps_metadata:
                event(log, "the broker drops offset-commit metadata; poison counts kept in a local file",
                      logging.WARNING, path=str(self.local.path))
        if not self.broker_keeps_metadata:
            self.local.put(tp, offset, attempts)

    def remember(self, tp: TopicPartition, offset: int, attempts: int) -> None:
        """Keep the local count in step with a commit (only where the broker drops metadata)."""
        if self.broker_keeps_metadata is False:
            self.local.put(tp, offset, attempts)

    def forget(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            self.armed.pop(tp, None)
