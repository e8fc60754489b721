"""What every stream consumer shares: the poll loop, checkpoints, dead letters and shutdown.

Delivery is at-least-once. A checkpoint makes the worker's outputs durable (its own sink,
e.g. Parquet, then every produced record acknowledged by the broker) and only then commits
the consumed offsets. If any step fails, nothing is committed: the consumer rewinds to the
last committed offsets and redoes the work, so a crash or a failed write repeats records
(same keys, removable downstream) but never loses one.

SIGTERM and SIGINT stop the loop after the current batch, checkpoint, and leave the group
cleanly, so a rolling restart costs no rework.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Sequence

from kafka import OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from pipeline.config import Settings
from pipeline.kafka_io import close_producer, consumer_lag, make_consumer, make_producer
from pipeline.logs import event
from pipeline.metrics import metrics
from schemas.messages import dead_letter_headers

log = logging.getLogger(__name__)


class _Rebalance(ConsumerRebalanceListener):
    """Checkpoint before partitions move, so the next owner starts where we stopped."""

    def __init__(self, worker: "StreamWorker"):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        if revoked:
            self.worker.checkpoint(reason="rebalance")

    def on_partitions_assigned(self, assigned):
        event(log, "partitions assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        if self.worker._paused_until and assigned:  # handed new partitions while the sink is down
            self.worker.consumer.pause(*assigned)


#: Poll timeout while work is in flight: short, so finished batches are collected promptly.
BUSY_POLL_MS = 10


class StreamWorker:
    """Subclasses implement :meth:`process` and may override :meth:`flush_sink`/:meth:`sink_due`.

    A stage whose work can overlap the poll loop (the featurizer's model thread) overrides
    :meth:`submit`, :meth:`collect`, :meth:`in_flight` and :meth:`abandon` instead of
    :meth:`process`: the loop keeps polling while at most ``max_in_flight`` messages are being
    worked on, and marks messages done (committable) only when :meth:`collect` hands them back.
    """

    stage = "worker"

    def __init__(self, settings: Settings, topic: str, group_id: str, max_poll_records: int = 64,
                 checkpoint_seconds: float = 5.0, max_in_flight: int = 0, **consumer_overrides: Any):
        self.settings = settings
        self.topic = topic
        self.group_id = group_id
        self.checkpoint_seconds = checkpoint_seconds
        self.stop_event = threading.Event()
        self.metrics = metrics()
        self.producer = make_producer(settings)
        self.consumer = make_consumer(settings, group_id, [], max_poll_records=max_poll_records, **consumer_overrides)
        self.consumer.subscribe([topic], listener=_Rebalance(self))
        self._pending: dict[TopicPartition, int] = {}
        self._futures: list[Any] = []
        self._last_checkpoint = time.monotonic()
        self._last_lag = 0.0
        self._paused_until = 0.0
        self.max_in_flight = max_in_flight
        self._finished: list[Sequence[Any]] = []

    # -- to implement -----------------------------------------------------------------------
    def process(self, messages: Sequence[Any]) -> None:
        """Handle ``messages`` completely (outputs sent or buffered in the sink) before returning."""
        raise NotImplementedError

    def submit(self, messages: Sequence[Any]) -> None:
        """Start work on ``messages``; by default all of it, now (:meth:`process`)."""
        started = time.perf_counter()
        self.process(messages)
        self.metrics.batch_seconds.labels(self.stage).observe(time.perf_counter() - started)
        self._finished.append(messages)

    def collect(self, block: bool) -> list[Sequence[Any]]:
        """Submitted batches whose outputs are sent or buffered, oldest first (``block``: at least one)."""
        finished, self._finished = self._finished, []
        return finished

    def in_flight(self) -> int:
        """Messages submitted and not yet collected."""
        return 0

    def abandon(self) -> None:
        """Drop work in flight: its messages are not marked done, so they will be consumed again."""

    def flush_sink(self) -> None:
        """Make buffered sink output durable (raise on failure; nothing is committed then)."""

    def sink_due(self) -> bool:
        return False

    def discard_sink(self) -> None:
        """Drop buffered, unflushed sink output (its messages will be consumed again)."""

    # -- outputs ----------------------------------------------------------------------------
    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self._futures.append(self.producer.send(topic, key=key, value=value, headers=headers))

    def dead_letter(self, message: Any, reason: str, detail: str) -> None:
        """Send the original message, untouched, to the dead-letter topic with why and where."""
        headers = dead_letter_headers(message.headers, reason, detail, self.stage, message.topic,
                                      message.partition, message.offset)
        self.send(self.settings.dead_letter_topic, message.key, message.value or b"", headers)
        self.metrics.dead_letters.labels(self.stage, reason).inc()
        event(log, "dead letter", logging.WARNING, reason=reason, detail=detail[:300], topic=message.topic,
              partition=message.partition, offset=message.offset)

    def mark_done(self, messages: Sequence[Any]) -> None:
        for m in messages:
            tp = TopicPartition(m.topic, m.partition)
            self._pending[tp] = max(self._pending.get(tp, 0), m.offset + 1)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, max_idle_seconds: float | None = None) -> None:
        """Poll until stopped (or idle for ``max_idle_seconds``), checkpointing as it goes."""
        idle_since = time.monotonic()
        event(log, f"{self.stage} started", topic=self.topic, group=self.group_id,
              settings=self.settings.redacted())
        try:
            while not self.stop_event.is_set():
                if self._paused_until and not self._retry_paused():
                    continue
                started = time.perf_counter()
                messages = self._poll(BUSY_POLL_MS if self.in_flight() else 500)
                if messages:
                    idle_since = time.monotonic()
                    self.metrics.messages.labels(self.stage).inc(len(messages))
                    self.metrics.stage_seconds.labels(self.stage, "consume").observe(time.perf_counter() - started)
                    self.submit(messages)
                self._collect(block=self.in_flight() > self.max_in_flight)
                if self.in_flight():
                    idle_since = time.monotonic()
                if self._checkpoint_due():
                    self.checkpoint(reason="due")
                self._update_lag()
                if max_idle_seconds is not None and time.monotonic() - idle_since > max_idle_seconds:
                    break
        finally:
            self.close()

    def _collect(self, block: bool) -> None:
        for messages in self.collect(block):
            self.mark_done(messages)

    def _collect_all(self) -> None:
        """Wait for all work in flight (before a checkpoint: its offsets are committed with it)."""
        while self.in_flight():
            self._collect(block=True)

    def _poll(self, timeout_ms: int = 500) -> list[Any]:
        """One batch: wait up to ``timeout_ms`` for records, then top up from what is already fetched.

        kafka-python hands out one partition's buffer per poll, so with 4 partitions a busy
        topic gives batches like 32, 3, 32, 9; small batches cost the model more per image.
        The top-up never waits, so a slow stream's half-full batch goes on at once.
        """
        batch = self.consumer.poll(timeout_ms=timeout_ms)
        messages = [m for part in batch.values() for m in part]
        limit = self.consumer.config["max_poll_records"]
        while 0 < len(messages) < limit:
            more = self.consumer.poll(timeout_ms=0, max_records=limit - len(messages))
            extra = [m for part in more.values() for m in part]
            if not extra:
                break
            messages += extra
        return messages

    def _checkpoint_due(self) -> bool:
        if self.sink_due():
            return True
        return bool(self._pending) and time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds \
            and not self.has_buffered_sink()

    def has_buffered_sink(self) -> bool:
        return False

    def checkpoint(self, reason: str = "") -> bool:
        """Work in flight finished -> sink durable -> produced records acked -> offsets committed.

        False if anything failed.
        """
        self._collect_all()
        if not self._pending and not self._futures:
            return True
        started = time.perf_counter()
        try:
            self.flush_sink()
        except Exception as exc:  # noqa: BLE001 - storage errors of any kind: pause and retry
            self._storage_failed(exc)
            return False
        flushed = time.perf_counter()
        self.producer.flush()
        self.metrics.stage_seconds.labels(self.stage, "produce").observe(time.perf_counter() - flushed)
        failed = [f for f in self._futures if f.failed()]
        if failed:
            event(log, "produce failed; rewinding to last commit", logging.ERROR, errors=len(failed),
                  first=repr(failed[0].exception))
            self._futures.clear()
            self.rewind()
            self._replace_broken_producer()
            return False
        self._futures.clear()
        self._commit()
        self._last_checkpoint = time.monotonic()
        self.metrics.stage_seconds.labels(self.stage, "checkpoint").observe(time.perf_counter() - started)
        event(log, "checkpoint", logging.DEBUG, reason=reason)
        return True

    def _commit(self) -> None:
        if not self._pending:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._pending.items()}
        try:
            self.consumer.commit(offsets)
        except Exception as exc:  # noqa: BLE001 - e.g. rebalanced away: the work will be redone
            event(log, "commit failed; records will be redone by the partition's next owner", logging.WARNING,
                  error=repr(exc))
        self._pending.clear()

    def rewind(self) -> None:
        """Seek back to the committed offsets and drop unflushed output: the work is redone."""
        self.abandon()
        self.discard_sink()
        for tp in self.consumer.assignment():  # not only those pending: abandoned work may be anywhere
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
        self._pending.clear()

    def _replace_broken_producer(self) -> None:
        """Swap in a new producer if this one is in kafka-python's fatal state.

        A fatal producer never recovers: every later send fails at once, so without this the
        worker would rewind and redo the same records forever. It happens after a broker
        restart when the broker refuses the idempotent producer's epoch bump (Tansu answers
        InitProducerId with UnknownError, docs/faults.md). If the private state can't be read,
        the producer is replaced anyway: a failed checkpoint is rare and a new one is cheap.
        """
        manager = getattr(self.producer, "_transaction_manager", None)
        has_fatal = getattr(manager, "has_fatal_error", None)
        if callable(has_fatal) and not has_fatal():
            return
        try:
            fresh = make_producer(self.settings)
        except Exception as exc:  # noqa: BLE001 - broker still away: keep the old one, retry next time
            event(log, "could not replace the failed producer; will retry", logging.WARNING, error=repr(exc))
            return
        old, self.producer = self.producer, fresh
        close_producer(old, timeout=1)
        event(log, "producer replaced after a fatal error", logging.WARNING)

    def _storage_failed(self, exc: BaseException) -> None:
        """Pause consuming (memory stays bounded) and retry the flush with a backoff."""
        backoff = 5.0
        event(log, "sink write failed; pausing consumption and retrying", logging.ERROR, error=repr(exc),
              retry_in_s=backoff)
        self.consumer.pause(*self.consumer.assignment())
        self._paused_until = time.monotonic() + backoff

    def _retry_paused(self) -> bool:
        """While paused, keep the group membership alive and retry the checkpoint when due."""
        batch = self.consumer.poll(timeout_ms=200)  # paused partitions return nothing...
        for tp, records in batch.items():  # ...but one assigned during the pause may: don't skip it
            self.consumer.seek(tp, records[0].offset)
        if batch:
            self.consumer.pause(*self.consumer.assignment())
        if time.monotonic() < self._paused_until:
            return False
        self._paused_until = 0.0
        if self.checkpoint(reason="retry"):
            self.consumer.resume(*self.consumer.assignment())
            event(log, "sink recovered; consumption resumed")
            return True
        return False

    def _update_lag(self) -> None:
        if time.monotonic() - self._last_lag < 10:
            return
        self._last_lag = time.monotonic()
        lag = consumer_lag(self.consumer)
        for tp, n in (lag or {}).items():
            self.metrics.lag.labels(self.stage, tp.topic, str(tp.partition)).set(n)

    # -- shutdown ---------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            event(log, "stopping", signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        try:
            self.checkpoint(reason="shutdown")
        finally:
            self.consumer.close(autocommit=False)
            close_producer(self.producer)
            event(log, f"{self.stage} stopped")
