"""Where the stream reaches into kafka-python's private state, in one place.

Written against **kafka-python 3.0.12** (the newest release; ``pipeline.kafka.client_fixes``
patches two of its bugs). Each function here uses attributes that are not kafka-python's
public API (``_transaction_manager``, ``_sender``, ``_fetcher`` and their fields), read
defensively where a missing attribute has a safe answer. Upgrading kafka-python means reading
these functions against the new version's ``kafka/producer/transaction_manager.py``,
``kafka/producer/sender.py`` and ``kafka/consumer/fetcher.py``; nothing else in the product
touches private client state.

Why each is needed is said where it is used: ``consumers/checkpoint.py`` (transactions whose
requests are waited for with a deadline, a zombie's refused offsets, a producer's fatal state)
``consumers/pause.py`` (resuming partitions) and ``consumers/worker.py`` (the place of an unreadable
record).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.kafka.client import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from pipeline.logs import event

log = logging.getLogger(__name__)

#: The kafka-python version this module's private-state access was read against.
WRITTEN_AGAINST = "3.0.12"


# --------------------------------------------------------------------------- transactional producer
def add_offsets_to_transaction(producer: KafkaProducer, offsets: dict[TopicPartition, OffsetAndMetadata],
                               group: Any) -> Any:
    """Start adding ``offsets`` to the open transaction; the request's result, to wait on with a
    deadline (``producer.send_offsets_to_transaction`` would wait without one)."""
    return producer._transaction_manager.send_offsets_to_transaction(offsets, group)


def begin_commit(producer: KafkaProducer) -> Any:
    """Start committing the open transaction; the EndTxn request's result (see above)."""
    return producer._transaction_manager.begin_commit()


def begin_abort(producer: KafkaProducer) -> Any:
    """Start aborting the open transaction; the EndTxn request's result (see above)."""
    return producer._transaction_manager.begin_abort()


def wake_sender(producer: KafkaProducer) -> None:
    """Wake the producer's I/O thread so a just-queued transactional request goes out now."""
    producer._sender.wakeup()


def producer_is_fatal(producer: KafkaProducer) -> bool:
    """kafka-python's fatal state never recovers: every later send fails at once.

    It happens after a broker restart that refuses the idempotent producer's epoch bump
    (Tansu, docs/faults.md) or when a newer replica fenced our transactional id. The state
    is private; if it can't be read, assume the worst (a new producer is cheap).
    """
    manager = getattr(producer, "_transaction_manager", None)
    has_fatal = getattr(manager, "has_fatal_error", None)
    return not callable(has_fatal) or bool(has_fatal())


def forget_refused_offsets(producer: KafkaProducer) -> None:
    """Drop offsets an earlier transaction failed to add, before this one adds its own.

    kafka-python 3.0.12 keeps the offsets of a refused TxnOffsetCommit (a zombie's stale
    generation: UnknownMemberId, IllegalGeneration) in ``_pending_txn_offset_commits`` after the
    transaction is aborted, and sends them again with the next transaction's offsets: a zombie
    that rejoined its group committed the old positions of partitions it no longer owned, under
    its new, valid generation, and their records were done twice (the cluster suite's zombie
    scenario: the group's offset history showed a partition's committed offset go from 11 back
    to 6, committed by the rejoined zombie along with its own). Nothing is pending between
    transactions, so clearing it here loses nothing.
    """
    pending = getattr(producer._transaction_manager, "_pending_txn_offset_commits", None)
    if pending:
        event(log, "dropping offsets a failed transaction left behind in the producer", logging.WARNING,
              partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in pending))
        pending.clear()


# --------------------------------------------------------------------------- consumer fetcher
def resume(consumer: KafkaConsumer, partitions: Any) -> None:
    """``consumer.resume``, working around kafka-python 3.0.12 (docs/faults.md, finding 5).

    Its fetcher restores a resumed partition's parked records only while its in-line slot is
    ``None``, but a drained record set (empty, not ``None``) can sit there for good, and a
    partition with parked records is never fetched again: it would stop silently. A drained
    slot holds nothing, so clearing it loses nothing.
    """
    consumer.resume(*partitions)
    fetcher = getattr(consumer, "_fetcher", None)
    slot = getattr(fetcher, "_next_partition_records", None)
    if slot is not None and not slot:
        fetcher._next_partition_records = None


def unreadable_place(consumer: KafkaConsumer) -> tuple[TopicPartition, int] | None:
    """(partition, offset) of the record kafka-python's fetcher failed to parse, if it says."""
    records = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    tp = getattr(records, "topic_partition", None)
    offset = getattr(records, "next_fetch_offset", None)
    if tp is None or offset is None:
        return None
    return tp, int(offset)
