"""The checkpoint: what a stream stage owes before it may move on, and how it pays it.

A stage consumes records, sends output records (features, labels, dead letters) and may buffer
rows in a sink (Parquet). The worker calls :meth:`Checkpoint.commit` only after the sink is
durable; what happens then depends on the guarantee (``DEEPER_GUARANTEE``):

at-least-once
    ``producer.flush()`` waits until every output record is acknowledged (acks=all,
    idempotent producer), then ``consumer.commit(offsets)``. A crash in between redoes the
    records: outputs may repeat, always under the same keys.

exactly-once (the default)
    Every output record since the last checkpoint was sent inside one Kafka transaction;
    ``send_offsets_to_transaction`` adds the consumed offsets to it (with the consumer's group
    metadata, so a zombie replica of an older group generation is fenced, KIP-447), and
    ``commit_transaction`` makes records and offsets visible together. A crash before that
    aborts all of it: ``read_committed`` readers never see the outputs, and the replay writes
    them again, once. Parquet is kept to the same rule by the sink's names (see
    :mod:`pipeline.storage.parquet_writer`).

Either way a failure raises :class:`CheckpointFailed` after dropping what the checkpoint held,
and the worker rewinds to the committed offsets: nothing is committed before its output is
durable.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from pipeline.config import Settings
from pipeline.errors import DeeperError
from pipeline.kafka import internals
from pipeline.kafka.client import KafkaConsumer, OffsetAndMetadata, TopicPartition, kafka_errors
from pipeline.kafka.kafka_io import close_producer, make_producer, make_transactional_producer
from pipeline.logs import event

log = logging.getLogger(__name__)

#: Longest wait for the broker to answer one transactional request (add offsets, commit, abort).
TRANSACTION_WAIT_S = 30.0


class CheckpointFailed(DeeperError):
    """Outputs or offsets could not be made durable; nothing of this checkpoint was committed."""

    def __init__(self, message: str, errors: list[BaseException] | None = None):
        super().__init__(message)
        self.errors = errors or []


class Checkpoint:
    """Pending offsets and output records of one stage, committed together."""

    def __init__(self, settings: Settings, consumer: KafkaConsumer, transactional_id: str | None):
        self.settings = settings
        self.consumer = consumer
        self.transactional_id = transactional_id  # None: at-least-once
        self.producer = self._new_producer()
        #: next offset to commit per partition (one past the last record whose output is done)
        self.pending: dict[TopicPartition, int] = {}
        self._futures: list[Any] = []
        self._in_transaction = False
        self._stuck = False  # a transactional request went unanswered: the producer must go

    @property
    def exactly_once(self) -> bool:
        return self.transactional_id is not None

    def _new_producer(self):
        if self.transactional_id is None:
            return make_producer(self.settings)
        return make_transactional_producer(self.settings, self.transactional_id)

    # -- filling ----------------------------------------------------------------------------
    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        """Send one output record as part of this checkpoint (inside its transaction)."""
        if self.exactly_once and not self._in_transaction:
            self.producer.begin_transaction()
            self._in_transaction = True
        future = self.producer.send(topic, key=key, value=value, headers=headers)
        self._futures.append(future)
        return future

    def mark(self, topic: str, partition: int, offset: int) -> None:
        """The record at ``offset`` is done: its outputs were sent or are in the sink."""
        tp = TopicPartition(topic, partition)
        self.pending[tp] = max(self.pending.get(tp, 0), offset + 1)

    def holds_anything(self) -> bool:
        return bool(self.pending or self._futures or self._in_transaction)

    # -- paying -----------------------------------------------------------------------------
    def commit(self, metadata: Mapping[TopicPartition, str] | None = None,
               extra_offsets: Mapping[TopicPartition, int] | None = None) -> dict[TopicPartition, int]:
        """Make outputs and offsets durable; return the committed offsets.

        ``metadata`` rides on each partition's committed offset (the poison attempt count);
        ``extra_offsets`` commits positions that produced nothing (e.g. an attempt marker).
        On any failure the checkpoint is dropped and :class:`CheckpointFailed` raised.
        """
        offsets = {**(extra_offsets or {}), **self.pending}
        committed = {tp: OffsetAndMetadata(offset, (metadata or {}).get(tp, ""), -1) for tp, offset in offsets.items()}
        try:
            if self.exactly_once:
                self._commit_transaction(committed)
            else:
                self._commit_acked(committed)
        except CheckpointFailed:
            self.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - any broker-side failure: drop it all, redo from the last commit
            self.abort()
            raise CheckpointFailed(f"checkpoint failed: {exc!r}", [exc]) from exc
        self.pending.clear()
        self._futures.clear()
        return offsets

    def _commit_transaction(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if not offsets and not self._in_transaction:
            return
        if not self._in_transaction:
            self.producer.begin_transaction()
            self._in_transaction = True
        if offsets:
            group = self._member_metadata()
            internals.forget_refused_offsets(self.producer)
            # The offsets join the transaction: they count only if its records do.
            self._await(internals.add_offsets_to_transaction(self.producer, offsets, group),
                        "adding the offsets to the transaction")
        # records + offsets, all or nothing
        self._await(internals.begin_commit(self.producer), "committing the transaction")
        self._in_transaction = False

    def _member_metadata(self) -> Any:
        """The consumer's group generation, which the broker checks the offsets against (KIP-447).

        A member whose session expired (frozen past ``session_timeout_ms``, its host cut off)
        has no generation any more: kafka-python resets it to -1 when a heartbeat is refused,
        and the broker accepts transactional offsets without a generation unchecked (what
        producers older than KIP-447 send). Such a zombie would commit offsets of partitions
        that have a new owner, so it must not commit at all: the checkpoint fails and the
        work goes to whoever owns the partitions now.
        """
        group = self.consumer.group_metadata()
        if group.generation_id < 0 or not group.member_id:
            raise CheckpointFailed("this consumer is no longer a member of its group (its session expired), so "
                                   "its partitions may have a new owner; committing nothing")
        return group

    def _await(self, result: Any, what: str) -> None:
        """Wait for a transactional request, but not for ever.

        kafka-python's own ``commit_transaction`` & co. wait without a limit, and after a
        broker is killed and restarted the answer can stay away for good (seen in the fault
        suite). A request unanswered in :data:`TRANSACTION_WAIT_S` fails the checkpoint; the
        abort then replaces the producer, whose successor (same transactional id) fences this
        one and aborts its open transaction.
        """
        internals.wake_sender(self.producer)
        if not result.wait(timeout_ms=TRANSACTION_WAIT_S * 1000):
            self._stuck = True
            raise CheckpointFailed(f"{what}: no answer from the broker within {TRANSACTION_WAIT_S:.0f} s")

    def _commit_acked(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.producer.flush()
        failed = [f.exception for f in self._futures if f.failed()]
        if failed:
            raise CheckpointFailed(f"{len(failed)} output record(s) not acknowledged: {failed[0]!r}", failed)
        if offsets:
            try:
                self.consumer.commit(offsets)
            except kafka_errors.CommitFailedError as exc:
                # Rebalanced away: the records are out (at-least-once allows the next owner to
                # repeat them), but part files must not be published by a replica that lost
                # the partition: the checkpoint fails and its staged files are dropped.
                raise CheckpointFailed("commit refused after a rebalance; the partition's next owner redoes "
                                       f"the records: {exc!r}", [exc]) from exc

    def abort(self) -> None:
        """Drop what this checkpoint holds; its records will be consumed and redone."""
        self.pending.clear()
        self._futures.clear()
        if self._in_transaction:
            self._in_transaction = False
            try:
                if self._stuck:
                    raise CheckpointFailed("the producer's last transactional request is unanswered")
                self._await(internals.begin_abort(self.producer), "aborting the transaction")
            except Exception as exc:  # noqa: BLE001 - fenced, fatal or stuck: only a new producer recovers
                event(log, "transaction abort failed; replacing the producer", logging.WARNING, error=repr(exc))
                self.replace_producer()
                return
        if internals.producer_is_fatal(self.producer):
            self.replace_producer()

    def replace_producer(self) -> None:
        try:
            fresh = self._new_producer()
        except Exception as exc:  # noqa: BLE001 - broker still away: keep the old one, retry next time
            event(log, "could not replace the producer; will retry", logging.WARNING, error=repr(exc))
            return
        old, self.producer = self.producer, fresh
        self._stuck = False
        close_producer(old, timeout=1)
        event(log, "producer replaced", logging.WARNING)

    def close(self) -> None:
        if self._in_transaction:
            self.abort()
        close_producer(self.producer)

