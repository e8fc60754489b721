"""What runs in Spark's Python workers: load the network, and featurize photos in one pass
(read once, hash, skip what is known, run the rest: ``mapInArrow`` functions).

Both take and yield Arrow record batches. The network is loaded once per Python worker (Spark
reuses its workers between tasks, and this module's :data:`_LOADED` lives as long as the worker)
and run through :class:`pipeline.model.featurize.GuardedInference`, the very path of
``deeper featurize``: :class:`pipeline.model.inference.Inference` (JPEGs decoded in the graph,
everything else by ``pipeline.model.decode``), batched, a photo that breaks its batch isolated.
The driver learns the network's :class:`FeatureId` from a one-task job (:func:`identify`) and
never imports TensorFlow; a later worker whose network makes another identity (other weights
on that node) fails its task: vectors of two identities never share a table. Memory per worker:
the network, plus up to ``READ_AHEAD + CHUNK`` photos' bytes (about 0.6 GB of 3-MB camera photos).

No photo is dropped: one that cannot be read, decoded or run is a row with a ``reason`` (the
reasons of ``deeper featurize`` and the stream: ``unreadable``, ``corrupt``, ``model_error``...),
which the driver writes to the rejects table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.errors import DeeperError
from pipeline.identity import FeatureId
from schemas import messages

UNREADABLE = "unreadable"
#: Why a photo read by the featurize pass was not run through the model (the ``skipped`` column):
#: its sha256 is in the table, in the rejects table, or was written by an earlier chunk of this run.
PRESENT, REJECTED_BEFORE, DUPLICATE = "present", "rejected_before", "duplicate"

_VECTOR = pa.list_(pa.field("element", pa.float32(), nullable=False))
#: The feature table's columns (pipeline.storage.table.schema) plus the reject's reason and detail; a
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
    pa.field("skipped", pa.string()),  # PRESENT, REJECTED_BEFORE or DUPLICATE: not run, not written
])
FEATURE_COLUMNS = [f.name for f in FEATURIZED if f.name not in ("reason", "detail", "skipped")]


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the network (pickled into each task).

    ``meta`` is what the identity job's worker found (:func:`identify`); every later task's
    worker must make the same, or the task fails: vectors of two identities never mix.
    """

    model: str  # auto, or a backbone name
    precision: str
    layer: str
    weights: str | None
    batch_size: int = 32
    cache_dir: str | None = None  # None: the worker's own $DEEPER_CACHE_DIR (on a cluster)
    meta: FeatureId | None = None

    def resolved(self, meta: FeatureId) -> "ModelSpec":
        """The spec every later task gets: the backbone ``auto`` chose, and the identity."""
        return replace(self, model=meta.backbone, precision=meta.precision, layer=meta.layer, meta=meta)


IDENTITY = pa.schema([pa.field("identity", pa.string(), nullable=False)])


# --------------------------------------------------------------------------- reading

#: Photos read ahead of the one being featurized, by this many threads: an S3 GET
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


# --------------------------------------------------------------------------- known photos


def digests(image_ids) -> np.ndarray:
    """Sorted, distinct sha256 digests (``S32``, 32 bytes each) of the hex ``image_ids`` given
    (others, which no sha256 of bytes can equal, are left out): what a worker looks a photo up in."""
    raw = [bytes.fromhex(i) for i in image_ids if isinstance(i, str) and len(i) == 64 and _is_hex(i)]
    return np.unique(np.array(raw, dtype="S32")) if raw else np.zeros(0, dtype="S32")


_HEX = frozenset("0123456789abcdef")


def _is_hex(text: str) -> bool:
    return set(text) <= _HEX


def _holds(known: np.ndarray, digest: bytes) -> bool:
    if not len(known):
        return False
    at = int(np.searchsorted(known, np.bytes_(digest)))
    return at < len(known) and known[at] == np.bytes_(digest)


@dataclass(frozen=True)
class Known:
    """What the featurize pass skips before the model, by sha256 digest (:func:`digests`; each
    a Spark broadcast of a sorted array, looked up by binary search: 32 bytes per photo in a
    worker's memory): photos in the table, rejected before (read but not decodable), and written
    or rejected by an earlier chunk of this run."""

    present: object  # Broadcast of np.ndarray, or a plain array (tests)
    rejected_before: object
    this_run: object

    def skipped(self, digest: bytes) -> str | None:
        for reason, held in ((PRESENT, self.present), (REJECTED_BEFORE, self.rejected_before),
                             (DUPLICATE, self.this_run)):
            if _holds(getattr(held, "value", held), digest):
                return reason
        return None


def read_photos(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[str, str | None, bytes | None, str | None,
                                                                     tuple[str, str] | None]]:
    """``(source, label, bytes, image_id, (reason, detail) or None)`` per listed photo, in order,
    each read once (ahead, by threads): the sha256 is taken from the very bytes the model gets."""
    for (source, label), data in _read_ahead(_rows(batches, ("source", "label"))):
        if isinstance(data, BaseException):
            yield source, label, None, None, _reason(data)
        else:
            yield source, label, data, messages.image_id(data), None


# --------------------------------------------------------------------------- featurizing

