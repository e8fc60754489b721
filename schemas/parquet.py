"""The Parquet schema of feature files, version 2 (see ``schemas/README.md``).

One row per image. The vector is a ``fixed_size_list<float32>[dim]`` so Spark, DuckDB, polars
and pandas all read it as an array column of known width. Which network made the vectors is
recorded once per file, in the file's key-value metadata (and in the ``backbone=`` directory of
a streamed dataset), not repeated on every row; ``pipeline.identity.FeatureId`` reads and writes it.
Adding ``deeper.precision`` kept the schema at version 1: readers default it (older files).
Version 2 adds ``kafka_key``, the image message's own key (a foreign producer's file name, say);
version 1 files, which lack it, are read as before.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "2"
#: versions this code reads
READS = frozenset({"1", "2"})

#: Keys of the file metadata (all values are UTF-8 strings).
META_SCHEMA_VERSION = "deeper.schema_version"
META_BACKBONE = "deeper.backbone"  # plain network name; files written before precision had its own key
#: may say ``efficientnet_lite0@bf16`` instead (see ``pipeline.identity``)
META_PRECISION = "deeper.precision"  # fp32 | bf16 | fp32-lite | int8; absent in older files: fp32
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
            pa.field("kafka_key", pa.binary()),  # the image message's key as it came (v2)
        ]
    )
