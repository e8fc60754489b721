"""The feature table: one Apache Iceberg table per feature identity, in a pyiceberg catalog.

The one home of the catalog and the table (README "Data platform": its name, schema and properties).

**Catalog** (:func:`load_catalog`): the catalog ``DEEPER_CATALOG`` names (default ``deeper``). If
pyiceberg's own configuration defines it (``~/.pyiceberg.yaml``, ``$PYICEBERG_HOME``,
``PYICEBERG_CATALOG__<NAME>__<KEY>``: REST, Glue, Hive, SQL...) it is used as is; otherwise the
embedded default needs no server: pyiceberg's SQL catalog on SQLite at
``$DEEPER_DATA_DIR/catalog.db`` (WAL journal and a busy timeout, so processes commit side by
side) with the warehouse at ``$DEEPER_WAREHOUSE`` or ``file://$DEEPER_DATA_DIR/warehouse``.

**Tables** (:func:`table_name`, :func:`open_table`): ``DEEPER_TABLE`` is a template, default
``deeper.features_{backbone}_{precision}_{layer}``: vectors of different identities never share
a table. The table's properties carry the identity (the Parquet metadata keys of
:meth:`FeatureId.to_parquet_metadata`); a table of another identity is refused.

**Schema**: :data:`SCHEMA` (field ids fixed; Parquet schema v2's columns), partitioned by
``day(created_at)``, no sort order.

**Snapshots** (:func:`commit`): every commit says who made it (``deeper.writer``: ``stream``,
``featurize``, ``backfill``, ``compact``) and carries the consumed Kafka offsets as
``deeper.offsets.<topic>`` = ``{"<partition>": <next offset>}`` (Kafka Connect's Iceberg sink
keeps ``kafka.connect.offsets.*`` the same way). Only ``stream`` and ``compact`` commits are
trusted for offsets (:func:`stored_offsets` reads the newest such ancestor): they re-read and
validate the map on every attempt, so an outside writer that carried a stale copy cannot move
the stream back. A stream commit also checks that each partition it records still has the
offset it expects (its fence against zombies) and retries a lost race on the new snapshot
itself (pyiceberg's own retries would re-apply a stale summary).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import random
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import DeeperError, IncompatibleFeatures
from pipeline.kafka.client import TopicPartition
from pipeline.logs import event
from pipeline.identity import FeatureId
from pipeline.storage.sink import Superseded

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table
    from pyiceberg.table.snapshots import Snapshot

    from pipeline.config import Settings
    from pipeline.storage.parquet_writer import FeatureRow

log = logging.getLogger(__name__)

#: Snapshot summary keys (README "Data platform").
WRITER = "deeper.writer"
COMMIT_ID = "deeper.commit-id"
OFFSETS_PREFIX = "deeper.offsets."
WRITERS = ("stream", "featurize", "backfill", "compact")
#: Writers whose offsets are read back: they validate what they carry.
OFFSET_WRITERS = ("stream", "compact")
#: Ref names of snapshots a registry version was trained on (expiry keeps them).
MODEL_TAG = "model-{version}"
#: Ours, next to Iceberg's ``history.expire.*``: expiry also keeps at most this many snapshots
#: (tags and the offsets aside). pyiceberg copies the whole snapshot list several times per
#: commit, so a commit's cost grows with it (README "Data platform").
MAX_SNAPSHOTS = "deeper.history.max-snapshots"
#: Table properties set at creation: old metadata files go as new ones come, the stream's many
#: small manifests are merged, and expiry (featurizer, ``deeper compact``) keeps an hour and at
#: most 100 snapshots.
TABLE_PROPERTIES = {
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
    "commit.manifest-merge.enabled": "true",
    "history.expire.max-snapshot-age-ms": str(3600 * 1000),
    "history.expire.min-snapshots-to-keep": "20",
    MAX_SNAPSHOTS: "100",
}
#: Attempts of one commit against concurrent writers, and the busy wait of the SQLite catalog.
COMMIT_ATTEMPTS = 8
SQLITE_BUSY_TIMEOUT_S = 10.0


class TableError(storage.StorageError):
    """The catalog or the table cannot be reached, or a commit kept losing races."""


# --------------------------------------------------------------------------- catalog


def _pyiceberg_config(name: str) -> dict[str, str] | None:
    """The catalog as pyiceberg's own configuration defines it (read now: tests set variables)."""
    from pyiceberg.utils.config import Config

    found = Config().get_catalog_config(name)
    return {str(k): str(v) for k, v in found.items()} if found else None


