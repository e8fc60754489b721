"""A consumer-group join that finishes between two ``poll()`` calls is applied, not lost.

kafka-python 3.0 runs the JoinGroup -> SyncGroup round trip as a task on its I/O thread, and only
the ``poll()`` that awaits the task applies its result (assignment, heartbeats back on, the
``on_partitions_assigned`` listener). A ``poll(timeout_ms=N)`` that gives up first leaves the task
running, and when it finishes before the next ``poll()`` (the worker was busy, or the test was
polling the group's other member) kafka-python 3.0.12 loses it in one of two ways:

* the next ``poll()`` sees a finished task and sends a **new** JoinGroup instead of using it; on
  Tansu every JoinGroup waits ~3 s, so the answer lands in the same gap again and again (the
  member never gets its partitions: 12 of 30 runs of two consumers polled in turn, 30 s each);
* if the join was started by a metadata change (a leader whose metadata did not list a new
  topic's partitions yet joins again once it does), ``need_rejoin()`` is already False, so the
  task is **never** applied: the member stays in REBALANCING with heartbeats off, the broker
  drops it after the session timeout, and it never joins again (10 of 30 runs on Apache Kafka:
  one consumer owned all 4 partitions, the other none, for good).

Java's client does neither: ``rejoinNeededOrPending()`` is true while a join future exists, and a
completed join future is handled by the next poll (``AbstractCoordinator.joinGroupIfNeeded``).
:func:`install` makes kafka-python do the same, without copying its join loop: a finished join
counts as pending, and the loop's next attempt returns the finished result instead of sending
a JoinGroup. It is applied once, to the classes, when :mod:`pipeline.kafka.kafka_io` is imported,
and only to the kafka-python versions whose join loop was read (:data:`PATCHED_VERSIONS`).
"""

from __future__ import annotations

import logging
from typing import Any

import kafka
from kafka.coordinator.base import BaseCoordinator

log = logging.getLogger(__name__)

#: kafka-python versions whose ``join_group_async`` has the loss described above (3.0.12 is the
#: newest release; its master branch still has the same loop).
PATCHED_VERSIONS = ("3.0.",)

_FINISHED = "_deeper_finished_join"  # instance attribute: a finished join's result, handed to the loop once
_installed = False


def install() -> bool:
    """Patch kafka-python's coordinator once; False (and a debug line) where it does not apply."""
    global _installed
    if _installed:
        return True
    needed = ("join_group_async", "_do_join_and_sync_async", "need_rejoin")
    if not kafka.__version__.startswith(PATCHED_VERSIONS) or not all(hasattr(BaseCoordinator, n) for n in needed):
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
