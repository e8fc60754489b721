"""STAND-IN for ``pipeline/storage/table.py`` (issue 20, the ``table`` helper): delete at merge.

The feature table's one home is ``pipeline.storage.table``, written at the same time on another
branch. Until it is merged, the Spark backfill (issue 21) needs the same five functions, so this
file implements exactly what /work/TABLE_CONTRACT.md says and nothing more: the catalog
(``DEEPER_CATALOG``, standard pyiceberg configuration first, else the embedded SQLite catalog
under ``$DEEPER_DATA_DIR`` with the warehouse at ``$DEEPER_WAREHOUSE``), table names from
``DEEPER_TABLE``, the schema with its fixed field ids, the identity in the table properties.
(Unpartitioned: the ``table`` branch partitions by ``day(created_at)``, which pyiceberg's own
``append`` can only write with ``pyiceberg-core``; writers must not depend on it.)

At merge: ``grep -rn table_standin`` and import ``pipeline.storage.table`` instead (the names and
signatures used are the ``table`` branch's: ``catalog_properties``, ``load_catalog``,
``table_name``, ``open_table``, ``check_identity``, ``append_rows``, ``WRITER``), then delete this file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import IncompatibleFeatures
from pipeline.storage.identity import FeatureId

#: Snapshot summary key naming who wrote a snapshot: stream | featurize | backfill | compact.
WRITER = "deeper.writer"


def catalog_properties(settings: Settings) -> dict[str, str]:
    """The resolved properties of the catalog: pyiceberg's own configuration of that name if
    there is one, else the embedded SQLite catalog and warehouse under ``$DEEPER_DATA_DIR``."""
    from pyiceberg.utils.config import Config

    configured = Config().get_catalog_config(settings.catalog)
    if configured:
        return {str(k): str(v) for k, v in configured.items()}
    data = Path(settings.data_dir).absolute()
    return {"type": "sql", "uri": f"sqlite:///{data / 'catalog.db'}",
            "warehouse": settings.warehouse or (data / "warehouse").as_uri()}


def load_catalog(settings: Settings):
    from pyiceberg.catalog import load_catalog as pyiceberg_load

    properties = catalog_properties(settings)
    if properties.get("type") == "sql" and properties["uri"].startswith("sqlite:///"):
        Path(properties["uri"][len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return pyiceberg_load(settings.catalog, **properties)


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


def table_name(settings: Settings, meta: FeatureId) -> str:
    """``namespace.name`` of the table holding vectors of ``meta`` (``DEEPER_TABLE``)."""
    return settings.table.format(backbone=_sanitize(meta.backbone), precision=_sanitize(meta.precision),
                                 layer=_sanitize(meta.layer))


def schema(dim: int = 0):
    """The feature table's Iceberg schema (field ids fixed by the contract)."""
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


def identity_properties(meta: FeatureId) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in meta.to_parquet_metadata().items()}


def open_table(settings: Settings, meta: FeatureId, create: bool = True):
    """The table for ``meta`` (created with its namespace if missing), its identity checked."""
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError, TableAlreadyExistsError

    catalog = load_catalog(settings)
    name = table_name(settings, meta)
    try:
        table = catalog.load_table(name)
    except NoSuchTableError:
        if not create:
            raise
        try:
            catalog.create_namespace(name.rsplit(".", 1)[0])
        except NamespaceAlreadyExistsError:
            pass
        try:
            table = catalog.create_table(name, schema(meta.dim), properties=identity_properties(meta))
        except TableAlreadyExistsError:  # another writer created it first: that is success
            table = catalog.load_table(name)
    check_identity(table, meta, settings)
    return table


def check_identity(table: Any, meta: FeatureId, settings: Settings | None = None) -> None:
    name = ".".join(table.name())
    held = FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in table.properties.items()},
                                           where=f"table {name}")
    if held.differences(meta):
        raise IncompatibleFeatures(f"table {name} holds {held.describe()}, these vectors are {meta.describe()}: "
                                   f"DEEPER_TABLE={settings.table if settings else ''!r} names one table for every "
                                   "identity: use a template with {backbone}, {precision}, {layer}")


def append_rows(settings: Settings, meta: FeatureId, rows, writer: str = "featurize"):
    """Append ``FeatureRow``s outside the stream as one snapshot (``deeper.writer`` = ``writer``)."""
    import pyarrow as pa

    from pipeline.storage.parquet_writer import rows_to_table

    table = open_table(settings, meta)
    arrow = rows_to_table(rows, meta)
    target = table.schema().as_arrow()
    table.append(pa.table([arrow.column(f.name).cast(f.type) for f in target], schema=target),
                 snapshot_properties={WRITER: writer})
    return table, table.current_snapshot()


def read_features(settings: Settings, name: str):
    """The table's rows as a :class:`pipeline.storage.parquet_reader.FeatureSet` (what
    ``deeper train --features TABLE`` trains on)."""
    import numpy as np
    from pyiceberg.exceptions import NoSuchTableError

    from pipeline.errors import DeeperError
    from pipeline.storage.parquet_reader import FeatureSet

    try:
        loaded = load_catalog(settings).load_table(name)
    except NoSuchTableError:
        raise DeeperError(f"no table {name} in catalog {settings.catalog}") from None
    meta = FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in loaded.properties.items()},
                                           where=f"table {name}")
    rows = loaded.scan(selected_fields=("image_id", "source", "label", "vector")).to_arrow()
    flat = rows.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return FeatureSet(meta, rows.column("image_id").to_pylist(), rows.column("source").to_pylist(),
                      rows.column("label").to_pylist(), flat.reshape(rows.num_rows, meta.dim), files=1)


def looks_like_table(text: str) -> bool:
    """``namespace.name`` (not a path that exists, not a Parquet file name)."""
    return (re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", text) is not None and not Path(text).exists()
            and not text.endswith(".parquet"))