def _warehouse(settings: Settings) -> str:
    if settings.warehouse:
        return settings.warehouse
    return Path(settings.data_dir).absolute().joinpath("warehouse").as_uri()


def _s3_properties() -> dict[str, str]:
    """pyiceberg's FileIO properties from the AWS variables :func:`storage.s3_options` reads."""
    options = storage.s3_options()
    out = {}
    if "endpoint_override" in options:
        out["s3.endpoint"] = f"{options['scheme']}://{options['endpoint_override']}"
    for ours, theirs in (("region", "s3.region"), ("access_key", "s3.access-key-id"),
                         ("secret_key", "s3.secret-access-key"), ("session_token", "s3.session-token")):
        if ours in options:
            out[theirs] = str(options[ours])
    return out


def catalog_properties(settings: Settings) -> dict[str, str]:
    """The resolved catalog properties: pyiceberg's configuration of ``DEEPER_CATALOG`` if it has
    one, else the embedded SQLite catalog (``type``, ``uri``, ``warehouse`` and S3 settings)."""
    configured = _pyiceberg_config(settings.catalog)
    if configured is not None:
        return configured
    props = {"type": "sql", "uri": f"sqlite:///{embedded_database(settings)}", "warehouse": _warehouse(settings)}
    if props["warehouse"].startswith(storage.S3_SCHEME):
        props.update(_s3_properties())
    return props


def embedded_database(settings: Settings) -> Path:
    return Path(settings.data_dir).absolute() / "catalog.db"


def has_catalog(settings: Settings) -> bool:
    """Whether there is a catalog to look in, without creating the embedded one by looking."""
    return _pyiceberg_config(settings.catalog) is not None or embedded_database(settings).exists()


def load_catalog(settings: Settings) -> Catalog:
    """The pyiceberg catalog of these settings (one per process and configuration)."""
    props = catalog_properties(settings)
    return _catalog(settings.catalog, tuple(sorted(props.items())))


