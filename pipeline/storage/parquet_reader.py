"""Read feature files (one file, many, or a streamed dataset directory) back into arrays.

Offline retraining reads what the featurizer wrote instead of re-running the network. Every
location may be a local path or an ``s3://`` URI (:mod:`pipeline.storage`). The reader checks
every file's feature id and refuses to mix backbones, precisions, weights or layers
(:meth:`pipeline.identity.FeatureId.check_compatible`).

It also keeps one row per image id (the first in file order), as a safety net: a stream that
delivers at least once can land an image in two part files after a crash. How many rows it
removed is returned (:attr:`FeatureSet.duplicates_dropped`) and logged, so a writer that claims
exactly-once can show the number is zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import DeeperError, IncompatibleFeatures
from pipeline.identity import FeatureId
from pipeline.logs import event

log = logging.getLogger(__name__)

COLUMNS = ["image_id", "source", "label", "vector"]


@dataclass
class FeatureSet:
    meta: FeatureId
    image_ids: list[str]
    sources: list[str]
    labels: list[str | None]
    vectors: np.ndarray  # float32 [N, dim]
    #: rows removed because their image id was already read (0 for an exactly-once writer)
    duplicates_dropped: int = 0
    files: int = 0

    def __len__(self) -> int:
        return len(self.image_ids)


def feature_files(paths: Iterable[storage.Location]) -> list[storage.Location]:
    """Expand files, directories and S3 prefixes into the finished Parquet files (each sorted)."""
    out: list[storage.Location] = []
    for p in paths:
        out.extend(storage.list_parquet(p))
    return out


def _read(location: storage.Location, columns: list[str] | None) -> tuple[FeatureId, pa.Table | None]:
    """One open per file: its feature id and (when ``columns`` is given) those columns."""
    with storage.open_input(location) as source:
        try:
            parquet = pq.ParquetFile(source)
        except (pa.ArrowInvalid, OSError) as exc:
            raise IncompatibleFeatures(f"{location} is not a readable Parquet file: {exc}") from None
        meta = FeatureId.from_parquet_metadata(parquet.schema_arrow.metadata, where=str(location))
        return meta, parquet.read(columns=columns) if columns else None


def read_meta(location: storage.Location) -> FeatureId:
    return _read(location, None)[0]


def read_features(paths: Sequence[storage.Location]) -> FeatureSet:
    """Read, check and concatenate feature files; drop (and count) duplicate image ids."""
    files = feature_files(paths)
    if not files:
        raise DeeperError(f"no Parquet feature files found in {', '.join(map(str, paths))}")
    meta: FeatureId | None = None
    tables = []
    for f in files:
        this, table = _read(f, COLUMNS)
        meta = meta or this
        this.check_compatible(meta, what=f"{f} and {files[0]}")
        tables.append(table)
    features = _dedupe(meta, pa.concat_tables(tables))
    features.files = len(files)
    event(log, "read features", logging.WARNING if features.duplicates_dropped else logging.INFO,
          files=len(files), rows=len(features), duplicates_dropped=features.duplicates_dropped,
          features=meta.describe())
    return features


def _dedupe(meta: FeatureId, table: pa.Table) -> FeatureSet:
    ids = table.column("image_id").to_pylist()
    seen: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        seen.setdefault(image_id, i)
    keep = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
    if len(keep) != len(ids):
        table = table.take(pa.array(keep))
    vectors = table.column("vector").combine_chunks()
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if flat.size != len(keep) * meta.dim:
        raise IncompatibleFeatures(f"vector column does not have {meta.dim} values per row")
    return FeatureSet(
        meta=meta,
        image_ids=table.column("image_id").to_pylist(),
        sources=table.column("source").to_pylist(),
        labels=table.column("label").to_pylist(),
        vectors=flat.reshape(len(keep), meta.dim),
        duplicates_dropped=len(ids) - len(keep),
    )
