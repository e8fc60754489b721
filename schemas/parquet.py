"""The Parquet schema of feature files, version 1 (see ``schemas/README.md``).

One row per image. The vector is a ``fixed_size_list<float32>[dim]`` so Spark, DuckDB, polars
and pandas all read it as an array column of known width. Which network made the vectors is
recorded once per file, in the file's key-value metadata (and in the ``backbone=`` directory of
a streamed dataset), not repeated on every row.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

#: Keys of the file metadata (all values are UTF-8 strings).
META_SCHEMA_VERSION = "deeper.schema_version"
META_BACKBONE = "deeper.backbone"
META_WEIGHTS_DIGEST = "deeper.weights_digest"
META_LAYER = "deeper.layer"
META_DIM = "deeper.dim"
META_PREPROCESSING = "deeper.preprocessing"


def feature_schema(dim: int) -> pa.Schema:
    """The Arrow schema of a feature file whose vectors have ``dim`` elements."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),  # sha256 hex of the image bytes
            pa.field("source", pa.string(), nullable=False),  # file path, or the producer's source
            pa.field("label", pa.string()),  # folder name / given label, null when unknown
            pa.field("width", pa.int32(), nullable=False),  # upright width in pixels
            pa.field("height", pa.int32(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("created_at", pa.timestamp("ms", tz="UTC"), nullable=False),
            pa.field("kafka_topic", pa.string()),  # provenance when the row came from the stream
            pa.field("kafka_partition", pa.int32()),
            pa.field("kafka_offset", pa.int64()),
        ]
    )
