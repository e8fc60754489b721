"""Batch featurization: photos on disk -> feature rows (cache first, then the network).

The runner behind ``deeper featurize``, ``train DIR``, ``predict`` and ``report``. It reads
lazily, skips images the cache already knows, shows a progress bar, and returns failures
alongside the rows instead of stopping at the first bad file.

A photo is never lost silently and never takes the others down with it: an unreadable file, an
undecodable image (``DecodeError``) and any other exception raised while one photo is read or
decoded all come back as a :class:`Failed` for that photo. The last kind breaks the tf.data
pipeline of its whole batch, so the batch is run again one photo at a time to find the culprit
(:class:`GuardedInference`); only a failure that hits photo after photo stops the run.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from pipeline.errors import DeeperError
from pipeline.storage.feature_cache import FeatureCache
from pipeline.identity import FeatureId
from pipeline.model.inference import Failed, Featurized, ImageRecord, Inference, Result
from pipeline.model.nets.base import Backbone
from pipeline.storage.parquet_writer import FeatureRow
from pipeline.model.photos import PhotoFile
from schemas.messages import image_id

#: Reason of a photo whose reading or decoding raised something other than ``DecodeError``.
INTERNAL_ERROR = "internal_error"
#: Photos in a row failing with :data:`INTERNAL_ERROR` after which the cause is taken to be the
#: machine or the model, not the photos: the run stops with that error instead of going on.
MAX_ERRORS_IN_A_ROW = 16


@dataclass
class FeaturizeResult:
    meta: FeatureId
    rows: list[FeatureRow]
    failures: list[Failed] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0


def feature_meta(backbone: Backbone, layer: str) -> FeatureId:
    try:
        real = backbone.info.resolve_layer(layer)
    except ValueError as exc:  # an unknown --layer is the user's to fix: a message, not a traceback
        raise DeeperError(str(exc)) from None
    return FeatureId(backbone.info.name, backbone.weights_digest, real, backbone.info.end_points[real],
                     backbone.info.preprocessing, precision=backbone.precision)


def featurize_photos(photos: Sequence[PhotoFile], backbone: Backbone, layer: str, batch_size: int = 32,
                     cache: FeatureCache | None = None, progress: bool = True,
                     chunk: int = 512) -> FeaturizeResult:
    """Featurize ``photos`` in order; unreadable or undecodable ones come back as failures.

    Photos are read ``chunk`` at a time so memory stays bounded on large directories.
    """
    started = time.perf_counter()
    meta = feature_meta(backbone, layer)
    result = FeaturizeResult(meta, [])
    inference = GuardedInference(backbone, meta.layer, batch_size)
    bar = tqdm(total=len(photos), desc=f"featurize ({meta.qualified_name}/{meta.layer})", unit="img",
               disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(photos), chunk):
            records, failures = _read(photos[start:start + chunk])
            result.failures.extend(failures)
            bar.update(len(failures))
            _featurize_chunk(records, inference, meta, cache, result, bar)
    finally:
        bar.close()
        inference.close()
    result.seconds = time.perf_counter() - started
    return result


def _featurize_chunk(records: list[ImageRecord], inference: GuardedInference, meta: FeatureId,
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


class GuardedInference:
    """An :class:`Inference` that a photo raising an unexpected error cannot take down.

    Such an error ends the tf.data pipeline (and its model thread) for good, and fails every
    record not yet handed out. The records handed out before it are kept; the next two
    batches' worth (the failed batch starts within one batch of the first result missing) are
    run one photo per batch, so the photo that fails is the one to blame, and a fresh pipeline
    takes the rest at full batch size.
    """

    def __init__(self, backbone: Backbone, layer: str, batch_size: int, parallel_decode: int | None = None):
        self.backbone, self.layer, self.batch_size = backbone, layer, batch_size
        self.parallel_decode = parallel_decode  # None: pipeline.model.inference's default
        self._batched: Inference | None = None
        self._single: Inference | None = None
        self._errors_in_a_row = 0

    def run(self, records: Sequence[ImageRecord]) -> Iterator[Result]:
        pending = list(records)
        while pending:
            done = 0
            for item in self._batched_run(pending):
                if item is None:  # the pipeline broke after ``done`` results
                    break
                done += 1
                yield item
            else:
                return
            suspects = pending[done:done + 2 * self.batch_size]
            yield from self._one_by_one(suspects)
            pending = pending[done + len(suspects):]

    def close(self) -> None:
        for inference in (self._batched, self._single):
            if inference is not None:
                inference.close()

    def _batched_run(self, records: list[ImageRecord]) -> Iterator[Result | None]:
        """Results in order, then ``None`` (and a fresh pipeline next time) if the pipeline broke."""
        if self._batched is None:
            self._batched = Inference(self.backbone, self.layer, self.batch_size, self.parallel_decode)
        results = self._batched.run(records)
        while True:
            try:
                item = next(results)
            except StopIteration:
                return
            except Exception:  # noqa: BLE001 - a photo broke the batch; _one_by_one finds which
                results.close()
                self._batched.close()
                self._batched = None
                yield None
                return
            self._errors_in_a_row = 0
            yield item

    def _one_by_one(self, records: list[ImageRecord]) -> Iterator[Result]:
        for record in records:
            if self._single is None:
                self._single = Inference(self.backbone, self.layer, 1, self.parallel_decode)
            try:
                (item,) = self._single.run([record])
                self._errors_in_a_row = 0
            except Exception as exc:  # noqa: BLE001 - this photo's own failure, reported as such
                self._single.close()
                self._single = None
                item = Failed(record, INTERNAL_ERROR, describe_exception(exc))
                self._count_error(item)
            yield item

    def _count_error(self, failed: Failed) -> None:
        self._errors_in_a_row += 1
        if self._errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
            raise DeeperError(f"featurizing failed for {self._errors_in_a_row} photos in a row, so the cause is "
                              f"not the photos; the last one: {failed.record.source}: {failed.detail}")


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of the root cause, first line only (TensorFlow appends a traceback)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", getattr(exc, "message", None) or str(exc))  # TF's node names
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if first.split(":", 1)[0].isidentifier() and ":" in first:  # already "ValueError: ..." (from tf.numpy_function)
        return first[:300]
    return f"{type(exc).__name__}: {first}"[:300] if first else type(exc).__name__


def _relabel(row: FeatureRow, record: ImageRecord) -> FeatureRow:
    """Duplicate photos share a cached vector but keep their own source and label."""
    return FeatureRow(row.image_id, record.source, record.label, row.width, row.height, row.vector)


def _read(photos: Sequence[PhotoFile]) -> tuple[list[ImageRecord], list[Failed]]:
    """Each photo's bytes; sources are display text (:func:`pipeline.model.photos.display_path`)."""
    records, failures = [], []
    for photo in photos:
        try:
            data = photo.path.read_bytes()
            records.append(ImageRecord(image_id(data), data, photo.source, photo.label))
        except OSError as exc:
            failures.append(Failed(ImageRecord("", b"", photo.source, photo.label), "unreadable",
                                   exc.strerror or str(exc)))
        except Exception as exc:  # noqa: BLE001 - one photo's problem, never the run's
            failures.append(Failed(ImageRecord("", b"", photo.source, photo.label), INTERNAL_ERROR,
                                   describe_exception(exc)))
    return records, failures


def default_cache(cache_dir: str | Path) -> FeatureCache:
    return FeatureCache(Path(cache_dir) / "features.sqlite")
