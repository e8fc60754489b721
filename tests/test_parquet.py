"""Feature files at rest: the rolling writer, the reader's checks and de-duplication, the cache.

Real Parquet files and a real SQLite cache in ``tmp_path``; vectors are small and synthetic
because what is under test is the file handling, not the network.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.parquet_writer as writer_module
from pipeline.errors import DeeperError, IncompatibleFeatures
from pipeline.feature_cache import FeatureCache
from pipeline.parquet_reader import feature_files, read_features
from pipeline.parquet_writer import (TEMP_PREFIX, FeatureMeta, FeatureRow, RollingParquetWriter, rows_to_table,
                                     write_features)

DIM = 8
META = FeatureMeta("efficientnet_lite0", "cd" * 32, "prelogits", DIM, "central_crop(0.875)")


def row(i: int, label: str | None = "cat", dim: int = DIM, offset: int | None = None) -> FeatureRow:
    return FeatureRow(image_id=f"{i:064x}", source=f"photos/{i}.jpg", label=label, width=640 + i, height=480,
                      vector=np.arange(dim, dtype=np.float32) + i, kafka_topic="deeper.images",
                      kafka_partition=0, kafka_offset=offset if offset is not None else i)


def parts(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


# -- rolling writer -------------------------------------------------------------------------------
def test_rolls_by_rows_into_partition_dirs(tmp_path):
    w = RollingParquetWriter(tmp_path / "features", META, max_rows=3, max_seconds=3600)
    assert not w.due() and w.flush() is None
    w.add([row(0), row(1)])
    assert len(w) == 2 and not w.due()
    w.add([row(2)])
    assert w.due()
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    path = w.flush()
    assert len(w) == 0 and not w.due()
    assert path.parent.name == "backbone=efficientnet_lite0" and path.parent.parent.name == f"date={today}"
    assert path.parent.parent.parent == tmp_path / "features"
    assert path.name.startswith("part-") and path.suffix == ".parquet"
    w.add([row(3), row(4), row(5)])
    second = w.flush()
    assert second != path and parts(tmp_path) == sorted([path, second])

    table = pq.read_table(path)
    assert table.column("image_id").to_pylist() == [row(i).image_id for i in range(3)]
    assert table.column("kafka_offset").to_pylist() == [0, 1, 2]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    assert FeatureMeta.from_metadata(table.schema.metadata) == META
    fs = read_features([tmp_path / "features"])
    assert len(fs) == 6 and fs.duplicates_dropped == 0
    np.testing.assert_array_equal(fs.vectors[fs.image_ids.index(row(4).image_id)], row(4).vector)


def test_rolls_by_time(tmp_path):
    w = RollingParquetWriter(tmp_path, META, max_rows=1000, max_seconds=0.3)
    w.add([row(0)])
    assert not w.due()
    time.sleep(0.4)
    assert w.due()  # a slow stream still lands on disk
    w.add([row(1)])  # the clock runs from the oldest buffered row
    assert w.due()
    path = w.flush()
    assert pq.read_table(path).num_rows == 2
    w.add([row(2)])
    assert not w.due()  # the clock restarted with the new buffer


def test_discard_drops_buffered_rows(tmp_path):
    w = RollingParquetWriter(tmp_path, META, max_rows=2)
    w.add([row(0), row(1)])
    w.discard()
    assert len(w) == 0 and not w.due() and w.flush() is None and parts(tmp_path) == []


def test_writes_to_a_temp_name_then_renames(tmp_path, monkeypatch):
    written = []
    real_write = writer_module.pq.write_table

    def spy(table, where, **kwargs):
        where = Path(where)
        written.append(where)
        assert where.name.startswith(TEMP_PREFIX)
        assert not list(where.parent.glob("part-*.parquet")), "final file visible before the data was written"
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(writer_module.pq, "write_table", spy)
    w = RollingParquetWriter(tmp_path, META, max_rows=2)
    w.add([row(0), row(1)])
    path = w.flush()
    assert len(written) == 1 and written[0].parent == path.parent and not written[0].exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no .tmp- left behind


def test_failed_write_leaves_nothing_and_keeps_the_rows(tmp_path, monkeypatch):
    real_write = writer_module.pq.write_table

    def half_then_crash(table, where, **kwargs):
        real_write(table.slice(0, 1), where, **kwargs)  # a partial file exists at the temp name...
        raise OSError("disk full")

    monkeypatch.setattr(writer_module.pq, "write_table", half_then_crash)
    w = RollingParquetWriter(tmp_path, META, max_rows=2)
    w.add([row(0), row(1)])
    with pytest.raises(OSError, match="disk full"):
        w.flush()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # ...and is removed
    assert len(w) == 2  # nothing lost: the caller can retry
    monkeypatch.setattr(writer_module.pq, "write_table", real_write)
    assert pq.read_table(w.flush()).num_rows == 2


def test_readers_skip_temp_files(tmp_path):
    root = tmp_path / "features"
    w = RollingParquetWriter(root, META, max_rows=2)
    w.add([row(0), row(1)])
    path = w.flush()
    crashed = path.parent / f"{TEMP_PREFIX}0123456789abcdef-part-crashed.parquet"
    crashed.write_bytes(b"PAR1 half a file")
    assert feature_files([root]) == [path]
    assert len(read_features([root])) == 2


# -- reader -----------------------------------------------------------------------------------------
def test_duplicate_ids_across_files_are_dropped_and_counted(tmp_path):
    a = write_features([row(0), row(1), row(2)], META, tmp_path / "a.parquet")
    replay = [row(1, label="dog"), row(2, label="dog"), row(3)]  # an at-least-once replay
    b = write_features(replay, META, tmp_path / "b.parquet")
    fs = read_features([a, b])
    assert fs.duplicates_dropped == 2
    assert fs.image_ids == [row(i).image_id for i in range(4)]
    assert fs.labels == ["cat", "cat", "cat", "cat"]  # the first occurrence (file order) wins
    assert fs.vectors.shape == (4, DIM) and fs.vectors.dtype == np.float32
    np.testing.assert_array_equal(fs.vectors, np.stack([row(i).vector for i in range(4)]))
    assert fs.sources == [f"photos/{i}.jpg" for i in range(4)]
    # duplicates inside one file count too
    c = write_features([row(5), row(5)], META, tmp_path / "c.parquet")
    assert read_features([c]).duplicates_dropped == 1


def test_file_without_metadata_is_refused(tmp_path):
    table = rows_to_table([row(0)], META).replace_schema_metadata(None)
    plain = tmp_path / "plain.parquet"
    pq.write_table(table, plain)
    with pytest.raises(IncompatibleFeatures, match="not a go-deeper feature file"):
        read_features([plain])
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), other)
    with pytest.raises(IncompatibleFeatures, match="not a go-deeper feature file"):
        read_features([other])


def test_other_schema_version_is_refused(tmp_path):
    table = rows_to_table([row(0)], META)
    md = dict(table.schema.metadata)
    md[b"deeper.schema_version"] = b"99"
    path = tmp_path / "future.parquet"
    pq.write_table(table.replace_schema_metadata(md), path)
    with pytest.raises(IncompatibleFeatures, match="schema version 99"):
        read_features([path])


def test_vectors_of_the_wrong_dim_are_refused(tmp_path):
    with pytest.raises(IncompatibleFeatures, match="9 values"):
        rows_to_table([row(0), row(1, dim=9)], META)
    # a file whose vectors don't match its own declared dim
    table = rows_to_table([row(0), row(1)], META)
    md = dict(table.schema.metadata)
    md[b"deeper.dim"] = b"16"
    lying = tmp_path / "lying.parquet"
    pq.write_table(table.replace_schema_metadata(md), lying)
    with pytest.raises(IncompatibleFeatures, match="16 values per row"):
        read_features([lying])
    # two files of different dims are never mixed
    a = write_features([row(0)], META, tmp_path / "a.parquet")
    wide = FeatureMeta(META.backbone, META.weights_digest, META.layer, 12, META.preprocessing)
    b = write_features([row(1, dim=12)], wide, tmp_path / "b.parquet")
    with pytest.raises(IncompatibleFeatures, match="cannot mix features"):
        read_features([a, b])


@pytest.mark.parametrize("field,value", [("backbone", "inception_v1"), ("weights_digest", "ef" * 32),
                                         ("layer", "logits")])
def test_files_of_different_origin_are_never_mixed(tmp_path, field, value):
    a = write_features([row(0)], META, tmp_path / "a.parquet")
    other = FeatureMeta(**{**META.__dict__, field: value})
    b = write_features([row(1)], other, tmp_path / "b.parquet")
    with pytest.raises(IncompatibleFeatures, match="cannot mix features"):
        read_features([a, b])


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DeeperError, match="no such feature file"):
        read_features([tmp_path / "nope.parquet"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeeperError, match="no Parquet feature files"):
        read_features([tmp_path / "empty"])


# -- feature cache ----------------------------------------------------------------------------------
def test_corrupt_cache_is_moved_aside_and_rebuilt(tmp_path):
    path = tmp_path / "cache" / "features.sqlite"
    path.parent.mkdir()
    garbage = b"this is not a sqlite database " * 200
    path.write_bytes(garbage)
    cache = FeatureCache(path)
    aside = path.with_suffix(".corrupt")
    assert aside.read_bytes() == garbage
    assert cache.get_many([row(0).image_id], META) == {}
    cache.put_many([(row(0).image_id, row(0).vector, 640, 480)], META)
    cache.close()
    # the rebuilt file is a real database that survives reopening
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM vectors").fetchone() == (1,)
    reopened = FeatureCache(path)
    vector, width, height = reopened.get_many([row(0).image_id], META)[row(0).image_id]
    np.testing.assert_array_equal(vector, row(0).vector)
    assert (width, height) == (640, 480) and vector.dtype == np.float32
    reopened.close()


@pytest.mark.parametrize("field,value", [("backbone", "inception_v1"), ("weights_digest", "ef" * 32),
                                         ("layer", "logits"), ("dim", 16)])
def test_cache_is_keyed_by_backbone_digest_and_layer(tmp_path, field, value):
    cache = FeatureCache(tmp_path / "features.sqlite")
    ids = [row(i).image_id for i in range(3)]
    cache.put_many([(row(i).image_id, row(i).vector, 10 + i, 20 + i) for i in range(2)], META)
    hits = cache.get_many(ids, META)
    assert sorted(hits) == ids[:2]  # the third was never stored: a miss
    np.testing.assert_array_equal(hits[ids[1]][0], row(1).vector)
    assert hits[ids[1]][1:] == (11, 21)
    other = FeatureMeta(**{**META.__dict__, field: value})
    assert cache.get_many(ids, other) == {}  # same photos, different network/weights/layer: all misses
    cache.put_many([(ids[0], np.full(other.dim, 7, np.float32), 1, 1)], other)
    np.testing.assert_array_equal(cache.get_many(ids, META)[ids[0]][0], row(0).vector)  # untouched
    assert cache.get_many(ids, other)[ids[0]][0].tolist() == [7.0] * other.dim
    cache.close()


def test_cache_handles_many_ids(tmp_path):
    cache = FeatureCache(tmp_path / "features.sqlite")
    items = [(f"{i:064x}", np.full(DIM, i, np.float32), 1, 1) for i in range(1200)]  # > one 500-id chunk
    cache.put_many(items, META)
    found = cache.get_many([i for i, *_ in items] + ["f" * 64], META)
    assert len(found) == 1200 and found[f"{1100:064x}"][0][0] == 1100
    cache.close()