@functools.lru_cache(maxsize=8)
def _catalog(name: str, frozen: tuple[tuple[str, str], ...]) -> Catalog:
    from pyiceberg.catalog import load_catalog as pyiceberg_load

    props = dict(frozen)
    if props.get("type") == "sql" and props.get("uri", "").startswith("sqlite:///"):
        Path(props["uri"][len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            catalog = pyiceberg_load(name, **props)
            break
        except Exception as exc:  # noqa: BLE001 - two processes creating the catalog tables at once
            if attempt == 2 or "already exists" not in str(exc):
                raise TableError(f"catalog {name} ({_where(props)}) cannot be opened: {exc}") from exc
            time.sleep(0.2)
    if getattr(catalog, "engine", None) is not None and str(catalog.engine.url).startswith("sqlite"):
        _make_sqlite_concurrent(catalog)
    return catalog


def _make_sqlite_concurrent(catalog: Any) -> None:
    """WAL (readers never block the writer) and a busy timeout (a writer waits for another
    instead of failing at once with ``database is locked``): SQLite commits from several
    processes. A lock held longer than the timeout still fails; the stream pauses and retries."""
    from sqlalchemy import create_engine, event as sa_event

    engine = create_engine(catalog.engine.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @sa_event.listens_for(engine, "connect")
    def _pragmas(connection, _record):  # noqa: ANN001 - SQLAlchemy's callback signature
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except Exception:  # noqa: BLE001 - a locked database keeps its journal mode; WAL is persistent anyway
            pass
        cursor.close()

    catalog.engine.dispose()
    catalog.engine = engine


def _where(props: Mapping[str, str]) -> str:
    return props.get("uri") or props.get("type") or "configured by pyiceberg"


def describe_catalog(settings: Settings) -> str:
    props = catalog_properties(settings)
    return f"catalog {settings.catalog} ({_where(props)}; warehouse {props.get('warehouse', '-')})"


# --------------------------------------------------------------------------- tables


def _sanitize(value: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", value.lower())


def is_template(name: str) -> bool:
    return any(p in name for p in ("{backbone}", "{precision}", "{layer}"))


def table_name(settings: Settings, meta: FeatureId) -> str:
    """``namespace.name`` of the table for vectors of ``meta`` (``DEEPER_TABLE`` filled in)."""
    try:
        name = settings.table.format(backbone=_sanitize(meta.backbone), precision=_sanitize(meta.precision),
                                     layer=_sanitize(meta.layer))
    except (KeyError, IndexError, ValueError) as exc:
        raise DeeperError(f"DEEPER_TABLE={settings.table!r} is not a table name or template "
                          f"(placeholders: {{backbone}}, {{precision}}, {{layer}}): {exc}") from None
    if "." not in name.strip("."):
        raise DeeperError(f"DEEPER_TABLE={settings.table!r}: a table name is namespace.name")
    return name


def schema():
    """The Iceberg schema (field ids fixed by the contract; vector = list<float>, element id 12)."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import (BinaryType, FloatType, IntegerType, ListType, LongType, NestedField, StringType,
                                 TimestamptzType)

    return Schema(
        NestedField(1, "image_id", StringType(), required=True),
        NestedField(2, "source", StringType(), required=True),
        NestedField(3, "label", StringType(), required=False),
        NestedField(4, "width", IntegerType(), required=True),
        NestedField(5, "height", IntegerType(), required=True),
        NestedField(6, "vector", ListType(12, FloatType(), element_required=True), required=True),
        NestedField(7, "created_at", TimestamptzType(), required=True),
        NestedField(8, "kafka_topic", StringType(), required=False),
        NestedField(9, "kafka_partition", IntegerType(), required=False),
        NestedField(10, "kafka_offset", LongType(), required=False),
        NestedField(11, "kafka_key", BinaryType(), required=False),
    )


def partition_spec():
    """``day(created_at)``: a day's rows stay together (compaction's unit, readers' date filter)."""
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import DayTransform

    return PartitionSpec(PartitionField(source_id=7, field_id=1000, transform=DayTransform(), name="created_at_day"))


def identity(table: Table) -> FeatureId:
    """The feature identity a table's properties record."""
    props = {k.encode(): v.encode() for k, v in table.properties.items()}
    return FeatureId.from_parquet_metadata(props, where=f"table {_name(table)}")


def _name(table: Table) -> str:
    return ".".join(table.name())


def open_table(settings: Settings, meta: FeatureId, create: bool = True) -> Table:
    """The table for vectors of ``meta``: created (with its namespace) when missing, and refused
    with :class:`IncompatibleFeatures` when it holds vectors of another identity."""
    from pyiceberg.exceptions import NoSuchTableError

    name = table_name(settings, meta)
    catalog = load_catalog(settings)
    try:
        table = catalog.load_table(name)
    except NoSuchTableError:
        if not create:
            raise DeeperError(f"no table {name} in {describe_catalog(settings)}") from None
        table = _create(catalog, name, meta)
    check_identity(table, meta, settings)
    return table


def _create(catalog: Catalog, name: str, meta: FeatureId) -> Table:
    """Create namespace and table; another process creating them at the same moment is fine."""
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, TableAlreadyExistsError

    namespace = name.rsplit(".", 1)[0]
    try:
        catalog.create_namespace(namespace)
    except NamespaceAlreadyExistsError:
        pass
    except Exception:  # noqa: BLE001 - see below
        # The SQL catalog checks, then inserts: two featurizers starting together both pass the
        # check and the second insert fails on the catalog's unique key (an IntegrityError, not
        # NamespaceAlreadyExistsError). Whoever won, the namespace is there now.
        if not catalog.namespace_exists(namespace):
            raise
    properties = {**{k.decode(): v.decode() for k, v in meta.to_parquet_metadata().items()}, **TABLE_PROPERTIES}
    try:
        table = catalog.create_table(name, schema(), partition_spec=partition_spec(), properties=properties)
    except TableAlreadyExistsError:
        return catalog.load_table(name)
    except Exception:  # noqa: BLE001 - the same race on the table's row: load the winner's table
        if not catalog.table_exists(name):
            raise
        return catalog.load_table(name)
    event(log, "feature table created", table=name, location=table.location(), features=meta.describe())
    return table


def check_identity(table: Table, meta: FeatureId, settings: Settings | None = None) -> None:
    """Refuse vectors of another identity, in one line that says what to change."""
    held = identity(table)
    if not held.differences(meta):
        return
    hint = (f"; DEEPER_TABLE={settings.table!r} names one table for every identity: use a template with "
            "{backbone}, {precision}, {layer}" if settings and not is_template(settings.table) else "")
    raise IncompatibleFeatures(f"table {_name(table)} holds {held.describe()}, these vectors are {meta.describe()} "
                               f"({'; '.join(held.differences(meta))}){hint}")


def load_named(settings: Settings, name: str) -> Table:
    """A feature table by name (``deeper train --features TABLE``); its identity must be readable."""
    from pyiceberg.exceptions import NoSuchTableError

    try:
        table = load_catalog(settings).load_table(name)
    except NoSuchTableError:
        raise DeeperError(f"no table {name} in {describe_catalog(settings)}") from None
    identity(table)
    return table


def feature_tables(settings: Settings) -> list[str]:
    """Names of the catalog's tables that carry a feature identity (``deeper compact``)."""
    catalog = load_catalog(settings)
    names = []
    for namespace in catalog.list_namespaces():
        for ident in catalog.list_tables(namespace):
            table = catalog.load_table(ident)
            try:
                identity(table)
            except IncompatibleFeatures:
                continue
            names.append(".".join(ident))
    return sorted(names)


def newest_table(settings: Settings) -> str | None:
    """The feature table the latest commit went to (None: no catalog or no table yet): what the
    stream writes now, when no model says which identity to look for."""
    if not has_catalog(settings):
        return None
    newest: tuple[int, str] | None = None
    for name in feature_tables(settings):
        snapshot = load_catalog(settings).load_table(name).current_snapshot()
        if snapshot is not None and (newest is None or snapshot.timestamp_ms > newest[0]):
            newest = (snapshot.timestamp_ms, name)
    return newest[1] if newest else None


def reading_hints(settings: Settings, name: str) -> dict[str, str]:
    """Shell lines that read the table with pyiceberg and with DuckDB (the demo prints them)."""
    props = catalog_properties(settings)
    configured = _pyiceberg_config(settings.catalog) is not None
    catalog = f"load_catalog({settings.catalog!r})" if configured else f"load_catalog({settings.catalog!r}, **{props!r})"
    table = f"from pyiceberg.catalog import load_catalog; t = {catalog}.load_table({name!r})"
    return {
        "pyiceberg": f'python -c "{table}; print(t.scan().to_arrow().num_rows, \'rows\')"',
        "duckdb": f'python -c "import duckdb; {table}; rows = t.scan().to_arrow(); '
                  f'print(duckdb.sql(\'SELECT label, count(*) AS photos FROM rows GROUP BY label\'))"',
    }


# --------------------------------------------------------------------------- writing data files


def arrow_schema() -> pa.Schema:
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return schema_to_pyarrow(schema())


def rows_to_arrow(rows: Sequence[FeatureRow], meta: FeatureId, created: dt.datetime) -> pa.Table:
    """Rows as an Arrow table of the Iceberg schema (field ids in the field metadata)."""
    target = arrow_schema()
    dim = meta.dim
    flat = np.concatenate([_vector(r.vector, dim) for r in rows]) if rows else np.zeros(0, np.float32)
    offsets = pa.array(np.arange(0, len(rows) * dim + 1, dim, dtype=np.int64))
    columns = [
        pa.array([r.image_id for r in rows], pa.large_string()),
        pa.array([r.source for r in rows], pa.large_string()),
        pa.array([r.label for r in rows], pa.large_string()),
        pa.array([r.width for r in rows], pa.int32()),
        pa.array([r.height for r in rows], pa.int32()),
        pa.LargeListArray.from_arrays(offsets, pa.array(flat, pa.float32()), type=target.field("vector").type),
        pa.array([created] * len(rows), pa.timestamp("us", tz="UTC")),
        pa.array([r.kafka_topic for r in rows], pa.large_string()),
        pa.array([r.kafka_partition for r in rows], pa.int32()),
        pa.array([r.kafka_offset for r in rows], pa.int64()),
        pa.array([r.kafka_key for r in rows], pa.large_binary()),
    ]
    return pa.Table.from_arrays(columns, schema=target).replace_schema_metadata(meta.to_parquet_metadata())


def _vector(vector: np.ndarray, dim: int) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise IncompatibleFeatures(f"vector has {v.shape[0]} values, the table's dim is {dim}")
    return v


def write_data_file(table: Table, data: pa.Table, name: str) -> DataFile:
    """Write one Parquet data file under the table's data location; return it for a commit.

    Nothing reads the file until a commit names it, so a writer killed half-way leaves only an
    unreferenced file (removed later by ``deeper compact``). All rows must share one day.
    """
    from pyiceberg.io.pyarrow import (compute_statistics_plan, data_file_statistics_from_parquet_metadata,
                                      parquet_path_to_id_mapping)
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
    from pyiceberg.partitioning import PartitionFieldValue, PartitionKey

    spec, iceberg_schema = table.spec(), table.schema()
    day = (data.column("created_at")[0].as_py().astimezone(dt.timezone.utc).date() - dt.date(1970, 1, 1)).days
    key = PartitionKey([PartitionFieldValue(spec.fields[0], day)], spec, iceberg_schema)  # day(created_at)
    path = table.location_provider().new_data_location(data_file_name=name, partition_key=key)
    output = table.io.new_output(path)
    with output.create(overwrite=False) as stream:
        writer = pq.ParquetWriter(stream, data.schema, compression=storage.PARQUET_COMPRESSION)
        writer.write_table(data)
        writer.close()
    statistics = data_file_statistics_from_parquet_metadata(
        writer.writer.metadata, compute_statistics_plan(iceberg_schema, table.properties),
        parquet_path_to_id_mapping(iceberg_schema))
    return DataFile.from_args(content=DataFileContent.DATA, file_path=path, file_format=FileFormat.PARQUET,
                              partition=key.partition, file_size_in_bytes=len(table.io.new_input(path)),
                              sort_order_id=None, spec_id=spec.spec_id, equality_ids=None, key_metadata=None,
                              **statistics.to_serialized_dict())


def file_name(prefix: str) -> str:
    """``<prefix>-<uuid>.parquet``: never the name of another file, so a retry never overwrites."""
    return f"{prefix}-{uuid.uuid4().hex}.parquet"


# --------------------------------------------------------------------------- offsets in snapshot summaries


def _snapshots(metadata: Any) -> dict[int, Snapshot]:
    return {s.snapshot_id: s for s in metadata.snapshots}


def ancestors(metadata: Any, snapshot: Snapshot | None = None) -> Iterable[Snapshot]:
    """The main branch's snapshots from ``snapshot`` (default: current) back to the oldest kept."""
    by_id = _snapshots(metadata)
    current = snapshot or (by_id.get(metadata.current_snapshot_id) if metadata.current_snapshot_id else None)
    while current is not None:
        yield current
        current = by_id.get(current.parent_snapshot_id) if current.parent_snapshot_id is not None else None


def offsets_snapshot(metadata: Any, snapshot: Snapshot | None = None) -> Snapshot | None:
    """The newest ancestor whose offsets are trusted (written by ``stream`` or ``compact``)."""
    for s in ancestors(metadata, snapshot):
        if s.summary[WRITER] in OFFSET_WRITERS:
            return s
    return None


def decode_offsets(summary: Any) -> dict[TopicPartition, int]:
    out = {}
    for key, value in dict(getattr(summary, "additional_properties", summary)).items():
        if key.startswith(OFFSETS_PREFIX):
            topic = key[len(OFFSETS_PREFIX):]
            out.update({TopicPartition(topic, int(p)): int(o) for p, o in json.loads(value).items()})
    return out


def encode_offsets(offsets: Mapping[TopicPartition, int]) -> dict[str, str]:
    by_topic: dict[str, dict[str, int]] = {}
    for tp, offset in sorted(offsets.items(), key=lambda item: (item[0].topic, item[0].partition)):
        by_topic.setdefault(tp.topic, {})[str(tp.partition)] = int(offset)
    return {OFFSETS_PREFIX + topic: json.dumps(parts, separators=(",", ":")) for topic, parts in by_topic.items()}


def stored_offsets(table: Table, snapshot: Snapshot | None = None) -> dict[TopicPartition, int]:
    """Per Kafka partition, the next offset whose row is not in the table (as of ``snapshot``)."""
    found = offsets_snapshot(table.metadata, snapshot)
    return decode_offsets(found.summary) if found is not None else {}


def carry_offsets(table: Table) -> dict[str, str]:
    """The summary properties that carry the stored offsets forward unchanged (for writers that
    are not the stream; optional: only ``stream`` and ``compact`` snapshots are read back)."""
    return encode_offsets(stored_offsets(table))


# --------------------------------------------------------------------------- commits


@functools.lru_cache(maxsize=1)
def _transaction_class() -> type:
    """pyiceberg's ``Transaction`` whose ``table_metadata`` is computed once per staged state.

    pyiceberg 0.12 re-applies every staged update and deep-copies the whole metadata (every
    snapshot) on each read of ``Transaction.table_metadata``, and one append reads it about
    fifteen times: a commit's cost grew with the table's history (0.2 s at 100 snapshots, 1 s at
    150 on this shared machine). The state only changes when ``_updates`` or the table's metadata
    is replaced (both immutable), so the result is kept until one of them is; upstream proposed
    the same (apache/iceberg-python#3302, #3784).
    """
    from pyiceberg.table import Transaction

    class CachedTransaction(Transaction):
        @property
        def table_metadata(self):  # noqa: ANN201 - pyiceberg's TableMetadata
            cached = getattr(self, "_deeper_cached", None)
            if cached is not None and cached[0] is self._table.metadata and cached[1] is self._updates:
                return cached[2]
            metadata = super().table_metadata
            self._deeper_cached = (self._table.metadata, self._updates, metadata)
            return metadata

    return CachedTransaction


def _one_attempt(table: Table) -> Table:
    """The same table, but pyiceberg won't retry a commit by itself: its retry would re-apply
    this attempt's summary (offsets, validation) on top of a snapshot it was not computed for."""
    from pyiceberg.table import Table as IcebergTable

    props = {**table.metadata.properties, "commit.retry.num-retries": "0"}
    metadata = table.metadata.model_copy(update={"properties": props})
    return IcebergTable(table.name(), metadata, table.metadata_location, table.io, table.catalog, table.config)


def _landed(table: Table, commit_id: str, since_ms: int) -> Snapshot | None:
    """A snapshot of ``commit_id`` committed since ``since_ms`` (a lost answer to a commit that worked)."""
    for s in ancestors(table.metadata):
        if s.timestamp_ms < since_ms:
            return None
        if s.summary[COMMIT_ID] == commit_id:
            return s
    return None


def _check_expected(table: Table, expect: Mapping[TopicPartition, int | None]) -> dict[TopicPartition, int]:
    stored = stored_offsets(table)
    moved = {tp: (want, stored.get(tp)) for tp, want in expect.items() if stored.get(tp) != want}
    if moved:
        text = ", ".join(f"{tp.topic}/{tp.partition} expected {want} found {found}"
                         for tp, (want, found) in sorted(moved.items(), key=lambda i: (i[0].topic, i[0].partition)))
        raise Superseded(f"table {_name(table)}: another writer stored these partitions' offsets ({text})")
    return stored


def _summary(table: Table, writer: str, commit_id: str, offsets: Mapping[TopicPartition, int] | None,
             expect: Mapping[TopicPartition, int | None] | None) -> dict[str, str]:
    stored = _check_expected(table, expect or {})
    return {WRITER: writer, COMMIT_ID: commit_id, **encode_offsets({**stored, **(offsets or {})})}


def commit(table: Table, writer: str, add: Sequence[DataFile] = (), remove: Sequence[DataFile] = (),
           offsets: Mapping[TopicPartition, int] | None = None,
           expect: Mapping[TopicPartition, int | None] | None = None,
           commit_id: str | None = None, since_ms: int | None = None,
           attempts: int = COMMIT_ATTEMPTS) -> tuple[Table, Snapshot]:
    """One snapshot adding ``add`` (and, for compaction, removing ``remove``); return the
    refreshed table and the snapshot.

    ``offsets``: the next offset per partition this commit stores (the stream). ``expect``: the
    stored offset each of those partitions must still have; checked against the snapshot the
    commit goes on top of, again on every attempt: a mismatch raises :class:`Superseded` and
    commits nothing. A lost race (``CommitFailedException``) refreshes and tries again, with a
    growing pause, ``attempts`` times; a commit whose answer was lost is recognised by its
    ``commit_id`` instead of being applied twice (``since_ms``: when the first try of this
    commit began, if an earlier call already tried it).
    """
    from pyiceberg.exceptions import CommitFailedException

    assert writer in WRITERS, writer
    commit_id = commit_id or uuid.uuid4().hex
    retried = since_ms is not None
    since_ms = since_ms if retried else int(time.time() * 1000) - 60_000
    for attempt in range(attempts):
        if attempt or retried:
            table = table.refresh()
            landed = _landed(table, commit_id, since_ms)
            if landed is not None:
                return table, landed
        try:
            table = _apply(_one_attempt(table), _summary(table, writer, commit_id, offsets, expect), add, remove)
            return table, table.current_snapshot()
        except CommitFailedException as exc:
            wait = min(2.0, 0.05 * 2 ** attempt) * (1 + random.random())
            event(log, "table commit lost a race; retrying on the new snapshot", logging.WARNING, table=_name(table),
                  attempt=attempt + 1, retry_in_s=round(wait, 3), error=str(exc)[:200])
            time.sleep(wait)
    raise TableError(f"table {_name(table)}: {attempts} commit attempts lost to concurrent writers")


def _apply(table: Table, summary: dict[str, str], add: Sequence[DataFile], remove: Sequence[DataFile]) -> Table:
    """One commit attempt; the table it returns holds the catalog's metadata after the commit."""
    transaction = _transaction_class()(table)
    update = transaction.update_snapshot(snapshot_properties=summary)
    with (update.overwrite() if remove else update.merge_append()) as operation:
        for data_file in remove:
            operation.delete_data_file(data_file)
        for data_file in add:
            operation.append_data_file(data_file)
    return transaction.commit_transaction()


def append_rows(settings: Settings, meta: FeatureId, rows: Sequence[FeatureRow], writer: str = "featurize"
                ) -> tuple[Table, Snapshot]:
    """Append rows outside the stream (``deeper featurize``) as one snapshot."""
    table = open_table(settings, meta)
    created = dt.datetime.now(dt.timezone.utc)
    data_file = write_data_file(table, rows_to_arrow(rows, meta, created), file_name(writer))
    return commit(table, writer, add=[data_file])


# --------------------------------------------------------------------------- reading and tags


def resolve_snapshot(table: Table, snapshot_id: int | None = None, as_of: dt.datetime | None = None) -> Snapshot:
    """The snapshot to read: by id, the one current at ``as_of``, or the current one."""
    if snapshot_id is not None:
        found = table.snapshot_by_id(int(snapshot_id))
        if found is None:
            tags = sorted(table.metadata.refs)
            raise DeeperError(f"table {_name(table)} has no snapshot {snapshot_id} (expired?); "
                              f"kept refs: {', '.join(tags) or 'none'}")
        return found
    if as_of is not None:
        found = table.snapshot_as_of_timestamp(int(as_of.timestamp() * 1000))
        if found is None:
            raise DeeperError(f"table {_name(table)} has no snapshot at or before {as_of.isoformat()}")
        return found
    current = table.current_snapshot()
    if current is None:
        raise DeeperError(f"table {_name(table)} is empty (no snapshot yet)")
    return current


def scan(table: Table, snapshot: Snapshot, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of ``snapshot`` (pyiceberg's Arrow scan), optionally only ``columns``."""
    selected = tuple(columns) if columns else ("*",)
    return table.scan(snapshot_id=snapshot.snapshot_id, selected_fields=selected).to_arrow()


def tag(table: Table, snapshot_id: int, name: str) -> None:
    """Point the tag ``name`` at ``snapshot_id`` (expiry keeps tagged snapshots)."""
    table.manage_snapshots().create_tag(snapshot_id, name).commit()
    event(log, "snapshot tagged", table=_name(table), snapshot_id=snapshot_id, tag=name)