#: (spec without its identity, cpus) -> Future of (GuardedInference, FeatureId, announcement):
#: one network per Python worker, kept between tasks (Spark reuses its Python workers).
_LOADED: dict = {}
_LOADING = threading.Lock()


def _warm(spec: ModelSpec) -> Future:
    """Start loading the worker's network for ``spec`` (once; in a background thread)."""
    key = (replace(spec, meta=None), _task_cpus())
    with _LOADING:
        if key not in _LOADED:
            _LOADED.clear()  # another network: let the old one go
            future: Future = Future()
            threading.Thread(target=_load, args=(key[0], key[1], future), name="deeper-model-load",
                             daemon=True).start()
            _LOADED[key] = future
        return _LOADED[key]


def _load(spec: ModelSpec, cpus: int, future: Future) -> None:
    try:
        from pipeline.model import threads
        from pipeline.model.featurize import GuardedInference, feature_meta
        from pipeline.model.nets.factory import load_backbone

        # this task's share of the executor's cores, before TensorFlow starts its pools
        threads.apply(threads.ThreadPlan(1, cpus, 1 if cpus == 1 else 0, f"{cpus} Spark task core(s)"))
        said: list[str] = []
        backbone = load_backbone(spec.model, weights=spec.weights, cache_dir=spec.cache_dir, progress=False,
                                 announce=said.append, precision=spec.precision)
        made = feature_meta(backbone, spec.layer)
        inference = GuardedInference(backbone, made.layer, spec.batch_size, parallel_decode=max(2, cpus))
        with _LOADING:  # later tasks ask for what ``auto`` resolved to: the same network
            _LOADED.setdefault((replace(spec.resolved(made), meta=None), cpus), future)
        future.set_result((inference, made, "; ".join(said)))
    except BaseException as exc:  # noqa: BLE001 - raised in the task that waits for it
        future.set_exception(exc)


def _inference(spec: ModelSpec):
    """The worker's network and input pipeline (loaded once, by the identity job), checked
    against the identity the driver expects."""
    inference, made, _ = _warm(spec).result()
    if spec.meta is not None:
        made.check_compatible(spec.meta, what="this Spark worker's network vs the identity job's")
    return inference


def identify(spec: ModelSpec):
    """The ``mapInArrow`` function of the identity job: one row, the worker's ``FeatureId`` as
    JSON (and what ``auto`` said about its choice). The driver never loads TensorFlow; this
    worker keeps the network it loaded for the tasks that follow."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        _, made, said = _warm(spec).result()
        text = json.dumps({"meta": made.to_json(), "said": said})
        yield pa.RecordBatch.from_pydict({"identity": [text]}, schema=IDENTITY)

    return run


def _task_cpus() -> int:
    from pyspark import TaskContext

    context = TaskContext.get()
    try:
        return max(1, int(context.cpus())) if context is not None else max(1, os.cpu_count() or 1)
    except (AttributeError, TypeError, ValueError):
        return 1


def featurize_photos(spec: ModelSpec, known: Known):
    """The ``mapInArrow`` function: ``source, label`` batches -> :data:`FEATURIZED`, one pass:
    each photo is read once, hashed, skipped if ``known`` holds its sha256 (no model time), else
    run through the network. Photos of the same bytes within one pass are all run (the driver
    keeps the first name): duplicates are rare, and a second read of every photo is not."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        inference = _inference(spec)
        chunk: list = []
        for item in read_photos(batches):
            chunk.append(item)
            if len(chunk) >= CHUNK:
                yield _featurize_chunk(inference, known, chunk)
                chunk = []
        if chunk:
            yield _featurize_chunk(inference, known, chunk)

    return run


def _featurize_chunk(inference, known: Known, chunk: list) -> pa.RecordBatch:
    from pipeline.model.inference import Failed, ImageRecord

    out = _Rows()
    records = []
    for source, label, data, image_id, failed in chunk:
        if failed is not None:
            out.reject(source, label, image_id, *failed)
            continue
        skipped = known.skipped(bytes.fromhex(image_id))
        if skipped is not None:
            out.skip(source, label, image_id, skipped)
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

    def row(self, image_id, source, label, width, height, vector, reason=None, detail=None, skipped=None) -> None:
        values = (image_id, source, label, int(width), int(height), None, self.now, None, None, None, None,
                  reason, detail, skipped)
        for name, value in zip(FEATURIZED.names, values):
            if name != "vector":
                self.columns[name].append(value)
        self.vectors.append(np.asarray(vector, np.float32).reshape(-1))

    def reject(self, source, label, image_id, reason, detail) -> None:
        self.row(image_id or "", source, label, 0, 0, np.zeros(0, np.float32), reason, (detail or "")[:1000])

    def skip(self, source, label, image_id, why) -> None:
        self.row(image_id, source, label, 0, 0, np.zeros(0, np.float32), skipped=why)

    def batch(self) -> pa.RecordBatch:
        lengths = np.fromiter((len(v) for v in self.vectors), np.int32, len(self.vectors))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
        flat = np.concatenate(self.vectors) if self.vectors else np.zeros(0, np.float32)
        vector = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()), type=_VECTOR)
        arrays = [vector if name == "vector" else pa.array(self.columns[name], FEATURIZED.field(name).type)
                  for name in FEATURIZED.names]
        return pa.RecordBatch.from_arrays(arrays, schema=FEATURIZED)
