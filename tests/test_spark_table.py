"""Spark reads the feature table pyiceberg writes (issue 20, item 5), through Iceberg's JDBC
catalog on the same SQLite file and warehouse: row count, ``vector`` as ``array<float>``, the
identity from the table properties, the snapshot summaries. Real Spark, real tables."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipeline.storage import table
from pipeline.identity import FeatureId
from pipeline.storage.parquet_writer import FeatureRow

DIM = 16
META = FeatureId("efficientnet_lite0", "ab" * 32, "prelogits", DIM, "central_crop(0.875), bilinear 224")


def _rows(count: int, start: int = 0) -> list[FeatureRow]:
    return [FeatureRow(f"{i:064x}", f"photos/{i}.jpg", ["cat", None][i % 2], 640, 480,
                       np.random.default_rng(i).normal(size=DIM).astype(np.float32), "deeper.images", i % 3, i,
                       b"k%d" % i)
            for i in range(start, start + count)]


def test_spark_reads_a_table_pyiceberg_wrote(spark_env):
    settings = replace(spark_env.settings(), table="deeper.spark_reads_pyiceberg")
    table.append_rows(settings, META, _rows(5), writer="featurize")
    table.append_rows(settings, META, _rows(3, start=5), writer="backfill")

    spark = spark_env.spark
    name = f"{spark_env.catalog}.{settings.table}"
    frame = spark.table(name)
    assert frame.count() == 8
    vector = frame.schema["vector"].dataType
    assert vector.simpleString() == "array<float>" and not vector.containsNull
    assert not frame.schema["image_id"].nullable and frame.schema["kafka_key"].dataType.simpleString() == "binary"
    got = {r["image_id"]: r for r in frame.collect()}
    for row in _rows(8):
        assert np.array_equal(np.asarray(got[row.image_id]["vector"], np.float32), row.vector)
        assert (got[row.image_id]["kafka_offset"], got[row.image_id]["kafka_key"]) == (row.kafka_offset, row.kafka_key)

    properties = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {name}").collect()}
    identity = FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in properties.items()})
    assert identity == META

    summaries = [r["summary"] for r in spark.sql(f"SELECT summary FROM {name}.snapshots ORDER BY committed_at")
                 .collect()]
    assert [s[table.WRITER] for s in summaries] == ["featurize", "backfill"]
    assert [s["added-records"] for s in summaries] == ["5", "3"]


def test_pyiceberg_reads_what_spark_writes(spark_env):
    """The other way round: a Spark append (with snapshot properties) is a pyiceberg snapshot."""
    settings = replace(spark_env.settings(), table="deeper.pyiceberg_reads_spark")
    table.append_rows(settings, META, _rows(2), writer="featurize")
    target = f"{spark_env.catalog}.{settings.table}"
    spark_env.spark.table(target).selectExpr(
        "concat('f', substr(image_id, 2)) AS image_id", "source", "label", "width", "height", "vector", "created_at",
        "kafka_topic", "kafka_partition", "kafka_offset", "kafka_key").writeTo(target) \
        .option(f"snapshot-property.{table.WRITER}", "backfill").append()
    reread = table.load_catalog(settings).load_table(settings.table)
    rows = reread.scan().to_arrow()
    assert rows.num_rows == 4 and len(set(rows.column("image_id").to_pylist())) == 4
    assert reread.current_snapshot().summary.additional_properties[table.WRITER] == "backfill"
    table.check_identity(reread, META)


def test_spark_catalog_is_the_pyiceberg_catalog(monkeypatch, tmp_path):
    """The embedded SQLite catalog becomes Iceberg's JDBC catalog on the same file and warehouse;
    a catalog configured the pyiceberg way (here a REST one) is passed through; an s3://
    warehouse gets S3FileIO with the endpoint of the AWS variables."""
    from pipeline.config import Settings
    from pipeline.spark.session import catalog_conf

    for name in ("DEEPER_CATALOG", "DEEPER_WAREHOUSE", "PYICEBERG_HOME", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEEPER_DATA_DIR", str(tmp_path / "data"))
    conf = catalog_conf(Settings.from_env())
    assert conf == {"spark.sql.catalog.deeper": "org.apache.iceberg.spark.SparkCatalog",
                    "spark.sql.catalog.deeper.type": "jdbc",
                    "spark.sql.catalog.deeper.uri": f"jdbc:sqlite:{tmp_path / 'data' / 'catalog.db'}",
                    "spark.sql.catalog.deeper.jdbc.schema-version": "V1",
                    "spark.sql.catalog.deeper.warehouse": (tmp_path / "data" / "warehouse").as_uri()}

    monkeypatch.setenv("DEEPER_WAREHOUSE", "s3://bucket/warehouse")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    conf = catalog_conf(Settings.from_env())
    assert conf["spark.sql.catalog.deeper.io-impl"] == "org.apache.iceberg.aws.s3.S3FileIO"
    assert conf["spark.sql.catalog.deeper.s3.endpoint"] == "http://127.0.0.1:9000"
    assert conf["spark.sql.catalog.deeper.s3.path-style-access"] == "true"

    monkeypatch.setenv("DEEPER_CATALOG", "lake")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__TYPE", "rest")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__URI", "http://127.0.0.1:8181")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__WAREHOUSE", "analytics")
    conf = catalog_conf(Settings.from_env())
    assert conf == {"spark.sql.catalog.lake": "org.apache.iceberg.spark.SparkCatalog",
                    "spark.sql.catalog.lake.type": "rest", "spark.sql.catalog.lake.uri": "http://127.0.0.1:8181",
                    "spark.sql.catalog.lake.warehouse": "analytics"}
