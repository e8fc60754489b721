"""STAND-IN for ``pipeline/storage/table.py`` (issue 20, the ``table`` helper): delete at merge.

The feature table's one home is ``pipeline.storage.table``, written at the same time on another
branch. Until it is merged, the Spark backfill (issue 21) needs the same five functions, so this
file implements exactly what /work/TABLE_CONTRACT.md says and nothing more: the catalog
(``DEEPER_CATALOG``, standard pyiceberg configuration first, else the embedded SQLite catalog
under ``$DEEPER_DATA_DIR`` with the warehouse at ``$DEEPER_WAREHOUSE``), table names from
``DEEPER_TABLE``, the schema with its fixed field ids, the identity in the table properties.

At merge: ``grep -rn table_standin`` and import ``pipeline.storage.table`` instead (the names are
the contract's), then delete this file. It reads its three variables from ``os.environ``
because ``pipeline.config.Settings`` gets them on the ``table`` branch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import IncompatibleFeatures
from pipeline.storage.identity import FeatureId

DEFAULT_CATALOG = "deeper"
DEFAULT_TABLE = "deeper.features_{backbone}_{precision}_{layer}"
#: Snapshot summary key naming who wrote a snapshot: stream | featurize | backfill | compact.
WRITER = "deeper.writer"
#: Snapshot summary keys of the stream's consumed offsets start with this (the ``table``
#: helper chooses the real keys; see the report).
OFFSETS_PREFIX = "deeper.offsets."


def catalog_name(settings: Settings | None = None) -> str:
    return os.environ.get("DEEPER_CATALOG", "").strip() or DEFAULT_CATALOG


def catalog_properties(settings: Settings) -> dict[str, str]:
    """The resolved properties of the catalog: pyiceberg's own configuration of that name if
    there is one, else the embedded SQLite catalog and warehouse under ``$DEEPER_DATA_DIR``."""
    from pyiceberg.utils.config import Config

    name = catalog_name(settings)
    configured = Config().get_catalog_config(name)
    if configured:
        return {str(k): str(v) for k, v in configured.items()}
    data = Path(settings.data_dir).absolute()
    warehouse = os.environ.get("DEEPER_WAREHOUSE", "").strip() or (data / "warehouse").as_uri()
    return {"type": "sql", "uri": f"sqlite:///{data / 'catalog.db'}", "warehouse": warehouse}


def load_catalog(settings: Settings):
    from pyiceberg.catalog import load_catalog as pyiceberg_load

    properties = catalog_properties(settings)
    if properties.get("type") == "sql" and properties["uri"].startswith("sqlite:///"):
        Path(properties["uri"][len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return pyiceberg_load(catalog_name(settings), **properties)


def _sanitize(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", text.lower())).strip("_")


def table_name(settings: Settings, meta: FeatureId) -> str:
    """``namespace.name`` of the table holding vectors of ``meta`` (``DEEPER_TABLE``)."""
    template = os.environ.get("DEEPER_TABLE", "").strip() or DEFAULT_TABLE
    return template.format(backbone=_sanitize(meta.backbone), precision=_sanitize(meta.precision),
                           layer=_sanitize(meta.layer))


def schema(dim: int):
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


def open_table(settings: Settings, meta: FeatureId, create: bool = True, name: str | None = None):
    """The table for ``meta`` (created if missing and ``create``), its identity checked."""
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError, TableAlreadyExistsError

    catalog = load_catalog(settings)
    name = name or table_name(settings, meta)
    namespace = name.rsplit(".", 1)[0]
    try:
        table = catalog.load_table(name)
    except NoSuchTableError:
        if not create:
            raise
        try:
            catalog.create_namespace(namespace)
        except NamespaceAlreadyExistsError:
            pass
        try:
            table = catalog.create_table(name, schema(meta.dim), properties=identity_properties(meta))
        except TableAlreadyExistsError:  # another writer created it first: that is success
            table = catalog.load_table(name)
    check_identity(table, meta, name)
    return table


def check_identity(table: Any, meta: FeatureId, name: str) -> None:
    found = FeatureId.from_parquet_metadata({k.encode(): v.encode() for k, v in table.properties.items()},
                                            where=f"table {name}")
    if found.differences(meta):
        raise IncompatibleFeatures(f"table {name} holds {found.describe()}, these vectors are {meta.describe()}: "
                                   f"set DEEPER_TABLE to another table (or use its default per-identity name)")


def carry_offsets(table: Any) -> dict[str, str]:
    """The current snapshot's stream offsets, for a writer that is not the stream to carry."""
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return {}
    return {k: v for k, v in snapshot.summary.additional_properties.items() if k.startswith(OFFSETS_PREFIX)}


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
        raise DeeperError(f"no table {name} in catalog {catalog_name(settings)}") from None
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
