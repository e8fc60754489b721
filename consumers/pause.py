"""Pausing a worker while its storage is away, and retrying its checkpoint until it is back.

A full disk, an object store or a table catalog that is down or locked is an error of the
whole stage, not of one message: consumption pauses (memory stays bounded, nothing is lost),
the group membership is kept alive by polling the paused partitions, and the checkpoint is
retried with a backoff; when it succeeds the partitions resume.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pipeline.kafka import internals
from pipeline.logs import event

log = logging.getLogger(__name__)


class StoragePause:
    """The pause of one worker's consumer; :attr:`active` while paused (``until`` is when to retry)."""

    def __init__(self, consumer: Any, checkpoint: Callable[..., bool]):
        self.consumer = consumer
        self.checkpoint = checkpoint
        self.until = 0.0

    @property
    def active(self) -> bool:
        return bool(self.until)

    def fail(self, exc: BaseException) -> None:
        """Pause consuming (memory stays bounded) and retry the flush with a backoff: a full disk,
        an object store or a table catalog that is down or locked (``database is locked``)."""
        backoff = 5.0
        event(log, "sink write failed; pausing consumption and retrying", logging.ERROR, error=repr(exc),
              retry_in_s=backoff)
        self.consumer.pause(*self.consumer.assignment())
        self.until = time.monotonic() + backoff

    def retry(self) -> bool:
        """While paused, keep the group membership alive and retry the checkpoint when due."""
        batch = self.consumer.poll(timeout_ms=200)  # paused partitions return nothing...
        for tp, records in batch.items():  # ...but one assigned during the pause may: don't skip it
            self.consumer.seek(tp, records[0].offset)
        if batch:
            self.consumer.pause(*self.consumer.assignment())
        if time.monotonic() < self.until:
            return False
        self.until = 0.0
        if self.checkpoint(reason="retry"):
            internals.resume(self.consumer, self.consumer.assignment())
            event(log, "sink recovered; consumption resumed")
            return True
        return False
