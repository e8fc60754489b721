"""The stream's Parquet sink: rows buffered per input partition, part files named by offsets.

Like Kafka Connect's S3 sink, a part file is named after what it holds::

    <root>/backbone=<name>/layer=<layer>/<topic>+<partition>+<first offset, 19 digits>.parquet

where *first offset* is the partition's first uncommitted offset when the file was cut.

A part file gets that name only **after** the checkpoint that covers it committed (the commit is
the fence): :meth:`ParquetSink.stage` writes it (atomically) under a hidden name that also
carries the offset the checkpoint commits, ``.staged-<topic>+<partition>+<first>+<end>-<id>.parquet.partial``,
the worker commits, and :meth:`ParquetSink.publish` renames it. A replica that lost its
partitions while frozen (a zombie: SIGSTOP, a long GC pause, a cut-off host) and wakes up
afterwards can still stage files, but its commit is refused, so they never get a final name;
had it written final names, its late file could replace or repeat the rows of the partition's
new owner. When a partition is assigned, :meth:`ParquetSink.recover` finishes what a process that
died between its commit and its rename left: the staged file that ends exactly at the committed
offset and starts after every final file is published; staged files that end at or before the
committed offset and were not published never will be, and are removed. Final files are never
removed: each one was committed. Zero duplicate rows on disk, without read-time de-duplication.
Readers, and globs of ``*.parquet``, never see a staged name.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.kafka.client import TopicPartition
from pipeline.logs import event
from pipeline.identity import FeatureId
from pipeline.storage.parquet_writer import FeatureRow, rows_to_table
from pipeline.storage.sink import Sink, Span

log = logging.getLogger(__name__)

_PART = re.compile(r"^(?P<topic>.+)\+(?P<partition>\d+)\+(?P<start>\d{19})\.parquet$")
STAGED_PREFIX = ".staged-"
_STAGED = re.compile(r"^\.staged-(?P<topic>.+)\+(?P<partition>\d+)\+(?P<start>\d{19})\+(?P<end>\d{19})"
                     r"-[0-9a-f]+\.parquet\.partial$")


#: A temporary part file older than this is left over from a writer killed mid-write.
STALE_TEMP_SECONDS = 120.0


def part_name(topic: str, partition: int, start: int) -> str:
    return f"{topic}+{partition}+{start:019d}.parquet"


def staged_name(topic: str, partition: int, start: int, end: int) -> str:
    """A part's name until its checkpoint committed: hidden, and unique to this write."""
    return (f"{STAGED_PREFIX}{topic}+{partition}+{start:019d}+{end:019d}-{uuid.uuid4().hex[:12]}"
            f"{storage.PARQUET_SUFFIX}{storage.TEMP_SUFFIX}")


