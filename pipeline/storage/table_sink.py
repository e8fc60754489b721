"""The stream's table sink: each checkpoint is one Iceberg commit that also stores the offsets.

How a checkpoint stays exactly-once (the worker's order: :meth:`TableSink.flush`, then the
Kafka transaction):

1. Rows of each partition go to one new data file,
   ``<topic>+<partition>+<first offset, 19 digits>-<uuid>.parquet`` under the table's data
   location. A file no snapshot names is never read, so a kill while writing leaves nothing
   a reader sees.
2. One snapshot adds the files; its summary stores, per partition, the next offset after this
   checkpoint (``deeper.offsets.<topic>``, every partition the table has seen, carried over).
   The commit first checks that each partition's stored offset is still the one this sink
   expects (read when the partition was assigned, or stored by its own last commit): if
   another writer moved it, this process no longer owns the partition and the checkpoint
   fails with :class:`Superseded` (the worker rewinds) instead of storing rows twice.
3. Then the Kafka transaction commits the feature records and the consumed offsets.

A crash between 2 and 3 leaves the table ahead of Kafka. The next owner reads the stored
offsets when it is assigned the partition (:meth:`TableSink.assigned`); the offsets in between
are consumed again and their feature records produced again, but their rows are dropped
(:meth:`TableSink.add`): they are in the table already. A catalog that is down or locked makes
:meth:`flush` raise; the worker pauses consuming and calls it again, with the same rows and,
once written, the same files and commit id, so a commit whose answer was lost is recognised.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from collections import defaultdict
from typing import TYPE_CHECKING, Mapping, Sequence

from pipeline.kafka.client import TopicPartition
from pipeline.logs import event
from pipeline.storage import table as tables
from pipeline.identity import FeatureId
from pipeline.storage.sink import Sink, Span, Superseded

if TYPE_CHECKING:
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

    from pipeline.config import Settings
    from pipeline.storage.parquet_writer import FeatureRow

log = logging.getLogger(__name__)

#: The featurizer expires old snapshots itself after this many of its commits, or as soon as
#: the table holds this many more than ``deeper.history.max-snapshots`` (featurizers restarted
#: often, several of them): a commit's cost grows with the number of snapshots, so they must not
#: pile up between runs of ``deeper compact``.
EXPIRE_EVERY_COMMITS = 20


@dataclasses.dataclass
class _Prepared:
    """A checkpoint's data files, written, and the commit that will store them."""

    files: list[DataFile]
    records: dict[TopicPartition, int]  # next offset per partition, stored by the commit
    expect: dict[TopicPartition, int | None]  # what each of those partitions must still hold
    rows: int
    commit_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    since_ms: int = dataclasses.field(default_factory=lambda: int(time.time() * 1000) - 60_000)
    tries: int = 0
    write_s: float = 0.0  # writing the data files (for the log line)


