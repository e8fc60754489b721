"""The one Parquet writer, used by ``deeper featurize`` and by the stream featurizer.

Every file is written to a hidden temporary name in its final directory, fsync'ed, then
renamed: a reader (or a crash) never sees half a file, and readers skip the temporary names.
The stream uses :class:`RollingParquetWriter`, which buffers rows and rolls a part file when
it holds ``max_rows`` rows or is ``max_seconds`` old; the caller commits Kafka offsets only
after :meth:`RollingParquetWriter.flush` returns, so a crash replays rows instead of losing them.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import IncompatibleFeatures
from schemas import parquet as ps

TEMP_PREFIX = ".tmp-"
#: In-progress files don't end in ``.parquet``, so DuckDB/polars/Spark globs like
#: ``features/**/*.parquet`` never pick up a file that is still being written.
TEMP_SUFFIX = ".partial"


@dataclass(frozen=True)
class FeatureMeta:
    """What made a set of vectors; vectors with different metas must never be mixed."""

    backbone: str
    weights_digest: str
    layer: str
    dim: int
    preprocessing: str = ""

    def to_metadata(self) -> dict[bytes, bytes]:
        values = {
            ps.META_SCHEMA_VERSION: ps.SCHEMA_VERSION,
            ps.META_BACKBONE: self.backbone,
            ps.META_WEIGHTS_DIGEST: self.weights_digest,
            ps.META_LAYER: self.layer,
            ps.META_DIM: str(self.dim),
            ps.META_PREPROCESSING: self.preprocessing,
        }
        return {k.encode(): v.encode() for k, v in values.items()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, where: str = "") -> "FeatureMeta":
        md = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        if ps.META_BACKBONE not in md:
            raise IncompatibleFeatures(f"{where or 'file'} is not a go-deeper feature file (no {ps.META_BACKBONE} metadata)")
        version = md.get(ps.META_SCHEMA_VERSION)
        if version != ps.SCHEMA_VERSION:
            raise IncompatibleFeatures(f"{where}: schema version {version}, this go-deeper reads {ps.SCHEMA_VERSION}")
        return cls(md[ps.META_BACKBONE], md[ps.META_WEIGHTS_DIGEST], md[ps.META_LAYER], int(md[ps.META_DIM]),
                   md.get(ps.META_PREPROCESSING, ""))

    def key(self) -> tuple[str, str, str, int]:
        return (self.backbone, self.weights_digest, self.layer, self.dim)

    def check_same(self, other: "FeatureMeta", what: str = "") -> None:
        """Refuse to mix vectors of different backbones, weights or layers."""
        if self.key() != other.key():
            raise IncompatibleFeatures(
                f"cannot mix features{(' ' + what) if what else ''}: "
                f"{self.describe()} vs {other.describe()}; re-featurize with one backbone and layer")

    def describe(self) -> str:
        return f"{self.backbone}/{self.layer} (dim {self.dim}, weights {self.weights_digest[:12]})"


@dataclass
class FeatureRow:
    image_id: str
    source: str
    label: str | None
    width: int
    height: int
    vector: np.ndarray
    kafka_topic: str | None = None
    kafka_partition: int | None = None
    kafka_offset: int | None = None


def rows_to_table(rows: Sequence[FeatureRow], meta: FeatureMeta, now: dt.datetime | None = None) -> pa.Table:
    """Build a schema-v1 Arrow table (metadata attached) from rows."""
    schema = ps.feature_schema(meta.dim)
    created = now or dt.datetime.now(dt.timezone.utc)
    flat = np.concatenate([_vector(r.vector, meta.dim) for r in rows]) if rows else np.zeros(0, np.float32)
    columns = {
        "image_id": [r.image_id for r in rows],
        "source": [r.source for r in rows],
        "label": [r.label for r in rows],
        "width": pa.array([r.width for r in rows], pa.int32()),
        "height": pa.array([r.height for r in rows], pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), meta.dim),
        "created_at": pa.array([created] * len(rows), pa.timestamp("ms", tz="UTC")),
        "kafka_topic": [r.kafka_topic for r in rows],
        "kafka_partition": pa.array([r.kafka_partition for r in rows], pa.int32()),
        "kafka_offset": pa.array([r.kafka_offset for r in rows], pa.int64()),
    }
    table = pa.table(columns, schema=schema)
    return table.replace_schema_metadata(meta.to_metadata())


def _vector(vector: np.ndarray, dim: int) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise IncompatibleFeatures(f"vector has {v.shape[0]} values, the file's dim is {dim}")
    return v


def write_table_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` via a temporary file + fsync + rename (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}{TEMP_SUFFIX}"
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_features(rows: Sequence[FeatureRow], meta: FeatureMeta, path: Path) -> Path:
    """Write one complete feature file (batch mode)."""
    return write_table_atomic(rows_to_table(rows, meta), path)


class RollingParquetWriter:
    """Buffers rows and writes part files ``root/date=YYYY-MM-DD/backbone=NAME/part-*.parquet``.

    A roll happens when ``max_rows`` rows are buffered or the oldest buffered row is
    ``max_seconds`` old (checked by :meth:`due`, so a slow stream still lands on disk).
    """

    def __init__(self, root: Path, meta: FeatureMeta, max_rows: int = 10_000, max_seconds: float = 60.0):
        self.root = Path(root)
        self.meta = meta
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self._rows: list[FeatureRow] = []
        self._since: float | None = None

    def add(self, rows: Iterable[FeatureRow]) -> None:
        for row in rows:
            if self._since is None:
                self._since = time.monotonic()
            self._rows.append(row)

    def __len__(self) -> int:
        return len(self._rows)

    def due(self) -> bool:
        if not self._rows:
            return False
        return len(self._rows) >= self.max_rows or (time.monotonic() - (self._since or 0)) >= self.max_seconds

    def discard(self) -> None:
        """Drop buffered rows (their Kafka messages will be consumed again)."""
        self._rows = []
        self._since = None

    def flush(self) -> Path | None:
        """Write buffered rows to a new part file; return its path (None when empty).

        On failure the rows stay buffered, so the caller can retry without losing them.
        """
        if not self._rows:
            return None
        now = dt.datetime.now(dt.timezone.utc)
        directory = self.root / f"date={now:%Y-%m-%d}" / f"backbone={self.meta.backbone}"
        name = f"part-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
        path = write_table_atomic(rows_to_table(self._rows, self.meta, now), directory / name)
        self._rows = []
        self._since = None
        return path
