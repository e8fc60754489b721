"""Two kafka-python 3.0.12 bugs this project works around, in one place (docs/broker.md).

**A group join that finishes between two ``poll()`` calls is lost.** kafka-python 3.0 runs the
JoinGroup -> SyncGroup round trip as a task on its I/O thread, and only the ``poll()`` that awaits
the task applies its result (assignment, heartbeats back on, ``on_partitions_assigned``). A
``poll(timeout_ms=N)`` that gives up first leaves the task running; when it finishes before the
next ``poll()`` (the worker was busy, or the test polled the group's other member):

* the next ``poll()`` sees a finished task and sends a **new** JoinGroup instead of using it; on
  Tansu every JoinGroup waits ~3 s, so the answer lands in the same gap again and again (the
  member never gets its partitions: 12 of 30 runs of two consumers polled in turn);
* if the join was started by a metadata change (a leader whose metadata did not list a new
  topic's partitions yet joins again once it does), ``need_rejoin()`` is already False, so the
  task is **never** applied: the member stays REBALANCING with heartbeats off, the broker drops
  it after the session timeout, and it never joins again (10 of 30 runs on Apache Kafka).

Java's client does neither: ``rejoinNeededOrPending()`` is true while a join future exists, and a
completed join future is handled by the next poll (``AbstractCoordinator.joinGroupIfNeeded``).
:func:`install` makes kafka-python do the same, without copying its join loop: a finished join
counts as pending, and the loop's next attempt returns the finished result instead of sending
a JoinGroup. Applied once, to the classes, when :mod:`pipeline.kafka.kafka_io` is imported.

**A transactional request dequeued while its coordinator is unreachable is dropped.** The
producer's sender asks ``await_ready(coordinator)``, which raises instead of returning False when
the connection is down (a broker restart); the ``except`` branch looks the coordinator up again
but re-queues the request only if no node had been chosen, and one had. So the AddOffsetsToTxn or
EndTxn of a checkpoint under way when the broker went away was never sent again: the checkpoint
waited ``TRANSACTION_WAIT_S`` (30 s), then replaced its producer (docs/faults.md, finding 4 and
the recovery timeline). :func:`retry_unready_coordinator` makes ``await_ready`` answer False for
the producer's sender, which takes the branch that re-queues. (kafka-python's master rewrote the
sender and always re-queues; no release has it yet.)

Both apply only to the kafka-python versions whose code was read (:data:`PATCHED_VERSIONS`).
"""

from __future__ import annotations

import logging
from typing import Any

import kafka
from kafka import errors as kafka_errors
from kafka.coordinator.base import BaseCoordinator

log = logging.getLogger(__name__)

#: kafka-python versions with both bugs (3.0.12 is the newest release).
PATCHED_VERSIONS = ("3.0.",)

_FINISHED = "_deeper_finished_join"  # instance attribute: a finished join's result, handed to the loop once
_installed = False


def _applies() -> bool:
    return kafka.__version__.startswith(PATCHED_VERSIONS)


def install() -> bool:
    """Patch kafka-python's group coordinator once; False (and a debug line) where it does not apply."""
    global _installed
    if _installed:
        return True
    needed = ("join_group_async", "_do_join_and_sync_async", "need_rejoin")
    if not _applies() or not all(hasattr(BaseCoordinator, n) for n in needed):
        log.debug("kafka-python %s: group join left as it is", kafka.__version__)
        return False
    join, join_and_sync = BaseCoordinator.join_group_async, BaseCoordinator._do_join_and_sync_async

    def need_rejoin(self: Any) -> bool:
        """Java's ``rejoinNeededOrPending``: a join in flight, or finished and not applied, is pending."""
        return bool(self.rejoin_needed or getattr(self, "_join_task", None) is not None)

    async def join_group_async(self: Any, timeout_ms: Any = None) -> Any:
        task = getattr(self, "_join_task", None)
        if task is not None and task.succeeded():
            # It finished while no poll() awaited it: the loop's next attempt returns its result.
            setattr(self, _FINISHED, task.value)
            self._join_task = None
            self.rejoin_needed = True  # the loop runs until it has applied the result
        try:
            return await join(self, timeout_ms)
        finally:
            self.__dict__.pop(_FINISHED, None)  # not used (the coordinator went away): a fresh join follows

    async def do_join_and_sync_async(self: Any) -> Any:
        if _FINISHED in self.__dict__:
            return self.__dict__.pop(_FINISHED)
        return await join_and_sync(self)

    BaseCoordinator.need_rejoin = need_rejoin
    BaseCoordinator.join_group_async = join_group_async
    BaseCoordinator._do_join_and_sync_async = do_join_and_sync_async
    _installed = True
    return True


def retry_unready_coordinator(producer: Any) -> None:
    """Make ``producer``'s sender re-queue a transactional request whose node is unreachable."""
    client = getattr(getattr(producer, "_sender", None), "_client", None)
    ready = getattr(client, "await_ready", None)
    if not _applies() or ready is None:
        return

    def await_ready(node_id: Any, timeout_ms: int = 30000) -> bool:
        try:
            return ready(node_id, timeout_ms=timeout_ms)
        except kafka_errors.KafkaConnectionError:
            return False  # the sender then looks the coordinator up again and re-queues the request

    client.await_ready = await_ready
