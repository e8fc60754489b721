"""How long recovery took after each fault, and what the workers went through (from their logs)."""

from __future__ import annotations

from typing import Any, Sequence

from devrig import Feeder, RigBroker, WorkerProcess


def _rounded(x: float | None) -> float | None:
    return None if x is None or x != x else round(x, 2)


def kill_recoveries(worker: WorkerProcess, moments: Sequence[str]) -> list[dict[str, Any]]:
    """For each killed incarnation: how long until the next one was up, owned partitions, worked."""
    out = []
    killed = [(inc, nxt) for inc, nxt in zip(worker.incarnations, worker.incarnations[1:])
              if inc.killed and inc.ended_at is not None]
    for (inc, nxt), moment in zip(killed, list(moments) + [None] * len(killed)):
        kill = inc.ended_at

        def since_kill(event: str) -> float | None:
            t = nxt.first(event)
            return _rounded(t - kill) if t is not None else None

        out.append({"killed_incarnation": inc.index, "moment": moment,
                    "killed_after_s": _rounded(kill - inc.started_at), "batches_before_kill": inc.count("batch"),
                    "process_up_s": since_kill(f"{worker.role} started"),
                    "partitions_assigned_s": since_kill("partitions assigned"),
                    "first_batch_s": since_kill("batch")})
    return out


def restart_recoveries(broker: RigBroker, workers: Sequence[WorkerProcess], feeder: Feeder,
                       since: float = 0.0) -> list[dict[str, Any]]:
    """For each broker restart after ``since``: broker back, each worker's next batch, the producer's next ack."""
    out = []
    for r in [r for r in broker.restarts if r["at"] >= since]:
        back = r["at"] + r["broker_back_s"]
        row = {k: v for k, v in r.items() if k != "at"}
        for worker in workers:
            firsts = [t for inc in worker.incarnations if (t := inc.first("batch", after=back)) is not None]
            row[f"{worker.role}_first_batch_s"] = _rounded(min(firsts) - r["at"]) if firsts else None
        acks = [t for t in feeder.acked.values() if t >= back]
        row["producer_first_ack_s"] = _rounded(min(acks) - r["at"]) if acks else None
        out.append(row)
    return out


#: Log events counted per worker: what its incarnations went through.
EVENTS = {
    "failed_checkpoints": "checkpoint failed; rewinding to the last commit",
    "producers_replaced": "producer replaced",
    "uncommitted_parts_removed": "removed part files of uncommitted work",
    "table_commits": "table commit",
    "table_ahead_replays": "the table is ahead of Kafka: these offsets are replayed without storing their rows again",
    "table_races_lost": "table commit lost a race; retrying on the new snapshot",
    "superseded_checkpoints": "checkpoint superseded by another writer; rewinding",
    "sink_pauses": "sink write failed; pausing consumption and retrying",
    "sink_recoveries": "sink recovered; consumption resumed",
}


def workers_report(workers: Sequence[WorkerProcess]) -> dict[str, Any]:
    return {w.name: {"incarnations": len(w.incarnations),
                     "exit_codes": [inc.returncode for inc in w.incarnations],
                     "unexpected_exits": w.unexpected_exits,
                     **{key: w.total(event) for key, event in EVENTS.items()}}
            for w in workers}
