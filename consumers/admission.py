"""Which polled messages a worker may work on now: arming, careful mode, poison.

A partition seen for the first time after an assignment is *armed*: its attempt count (how
many runs died on its first uncommitted message, :mod:`consumers.attempts`) is read from its
committed offset's metadata, raised by one and committed before any of its messages is
processed, so a run that dies on a message leaves that count behind. A partition whose runs
died is worked on *carefully*, one message and a checkpoint at a time, so the next death names
its message; after ``DEEPER_MAX_ATTEMPTS`` runs died on one message it is dead-lettered as
``poison`` and the stream goes on.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from consumers.attempts import Attempts
from pipeline.kafka.client import TopicPartition
from pipeline.logs import event

if TYPE_CHECKING:
    from consumers.worker import StreamWorker

log = logging.getLogger(__name__)


class Admission:
    """Arms new partitions, lets careful ones through one message at a time, dead-letters poison.

    Its own state: :attr:`stored_ahead` (what the sink reported when arming) and
    :attr:`checkpoint_now` (the worker checkpoints right after this batch: a careful message or
    a poison's dead letter must be committed before the next one is tried).
    """

    def __init__(self, worker: "StreamWorker", attempts: Attempts):
        self.worker = worker
        self.attempts = attempts
        self.checkpoint_now = False
        #: per partition, the offset up to which the sink already stores rows past Kafka's commit
        #: (a crash between the two commits): those messages were processed to the end once
        self.stored_ahead: dict[TopicPartition, int] = {}

    def admit(self, messages: list[Any]) -> list[Any]:
        """Arm partitions seen for the first time; let careful partitions through one message at a time."""
        consumer = self.worker.consumer
        assigned = consumer.assignment()
        by_tp: dict[TopicPartition, list[Any]] = defaultdict(list)
        for m in messages:
            tp = TopicPartition(m.topic, m.partition)
            if tp in assigned:  # a rebalance inside the poll's top-up may have taken it away
                by_tp[tp].append(m)
        unarmed = [tp for tp in by_tp if tp not in self.attempts.armed]
        if unarmed:
            outcome, behind = self._arm_contained({tp: by_tp[tp][0].offset for tp in unarmed})
            for tp in behind:  # already sought to their committed offsets
                del by_tp[tp]
            if outcome != "armed":
                # Nothing of this poll may be worked on now: it is fetched again later. After a
                # rewind the consumer already seeks to the committed offsets; otherwise (storage
                # down, broker unreachable) it goes back to where this poll began.
                self.attempts.forget(unarmed)
                if outcome != "rewound":
                    for tp, queue in by_tp.items():
                        consumer.seek(tp, queue[0].offset)
                return []
        admitted: list[Any] = []
        for tp, queue in by_tp.items():
            admitted += self._admit_partition(tp, queue)
        return admitted

    def _admit_partition(self, tp: TopicPartition, queue: list[Any]) -> list[Any]:
        armed = self.attempts.armed.get(tp)
        if armed is None:
            return queue
        first = queue[0]
        # a message whose row the sink stored was processed to the end: the runs died after it
        stored = first.offset < self.stored_ahead.get(tp, -1)
        if self.attempts.is_poison(armed, first.offset) and not stored:
            detail = (f"{armed.attempts} runs of the {self.worker.stage} died on this message "
                      f"(limit DEEPER_MAX_ATTEMPTS={self.attempts.max_attempts})")
            self.worker.dead_letter(first, "poison", detail)
            self.worker.mark_done([first])
            armed.attempts = 0
            self.checkpoint_now = True
            queue = queue[1:]
            if not queue:
                return []
            first = queue[0]
        if not armed.careful(first.offset):
            return queue
        # One message now and a checkpoint right after it, so a run that dies now dies at a
        # known offset; the rest are fetched again (a seek, not pause/resume: kafka-python
        # 3.0 can leave a resumed partition's parked fetch unserved).
        if len(queue) > 1:
            self.worker.consumer.seek(tp, first.offset + 1)
        self.checkpoint_now = True
        return [first]

    def _arm_contained(self, first_offsets: dict[TopicPartition, int]) -> tuple[str, set[TopicPartition]]:
        """``armed``, ``rewound`` (the checkpoint failed and rewound) or ``held`` (try again later),
        and the partitions whose records were behind their committed offset (skipped)."""
        behind: set[TopicPartition] = set()
        try:
            if self._arm(first_offsets, behind):
                return "armed", behind
            return ("held" if self.worker.storage_pause.active else "rewound"), behind
        except Exception as exc:  # noqa: BLE001 - broker or storage away: a stage error, wait and retry
            event(log, "cannot arm partitions yet; retrying", logging.ERROR, error=repr(exc))
            time.sleep(1.0)
            return "held", behind

    def _arm(self, first_offsets: dict[TopicPartition, int], behind: set[TopicPartition]) -> bool:
        """Read each new partition's attempt count, add one, commit it before any processing.

        A partition whose records start below its committed offset is not armed but sought to
        that offset (and added to ``behind``): those records are committed work, and arming at
        the first of them would move the committed offset back (the group coordinator takes any
        current member's offsets, for any partition), so they would be done twice. A position
        can lag like that after a rebalance: kafka-python keeps the position of a partition that
        stays with a member, and records polled just before a rebalance are still in hand.
        """
        worker = self.worker
        markers: dict[TopicPartition, int] = {}
        for tp, first in first_offsets.items():
            committed = worker.consumer.committed(tp, metadata=True)
            if committed is not None and first < committed.offset:
                worker.consumer.seek(tp, committed.offset)
                behind.add(tp)
                event(log, "fetched records behind the committed offset; skipping to it", logging.WARNING,
                      partition=f"{tp.topic}/{tp.partition}", first=first, committed=committed.offset)
                continue
            metadata = getattr(committed, "metadata", None)
            prior = self.attempts.prior(tp, first, metadata)
            self.attempts.arm(tp, first, prior)
            worker.starts[tp] = first
            markers[tp] = prior + 1
        if not markers:
            return True
        if worker.sink is not None:  # what the sink holds past Kafka's commit is replayed, not stored twice
            for tp in markers:
                self.stored_ahead.pop(tp, None)
            self.stored_ahead.update(worker.sink.assigned({tp: worker.starts[tp] for tp in markers}))
        arming = {tp: (worker.starts[tp], n) for tp, n in markers.items()}
        if not worker.checkpoint(reason="arming", markers=arming):
            return False
        for tp, n in markers.items():
            read_back = getattr(worker.consumer.committed(tp, metadata=True), "metadata", None)
            self.attempts.learn(tp, worker.starts[tp], n, read_back)
        return True
