"""What a worker does when the group moves its partitions (kafka-python's rebalance callbacks).

Revoked partitions are checkpointed first, so the next owner starts where this worker stopped;
lost ones (the session expired: they may have a new owner already) are dropped without a
commit, so a zombie publishes nothing (docs/cluster.md); partitions assigned while the sink is
down are paused with the others.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline.kafka.client import ConsumerRebalanceListener
from pipeline.logs import event

if TYPE_CHECKING:
    from consumers.worker import StreamWorker

log = logging.getLogger(__name__)


class Rebalance(ConsumerRebalanceListener):
    """Checkpoint before partitions move, so the next owner starts where we stopped.

    kafka-python calls these on its I/O thread, where no blocking consumer call may be made
    (``committed()`` raises there): ``worker.in_rebalance`` tells :meth:`StreamWorker.rewind` so.
    """

    def __init__(self, worker: "StreamWorker"):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        if not revoked:
            return
        self.worker.in_rebalance = True
        try:
            self.worker.return_held()  # polled before the rebalance, not started: fetched again or by the next owner
            self.worker.checkpoint(reason="rebalance", clean=True)
        except Exception as exc:  # noqa: BLE001 - an exception here would break the client's rebalance
            event(log, "checkpoint before a rebalance failed; the next owner redoes the work", logging.ERROR,
                  error=repr(exc))
        finally:
            self.worker.in_rebalance = False
        self.worker.attempts.forget(list(revoked))

    def on_partitions_lost(self, lost):
        """Our session expired (the broker unreachable for longer than the session timeout, a long
        pause, a cut-off host): the partitions may already have a new owner, so nothing of ours
        may be committed or published; the work is redone by whoever owns them now (zombie
        fencing: docs/cluster.md)."""
        if not lost:
            return
        self.worker.in_rebalance = True
        try:
            self.worker.drop_uncommitted()
        except Exception as exc:  # noqa: BLE001 - as above
            event(log, "dropping the work of lost partitions failed", logging.ERROR, error=repr(exc))
        finally:
            self.worker.in_rebalance = False
        self.worker.attempts.forget(list(lost))
        event(log, "partitions lost; their uncommitted work is redone by their next owner", logging.WARNING,
              partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in lost))

    def on_partitions_assigned(self, assigned):
        event(log, "partitions assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        if self.worker.storage_pause.active and assigned:  # handed new partitions while the sink is down
            self.worker.consumer.pause(*assigned)
