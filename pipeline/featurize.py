"""Batch featurization: photos on disk -> feature rows (cache first, then the network).

The runner behind ``deeper featurize``, ``train DIR``, ``predict`` and ``report``. It reads
lazily, skips images the cache already knows, shows a progress bar, and returns failures
alongside the rows instead of stopping at the first bad file.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from pipeline.decode import image_id
from pipeline.errors import DeeperError
from pipeline.feature_cache import FeatureCache
from pipeline.inference import Failed, Featurized, ImageRecord, Inference
from pipeline.nets.base import Backbone
from pipeline.nets.factory import vector_source
from pipeline.parquet_writer import FeatureMeta, FeatureRow
from pipeline.photos import Photo


@dataclass
class FeaturizeResult:
    meta: FeatureMeta
    rows: list[FeatureRow]
    failures: list[Failed] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0


def feature_meta(backbone: Backbone, layer: str) -> FeatureMeta:
    try:
        real = backbone.info.resolve_layer(layer)
    except ValueError as exc:  # an unknown --layer is the user's to fix: a message, not a traceback
        raise DeeperError(str(exc)) from None
    return FeatureMeta(vector_source(backbone), backbone.weights_digest, real, backbone.info.end_points[real],
                       backbone.info.preprocessing)


def featurize_photos(photos: Sequence[Photo], backbone: Backbone, layer: str, batch_size: int = 32,
                     cache: FeatureCache | None = None, progress: bool = True,
                     chunk: int = 512) -> FeaturizeResult:
    """Featurize ``photos`` in order; unreadable or undecodable ones come back as failures.

    Photos are read ``chunk`` at a time so memory stays bounded on large directories.
    """
    started = time.perf_counter()
    meta = feature_meta(backbone, layer)
    result = FeaturizeResult(meta, [])
    inference = Inference(backbone, meta.layer, batch_size)
    bar = tqdm(total=len(photos), desc=f"featurize ({meta.backbone}/{meta.layer})", unit="img",
               disable=not progress, file=sys.stderr)
    for start in range(0, len(photos), chunk):
        records, failures = _read(photos[start:start + chunk])
        result.failures.extend(failures)
        bar.update(len(failures))
        _featurize_chunk(records, inference, meta, cache, result, bar)
    bar.close()
    result.seconds = time.perf_counter() - started
    return result


def _featurize_chunk(records: list[ImageRecord], inference: Inference, meta: FeatureMeta,
                     cache: FeatureCache | None, result: FeaturizeResult, bar: tqdm) -> None:
    known = cache.get_many([r.image_id for r in records], meta) if cache else {}
    by_id = {image_id: FeatureRow(image_id, "", None, w, h, v) for image_id, (v, w, h) in known.items()}
    todo = [r for r in records if r.image_id not in known]
    result.cached += len(records) - len(todo)
    bar.update(len(records) - len(todo))
    fresh = []
    for item in inference.run(todo):
        bar.update(1)
        if isinstance(item, Featurized):
            r = item.record
            by_id[r.image_id] = FeatureRow(r.image_id, r.source, r.label, item.width, item.height, item.vector)
            fresh.append((r.image_id, item.vector, item.width, item.height))
        else:
            result.failures.append(item)
    if cache and fresh:
        cache.put_many(fresh, meta)
    result.computed += len(fresh)
    result.rows.extend(_relabel(by_id[r.image_id], r) for r in records if r.image_id in by_id)


def _relabel(row: FeatureRow, record: ImageRecord) -> FeatureRow:
    """Duplicate photos share a cached vector but keep their own source and label."""
    return FeatureRow(row.image_id, record.source, record.label, row.width, row.height, row.vector)


def _read(photos: Sequence[Photo]) -> tuple[list[ImageRecord], list[Failed]]:
    records, failures = [], []
    for photo in photos:
        try:
            data = photo.path.read_bytes()
        except OSError as exc:
            failures.append(Failed(ImageRecord("", b"", str(photo.path), photo.label), "unreadable", str(exc)))
            continue
        records.append(ImageRecord(image_id(data), data, str(photo.path), photo.label))
    return records, failures


def default_cache(cache_dir: str | Path) -> FeatureCache:
    return FeatureCache(Path(cache_dir) / "features.sqlite")
