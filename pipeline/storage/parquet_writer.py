"""The one Parquet writer, used by ``deeper featurize`` and by the stream featurizer.

Every file is written all or nothing through :func:`pipeline.storage.write_parquet` (local:
a hidden temporary name in its final directory, fsync'ed, then renamed; S3: one object PUT), so a
reader (or a crash) never sees half a file. The location may be a path or an ``s3://`` URI.
The stream buffers rows and names its part files by Kafka offsets in
:class:`pipeline.storage.parquet_sink.ParquetSink`, which builds its tables with :func:`rows_to_table`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import IncompatibleFeatures
from pipeline.identity import FeatureId
from schemas import parquet as ps


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
    kafka_key: bytes | None = None


def rows_to_table(rows: Sequence[FeatureRow], meta: FeatureId, now: dt.datetime | None = None) -> pa.Table:
    """Build a schema-v2 Arrow table (the feature id in its metadata) from rows."""
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
        "kafka_key": pa.array([r.kafka_key for r in rows], pa.binary()),
    }
    table = pa.table(columns, schema=schema)
    return table.replace_schema_metadata(meta.to_parquet_metadata())


def _vector(vector: np.ndarray, dim: int) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise IncompatibleFeatures(f"vector has {v.shape[0]} values, the file's dim is {dim}")
    return v


def write_features(rows: Sequence[FeatureRow], meta: FeatureId, path: storage.Location) -> storage.Location:
    """Write one complete feature file (batch mode) to a path or an ``s3://`` URI, all or
    nothing (:func:`pipeline.storage.write_parquet`)."""
    return storage.write_parquet(rows_to_table(rows, meta), path)

