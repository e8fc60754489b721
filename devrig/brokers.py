"""A private broker for rig runs that can be crashed and restarted on its own data.

Both kinds go through :mod:`pipeline.app.broker.local` (the one home of starting and stopping brokers):
Apache Kafka always keeps its data on disk; Tansu does only in durable mode (S3 served by
localbucket with the If-Match shim of :mod:`pipeline.app.broker.local_s3`), which is what the rig uses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.app.broker import local as broker, local_s3


def broker_unavailable(kind: str, durable: bool = True) -> str | None:
    """None if a restartable broker of ``kind`` can run here, else why not (for skips)."""
    return broker.unavailable_reason(kind, durable=durable)


class RigBroker:
    """A broker in ``state_dir``: :meth:`start`, :meth:`restart` (clean or crash), :meth:`stop`.

    ``conditional_s3=False`` (Tansu only) serves durable storage with localbucket as shipped,
    to reproduce the offsets handed out twice after a restart (docs/faults.md);
    ``durable=False`` (Tansu only) keeps everything in memory: fastest, lost on restart.
    """

    def __init__(self, state_dir: Path, kind: str = "tansu", conditional_s3: bool = True, durable: bool = True):
        if kind not in broker.KINDS:
            raise ValueError(f"unknown broker kind {kind!r}; choose one of {', '.join(broker.KINDS)}")
        self.state_dir = Path(state_dir)
        self.kind = kind
        self.conditional_s3 = conditional_s3
        self.durable = durable
        self.info: broker.BrokerInfo | None = None
        self.restarts: list[dict[str, Any]] = []

    def start(self) -> "RigBroker":
        with _conditional_s3(self.conditional_s3):
            self.info = broker.start(self.state_dir, port=broker.free_port(), durable=self.durable, kind=self.kind)
        return self

    @property
    def bootstrap_servers(self) -> str:
        assert self.info is not None, "broker not started"
        return self.info.bootstrap_servers

    @property
    def pid(self) -> int:
        assert self.info is not None, "broker not started"
        return self.info.pid

    def restart(self, crash: bool = False) -> dict[str, Any]:
        """Stop (SIGTERM, or SIGKILL when ``crash``) and start again on the same port and data."""
        down = time.time()
        with _conditional_s3(self.conditional_s3):
            self.info = broker.restart(self.state_dir, grace_s=0 if crash else 10.0)
        record = {"kind": "broker_crash" if crash else "broker_restart", "at": down,
                  "broker_back_s": round(time.time() - down, 3)}
        self.restarts.append(record)
        return record

    def stop(self) -> None:
        broker.stop(self.state_dir, grace_s=5.0)

    def findings(self) -> dict[str, Any]:
        """What the broker's logs say went wrong (Tansu: refused stale writes, offsets taken twice)."""
        out: dict[str, Any] = {"kind": self.kind, "durable": self.durable or self.kind == "kafka"}
        if self.kind == "tansu":
            out["s3"] = "localbucket + If-Match shim" if self.conditional_s3 else "localbucket as shipped"
            out["s3_if_match_refused"] = self._count("localbucket.log", local_s3.IF_MATCH_REFUSED)
            out["tansu_batch_already_exists"] = self._count("tansu.log", "AlreadyExists")
        return out

    def _count(self, name: str, needle: str) -> int:
        try:
            return (self.state_dir / name).read_text(errors="replace").count(needle)
        except OSError:
            return 0


class _conditional_s3:
    """Set :data:`pipeline.app.broker.local.CONDITIONAL_S3` for one start (it is read when Tansu starts)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._saved = broker.CONDITIONAL_S3

    def __enter__(self) -> None:
        self._saved, broker.CONDITIONAL_S3 = broker.CONDITIONAL_S3, self.enabled

    def __exit__(self, *exc: object) -> None:
        broker.CONDITIONAL_S3 = self._saved
