"""Reading what the stream produced: topics (``read_committed``) and Parquet part files on disk."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.config import Settings
from schemas.messages import record_header

#: Readers see only committed transactions, as every consumer of the pipeline does: records of
#: an aborted checkpoint (exactly-once) must never be counted as output.
ISOLATION = "read_committed"


def _assigned_consumer(settings: Settings, topic: str, timeout: float):
    """A group-less consumer assigned to every partition of ``topic`` from the beginning (None: no topic)."""
    from pipeline.kafka.topic_reader import open_topic_reader

    return open_topic_reader(settings, topic, timeout, isolation_level=ISOLATION)


def read_records(settings: Settings, topic: str, until: Callable[[list[Any]], bool] | None = None,
                 timeout: float = 120.0, quiet_s: float = 4.0, tick: Callable[[], Any] | None = None,
                 drain: bool = False) -> list[Any]:
    """Every committed record of ``topic`` from the beginning (assign, no group).

    Stops when ``until(records)`` holds (with ``drain``: and then nothing new arrived for
    ``quiet_s`` seconds, so repeats in partitions read last are counted too), or, without
    ``until``, when nothing new arrived for ``quiet_s`` seconds; at ``timeout`` either way. End offsets are not used: Tansu
    under-reports them (docs/broker.md). ``tick`` is called between polls.
    """
    consumer = _assigned_consumer(settings, topic, min(timeout, 60.0))
    if consumer is None:
        return []
    try:
        deadline = time.monotonic() + timeout
        records: list[Any] = []
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            if tick is not None:
                tick()
            got = [r for part in consumer.poll(timeout_ms=300).values() for r in part]
            if got:
                records.extend(got)
                last_new = time.monotonic()
            quiet = time.monotonic() - last_new > quiet_s
            if until is not None and until(records) and (quiet or not drain):
                return records
            if until is None and quiet:
                return records
        return records
    finally:
        consumer.close()


header = record_header  # the rig's name for it (tests read dead letters' headers with it)


class LabelCollector(threading.Thread):
    """Reads the labels topic from the beginning in the background: first receive time per id.

    Receive times are what "arrived downstream" means in the benchmarks; ``kafka_ts`` is the
    label record's own timestamp.
    """

    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="labels")
        self.settings = settings
        self.received: dict[str, float] = {}
        self.kafka_ts: dict[str, float] = {}
        self.records = 0
        self._halt = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.start()
        if not self._ready.wait(60):
            raise RuntimeError(f"labels topic {settings.labels_topic} not found")

    def run(self) -> None:
        from schemas.messages import decode_label

        consumer = None
        try:
            consumer = _assigned_consumer(self.settings, self.settings.labels_topic, 60.0)
            if consumer is None:
                raise RuntimeError(f"labels topic {self.settings.labels_topic} not found")
            self._ready.set()
            while not self._halt.is_set():
                for part in consumer.poll(timeout_ms=100).values():
                    now = time.time()
                    for m in part:
                        record = decode_label(m.value)
                        self.records += 1
                        self.received.setdefault(record.image_id, now)
                        self.kafka_ts.setdefault(record.image_id, m.timestamp / 1000.0)
        except BaseException as exc:  # noqa: BLE001 - surfaced by wait()
            self.error = exc
            self._ready.set()
        finally:
            if consumer is not None:
                consumer.close()

    def count(self, ids: Iterable[str]) -> int:
        return sum(1 for i in ids if i in self.received)

    def wait(self, ids: list[str], timeout: float, check: Callable[[], Any] | None = None) -> None:
        """Until every id has a label; ``check`` (e.g. "are the workers alive?") runs meanwhile."""
        deadline = time.monotonic() + timeout
        while self.count(ids) < len(ids):
            if self.error:
                raise RuntimeError(f"labels consumer failed: {self.error!r}")
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.count(ids)}/{len(ids)} labels within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def parquet_on_disk(features_root: Path) -> dict[str, Any]:
    """Every finished part file read raw and whole (no de-duplication): ids, positions, temp files."""
    import pyarrow.parquet as pq

    from pipeline.storage.parquet_reader import feature_files
    from pipeline.storage import TEMP_PREFIX

    root = Path(features_root)
    everything = sorted(root.rglob("*")) if root.exists() else []
    temps = [p for p in everything if p.is_file() and p.name.startswith(TEMP_PREFIX)]
    parts = feature_files([root]) if root.exists() else []
    ids: list[str] = []
    positions: list[tuple[str, int, int]] = []
    broken = []
    for part in parts:
        try:
            table = pq.read_table(part, columns=["image_id", "kafka_topic", "kafka_partition", "kafka_offset"])
            if table.num_rows != pq.ParquetFile(part).metadata.num_rows:
                broken.append(str(part))
            ids.extend(table.column("image_id").to_pylist())
            positions.extend(zip(*(table.column(c).to_pylist()
                                   for c in ("kafka_topic", "kafka_partition", "kafka_offset"))))
        except Exception as exc:  # noqa: BLE001 - a half-written part file would land here
            broken.append(f"{part}: {exc!r}")
    return {"parts": parts, "temps": temps, "raw_ids": ids, "positions": positions, "broken": broken,
            "temps_listed_by_reader": [str(p) for p in parts if Path(str(p)).name.startswith(TEMP_PREFIX)]}


def table_on_disk(settings: Settings) -> dict[str, Any]:
    """Every row of the current snapshot of every feature table in the settings' catalog, raw
    (no de-duplication), plus the data files there that no snapshot names (left by a writer
    killed before its commit, or by a commit that lost its partition)."""
    from pipeline.storage import table as tables
    from pipeline.storage import table_maintenance

    out: dict[str, Any] = {"tables": [], "data_files": 0, "raw_ids": [], "positions": [], "unreferenced_data_files": 0,
                           "live_files": []}
    if not tables.has_catalog(settings):
        return out
    for name in tables.feature_tables(settings):
        table = tables.load_named(settings, name)
        snapshot = table.current_snapshot()
        out["tables"].append(name)
        if snapshot is None:
            continue
        data = tables.scan(table, snapshot, ["image_id", "kafka_topic", "kafka_partition", "kafka_offset"])
        out["raw_ids"] += data.column("image_id").to_pylist()
        out["positions"] += list(zip(*(data.column(c).to_pylist()
                                       for c in ("kafka_topic", "kafka_partition", "kafka_offset"))))
        live = {f.file.file_path for f in table.scan(snapshot_id=snapshot.snapshot_id).plan_files()}
        out["data_files"] += len(live)
        out["live_files"] += sorted(live)
        known = table_maintenance.referenced_files(table)
        listing = table_maintenance.list_files(table.location() + "/data") or []
        out["unreferenced_data_files"] += sum(1 for path, _ in listing if path not in known)
    return out


class TempWatcher(threading.Thread):
    """Scans the features directory while faults happen: which temp files ever appeared."""

    def __init__(self, root: Path, every_s: float = 0.25):
        super().__init__(daemon=True, name="temp-watcher")
        self.root = Path(root)
        self.every_s = every_s
        self.seen: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        from pipeline.storage import TEMP_PREFIX

        while not self._halt.is_set():
            if self.root.exists():
                try:
                    self.seen.update(str(p) for p in self.root.rglob(f"{TEMP_PREFIX}*"))
                except OSError:
                    pass  # a temp file renamed while walking
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)
