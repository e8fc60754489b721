"""Read feature files (one file, many, or a streamed dataset directory) back into arrays.

Offline retraining reads what the featurizer wrote instead of re-running the network. The
reader checks every file's metadata and refuses to mix backbones, weights or layers, and it
drops duplicate image ids (keeping the first row in file order): the stream is
at-least-once, so after a crash the same image can land in two part files; removing those at
read time keeps the writer simple and never loses a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DeeperError, IncompatibleFeatures
from pipeline.parquet_writer import TEMP_PREFIX, FeatureMeta


@dataclass
class FeatureSet:
    meta: FeatureMeta
    image_ids: list[str]
    sources: list[str]
    labels: list[str | None]
    vectors: np.ndarray  # float32 [N, dim]
    duplicates_dropped: int = 0

    def __len__(self) -> int:
        return len(self.image_ids)


def feature_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories into the sorted list of finished Parquet files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*.parquet") if not f.name.startswith(TEMP_PREFIX)))
        elif p.exists():
            out.append(p)
        else:
            raise DeeperError(f"no such feature file or directory: {p}")
    return out


def read_meta(path: Path) -> FeatureMeta:
    return FeatureMeta.from_metadata(pq.read_schema(path).metadata, where=str(path))


def read_features(paths: Sequence[str | Path]) -> FeatureSet:
    """Read, check and concatenate feature files; drop duplicate image ids."""
    files = feature_files(paths)
    if not files:
        raise DeeperError(f"no Parquet feature files found in {', '.join(map(str, paths))}")
    meta = read_meta(files[0])
    tables = []
    for f in files:
        read_meta(f).check_same(meta, what=f"({files[0]} and {f})")
        tables.append(pq.read_table(f, columns=["image_id", "source", "label", "vector"]))
    table = pa.concat_tables(tables)
    return _dedupe(meta, table)


def _dedupe(meta: FeatureMeta, table: pa.Table) -> FeatureSet:
    ids = table.column("image_id").to_pylist()
    seen: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        seen.setdefault(image_id, i)
    keep = np.fromiter(seen.values(), dtype=np.int64)
    table = table.take(pa.array(keep))
    vectors = table.column("vector").combine_chunks()
    flat = vectors.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
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
