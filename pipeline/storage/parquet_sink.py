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

import re
import time
from collections import defaultdict
from typing import Mapping, Protocol, Sequence

import pyarrow.fs as pafs
from kafka import TopicPartition

from pipeline import storage
from pipeline.storage.identity import FeatureId
from pipeline.storage.parquet_writer import FeatureRow, rows_to_table

_PART = re.compile(r"^(?P<topic>.+)\+(?P<partition>\d+)\+(?P<start>\d{19})\.parquet$")


class Sink(Protocol):
    """What a stream stage buffers until a checkpoint (quix-streams' sink, in four verbs)."""

    def add(self, rows: Sequence[FeatureRow]) -> None: ...

    def flush(self, starts: Mapping[TopicPartition, int]) -> list[str]: ...

    def discard(self) -> None: ...

    def due(self) -> bool: ...

    def __len__(self) -> int: ...


def part_name(topic: str, partition: int, start: int) -> str:
    return f"{topic}+{partition}+{start:019d}.parquet"


class ParquetSink:
    """Buffers feature rows per (topic, partition); :meth:`flush` writes one part file each."""

    def __init__(self, root: str, meta: FeatureId, max_rows: int = 5000, max_seconds: float = 30.0):
        self.root = root
        self.meta = meta
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._rows: dict[TopicPartition, list[FeatureRow]] = defaultdict(list)
        self._count = 0
        self._since: float | None = None

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

    def flush(self, starts: Mapping[TopicPartition, int]) -> list[str]:
        """Write each partition's rows to the file named by its first uncommitted offset.

        ``starts`` maps partitions to that offset (the committed position); rows stay
        buffered if a write fails, so a retry loses nothing.
        """
        written = []
        for tp in sorted(self._rows, key=lambda t: (t.topic, t.partition)):
            rows = self._rows[tp]
            start = starts.get(tp, min(r.kafka_offset for r in rows))
            location = storage.join(self.directory, part_name(tp.topic, tp.partition, start))
            written.append(str(storage.write_parquet(rows_to_table(rows, self.meta), location)))
            del self._rows[tp]
            self._count -= len(rows)
        self._since = None
        return written

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

