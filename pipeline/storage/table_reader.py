"""Read a feature table's snapshot into arrays, in an order that does not depend on files.

Retraining from the table (``deeper train --features TABLE``, the UI's Retrain) and
reproducing a registry version (``--reproduce``) must see exactly the same rows in exactly the
same order: a snapshot's rows come back in whatever order its data files are planned, and
compaction changes the files, not the rows. So rows are sorted by image id (then Kafka position,
then time, then source), and one row per image id is kept (the first in that order; a photo
produced twice has a row per offset). How many were dropped is returned, as the Parquet
reader does.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.errors import IncompatibleFeatures
from pipeline.logs import event
from pipeline.storage import table as tables
from pipeline.storage.parquet_reader import FeatureSet

if TYPE_CHECKING:
    from pyiceberg.table import Table
    from pyiceberg.table.snapshots import Snapshot

log = logging.getLogger(__name__)

COLUMNS = ("image_id", "source", "label", "vector", "created_at", "kafka_topic", "kafka_partition", "kafka_offset")
ORDER = ("image_id", "kafka_topic", "kafka_partition", "kafka_offset", "created_at", "source")


@dataclass
class TableRead:
    """A snapshot's features and where they came from (what the registry records)."""

    features: FeatureSet
    table: str
    snapshot_id: int
    snapshot_at: str
    rows_read: int

    def provenance(self, catalog: str) -> dict[str, Any]:
        return {"source": "table", "catalog": catalog, "table": self.table, "snapshot_id": self.snapshot_id,
                "snapshot_at": self.snapshot_at, "rows": len(self.features), "rows_read": self.rows_read}


def _sorted_unique(data: pa.Table) -> tuple[pa.Table, int]:
    data = data.sort_by([(c, "ascending") for c in ORDER])
    ids = data.column("image_id").to_pylist()
    keep = [i for i, image_id in enumerate(ids) if i == 0 or image_id != ids[i - 1]]
    return (data.take(pa.array(keep, pa.int64())) if len(keep) != len(ids) else data), len(ids) - len(keep)


def read_snapshot(table: Table, snapshot: Snapshot) -> TableRead:
    """The rows of ``snapshot``, sorted and one per image id (module doc)."""
    meta = tables.identity(table)
    data, dropped = _sorted_unique(tables.scan(table, snapshot, COLUMNS))
    flat = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if flat.size != len(data) * meta.dim:
        raise IncompatibleFeatures(f"table {'.'.join(table.name())}: vectors are not {meta.dim} values long")
    features = FeatureSet(meta=meta, image_ids=data.column("image_id").to_pylist(),
                          sources=data.column("source").to_pylist(), labels=data.column("label").to_pylist(),
                          vectors=flat.reshape(len(data), meta.dim), duplicates_dropped=dropped,
                          files=len(list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files())))
    at = dt.datetime.fromtimestamp(snapshot.timestamp_ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")
    event(log, "read features", table=".".join(table.name()), snapshot_id=snapshot.snapshot_id, rows=len(features),
          duplicates_dropped=dropped, features=meta.describe())
    return TableRead(features, ".".join(table.name()), snapshot.snapshot_id, at, len(data) + dropped)


def kafka_position(table: Table, image_id: str) -> tuple[str, int, int] | None:
    """Where a photo's message is (topic, partition, offset), from its row in the current snapshot."""
    from pyiceberg.expressions import EqualTo

    snapshot = table.current_snapshot()
    if snapshot is None:
        return None
    found = table.scan(snapshot_id=snapshot.snapshot_id, row_filter=EqualTo("image_id", image_id),
                       selected_fields=("kafka_topic", "kafka_partition", "kafka_offset")).to_arrow()
    for row in found.to_pylist():
        if row["kafka_topic"] is not None and row["kafka_offset"] is not None:
            return row["kafka_topic"], int(row["kafka_partition"]), int(row["kafka_offset"])
    return None
