"""The feature table on a real pyiceberg SQL catalog (SQLite) and real Parquet data files.

No broker here: the table sink is driven the way the worker drives it (``assigned``, ``add``,
``flush`` with the checkpoint's spans, ``discard``), so the exactly-once rules are shown
deterministically: offsets stored in the snapshot summary, replayed rows not stored twice, a
zombie superseded, concurrent writers (threads and processes) never losing or duplicating a
row, a locked catalog failing the flush and the retry storing everything once. Stream tests
with a broker: ``tests/test_table_stream.py``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sqlite3
import threading

import numpy as np
import pytest
from kafka import TopicPartition

from pipeline.config import Settings
from pipeline.errors import IncompatibleFeatures
from pipeline.storage import table as tables
from pipeline.identity import FeatureId
from pipeline.storage.parquet_writer import FeatureRow
from pipeline.storage.sink import Span, Superseded
from pipeline.storage.table_sink import TableSink
from tests.test_s3_features import s3, s3_server  # noqa: F401 - fixtures

META = FeatureId("efficientnet_lite0", "ab" * 32, "prelogits+block_14", 4, "crop 0.875")
TOPIC = "images"


def tp(partition: int, topic: str = TOPIC) -> TopicPartition:
    return TopicPartition(topic, partition)


def rows(partition: int, start: int, end: int, label: str | None = "x") -> list[FeatureRow]:
    return [FeatureRow(f"{partition:02d}{i:062x}", f"photo-{partition}-{i}.jpg", label, 10, 20,
                       np.full(META.dim, i, np.float32), TOPIC, partition, i, f"key-{i}".encode())
            for i in range(start, end)]


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings.from_env({}, data_dir=str(tmp_path / "data"))


def stored(settings: Settings) -> dict[TopicPartition, int]:
    return tables.stored_offsets(tables.open_table(settings, META))


def offsets_in_table(settings: Settings) -> list[tuple[int, int]]:
    table = tables.open_table(settings, META)
    data = tables.scan(table, table.current_snapshot(), ["kafka_partition", "kafka_offset"])
    return sorted(zip(data.column("kafka_partition").to_pylist(), data.column("kafka_offset").to_pylist()))


def commit_rows(sink: TableSink, partition: int, start: int, end: int, next_offset: int | None = None) -> list[str]:
    sink.add(rows(partition, start, end))
    return sink.flush({tp(partition): Span(start, next_offset or end)})


# -- names, identity, schema --------------------------------------------------------------------------
def test_one_table_per_identity_named_by_the_template(settings):
    assert tables.table_name(settings, META) == "deeper.features_efficientnet_lite0_fp32_prelogits_block_14"
    bf16 = dataclasses.replace(META, precision="bf16")
    assert tables.table_name(settings, bf16) == "deeper.features_efficientnet_lite0_bf16_prelogits_block_14"
    table = tables.open_table(settings, META)
    assert FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in table.properties.items()}) == META
    assert [(f.field_id, f.name, f.required) for f in table.schema().fields] == [
        (1, "image_id", True), (2, "source", True), (3, "label", False), (4, "width", True), (5, "height", True),
        (6, "vector", True), (7, "created_at", True), (8, "kafka_topic", False), (9, "kafka_partition", False),
        (10, "kafka_offset", False), (11, "kafka_key", False)]
    vector = table.schema().find_field("vector").field_type
    assert vector.element_id == 12 and vector.element_required
    assert str(table.spec().fields[0].transform) == "day"


def test_a_fixed_table_refuses_vectors_of_another_identity_in_one_line(settings):
    fixed = dataclasses.replace(settings, table="lake.features")
    tables.open_table(fixed, META)
    other = dataclasses.replace(META, layer="logits", dim=1000)
    with pytest.raises(IncompatibleFeatures) as refused:
        tables.open_table(fixed, other)
    text = str(refused.value)
    assert "\n" not in text and "lake.features" in text and "DEEPER_TABLE" in text
    assert "prelogits+block_14" in text and "logits" in text
    assert tables.open_table(fixed, META)  # the same identity is welcome


# -- exactly-once ------------------------------------------------------------------------------------
def test_a_checkpoint_is_one_snapshot_that_stores_its_offsets(settings):
    sink = TableSink(settings, META)
    assert sink.assigned({tp(0): 0, tp(1): 0}) == {}
    written = commit_rows(sink, 0, 0, 5, next_offset=6)  # offset 5 was a dead letter
    (path,) = written
    assert path.rsplit("/", 1)[1].startswith(f"{TOPIC}+0+{0:019d}-") and "created_at_day=" in path
    sink.add(rows(1, 0, 3))
    sink.flush({tp(0): Span(6, 6), tp(1): Span(0, 3)})
    table = tables.open_table(settings, META)
    summary = table.current_snapshot().summary
    assert summary[tables.WRITER] == "stream" and summary[tables.COMMIT_ID]
    assert json.loads(summary[tables.OFFSETS_PREFIX + TOPIC]) == {"0": 6, "1": 3}
    assert len(table.metadata.snapshots) == 2 and offsets_in_table(settings) == \
        [(0, i) for i in range(5)] + [(1, i) for i in range(3)]


def test_offsets_the_table_has_are_replayed_without_storing_their_rows_again(settings):
    first = TableSink(settings, META)
    first.assigned({tp(0): 0})
    commit_rows(first, 0, 0, 8)  # stored, and then the process died before its Kafka commit
    successor = TableSink(settings, META)
    assert successor.assigned({tp(0): 0}) == {tp(0): 8}  # Kafka says 0, the table says 8
    commit_rows(successor, 0, 0, 12)
    assert successor.replayed_rows == 8
    assert offsets_in_table(settings) == [(0, i) for i in range(12)]
    assert stored(settings) == {tp(0): 12}


def test_a_zombie_is_superseded_and_stores_nothing(settings):
    zombie, owner = TableSink(settings, META), TableSink(settings, META)
    zombie.assigned({tp(0): 0})
    owner.assigned({tp(0): 0})
    commit_rows(owner, 0, 0, 4)  # the new owner got the partition and committed first
    with pytest.raises(Superseded, match="expected None found 4"):
        commit_rows(zombie, 0, 0, 6)
    assert offsets_in_table(settings) == [(0, i) for i in range(4)]
    zombie.discard()  # the worker rewinds; the next flush reads the table again
    commit_rows(zombie, 0, 4, 6)
    assert offsets_in_table(settings) == [(0, i) for i in range(6)] and stored(settings) == {tp(0): 6}


def test_concurrent_commits_on_other_partitions_retry_and_carry_every_offset(settings):
    sinks = [TableSink(settings, META) for _ in range(4)]
    for p, sink in enumerate(sinks):
        sink.assigned({tp(p): 0})
    errors = []

    def run(p: int) -> None:
        try:
            for k in range(6):
                commit_rows(sinks[p], p, k * 3, k * 3 + 3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert offsets_in_table(settings) == [(p, i) for p in range(4) for i in range(18)]
    assert stored(settings) == {tp(p): 18 for p in range(4)}


def _commit_in_process(data_dir: str, partition: int, commits: int) -> None:
    sink = TableSink(Settings.from_env({}, data_dir=data_dir), META)
    sink.assigned({tp(partition): 0})
    for k in range(commits):
        commit_rows(sink, partition, k * 2, k * 2 + 2)


def test_processes_commit_to_one_sqlite_catalog_side_by_side(settings):
    tables.open_table(settings, META)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_commit_in_process, args=(settings.data_dir, p, 8)) for p in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(180)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert offsets_in_table(settings) == [(p, i) for p in range(3) for i in range(16)]
    assert stored(settings) == {tp(p): 16 for p in range(3)}


def test_a_locked_catalog_fails_the_flush_and_the_retry_stores_everything_once(settings, monkeypatch):
    monkeypatch.setattr(tables, "SQLITE_BUSY_TIMEOUT_S", 0.5)
    sink = TableSink(settings, META)
    sink.assigned({tp(0): 0})
    commit_rows(sink, 0, 0, 3)
    lock = sqlite3.connect(tables.embedded_database(settings), timeout=5)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the catalog
    try:
        sink.add(rows(0, 3, 7))
        with pytest.raises(Exception, match="locked"):
            sink.flush({tp(0): Span(3, 7)})
        assert len(sink) == 4 and sink.due()  # written, not committed: the worker must flush again
    finally:
        lock.rollback()
        lock.close()
    sink.add(rows(0, 7, 9))  # work collected while the stage was paused
    sink.flush({tp(0): Span(3, 9)})
    assert offsets_in_table(settings) == [(0, i) for i in range(9)] and stored(settings) == {tp(0): 9}


def test_a_commit_whose_answer_was_lost_is_not_applied_twice(settings, monkeypatch):
    sink = TableSink(settings, META)
    sink.assigned({tp(0): 0})
    real = tables.commit
    lost = []

    def commit_then_lose_the_answer(*args, **kwargs):
        result = real(*args, **kwargs)
        if not lost:
            lost.append(result)
            raise OSError("connection reset while reading the catalog's answer")
        return result

    monkeypatch.setattr(tables, "commit", commit_then_lose_the_answer)
    sink.add(rows(0, 0, 4))
    with pytest.raises(OSError):
        sink.flush({tp(0): Span(0, 4)})
    sink.flush({tp(0): Span(0, 4)})  # the worker's retry after its pause
    table = tables.open_table(settings, META)
    assert offsets_in_table(settings) == [(0, i) for i in range(4)]
    assert len(table.metadata.snapshots) == 1


def test_the_featurizer_expires_old_snapshots_but_keeps_tags_and_offsets(settings, monkeypatch):
    from pipeline.storage import table_sink

    monkeypatch.setattr(table_sink, "EXPIRE_EVERY_COMMITS", 4)
    table = tables.open_table(settings, META)
    with table.transaction() as transaction:
        transaction.set_properties({tables.MAX_SNAPSHOTS: "5", "history.expire.min-snapshots-to-keep": "2"})
    sink = TableSink(settings, META)
    sink.assigned({tp(0): 0})
    commit_rows(sink, 0, 0, 1)
    first = tables.open_table(settings, META).current_snapshot().snapshot_id
    tables.tag(tables.open_table(settings, META), first, "model-v0001")
    for i in range(1, 30):
        commit_rows(sink, 0, i, i + 1)
    table = tables.open_table(settings, META)
    assert len(table.metadata.snapshots) <= 5 + 4 + 1  # the cap, commits since the last expiry, the tag
    assert table.snapshot_by_id(first) is not None and stored(settings) == {tp(0): 30}
    assert offsets_in_table(settings) == [(0, i) for i in range(30)]
    assert len(tables.scan(table, table.snapshot_by_id(first), ["image_id"])) == 1  # its files are still there


def test_a_new_identity_goes_to_its_own_table_with_its_own_offsets(settings):
    sink = TableSink(settings, META)
    sink.assigned({tp(0): 0})
    commit_rows(sink, 0, 0, 3)
    other = dataclasses.replace(META, layer="block_15")  # the featurizer followed a model change
    sink.switch(other)
    sink.add([dataclasses.replace(r, vector=r.vector) for r in rows(0, 3, 5)])
    sink.flush({tp(0): Span(3, 5)})
    assert stored(settings) == {tp(0): 3}
    assert tables.stored_offsets(tables.open_table(settings, other)) == {tp(0): 5}
    assert tables.feature_tables(settings) == sorted([tables.table_name(settings, META),
                                                      tables.table_name(settings, other)])


def test_an_s3_warehouse_holds_the_table_and_compaction_cleans_it(tmp_path, s3):
    from pipeline.storage import table_maintenance

    settings = Settings.from_env({}, data_dir=str(tmp_path / "data"), warehouse=s3)
    assert tables.catalog_properties(settings)["s3.endpoint"].startswith("http://127.0.0.1:")
    sink = TableSink(settings, META)
    sink.assigned({tp(0): 0})
    for k in range(3):
        commit_rows(sink, 0, k * 2, k * 2 + 2)
    table = tables.open_table(settings, META)
    assert table.location().startswith(s3) and offsets_in_table(settings) == [(0, i) for i in range(6)]
    assert table_maintenance.compact(table).written == 1
    table = table_maintenance.expire_snapshots(table.refresh(), max_age_ms=0, keep_last=1)
    removed = table_maintenance.remove_unreferenced_files(table, older_than_s=0)
    assert removed and all(r.startswith("s3://") for r in removed) and sum(r.endswith(".parquet") for r in removed) == 3
    assert offsets_in_table(settings) == [(0, i) for i in range(6)] and stored(settings) == {tp(0): 6}


# -- outside readers ---------------------------------------------------------------------------------
def test_duckdb_and_polars_read_the_table_through_pyiceberg(settings):
    duckdb = pytest.importorskip("duckdb")
    polars = pytest.importorskip("polars")
    sink = TableSink(settings, META)
    sink.assigned({tp(0): 0})
    commit_rows(sink, 0, 0, 7)
    table = tables.open_table(settings, META)
    arrow = table.scan().to_arrow()  # noqa: F841 - DuckDB finds it by name
    ((count, dim),) = duckdb.sql("SELECT count(*), max(len(vector)) FROM arrow").fetchall()
    assert (count, dim) == (7, META.dim)
    frame = polars.scan_iceberg(table).collect()
    assert frame.height == 7 and frame["vector"].list.len().unique().to_list() == [META.dim]
    assert FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in table.properties.items()}) == META


def test_a_namespace_another_featurizer_creates_meanwhile_is_taken_as_it_is(settings, monkeypatch):
    """pyiceberg's SQL catalog checks for the namespace, then inserts it: two featurizers starting
    together both pass the check, and the second insert fails on the catalog's unique key (an
    IntegrityError, not NamespaceAlreadyExistsError: CI saw a featurizer exit on it)."""
    catalog = tables.load_catalog(settings)
    assert tables.load_catalog(settings) is catalog  # one catalog per settings: the patch below holds
    namespace = tables.table_name(settings, META).rsplit(".", 1)[0]
    catalog.create_namespace(namespace)  # the other featurizer's insert landed...
    real, asked = catalog.namespace_exists, []

    def exists(ns):  # ...just after our check said there was none
        asked.append(ns)
        return False if len(asked) == 1 else real(ns)

    monkeypatch.setattr(catalog, "namespace_exists", exists)
    table = tables.open_table(settings, META)
    assert len(asked) >= 2 and tables.identity(table) == META
