"""One replica of a stage as a process: its stable instance id, the signals that stop it, its lag.

None of this touches a message: the instance id names the replica's transactions (so a
restart fences its dead predecessor), SIGTERM/SIGINT ask the poll loop to stop after the
current batch, and the lag gauge reports how far behind the replica's partitions are.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import IO, Any

from pipeline.config import Settings
from pipeline.kafka.kafka_io import consumer_lag
from pipeline.logs import event

log = logging.getLogger(__name__)


class InstanceSlot:
    """The replica's instance on this machine, held (a file lock) until :meth:`release`."""

    def __init__(self, settings: Settings, group_id: str):
        self.settings = settings
        self.group_id = group_id
        self._lock: IO[str] | None = None

    def transactional_id(self) -> str:
        """``<group>.<instance>``: stable across restarts of the same replica.

        A restarted replica that reuses its id fences its dead predecessor and aborts the
        transaction it left open at once (``init_transactions``); a new id would leave that
        transaction to the broker's timeout, holding up ``read_committed`` readers. Without
        ``DEEPER_INSTANCE_ID`` the instance is the host name plus the lowest slot number no
        live process of this group holds on this machine (a file lock in the data directory).
        """
        instance = self.settings.instance_id
        if not instance:
            instance = f"{socket.gethostname()}.{self._claim_slot()}"
        return f"{self.group_id}.{instance}"

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()

    def _claim_slot(self) -> str:
        directory = Path(self.settings.data_dir) / "instances"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return str(self._lock_free_slot(directory))
        except OSError as exc:  # no local disk to coordinate on: unique, but not stable across restarts
            event(log, "no data directory for a stable instance id; set DEEPER_INSTANCE_ID", logging.WARNING,
                  error=repr(exc))
            return f"pid{os.getpid()}"

    def _lock_free_slot(self, directory: Path) -> int:
        slot = 0
        while True:
            handle = open(directory / f"{safe_name(self.group_id)}.{slot}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                slot += 1
                continue
            self._lock = handle  # held (and the slot ours) until the process ends
            return slot


def stop_on_signals(stop_event: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop_event``: the loop stops after the current batch, checkpoints
    and leaves the group cleanly, so a rolling restart costs no rework."""
    def handler(signum, _frame):
        event(log, "stopping", signal=signal.Signals(signum).name)
        stop_event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class LagGauge:
    """The consumer's lag per partition as a metric, asked of the broker at most every 10 s."""

    def __init__(self, stage: str, consumer: Any, metrics: Any):
        self.stage = stage
        self.consumer = consumer
        self.metrics = metrics
        self._last = 0.0

    def update(self) -> None:
        if time.monotonic() - self._last < 10:
            return
        self._last = time.monotonic()
        lag = consumer_lag(self.consumer)
        for tp, n in (lag or {}).items():
            self.metrics.lag.labels(self.stage, tp.topic, str(tp.partition)).set(n)


def safe_name(name: str) -> str:
    """``name`` (a group id) as a file name: anything but letters, digits and ``._-`` becomes ``_``."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
