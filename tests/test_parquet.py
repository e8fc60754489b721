"""Feature files at rest: the stream's Parquet sink, the reader's checks and de-duplication, the cache.

Real Parquet files and a real SQLite cache in ``tmp_path``; vectors are small and synthetic
because what is under test is the file handling, not the network.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kafka import TopicPartition

from pipeline import storage
from pipeline.errors import DeeperError, IncompatibleFeatures
from pipeline.storage.feature_cache import FeatureCache
from pipeline.identity import FeatureId
from pipeline.storage.parquet_reader import feature_files, read_features
from pipeline.storage.parquet_sink import ParquetSink
from pipeline.storage.sink import Span
from pipeline.storage.parquet_writer import FeatureRow, rows_to_table, write_features
from tests.claim_check_servers import s3  # noqa: F401 (a fixture: the project's local S3 server)

DIM = 8
META = FeatureId("efficientnet_lite0", "cd" * 32, "prelogits", DIM, "central_crop(0.875)")
BF16 = dataclasses.replace(META, precision="bf16")


def row(i: int, label: str | None = "cat", dim: int = DIM, offset: int | None = None) -> FeatureRow:
    return FeatureRow(image_id=f"{i:064x}", source=f"photos/{i}.jpg", label=label, width=640 + i, height=480,
                      vector=np.arange(dim, dtype=np.float32) + i, kafka_topic="deeper.images",
                      kafka_partition=0, kafka_offset=offset if offset is not None else i)


def parts(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


# -- the stream's sink --------------------------------------------------------------------------------
TOPIC = "deeper.images"


def tp(partition: int, topic: str = TOPIC) -> TopicPartition:
    return TopicPartition(topic, partition)


def prow(i: int, partition: int = 0, topic: str = TOPIC, label: str | None = "cat") -> FeatureRow:
    """Row ``i`` as read from offset ``i`` of ``topic``/``partition``."""
    return dataclasses.replace(row(i, label), kafka_topic=topic, kafka_partition=partition, kafka_offset=i)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch) -> str:
    """Where the sink writes: a local directory, or a prefix on the project's local S3 server."""
    if request.param == "local":
        return str(tmp_path / "features")
    s3 = request.getfixturevalue("s3")
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["endpoint"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return f"s3://photos/{request.node.name.replace('[', '-').rstrip(']')}"  # the server may be shared


def write(sink: ParquetSink, starts: dict) -> list[str]:
    """A whole checkpoint on the sink: stage each partition's rows from its start, then publish."""
    sink.flush({t: Span(start, start) for t, start in starts.items()})
    return sink.publish()


def names(root: str) -> list[str]:
    """The finished part files below ``root``, relative to it."""
    try:
        found = storage.list_parquet(root)
    except storage.StorageError:
        return []
    return sorted(str(f)[len(str(root)):].replace("\\", "/").lstrip("/") for f in found)


def table_at(location: str) -> pa.Table:
    with storage.open_input(location) as f:
        return pq.read_table(f)


def test_sink_writes_one_file_per_partition_named_by_its_start_offset(root):
    sink = ParquetSink(root, META, max_rows=5, max_seconds=3600)
    assert not sink.due() and write(sink, {}) == []
    sink.add([prow(10, 0), prow(7, 1), prow(11, 0)])
    sink.add([prow(3, 0, topic="other")])
    assert len(sink) == 4 and not sink.due()
    sink.add([prow(12, 0)])
    assert sink.due()
    written = write(sink, {tp(0): 9, tp(1): 7})  # partition 0's first uncommitted offset is 9
    assert len(sink) == 0 and not sink.due()
    directory = "backbone=efficientnet_lite0/layer=prelogits"
    expected = [f"{directory}/deeper.images+0+{9:019d}.parquet", f"{directory}/deeper.images+1+{7:019d}.parquet",
                f"{directory}/other+0+{3:019d}.parquet"]  # no start given: its first row's offset
    assert names(root) == expected
    assert sorted(written) == sorted(str(storage.join(root, name)) for name in expected)
    part0 = table_at(str(storage.join(root, expected[0])))
    assert part0.column("kafka_offset").to_pylist() == [10, 11, 12]
    assert part0.column("image_id").to_pylist() == [prow(i).image_id for i in (10, 11, 12)]
    assert set(part0.column("kafka_partition").to_pylist()) == {0}
    assert FeatureId.from_parquet_metadata(part0.schema.metadata) == META
    fs = read_features([root])
    assert len(fs) == 5 and fs.duplicates_dropped == 0
    np.testing.assert_array_equal(fs.vectors[fs.image_ids.index(prow(7).image_id)], prow(7).vector)


def test_a_replay_from_the_same_start_replaces_the_file(root):
    """Written, then the process died before the commit: the replay writes the same name."""
    sink = ParquetSink(root, META, max_rows=100)
    sink.add([prow(i) for i in range(5, 8)])
    (first,) = write(sink, {tp(0): 5})
    replay = ParquetSink(root, META, max_rows=100)
    replay.add([prow(i, label="dog") for i in range(5, 10)])  # the same rows and more
    (again,) = write(replay, {tp(0): 5})
    assert again == first and len(names(root)) == 1
    table = table_at(first)
    assert table.column("kafka_offset").to_pylist() == [5, 6, 7, 8, 9]
    assert set(table.column("label").to_pylist()) == {"dog"}
    fs = read_features([root])
    assert len(fs) == 5 and fs.duplicates_dropped == 0


def test_recover_never_removes_final_files(root):
    """Final names are given only after a commit (tests/test_parquet_fencing.py), so every final
    file is committed work, whatever the committed offset a (possibly late) caller passes."""
    sink = ParquetSink(root, META, max_rows=100)
    for start in (0, 10, 20):
        sink.add([prow(start, 0), prow(start + 1, 0)])
        write(sink, {tp(0): start})
    before = names(root)
    assert ParquetSink(root, META).recover({}) == ([], [])
    assert sink.recover({tp(0): 10, tp(1): 6}) == ([], [])
    assert names(root) == before and len(before) == 3


def test_recover_before_anything_was_written(root):
    assert ParquetSink(root, META).recover({tp(0): 0}) == ([], [])


def test_sink_rolls_by_time(tmp_path):
    sink = ParquetSink(str(tmp_path), META, max_rows=1000, max_seconds=0.3)
    sink.add([prow(0)])
    assert not sink.due()
    time.sleep(0.4)
    assert sink.due()  # a slow stream still lands on disk
    sink.add([prow(1)])  # the clock runs from the oldest buffered row
    assert sink.due()
    write(sink, {tp(0): 0})
    sink.add([prow(2)])
    assert not sink.due()  # the clock restarted with the new buffer


def test_discard_drops_buffered_rows(tmp_path):
    sink = ParquetSink(str(tmp_path), META, max_rows=2)
    sink.add([prow(0), prow(1, 1)])
    sink.discard()
    assert len(sink) == 0 and not sink.due() and write(sink, {}) == [] and parts(tmp_path) == []


def test_switch_sends_new_vectors_to_their_own_directory(tmp_path):
    sink = ParquetSink(str(tmp_path), META, max_rows=2)
    sink.add([prow(0)])
    with pytest.raises(AssertionError):
        sink.switch(BF16)  # rows of the old vectors are still buffered
    write(sink, {tp(0): 0})
    sink.switch(BF16)
    sink.add([prow(1)])
    (path,) = write(sink, {tp(0): 1})
    assert len(parts(tmp_path)) == 2 and len({p.parent for p in parts(tmp_path)}) == 2
    assert FeatureId.from_parquet_metadata(pq.read_schema(path).metadata) == BF16
    with pytest.raises(IncompatibleFeatures, match="precision bf16 vs fp32"):
        read_features([tmp_path])  # fp32 and bf16 vectors are never mixed


def test_writes_to_a_temp_name_then_renames(tmp_path, monkeypatch):
    written = []
    real_write = storage.pq.write_table

    def spy(table, where, **kwargs):
        where = Path(where)
        written.append(where)
        assert storage.is_temp_name(where.name)
        assert not list(where.parent.glob("*.parquet")), "final file visible before the data was written"
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(storage.pq, "write_table", spy)
    sink = ParquetSink(str(tmp_path), META)
    sink.add([prow(0), prow(1)])
    (path,) = map(Path, write(sink, {tp(0): 0}))
    assert len(written) == 1 and written[0].parent == path.parent and not written[0].exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_failed_write_leaves_nothing_and_keeps_the_rows(tmp_path, monkeypatch):
    real_write = storage.pq.write_table
    calls = []

    def second_one_fails(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            real_write(table.slice(0, 1), where, **kwargs)  # a partial file exists at the temp name...
            raise OSError("disk full")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(storage.pq, "write_table", second_one_fails)
    sink = ParquetSink(str(tmp_path), META)
    sink.add([prow(0, 0), prow(1, 0), prow(10, 1), prow(11, 1), prow(12, 1)])
    with pytest.raises(OSError, match="disk full"):
        write(sink, {})
    (staged,) = [p.name for p in tmp_path.rglob("*") if p.is_file()]  # partition 0's, hidden until published
    assert staged.startswith(f".staged-deeper.images+0+{0:019d}+{2:019d}-") and feature_files([tmp_path]) == []
    assert len(sink) == 3  # ...and is removed; partition 1's rows are kept for the retry
    monkeypatch.setattr(storage.pq, "write_table", real_write)
    first, retried = write(sink, {})  # both published now that the whole checkpoint is written
    assert pq.read_table(retried).column("kafka_offset").to_pylist() == [10, 11, 12] and len(sink) == 0
    assert Path(first).name == f"deeper.images+0+{0:019d}.parquet"
    assert len(read_features([tmp_path])) == 5


def test_readers_skip_temp_files(tmp_path):
    root = tmp_path / "features"
    path = write_features([row(0), row(1)], META, root / "a.parquet")
    for name in (f"{storage.TEMP_PREFIX}0123456789abcdef-part-crashed.parquet", "b.parquet.partial"):
        (root / name).write_bytes(b"PAR1 half a file")
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
    wide = FeatureId(META.backbone, META.weights_digest, META.layer, 12, META.preprocessing)
    b = write_features([row(1, dim=12)], wide, tmp_path / "b.parquet")
    with pytest.raises(IncompatibleFeatures, match="cannot mix features"):
        read_features([a, b])


@pytest.mark.parametrize("field,value", [("backbone", "inception_v1"), ("weights_digest", "ef" * 32),
                                         ("layer", "logits")])
def test_files_of_different_origin_are_never_mixed(tmp_path, field, value):
    a = write_features([row(0)], META, tmp_path / "a.parquet")
    other = FeatureId(**{**META.__dict__, field: value})
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
    other = FeatureId(**{**META.__dict__, field: value})
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


def test_version_1_files_without_kafka_key_are_still_read(tmp_path):
    """Schema 2 added ``kafka_key``; a file written before it reads as it did."""
    rows = [FeatureRow(f"{i:064x}", f"p{i}.jpg", "a", 4, 4, np.full(DIM, i, np.float32), "t", 0, i, b"k")
            for i in range(3)]
    table = rows_to_table(rows, META)
    assert table.column("kafka_key").to_pylist() == [b"k"] * 3
    old = table.drop(["kafka_key"])
    metadata = {**old.schema.metadata, b"deeper.schema_version": b"1"}
    pq.write_table(old.replace_schema_metadata(metadata), tmp_path / "v1.parquet")
    write_features(rows, META, tmp_path / "v2.parquet")
    features = read_features([tmp_path / "v1.parquet", tmp_path / "v2.parquet"])
    assert len(features) == 3 and features.duplicates_dropped == 3
