"""What runs in Spark's Python workers: hash photos, featurize photos (``mapInArrow`` functions).

Both take and yield Arrow record batches. The network is loaded once per Python worker (Spark
reuses its workers between tasks, and this module's :data:`_LOADED` lives as long as the worker)
and run through :class:`pipeline.model.featurize.GuardedInference`, the very path of
``deeper featurize``: :class:`pipeline.model.inference.Inference` (JPEGs decoded in the graph,
everything else by ``pipeline.model.decode``), batched, a photo that breaks its batch isolated.
A worker whose network does not make the driver's :class:`FeatureId` (other weights on that
node) fails its task: vectors of two identities never share a table.

No photo is dropped: one that cannot be read, decoded or run is a row with a ``reason`` (the
reasons of ``deeper featurize`` and the stream: ``unreadable``, ``corrupt``, ``model_error``...),
which the driver writes to the rejects table.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.errors import DeeperError
from pipeline.storage.identity import FeatureId

#: Reason of a photo whose bytes changed between hashing and featurizing (it is retried next run).
CHANGED = "changed_during_backfill"
UNREADABLE = "unreadable"

HASHED = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("image_id", pa.string()),  # null when unreadable
    pa.field("size", pa.int64()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])

_VECTOR = pa.list_(pa.field("element", pa.float32(), nullable=False))
#: The feature table's columns (TABLE_CONTRACT.md) plus the reject's reason and detail; a
#: rejected photo's row has an empty vector and zero size and is written to the rejects table.
FEATURIZED = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("vector", _VECTOR, nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("kafka_topic", pa.string()),
    pa.field("kafka_partition", pa.int32()),
    pa.field("kafka_offset", pa.int64()),
    pa.field("kafka_key", pa.binary()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])
FEATURE_COLUMNS = [f.name for f in FEATURIZED if f.name not in ("reason", "detail")]


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the driver's network (pickled into the task)."""

    backbone: str  # qualified name: name@precision for non-fp32
    layer: str
    weights: str | None
    meta: FeatureId  # what the driver's network makes; a worker must make the same
    batch_size: int = 32


# --------------------------------------------------------------------------- reading

#: Photos read ahead of the one being hashed or featurized, by this many threads: an S3 GET
#: takes tens of milliseconds, so reads overlap each other and the model.
READ_AHEAD = 64
READ_THREADS = 8
#: Photos handed to the network at a time (GuardedInference takes a list): four batches.
CHUNK = 128


def _read(source: str) -> bytes | BaseException:
    from pipeline.spark.sources import read_photo

    try:
        return read_photo(source)
    except Exception as exc:  # noqa: BLE001 - handed back as this photo's reason
        return exc


def _rows(batches: Iterator[pa.RecordBatch], columns: tuple[str, ...]) -> Iterator[tuple]:
    for batch in batches:
        yield from zip(*(batch.column(c).to_pylist() for c in columns))


def _read_ahead(rows: Iterator[tuple]) -> Iterator[tuple[tuple, bytes | BaseException]]:
    """``(row, bytes or the exception)`` in input order; ``row[0]`` is the source."""
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="deeper-read") as pool:
        pending: deque = deque()
        for row in rows:
            pending.append((row, pool.submit(_read, row[0])))
            if len(pending) >= READ_AHEAD:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _reason(error: BaseException) -> tuple[str, str]:
    from pipeline.model.featurize import INTERNAL_ERROR, describe_exception

    if isinstance(error, (OSError, DeeperError)):
        return UNREADABLE, getattr(error, "strerror", None) or str(error)
    return INTERNAL_ERROR, describe_exception(error)


# --------------------------------------------------------------------------- hashing


