"""Spark reads the feature table pyiceberg writes (issue 20, item 5), through Iceberg's JDBC
catalog on the same SQLite file and warehouse: row count, ``vector`` as ``array<float>``, the
identity from the table properties, the snapshot summaries. Real Spark, real tables."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from pipeline.storage import table_standin as table
from pipeline.storage.identity import FeatureId

DIM = 16
META = FeatureId("efficientnet_lite0", "ab" * 32, "prelogits", DIM, "central_crop(0.875), bilinear 224")


def _rows(count: int, start: int = 0) -> list[dict]:
    now = dt.datetime.now(dt.timezone.utc)
    return [{"image_id": f"{i:064x}", "source": f"photos/{i}.jpg", "label": ["cat", None][i % 2], "width": 640,
             "height": 480, "vector": np.random.default_rng(i).normal(size=DIM).astype(np.float32).tolist(),
             "created_at": now,
             "kafka_topic": "deeper.images", "kafka_partition": i % 3, "kafka_offset": i, "kafka_key": b"k%d" % i}
            for i in range(start, start + count)]


def _append(iceberg_table, rows: list[dict], writer: str, extra: dict[str, str] | None = None) -> None:
    schema = iceberg_table.schema().as_arrow()
    iceberg_table.append(pa.Table.from_pylist(rows, schema=schema),
                         snapshot_properties={table.WRITER: writer, **(extra or {})})


def test_spark_reads_a_table_pyiceberg_wrote(spark_env):
    settings = spark_env.settings()
    name = "deeper.spark_reads_pyiceberg"
    written = table.open_table(settings, META, name=name)
    _append(written, _rows(5), "stream", {"deeper.offsets.deeper.images.0": "42"})
    _append(written, _rows(3, start=5), "featurize")

    spark = spark_env.spark
    frame = spark.table(f"{spark_env.catalog}.{name}")
    assert frame.count() == 8
    vector = frame.schema["vector"].dataType
    assert vector.simpleString() == "array<float>" and not vector.containsNull
    assert not frame.schema["image_id"].nullable and frame.schema["kafka_key"].dataType.simpleString() == "binary"
    got = {r["image_id"]: r for r in frame.collect()}
    for row in _rows(8):
        assert got[row["image_id"]]["vector"] == pytest.approx(row["vector"], abs=0)
        assert got[row["image_id"]]["kafka_offset"] == row["kafka_offset"]

    properties = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {spark_env.catalog}.{name}").collect()}
    identity = FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in properties.items()})
    assert identity == META

    summaries = [r["summary"] for r in spark.sql(f"SELECT summary FROM {spark_env.catalog}.{name}.snapshots "
                                                 "ORDER BY committed_at").collect()]
    assert [s[table.WRITER] for s in summaries] == ["stream", "featurize"]
    assert summaries[0]["deeper.offsets.deeper.images.0"] == "42"
    assert [s["added-records"] for s in summaries] == ["5", "3"]


def test_pyiceberg_reads_what_spark_writes(spark_env):
    """The other way round: a Spark append (with snapshot properties) is a pyiceberg snapshot."""
    settings = spark_env.settings()
    name = "deeper.pyiceberg_reads_spark"
    written = table.open_table(settings, META, name=name)
    _append(written, _rows(2), "featurize")
    spark = spark_env.spark
    target = f"{spark_env.catalog}.{name}"
    spark.table(target).selectExpr("concat('f', substr(image_id, 2)) AS image_id", "source", "label", "width",
                                   "height", "vector", "created_at", "kafka_topic", "kafka_partition",
                                   "kafka_offset", "kafka_key").writeTo(target) \
        .option(f"snapshot-property.{table.WRITER}", "backfill").append()
    reread = table.load_catalog(settings).load_table(name)
    rows = reread.scan().to_arrow()
    assert rows.num_rows == 4 and len(set(rows.column("image_id").to_pylist())) == 4
    assert reread.current_snapshot().summary.additional_properties[table.WRITER] == "backfill"
    table.check_identity(reread, META, name)