class TableSink(Sink):
    """Buffers rows per partition; :meth:`flush` writes one data file each and commits them."""

    kind = "table"

    def __init__(self, settings: Settings, meta: FeatureId, max_rows: int = 5000, max_seconds: float = 5.0):
        self.settings = settings
        self.meta = meta
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._table: Table | None = None
        self._rows: dict[TopicPartition, list[FeatureRow]] = defaultdict(list)
        self._count = 0
        self._since: float | None = None
        #: per owned partition, the table's stored offset as this sink knows it (None: none stored)
        self._stored: dict[TopicPartition, int | None] = {}
        #: partitions whose stored offset must be read again (after a rewind or a switch)
        self._stale: set[TopicPartition] = set()
        self._prepared: _Prepared | None = None
        self._commits = 0
        self.replayed_rows = 0  # rows dropped because the table had them (a replay after a crash)

    # -- the table --------------------------------------------------------------------------
    def table(self) -> Table:
        """The table of the current identity, opened (created, identity checked) on first use."""
        if self._table is None:
            self._table = tables.open_table(self.settings, self.meta)
        return self._table

    def open(self) -> None:
        """Open the table now: a wrong identity fails at start, in one line."""
        self.table()

    def describe(self) -> str:
        return f"table {tables.table_name(self.settings, self.meta)} in {tables.describe_catalog(self.settings)}"

    # -- Sink -------------------------------------------------------------------------------
    def add(self, rows: Sequence[FeatureRow]) -> None:
        for row in rows:
            tp = TopicPartition(row.kafka_topic, row.kafka_partition)
            stored = self._stored.get(tp)
            if stored is not None and row.kafka_offset < stored:
                self.replayed_rows += 1  # stored before a crash: its record is produced again, its row not
                continue
            self._rows[tp].append(row)
            self._count += 1
        if self._count and self._since is None:
            self._since = time.monotonic()

    def __len__(self) -> int:
        """Rows not yet committed: buffered, or written into files whose commit failed."""
        return self._count + (self._prepared.rows if self._prepared is not None else 0)

    def due(self) -> bool:
        return self._prepared is not None or (bool(self._count) and (
            self._count >= self.max_rows or time.monotonic() - (self._since or 0.0) >= self.max_seconds))

    def discard(self) -> None:
        """Drop buffered rows and files not committed (unreferenced: never read); the stored
        offsets are read again before the next commit, since the rewind may follow a lost race."""
        self._rows.clear()
        self._count = 0
        self._since = None
        self._prepared = None
        self._stale.update(self._stored)

    def assigned(self, committed: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        stored = tables.stored_offsets(self.table().refresh())
        ahead = {}
        for tp, offset in committed.items():
            self._stored[tp] = stored.get(tp)
            self._stale.discard(tp)
            if stored.get(tp) is not None and stored[tp] > offset:
                ahead[tp] = stored[tp]
        if ahead:
            event(log, "the table is ahead of Kafka: these offsets are replayed without storing their rows again",
                  logging.WARNING, table=tables.table_name(self.settings, self.meta),
                  partitions={f"{tp.topic}/{tp.partition}": [committed[tp], end] for tp, end in ahead.items()})
        return ahead

    def switch(self, meta: FeatureId) -> None:
        """Another identity, so another table, with its own stored offsets (read at the next flush)."""
        assert not self._count and self._prepared is None, "flush before switching what the sink holds"
        self.meta = meta
        self._table = None
        self._stored = {tp: None for tp in self._stored}
        self._stale.update(self._stored)

    def flush(self, spans: Mapping[TopicPartition, Span]) -> list[str]:
        """Write and commit the buffered rows (see the module doc); return the data files' paths."""
        written = []
        if self._prepared is not None:  # written by an earlier call whose commit failed: commit it first
            written += self._commit_prepared()
        if self._stale & (set(self._rows) | set(spans)):
            self._refresh()
        started = time.perf_counter()
        prepared = self._prepare(spans)
        if prepared is not None:
            prepared.write_s = time.perf_counter() - started
            self._prepared = prepared
            written += self._commit_prepared()
        return written

    # -- the steps --------------------------------------------------------------------------
    def _refresh(self) -> None:
        stored = tables.stored_offsets(self.table().refresh())
        for tp in self._stale:
            self._stored[tp] = stored.get(tp)
        self._stale.clear()

    def _prepare(self, spans: Mapping[TopicPartition, Span]) -> _Prepared | None:
        """Write one data file per partition with rows the table lacks; None if there are none."""
        created = dt.datetime.now(dt.timezone.utc)
        files, records, expect, count = [], {}, {}, 0
        for tp in sorted(set(spans) | set(self._rows), key=lambda t: (t.topic, t.partition)):
            stored = self._stored.get(tp)
            keep = [r for r in self._rows.get(tp, []) if stored is None or r.kafka_offset >= stored]
            ends = ([spans[tp].end] if tp in spans else []) + ([keep[-1].kafka_offset + 1] if keep else [])
            if not ends:
                continue
            end = max(ends)
            if stored is not None and end <= stored:
                continue  # still replaying what the table has
            records[tp], expect[tp] = end, stored
            if keep:
                files.append(self._write(tp, keep, created))
                count += len(keep)
        self._rows.clear()
        self._count = 0
        self._since = None
        return _Prepared(files, records, expect, count) if files else None

    def _write(self, tp: TopicPartition, rows: list[FeatureRow], created: dt.datetime) -> DataFile:
        data = tables.rows_to_arrow(rows, self.meta, created)
        name = tables.file_name(f"{tp.topic}+{tp.partition}+{rows[0].kafka_offset:019d}")
        return tables.write_data_file(self.table(), data, name)

    def _commit_prepared(self) -> list[str]:
        prepared = self._prepared
        prepared.tries += 1
        started = time.perf_counter()
        try:
            table, snapshot = tables.commit(self.table(), "stream", add=prepared.files, offsets=prepared.records,
                                            expect=prepared.expect, commit_id=prepared.commit_id,
                                            since_ms=prepared.since_ms if prepared.tries > 1 else None)
        except Superseded:
            self._prepared = None  # its files stay unreferenced; the worker rewinds
            raise
        self._table = table
        self._stored.update(prepared.records)
        self._prepared = None
        self._commits += 1
        event(log, "table commit", table=tables.table_name(self.settings, self.meta), snapshot_id=snapshot.snapshot_id,
              files=len(prepared.files), rows=prepared.rows, write_s=round(prepared.write_s, 4),
              commit_s=round(time.perf_counter() - started, 4), snapshots=len(table.metadata.snapshots),
              offsets={f"{tp.topic}/{tp.partition}": end for tp, end in prepared.records.items()})
        cap = int(table.properties.get(tables.MAX_SNAPSHOTS, 0) or 0)
        piled_up = bool(cap) and len(table.metadata.snapshots) >= cap + EXPIRE_EVERY_COMMITS
        if piled_up or self._commits % EXPIRE_EVERY_COMMITS == 0:
            self._expire()
        return [f.file_path for f in prepared.files]

    def _expire(self) -> None:
        """Old snapshots go (tags and the offsets stay); a failure only postpones it."""
        from pipeline.storage import table_maintenance

        try:
            self._table = table_maintenance.expire_snapshots(self.table())
        except Exception as exc:  # noqa: BLE001 - housekeeping: the next round tries again
            event(log, "snapshot expiry failed; retrying later", logging.WARNING, error=repr(exc)[:300])