class ParquetSink(Sink):
    """Buffers feature rows per (topic, partition); each checkpoint stages one part file each
    (:meth:`flush`), published once the checkpoint committed (:meth:`publish`)."""

    kind = "parquet"

    def __init__(self, root: str, meta: FeatureId, max_rows: int = 5000, max_seconds: float = 30.0):
        self.root = root
        self.meta = meta
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._rows: dict[TopicPartition, list[FeatureRow]] = defaultdict(list)
        self._count = 0
        self._since: float | None = None
        self._staged: list[tuple[str, str]] = []  # (staged, final): written, checkpoint not committed yet
        self._committed: list[tuple[str, str]] = []  # committed, not renamed yet (a failed publish)

    def describe(self) -> str:
        return f"Parquet parts under {self.directory}"

    def open(self) -> None:
        """Sweep temporary files a writer killed long ago left behind (local disk only)."""
        if not storage.is_uri(self.root):
            remove_stale_temp_files(Path(self.root))

    @property
    def directory(self) -> str:
        return str(storage.join(self.root, f"backbone={self.meta.qualified_name}", f"layer={self.meta.layer}"))

    def add(self, rows: Sequence[FeatureRow]) -> None:
        for row in rows:
            self._rows[TopicPartition(row.kafka_topic, row.kafka_partition)].append(row)
        if rows and self._since is None:
            self._since = time.monotonic()
        self._count += len(rows)

    def __len__(self) -> int:
        return self._count

    def due(self) -> bool:
        return bool(self._count) and (self._count >= self.max_rows
                                      or time.monotonic() - (self._since or 0.0) >= self.max_seconds)

    def discard(self) -> None:
        """Drop buffered rows and the staged files of a checkpoint that failed (never committed)."""
        self._rows.clear()
        self._count = 0
        self._since = None
        staged, self._staged = self._staged, []
        try:
            storage.delete(location for location, _ in staged)
        except storage.StorageError as exc:  # hidden and never published: recover() removes it later
            event(log, "cannot remove a staged part file", logging.WARNING, error=repr(exc))

    def switch(self, meta: FeatureId) -> None:
        """New vectors from now on (the featurizer followed a model change); call when empty."""
        assert not self._count, "flush before switching what the sink holds"
        self.meta = meta

    def stage(self, starts: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int]) -> list[str]:
        """Write each partition's rows to a staged file; the checkpoint may commit afterwards.

        ``starts`` maps partitions to their first uncommitted offset (the final name), ``ends``
        to the offset the checkpoint will commit (kept in the staged name for :meth:`recover`).
        Rows stay buffered if a write fails, so a retry loses nothing.
        """
        written = []
        for tp in sorted(self._rows, key=lambda t: (t.topic, t.partition)):
            rows = self._rows[tp]
            start = starts.get(tp, min(r.kafka_offset for r in rows))
            end = ends.get(tp, max(r.kafka_offset for r in rows) + 1)
            final = storage.join(self.directory, part_name(tp.topic, tp.partition, start))
            staged = storage.join(self.directory, staged_name(tp.topic, tp.partition, start, end))
            written.append(str(storage.write_parquet(rows_to_table(rows, self.meta), staged)))
            self._staged.append((str(staged), str(final)))
            del self._rows[tp]
            self._count -= len(rows)
        self._since = None
        return written

    def unpublished(self) -> bool:
        """Committed parts still under their staged names (their rename failed: retry first)."""
        return bool(self._committed)

    def publish(self) -> list[str]:
        """The checkpoint committed: give every staged part its final name; return those names.

        A staged file already gone while its final name exists was published by the partition's
        next owner (:meth:`recover`, after this process stalled between commit and rename).
        """
        self._committed += self._staged
        self._staged = []
        published = []
        while self._committed:
            staged, final = self._committed[0]
            try:
                storage.move(staged, final)
            except FileNotFoundError:
                if not storage.exists(final):
                    raise storage.StorageError(f"the committed part {staged} is gone and {final} does not exist")
            published.append(final)
            self._committed.pop(0)
        return published

    def flush(self, spans: Mapping[TopicPartition, Span]) -> list[str]:
        """The checkpoint's first half: :meth:`stage` each partition's rows under its span."""
        written = self.stage({tp: span.start for tp, span in spans.items()},
                             {tp: span.end for tp, span in spans.items()})
        if written:
            event(log, "parquet part written", paths=written)
        return written

    def assigned(self, committed: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """:meth:`recover` the partitions' staged files; nothing is ever stored past Kafka's
        commit (a part gets its final name only after it), so nothing is replayed-but-stored."""
        published, removed = self.recover(committed)
        if published:
            event(log, "published part files a previous owner committed", files=len(published))
        if removed:
            event(log, "removed part files of uncommitted work", files=len(removed))
        return {}

    def recover(self, committed: Mapping[TopicPartition, int]) -> tuple[list[str], list[str]]:
        """Tidy the staged files of newly assigned partitions: (published, removed).

        For each partition at committed offset C: the staged file ending at C that starts after
        every final file is the last committed checkpoint's, published now (its writer died or
        stalled between commit and rename); other staged files ending at or before C were never
        committed and are removed. Nothing else is touched, so a replica that runs this late
        (a zombie that thought it was assigned the partition) with an old C destroys nothing of
        the partition's new owner: the owner's staged files end after any C the zombie saw, and
        final files, all committed, are never removed.
        """
        fs, path = storage.resolve(self.directory)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return [], []  # nothing written here yet; any other listing error is raised
        finals: dict[TopicPartition, list[int]] = defaultdict(list)
        staged: dict[TopicPartition, list[tuple[int, int, str]]] = defaultdict(list)
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if match := _PART.match(info.base_name):
                finals[TopicPartition(match["topic"], int(match["partition"]))].append(int(match["start"]))
            elif match := _STAGED.match(info.base_name):
                tp = TopicPartition(match["topic"], int(match["partition"]))
                location = str(storage.join(self.directory, info.base_name))
                staged[tp].append((int(match["start"]), int(match["end"]), location))
        published, doomed = [], []
        for tp, offset in committed.items():
            last_final = max(finals[tp], default=-1)
            winners = sorted((s, loc) for s, e, loc in staged[tp] if e == offset and s > last_final)
            if winners:
                start, location = winners[-1]
                final = str(storage.join(self.directory, part_name(tp.topic, tp.partition, start)))
                try:
                    storage.move(location, final)
                except FileNotFoundError:  # its writer woke up and published it meanwhile
                    pass
                published.append(final)
            doomed += [loc for _, e, loc in staged[tp] if e <= offset and (not winners or loc != winners[-1][1])]
        storage.delete(doomed)
        return published, [str(d) for d in doomed]


def remove_stale_temp_files(root: Path, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete ``.tmp-`` part files a killed featurizer left behind; return what was removed.

    A SIGKILL during a part-file write leaves its temporary file (the rename never happens, so
    readers never see it and its rows are redone from Kafka). Only files older than
    ``older_than_s`` go: a featurizer sharing this directory may be writing a fresh one now.
    """
    removed: list[Path] = []
    if not root.exists():
        return removed
    cutoff = time.time() - older_than_s
    for path in root.rglob(f"{storage.TEMP_PREFIX}*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # renamed or removed meanwhile
    if removed:
        event(log, "removed stale temporary part files", files=len(removed))
    return removed