def hash_photos(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``source, label`` -> ``+ image_id`` (sha256 of the bytes), ``size``; or a reason."""
    rows = {name: [] for name in HASHED.names}
    for (source, label), data in _read_ahead(_rows(batches, ("source", "label"))):
        image_id = size = reason = detail = None
        if isinstance(data, BaseException):
            reason, detail = _reason(data)
        else:
            image_id, size = hashlib.sha256(data).hexdigest(), len(data)
        for name, value in zip(HASHED.names, (source, label, image_id, size, reason, detail)):
            rows[name].append(value)
        if len(rows["source"]) >= CHUNK:
            yield pa.RecordBatch.from_pydict(rows, schema=HASHED)
            rows = {name: [] for name in HASHED.names}
    if rows["source"]:
        yield pa.RecordBatch.from_pydict(rows, schema=HASHED)


# --------------------------------------------------------------------------- featurizing

#: (spec, cpus) -> GuardedInference; one per Python worker, kept between tasks.
_LOADED: dict = {}


def _inference(spec: ModelSpec):
    """The worker's network and input pipeline, loaded on its first task and kept."""
    cpus = _task_cpus()
    key = (spec, cpus)
    if key not in _LOADED:
        from pipeline.model import threads
        from pipeline.model.featurize import GuardedInference, feature_meta
        from pipeline.model.nets.factory import load_backbone

        # this task's share of the executor's cores, before TensorFlow starts its pools
        threads.apply(threads.ThreadPlan(1, cpus, 1 if cpus == 1 else 0, f"{cpus} Spark task core(s)"))
        backbone = load_backbone(spec.backbone, weights=spec.weights, progress=False)
        made = feature_meta(backbone, spec.layer)
        made.check_compatible(spec.meta, what="this Spark worker's network vs the driver's")
        _LOADED.clear()
        _LOADED[key] = GuardedInference(backbone, made.layer, spec.batch_size, parallel_decode=max(2, cpus))
    return _LOADED[key]


def _task_cpus() -> int:
    from pyspark import TaskContext

    context = TaskContext.get()
    try:
        return max(1, int(context.cpus())) if context is not None else max(1, os.cpu_count() or 1)
    except (AttributeError, TypeError, ValueError):
        return 1


def featurize_photos(spec: ModelSpec):
    """The ``mapInArrow`` function: ``source, label, image_id`` batches -> :data:`FEATURIZED`."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        inference = _inference(spec)
        chunk: list = []
        for item in _read_ahead(_rows(batches, ("source", "label", "image_id"))):
            chunk.append(item)
            if len(chunk) >= CHUNK:
                yield _featurize_chunk(inference, chunk)
                chunk = []
        if chunk:
            yield _featurize_chunk(inference, chunk)

    return run


def _featurize_chunk(inference, chunk: list[tuple[tuple, bytes | BaseException]]) -> pa.RecordBatch:
    from pipeline.model.inference import Failed, ImageRecord

    out = _Rows()
    records = []
    for (source, label, image_id), data in chunk:
        if isinstance(data, BaseException):
            out.reject(source, label, image_id, *_reason(data))
            continue
        now = hashlib.sha256(data).hexdigest()
        if now != image_id:  # the anti-join decided on other bytes: this run must not add these
            out.reject(source, label, image_id, CHANGED, f"sha256 was {image_id}, is now {now}")
            continue
        records.append(ImageRecord(image_id, data, source, label))
    for result in inference.run(records):
        record = result.record
        if isinstance(result, Failed):
            out.reject(record.source, record.label, record.image_id, result.reason, result.detail)
        else:
            out.row(record.image_id, record.source, record.label, result.width, result.height, result.vector)
    return out.batch()


class _Rows:
    """Columns of one output batch, filled row by row."""

    def __init__(self):
        self.columns: dict[str, list] = {name: [] for name in FEATURIZED.names}
        self.vectors: list[np.ndarray] = []
        self.now = dt.datetime.now(dt.timezone.utc)

    def row(self, image_id, source, label, width, height, vector, reason=None, detail=None) -> None:
        values = (image_id, source, label, int(width), int(height), None, self.now, None, None, None, None,
                  reason, detail)
        for name, value in zip(FEATURIZED.names, values):
            if name != "vector":
                self.columns[name].append(value)
        self.vectors.append(np.asarray(vector, np.float32).reshape(-1))

    def reject(self, source, label, image_id, reason, detail) -> None:
        self.row(image_id or "", source, label, 0, 0, np.zeros(0, np.float32), reason, (detail or "")[:1000])

    def batch(self) -> pa.RecordBatch:
        lengths = np.fromiter((len(v) for v in self.vectors), np.int32, len(self.vectors))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        flat = np.concatenate(self.vectors) if self.vectors else np.zeros(0, np.float32)
        vector = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()), type=_VECTOR)
        arrays = [vector if name == "vector" else pa.array(self.columns[name], FEATURIZED.field(name).type)
                  for name in FEATURIZED.names]
        return pa.RecordBatch.from_arrays(arrays, schema=FEATURIZED)
