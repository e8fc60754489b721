"""The stream's Parquet sink: rows buffered per input partition, part files named by offsets.

Like Kafka Connect's S3 sink, a part file is named after what it holds::

    <root>/backbone=<name>/layer=<layer>/<topic>+<partition>+<first offset, 19 digits>.parquet

where *first offset* is the partition's first uncommitted offset when the file was cut. A
file is written (atomically: rename locally, one PUT on S3) before the offsets it covers are
committed; if the process dies in between, the replay starts at the same offset and writes
the same name, replacing the file instead of duplicating its rows. Files of a partition that
start at or after its committed offset belong to work that was never committed, so
:meth:`ParquetSink.remove_uncommitted` deletes them when the partition is assigned: zero
duplicate rows on disk, without read-time de-duplication.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow.fs as pafs
from kafka import TopicPartition

from pipeline import storage
from pipeline.logs import event
from pipeline.storage.identity import FeatureId
from pipeline.storage.parquet_writer import FeatureRow, rows_to_table
from pipeline.storage.sink import Sink, Span

log = logging.getLogger(__name__)

_PART = re.compile(r"^(?P<topic>.+)\+(?P<partition>\d+)\+(?P<start>\d{19})\.parquet$")
#: A temporary part file older than this is left over from a writer killed mid-write.
STALE_TEMP_SECONDS = 120.0


def part_name(topic: str, partition: int, start: int) -> str:
    return f"{topic}+{partition}+{start:019d}.parquet"


class ParquetSink(Sink):
    """Buffers feature rows per (topic, partition); :meth:`flush` writes one part file each."""

    kind = "parquet"

    def __init__(self, root: str, meta: FeatureId, max_rows: int = 5000, max_seconds: float = 30.0):
        self.root = root
        self.meta = meta
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._rows: dict[TopicPartition, list[FeatureRow]] = defaultdict(list)
        self._count = 0
        self._since: float | None = None

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
        self._rows.clear()
        self._count = 0
        self._since = None

    def switch(self, meta: FeatureId) -> None:
        """New vectors from now on (the featurizer followed a model change); call when empty."""
        assert not self._count, "flush before switching what the sink holds"
        self.meta = meta

    def flush(self, spans: Mapping[TopicPartition, Span]) -> list[str]:
        """Write each partition's rows to the file named by its first uncommitted offset
        (``spans[tp].start``, the committed position); rows stay buffered if a write fails, so
        a retry loses nothing."""
        written = []
        for tp in sorted(self._rows, key=lambda t: (t.topic, t.partition)):
            rows = self._rows[tp]
            start = spans[tp].start if tp in spans else min(r.kafka_offset for r in rows)
            location = storage.join(self.directory, part_name(tp.topic, tp.partition, start))
            written.append(str(storage.write_parquet(rows_to_table(rows, self.meta), location)))
            del self._rows[tp]
            self._count -= len(rows)
        self._since = None
        if written:
            event(log, "parquet part written", paths=written)
        return written

    def assigned(self, committed: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Parts at or past the committed offset are uncommitted work: deleted (the replay
        writes them again), so nothing is ever stored ahead of Kafka."""
        removed = self.remove_uncommitted(committed)
        if removed:
            event(log, "removed part files of uncommitted work", files=len(removed))
        return {}

    def remove_uncommitted(self, committed: Mapping[TopicPartition, int]) -> list[str]:
        """Delete part files of these partitions that start at or after the committed offset."""
        fs, path = storage.resolve(self.directory)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []  # nothing written here yet; any other listing error is raised
        files = storage.list_parquet(self.directory)
        doomed = []
        for location in files:
            match = _PART.match(str(location).replace("\\", "/").rsplit("/", 1)[-1])
            if not match:
                continue
            tp = TopicPartition(match["topic"], int(match["partition"]))
            if tp in committed and int(match["start"]) >= committed[tp]:
                doomed.append(location)
        storage.delete(doomed)
        return [str(d) for d in doomed]



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
