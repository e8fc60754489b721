"""What every stream consumer shares: the poll loop, checkpoints, dead letters, containment.

The bar: every record offset of the input topic ends in exactly one outcome, its output
(row and record) or a dead letter with a reason, and the stream never stops for one message.
How this loop keeps it:

- **Containment.** A stage handles each message inside its own ``try``: any exception becomes
  that message's dead letter (``internal_error``). Records the Kafka client cannot even parse
  (an unknown codec, a corrupt batch) are skipped one offset at a time, each with a dead letter
  naming its topic, partition and offset (:meth:`StreamWorker._poll`). Outputs too large for
  their topic are replaced by a dead letter that keeps position and headers and omits the value
  (:class:`consumers.outputs.OutputLimits`). Only errors of the whole stage (broker away,
  storage down) pause or stop it.
- **Checkpoints** (:mod:`consumers.checkpoint`): work in flight finished -> sink durable ->
  outputs and offsets committed (one transaction in exactly-once mode). A failure rewinds to
  the committed offsets; a process that dies or exits on an error commits nothing more.
- **Poison across restarts** (:mod:`consumers.admission`, :mod:`consumers.attempts`): a
  message that kills the process is found one message at a time and dead-lettered as
  ``poison`` after N runs died on it.
- **Rebalances** (:mod:`consumers.rebalance`): revoked partitions are checkpointed first, lost
  ones dropped without a commit (zombie fencing).
- **Storage away** (:mod:`consumers.pause`): consumption pauses and the checkpoint is retried.

SIGTERM and SIGINT stop the loop after the current batch, checkpoint, and leave the group
cleanly, so a rolling restart costs no rework (:mod:`consumers.replica`: signals, the stable
instance id, lag).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from consumers import attempts as attempts_lib
from consumers.admission import Admission
from consumers.attempts import Attempts
from consumers.checkpoint import Checkpoint, CheckpointFailed
from consumers.outputs import OutputLimits, Unreadable, fit_dead_letter
from consumers.pause import StoragePause
from consumers.rebalance import Rebalance
from consumers.replica import InstanceSlot, LagGauge, safe_name, stop_on_signals
from pipeline.config import Settings
from pipeline.kafka import internals
from pipeline.kafka.client import TopicPartition, kafka_errors
from pipeline.kafka.kafka_io import closing_quietly, make_consumer
from pipeline.logs import event
from pipeline.metrics import metrics
from pipeline.storage.sink import Sink, Span, Superseded
from schemas.messages import dead_letter_headers

log = logging.getLogger(__name__)


#: Poll timeout while work is in flight: short, so finished batches are collected promptly.
BUSY_POLL_MS = 10
#: Poll timeout with nothing in flight but outputs waiting for their checkpoint. A poll that
#: waits this long and gets nothing means the input went quiet: the waiting outputs are then
#: committed at once (``reason="idle"``) instead of at the next roll. With exactly-once, a
#: burst's last outputs become visible then; the roll (up to ``--roll-seconds``) bounds only
#: how long outputs wait while the input keeps coming.
QUIET_POLL_MS = 250
#: Poll timeout with nothing in flight and nothing waiting.
IDLE_POLL_MS = 500


class StreamWorker:
    """Subclasses implement :meth:`process` (or the overlapping :meth:`submit`/:meth:`collect`).

    A stage whose work can overlap the poll loop (the featurizer's model thread) overrides
    :meth:`submit`, :meth:`collect`, :meth:`in_flight` and :meth:`abandon`: the loop keeps
    polling while at most ``max_in_flight`` messages are being worked on, and marks messages
    done (committable) only when :meth:`collect` hands them back. A stage with a sink passes
    it in; the worker flushes it at every checkpoint.
    """

    stage = "worker"

    def __init__(self, settings: Settings, topic: str, group_id: str, max_poll_records: int = 64,
                 checkpoint_seconds: float = 5.0, max_in_flight: int = 0, sink: Sink | None = None,
                 output_topics: Sequence[str] = (), **consumer_overrides: Any):
        self.settings = settings
        self.topic = topic
        self.group_id = group_id
        self.checkpoint_seconds = checkpoint_seconds
        self.stop_event = threading.Event()
        self.metrics = metrics()
        self.sink = sink
        self.max_in_flight = max_in_flight
        self.consumer = make_consumer(settings, group_id, [], max_poll_records=max_poll_records, **consumer_overrides)
        self.instance = InstanceSlot(settings, group_id)
        transactional_id = self.instance.transactional_id() if settings.exactly_once else None
        self.ckpt = Checkpoint(settings, self.consumer, transactional_id)
        self.limits = OutputLimits(settings, [*output_topics, settings.dead_letter_topic])
        self.limits.load()  # one DescribeConfigs now, not in the middle of the first batch
        self.attempts = Attempts(int(settings.max_attempts), max_in_flight + max_poll_records,
                                 Path(settings.data_dir) / "attempts" / f"{safe_name(group_id)}.json")
        self.admission = Admission(self, self.attempts)
        self.storage_pause = StoragePause(self.consumer, self.checkpoint)
        self.lag = LagGauge(self.stage, self.consumer, self.metrics)
        self.consumer.subscribe([topic], listener=Rebalance(self))
        self.starts: dict[TopicPartition, int] = {}  # first uncommitted offset per partition
        self._last_checkpoint = time.monotonic()
        self._finished: list[Sequence[Any]] = []
        self._held: list[Any] = []  # polled by this turn's poll, not yet handed to the stage
        self.in_rebalance = False  # inside kafka-python's rebalance callback (its I/O thread)
        self._poll_failures = 0
        self._poll_failure_logged = float("-inf")

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

    # -- outputs ----------------------------------------------------------------------------
    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
             origin: Any = None, reason_if_too_large: str = "output_too_large") -> bool:
        """Send one output record in this checkpoint; False if it can't fit its topic.

        A record over the topic's size limit would fail the whole checkpoint (and, in a
        transaction, every record with it), so it is checked first: the message it came from
        (``origin``) is dead-lettered instead.
        """
        size = self.limits.record_size(key, value, headers)
        if size > self.limits.limit(topic):
            if origin is not None:
                self.dead_letter(origin, reason_if_too_large,
                                 f"its output to {topic} is {size} bytes, over the topic's limit "
                                 f"of {self.limits.limit(topic)}")
            return False
        self.ckpt.send(topic, key, value, headers)
        return True

    def dead_letter(self, message: Any, reason: str, detail: str) -> None:
        """Send the original message to the dead-letter topic with why and where.

        The value and headers stay untouched when they fit; otherwise the value is omitted
        (``dlq-value-omitted`` says its size), then long headers are cut with a marker:
        the position headers always survive, so the message can be found and replayed.
        """
        headers = dead_letter_headers(message.headers, reason, detail, self.stage, message.topic,
                                      message.partition, message.offset)
        topic = self.settings.dead_letter_topic
        key, value, headers = fit_dead_letter(message.key, message.value, headers, self.limits, topic)
        self.ckpt.send(topic, key, value, headers)
        self.metrics.dead_letters.labels(self.stage, reason).inc()
        event(log, "dead letter", logging.WARNING, reason=reason, detail=detail[:300], topic=message.topic,
              partition=message.partition, offset=message.offset)

    def mark_done(self, messages: Sequence[Any]) -> None:
        for m in messages:
            self.ckpt.mark(m.topic, m.partition, m.offset)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, max_idle_seconds: float | None = None) -> None:
        """Poll until stopped (or idle for ``max_idle_seconds``), checkpointing as it goes.

        A loop that ends on an exception commits nothing more: work in flight and buffered
        rows are dropped and redone by the partition's next run.
        """
        idle_since = time.monotonic()
        event(log, f"{self.stage} started", topic=self.topic, group=self.group_id,
              guarantee=self.settings.guarantee, settings=self.settings.redacted())
        clean = False
        try:
            while not self.stop_event.is_set():
                if self.storage_pause.active and not self.storage_pause.retry():
                    continue
                if self._step():
                    idle_since = time.monotonic()
                if max_idle_seconds is not None and time.monotonic() - idle_since > max_idle_seconds:
                    break
            clean = True
        finally:
            self.close(checkpoint=clean)

    def _step(self) -> bool:
        """One turn: poll, submit, collect, maybe checkpoint."""
        started = time.perf_counter()
        timeout_ms = self._poll_timeout_ms()
        polled = self._poll(timeout_ms)
        messages = self.admission.admit(polled)
        if messages:
            self.metrics.messages.labels(self.stage).inc(len(messages))
            self.metrics.stage_seconds.labels(self.stage, "consume").observe(time.perf_counter() - started)
            self.submit(messages)
        self._collect(block=self.in_flight() > self.max_in_flight)
        busy = bool(messages) or bool(self.in_flight())
        quiet = timeout_ms == QUIET_POLL_MS and not polled  # the input was quiet for a whole poll
        if self.admission.checkpoint_now or self._checkpoint_due() or (quiet and self.ckpt.pending):
            self.admission.checkpoint_now = False
            self.checkpoint(reason="idle" if quiet else "due")
        self.lag.update()
        return busy

    def _poll_timeout_ms(self) -> int:
        if self.in_flight():
            return BUSY_POLL_MS
        return QUIET_POLL_MS if self.ckpt.pending else IDLE_POLL_MS

    def _collect(self, block: bool) -> None:
        for messages in self.collect(block):
            self.mark_done(messages)

    def _collect_all(self) -> None:
        """Wait for all work in flight (before a checkpoint: its offsets are committed with it)."""
        while self.in_flight():
            self._collect(block=True)

    def _poll(self, timeout_ms: int = IDLE_POLL_MS) -> list[Any]:
        """One batch: wait up to ``timeout_ms`` for records, then top up from what is already fetched.

        kafka-python hands out one partition's buffer per poll, so with 4 partitions a busy
        topic gives batches like 32, 3, 32, 9; small batches cost the model more per image.
        The top-up never waits, so a slow stream's half-full batch goes on at once. A record
        the client can't parse raises inside poll: it is skipped with a dead letter.

        A rebalance can run inside the top-up's poll, after earlier records of this turn came
        back: those are ``_held`` until the turn ends, so the rebalance hands them back
        (:meth:`return_held`) instead of this worker doing records of a partition it no longer
        owns, next to their new owner.
        """
        limit = self.consumer.config["max_poll_records"]
        self._held = self._poll_once(timeout_ms, limit)
        while 0 < len(self._held) < limit:
            extra = self._poll_once(0, limit - len(self._held))
            if not extra:
                break
            self._held += extra  # the list as the top-up left it: emptied if a rebalance ran in it
        messages, self._held = self._held, []
        return messages

    def return_held(self) -> None:
        """Give this turn's polled records back before a rebalance: each partition goes back to
        its first held record. A partition that stays with us is fetched again from there (its
        position is kept); one that moves is started by its new owner at its committed offset."""
        first: dict[TopicPartition, int] = {}
        for m in self._held:
            first.setdefault(TopicPartition(m.topic, m.partition), m.offset)
        self._held = []
        for tp, offset in first.items():
            self.consumer.seek(tp, offset)

    def _poll_once(self, timeout_ms: int, max_records: int) -> list[Any]:
        try:
            batch = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except Exception as exc:  # noqa: BLE001 - unparseable records: find, dead-letter, skip
            if not names_a_record(exc):
                # The broker or the client, not a record (a connection refused while the broker
                # restarts, kept by kafka-python and raised by the next poll): try again.
                self._poll_failed(exc)
                return []
            self._skip_unreadable(exc)
            return []
        return [m for part in batch.values() for m in part]

    def _poll_failed(self, exc: BaseException) -> None:
        """Wait a little before the next poll; say so at most every 10 s (an outage can be long)."""
        self._poll_failures += 1
        if time.monotonic() - self._poll_failure_logged >= 10.0:
            self._poll_failure_logged = time.monotonic()
            event(log, "poll failed; retrying", logging.WARNING, error=repr(exc)[:300], failures=self._poll_failures)
        time.sleep(POLL_RETRY_S)

    def _skip_unreadable(self, exc: BaseException) -> None:
        """Dead-letter the record that broke ``poll`` and step over it.

        kafka-python says what went wrong, not where: the place is the partition its fetcher
        was reading and that partition's next offset (private state, read defensively). A
        batch that can't be decoded at all comes back offset by offset, each with its own dead
        letter, so no offset of it goes unaccounted for. Without a place there is nothing safe
        to skip: the error is re-raised and the worker stops, committing nothing more.
        """
        place = internals.unreadable_place(self.consumer)
        if place is None:
            raise exc
        tp, offset = place
        self.consumer.seek(tp, offset + 1)
        stub = Unreadable(tp.topic, tp.partition, offset)
        self.dead_letter(stub, "unreadable_record", f"the Kafka client cannot parse this record: {exc!r}")
        self.mark_done([stub])

    # -- checkpoints --------------------------------------------------------------------------
    def _checkpoint_due(self) -> bool:
        if self.sink is not None and self.sink.due():
            return True
        sink_empty = self.sink is None or len(self.sink) == 0
        return bool(self.ckpt.pending) and time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds \
            and sink_empty

    def checkpoint(self, reason: str = "", clean: bool = False,
                   markers: dict[TopicPartition, tuple[int, int]] | None = None) -> bool:
        """Work in flight finished -> sink durable -> outputs and offsets committed together.

        ``clean``: the run is handing its partitions over (attempt count 0 on each commit);
        ``markers``: offsets to commit with an explicit attempt count (arming). False if
        anything failed; the worker has then rewound or paused.
        """
        self._collect_all()
        if self.sink is not None and self.sink.unpublished() and not self._publish():
            return False
        if not self.ckpt.holds_anything() and not markers and not (clean and self.attempts.armed):
            return True
        started = time.perf_counter()
        if self.sink is not None and len(self.sink) and not self._flush_sink():
            return False
        running = attempts_lib.encode(0 if clean else 1)
        metadata = {tp: running for tp in self.ckpt.pending}
        extra = {}
        if clean:  # a clean hand-over: no partition of ours may look like a run died on it
            markers = {**{tp: (self.starts[tp], 0) for tp in self.attempts.armed
                          if tp in self.starts and tp not in self.ckpt.pending}, **(markers or {})}
        for tp, (offset, n) in (markers or {}).items():
            extra[tp] = offset
            metadata[tp] = attempts_lib.encode(n)
        try:
            committed = self.ckpt.commit(metadata, extra)
        except CheckpointFailed as exc:
            event(log, "checkpoint failed; rewinding to the last commit", logging.ERROR, error=str(exc)[:500],
                  reason=reason)
            self.limits.learn(exc.errors)
            self.rewind()
            return False
        for tp, offset in committed.items():
            self.starts[tp] = offset
            n = markers[tp][1] if markers and tp in markers else (0 if clean else 1)
            self.attempts.remember(tp, offset, n)
        self._last_checkpoint = time.monotonic()
        published = self.sink is None or self._publish()
        self.metrics.stage_seconds.labels(self.stage, "checkpoint").observe(time.perf_counter() - started)
        event(log, "checkpoint", logging.DEBUG, reason=reason, offsets=len(committed))
        return published

    def _publish(self) -> bool:
        """Committed part files get their final names; a failure pauses like a failed write (the
        next checkpoint renames them before anything else)."""
        try:
            self.sink.publish()
        except Exception as exc:  # noqa: BLE001 - storage errors of any kind: pause and retry
            self.storage_pause.fail(exc)
            return False
        return True

    def _flush_sink(self) -> bool:
        """Rows durable before the Kafka commit; False if the checkpoint must not go on: another
        writer owns a partition now (rewound) or storage is away (paused, retried later)."""
        spans = {tp: Span(self.starts.get(tp, end), end) for tp, end in self.ckpt.pending.items()}
        try:
            written = self.sink.flush(spans)
        except Superseded as exc:  # this process lost a partition: its outputs must not be committed
            event(log, "checkpoint superseded by another writer; rewinding", logging.ERROR, error=str(exc)[:500])
            self.rewind()
            return False
        except Exception as exc:  # noqa: BLE001 - storage errors of any kind: pause and retry
            self.storage_pause.fail(exc)
            return False
        self.metrics.flushes.inc(len(written))
        return True

    def drop_uncommitted(self) -> None:
        """Forget work in flight, buffered rows, staged files and the open transaction, without
        touching the consumer's positions (the partitions are gone; new ones start from their
        committed offsets)."""
        self._held = []  # their positions are reset too (lost: fresh state; rewind: sought back)
        self.abandon()
        if self.sink is not None:
            self.sink.discard()
        self.ckpt.abort()

    def rewind(self) -> None:
        """Seek back to the committed offsets and drop unflushed output: the work is redone.

        Inside a rebalance callback the broker can't be asked (kafka-python's I/O thread), and
        kafka-python keeps the position of a revoked partition that comes straight back to us:
        each goes back to where this worker's last commit left it (``starts``).
        """
        self.drop_uncommitted()
        if self.in_rebalance:
            for tp in self.consumer.assignment():
                if tp in self.starts:
                    self.consumer.seek(tp, self.starts[tp])
            return
        for tp in self.consumer.assignment():  # not only those pending: abandoned work may be anywhere
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
            if tp in self.starts and committed is not None:
                self.starts[tp] = committed

    # -- shutdown ---------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stop_event)

    def close(self, checkpoint: bool = True) -> None:
        """Leave the group; with ``checkpoint`` (a clean stop) commit finished work first."""
        try:
            if checkpoint:
                self.checkpoint(reason="shutdown", clean=True)
                self.attempts.forget(list(self.attempts.armed))  # leaving the group has nothing more to say
            else:
                self.abandon()
                event(log, f"{self.stage} stopping on an error; committing nothing more", logging.ERROR)
        finally:
            with closing_quietly():
                self.consumer.close(autocommit=False)
                self.ckpt.close()
            self.instance.release()
            event(log, f"{self.stage} stopped")


#: kafka-python errors raised by ``poll()`` that are about a record batch it cannot read. Every
#: other KafkaError is about the broker or the client (connection refused, timeouts, authorization)
#: and is no reason to skip a record; errors from outside kafka-python's error tree (a header key
#: that isn't UTF-8) come from parsing a record.
RECORD_ERRORS = (kafka_errors.CorruptRecordError, kafka_errors.UnsupportedCodecError)
#: Pause after a poll that failed for a reason other than a record, before polling again.
POLL_RETRY_S = 0.5


def names_a_record(exc: BaseException) -> bool:
    """Whether an exception from ``poll()`` is about one unreadable record (to dead-letter and skip)."""
    return isinstance(exc, RECORD_ERRORS) or not isinstance(exc, kafka_errors.KafkaError)
