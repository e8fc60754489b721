"""``deeper backfill SRC``: featurize a lake of photos on Spark into the stream's feature table.

The job, on the driver (each step a Spark job; the Python side in :mod:`pipeline.spark.tasks`):

1. **List** ``SRC`` (:mod:`pipeline.spark.sources`), before Spark starts: a wrong SRC fails at once.
2. **Identity** (:func:`identify`): one task per task slot loads the network in its Python worker
   (all at once; the driver never imports TensorFlow) and returns its :class:`FeatureId`. The
   table is the stream's table for it (``DEEPER_TABLE``) unless ``--table`` names another,
   created if missing, its identity checked (one line, ``IncompatibleFeatures``, if it holds
   other vectors).
3. **Known photos**: the ``image_id`` values of the table and of the photos rejected before, read
   by pyiceberg on the driver and broadcast to the workers as sorted sha256 digests (32 bytes
   each per Python worker; no Spark job).
4. **Featurize in chunks**, one pass over the photos: each chunk (a range of the listing in name
   order) is one ``mapInArrow`` over the executors that reads each photo once, takes its sha256
   (``image_id``) from those bytes, skips it before the model if it is known (in the table,
   rejected before, or written by an earlier chunk of this run), and runs the rest. Of photos
   with the same bytes in one chunk the first name is written and the others counted as
   duplicates (they cost model time once each: rare, and cheaper than reading every photo twice).
   Each chunk is one Iceberg commit (snapshot summary ``deeper.writer=backfill`` and the run's id;
   no Kafka offsets: the stream trusts only its own and compaction's), then its rejects are
   appended to the rejects table. A job killed half way keeps every committed chunk; run again,
   the known ids skip them, so each photo ends in the table exactly once (a chunk is all or
   nothing: one commit).

Rejects go to ``<table>_rejects`` (``source, image_id, reason, detail, rejected_at, run_id``): a
photo is never dropped silently. A photo rejected with an ``image_id`` (it was read: undecodable,
model error) is not retried by later runs (delete its reject row to retry it); an unreadable one
(maybe a transient error) is, and its reject row is written once per (source, reason).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import numpy as np
import pyarrow as pa

from pipeline.config import Settings
from pipeline.errors import DeeperError, IncompatibleFeatures
from pipeline.spark import sources, tasks
from pipeline.spark.session import spark_session
from pipeline.storage import table
from pipeline.identity import FeatureId

WRITER = "backfill"
#: Snapshot summary key naming the run that made a backfill commit.
RUN_KEY = "deeper.backfill.run"
#: Photos per task slot in one chunk (one commit): big enough that a commit's ~1 s and a
#: job's scheduling are small beside the model's time, small enough that a kill loses little.
DEFAULT_PHOTOS_PER_SLOT = 512
REJECTS_SUFFIX = "_rejects"


@dataclass
class BackfillOptions:
    src: str
    table: str | None = None  # namespace.name; default: the stream's table for this identity
    master: str | None = None
    conf: Mapping[str, str] = field(default_factory=dict)
    chunk_size: int | None = None  # photos per commit; default DEFAULT_PHOTOS_PER_SLOT per task slot
    batch_size: int = 32
    model: str = "auto"
    weights: str | None = None
    precision: str | None = None
    layer: str = "prelogits"  # pipeline.learning.training.DEFAULT_LAYER (the CLI passes it)
    labels_from_folders: bool = False
    progress: bool = True


@dataclass
class BackfillSummary:
    listed: int = 0
    featurized: int = 0
    skipped_present: int = 0  # image_id already in the table
    skipped_rejected: int = 0  # rejected by an earlier run (undecodable: the same bytes fail again)
    duplicates: int = 0  # same bytes as another photo of this run
    rejected: Counter = field(default_factory=Counter)  # reason -> photos
    chunks: int = 0
    spark_startup_s: float = 0.0
    elapsed_s: float = 0.0
    table: str = ""
    rejects_table: str = ""
    run_id: str = ""

    def line(self) -> str:
        """The last line of a backfill: counts, time, rate, Spark's start-up apart."""
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items()))
        rate = self.featurized / self.elapsed_s if self.elapsed_s else 0.0
        return (f"backfill {self.table}: featurized {self.featurized}, skipped {self.skipped_present} already "
                f"present + {self.skipped_rejected} rejected before + {self.duplicates} duplicate, rejected "
                f"{rejected}{f' ({reasons})' if reasons else ''}; {self.elapsed_s:.1f} s, {rate:.1f} photos/s, "
                f"Spark start-up {self.spark_startup_s:.1f} s")


def run_backfill(settings: Settings, options: BackfillOptions, say: Callable[[str], None]) -> BackfillSummary:
    started = time.perf_counter()
    summary = BackfillSummary(run_id=uuid.uuid4().hex)
    listing = sources.list_photos(options.src, options.labels_from_folders)
    summary.listed = listing.photos.num_rows
    say(f"listed {summary.listed} photos ({listing.what} {options.src})")
    session = spark_session(settings, options.master, options.conf, app_name=f"deeper backfill {options.src}",
                            announce=say)
    summary.spark_startup_s = session.seconds
    say(f"Spark {session.spark.version} started in {session.seconds:.1f} s "
        f"(master {session.spark.sparkContext.master}, {_slots(session.spark)} task slot(s))")
    local = session.spark.sparkContext.master.startswith("local")  # workers share this machine's cache
    spec = identify(session.spark, tasks.ModelSpec(options.model, options.precision or settings.precision,
                                                   options.layer, options.weights, options.batch_size,
                                                   str(settings.cache_dir) if local else None), say)
    if options.table:  # a fixed table: vectors of another identity are refused, as for DEEPER_TABLE
        settings = replace(settings, table=options.table)
    features = table.open_table(settings, spec.meta, create=True)
    summary.table = ".".join(features.name())
    summary.rejects_table = summary.table + REJECTS_SUFFIX
    open_rejects_table(settings, summary.rejects_table, spec.meta)
    job = _Job(session.spark, settings, session.catalog, summary, spec, options, say)
    try:
        job.run(listing.photos)
    finally:
        summary.elapsed_s = time.perf_counter() - started - summary.spark_startup_s
    return summary


def identify(spark, spec: tasks.ModelSpec, say: Callable[[str], None]) -> tasks.ModelSpec:
    """The network's :class:`FeatureId`, from a job of one task per task slot: each Python worker
    loads the network at the same time (and keeps it for the featurize tasks), so the driver needs
    no TensorFlow and no worker loads it later while the others wait. Every worker must find the
    same identity. A worker's error (no weights, an unknown layer) comes back as its one line,
    not a JVM stack trace."""
    started = time.perf_counter()
    slots = _slots(spark)
    frame = spark.range(slots, numPartitions=slots).mapInArrow(tasks.identify(spec), _spark_schema(tasks.IDENTITY))
    try:
        rows = frame.collect()
    except Exception as exc:  # noqa: BLE001 - a PythonException carrying the worker's traceback
        raise DeeperError(f"the network could not be loaded on a Spark worker: {_worker_error(exc)}") from None
    found = [json.loads(row["identity"]) for row in rows]
    metas = {FeatureId.from_json(f["meta"]) for f in found}
    if len(metas) != 1:
        raise IncompatibleFeatures("Spark workers load different networks: "
                                   + " vs ".join(sorted(m.describe() for m in metas)))
    if found[0]["said"]:
        say(found[0]["said"])
    say(f"network loaded on {slots} Spark worker(s) in {time.perf_counter() - started:.1f} s")
    return spec.resolved(metas.pop())


def _worker_error(exc: BaseException) -> str:
    """The last ``Type: message`` line of a Python worker's traceback inside a Spark error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Unavailable|Features)\b.*:", line)]
    last = found[-1] if found else (lines[-1] if lines else type(exc).__name__)
    return re.sub(r"^[\w.]*\.(\w+):", r"\1:", last)[:500]  # pipeline.errors.DeeperError: -> DeeperError:


def rejects_schema():
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField, StringType, TimestamptzType

    return Schema(NestedField(1, "source", StringType(), required=True),
                  NestedField(2, "image_id", StringType(), required=False),
                  NestedField(3, "reason", StringType(), required=True),
                  NestedField(4, "detail", StringType(), required=False),
                  NestedField(5, "rejected_at", TimestamptzType(), required=True),
                  NestedField(6, "run_id", StringType(), required=True))


def open_rejects_table(settings: Settings, name: str, meta: FeatureId):
    """The rejects table next to the feature table (created if missing; the identity in its
    properties too, since a model error belongs to one network)."""
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

    catalog = table.load_catalog(settings)
    try:
        return catalog.load_table(name)
    except NoSuchTableError:
        try:
            identity = {k.decode(): v.decode() for k, v in meta.to_parquet_metadata().items()}
            return catalog.create_table(name, rejects_schema(), properties=identity)
        except TableAlreadyExistsError:
            return catalog.load_table(name)


def _slots(spark) -> int:
    cpus = int(spark.conf.get("spark.task.cpus", "1") or 1)
    return max(1, spark.sparkContext.defaultParallelism // max(1, cpus))


class _Job:
    """One run's Spark work: featurize chunk by chunk, one pass over the photos (steps 3-4 above)."""

    def __init__(self, spark, settings: Settings, catalog: str, summary: BackfillSummary, spec: tasks.ModelSpec,
                 options: BackfillOptions, say: Callable[[str], None]):
        self.spark, self.summary, self.spec, self.options, self.say = spark, summary, spec, options, say
        self.settings = settings
        self.target = f"{catalog}.{summary.table}"
        self.rejects = f"{catalog}.{summary.rejects_table}"
        self.slots = _slots(spark)
        self.this_run: list[str] = []  # image ids written or rejected by this run's chunks

    def run(self, photos: pa.Table) -> None:
        from tqdm import tqdm

        photos = self._distinct(photos.sort_by("source"))  # chunks in name order: the first name of a photo wins
        sc = self.spark.sparkContext
        present = sc.broadcast(self._known(self.summary.table))
        rejected = sc.broadcast(self._known(self.summary.rejects_table))
        self.say(f"{len(present.value)} photos already in {self.summary.table}, {len(rejected.value)} rejected "
                 f"before: skipped when read, before the model")
        size = self.options.chunk_size or DEFAULT_PHOTOS_PER_SLOT * self.slots
        chunks = max(1, math.ceil(photos.num_rows / size))
        bar = tqdm(total=photos.num_rows, desc=f"backfill ({self.spec.meta.describe()})", unit="img",
                   disable=not self.options.progress, file=_stderr())
        started = time.perf_counter()
        try:
            for start in range(0, photos.num_rows, size):
                this_run = sc.broadcast(tasks.digests(self.this_run))
                try:
                    known = tasks.Known(present, rejected, this_run)
                    bar.update(self._commit_chunk(photos.slice(start, size), known))
                finally:
                    this_run.destroy()
        finally:
            bar.close()
            present.destroy()
            rejected.destroy()
        seconds = time.perf_counter() - started
        rate = self.summary.featurized / seconds if seconds else 0.0
        self.say(f"featurized {self.summary.featurized} photos in {self.summary.chunks} commit(s), {seconds:.1f} s: "
                 f"{rate:.1f} photos/s, {rate / self.slots:.1f} per task slot ({chunks} chunk(s) of up to {size})")

    def _distinct(self, photos: pa.Table) -> pa.Table:
        """The sorted listing without repeated names (a Parquet list may name a photo twice: one
        row, the others counted as duplicates)."""
        sources = photos.column("source").to_numpy(zero_copy_only=False)
        first = np.ones(len(sources), dtype=bool)
        first[1:] = sources[1:] != sources[:-1]
        self.summary.duplicates += int((~first).sum())
        return photos if first.all() else photos.filter(pa.array(first))

    def _known(self, name: str):
        """The digests of the ``image_id`` values of a table (read by pyiceberg on the driver: no
        Spark job), for the workers to skip before the model."""
        found = table.load_catalog(self.settings).load_table(name)
        if found.current_snapshot() is None:  # a new table: nothing to skip
            return tasks.digests([])
        ids = found.scan(selected_fields=("image_id",)).to_arrow().column("image_id")
        return tasks.digests(ids.drop_null().unique().to_pylist())

    def _commit_chunk(self, photos: pa.Table, known: tasks.Known) -> int:
        """Featurize one chunk, commit its rows (one snapshot), then its rejects; photos done.

        One job runs the model and brings every row's name, id and outcome to the driver (not
        the vectors); the write reads the persisted rows. Of photos with the same bytes in the
        chunk the first name is written and the others counted as duplicates."""
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        frame = self.spark.createDataFrame(photos).repartition(self.slots)
        out = (frame.mapInArrow(tasks.featurize_photos(self.spec, known), _spark_schema(tasks.FEATURIZED))
               .persist(StorageLevel.MEMORY_AND_DISK))
        try:
            outcomes = out.select("source", "image_id", "reason", "detail", "skipped").collect()  # runs the model
            written, rejects, duplicates = self._outcomes(outcomes)
            if written:  # the write reads the persisted rows
                keep = out.filter(F.col("reason").isNull() & F.col("skipped").isNull())
                if duplicates:
                    keep = keep.filter(~F.col("source").isin(duplicates))
                writer = keep.select(*tasks.FEATURE_COLUMNS).writeTo(self.target)
                # no offsets carried: the stream reads its offsets from its own (and compact's) snapshots only
                for key, value in {table.WRITER: WRITER, RUN_KEY: self.summary.run_id}.items():
                    writer = writer.option(f"snapshot-property.{key}", value)
                writer.append()
            self._reject([r for r in rejects if r["image_id"] is None], retried=True)
            self._reject([r for r in rejects if r["image_id"] is not None], retried=False)
        finally:
            out.unpersist()
        self.summary.featurized += written
        self.summary.chunks += 1
        return len(outcomes)

    def _outcomes(self, outcomes) -> tuple[int, list[dict], list[str]]:
        """Count a chunk's rows: (photos to write, rejects to write, names of duplicates).
        Of the photos of one ``image_id`` (read, not skipped) the first name wins."""
        first: dict[str, str] = {}
        for row in outcomes:
            if row["skipped"] is None and row["image_id"]:
                first[row["image_id"]] = min(first.get(row["image_id"], row["source"]), row["source"])
        written, rejects, duplicates = 0, [], []
        for row in outcomes:
            image_id = row["image_id"] or None
            if row["skipped"] == tasks.PRESENT:
                self.summary.skipped_present += 1
            elif row["skipped"] == tasks.REJECTED_BEFORE:
                self.summary.skipped_rejected += 1
            elif row["skipped"] == tasks.DUPLICATE or (image_id and first[image_id] != row["source"]):
                self.summary.duplicates += 1
                duplicates.append(row["source"])
            elif row["reason"] is not None:
                rejects.append({"source": row["source"], "image_id": image_id, "reason": row["reason"],
                                "detail": row["detail"]})
            else:
                written += 1
        self.this_run.extend(first)
        return written, rejects, duplicates

    def _reject(self, rejects: list[dict], retried: bool) -> None:
        """Append this run's rejects and count them by reason. Unreadable photos are tried again
        by every run, so theirs are appended once per (source, reason)."""
        import datetime as dt

        for row in rejects:
            self.summary.rejected[row["reason"]] += 1
        if retried and rejects:
            before = table.load_catalog(self.settings).load_table(self.summary.rejects_table)
            if before.current_snapshot() is not None:
                seen = before.scan(selected_fields=("source", "reason")).to_arrow().to_pylist()
                seen_pairs = {(r["source"], r["reason"]) for r in seen}
                rejects = [r for r in rejects if (r["source"], r["reason"]) not in seen_pairs]
        if rejects:
            now = dt.datetime.now(dt.timezone.utc)
            rows = [(r["source"], r["image_id"], r["reason"], r["detail"], now, self.summary.run_id)
                    for r in rejects]
            frame = self.spark.createDataFrame(rows, schema=_rejects_spark_schema())
            frame.writeTo(self.rejects).option(f"snapshot-property.{table.WRITER}", WRITER).append()


def _rejects_spark_schema():
    from pyspark.sql import types as T

    return T.StructType([T.StructField("source", T.StringType(), False), T.StructField("image_id", T.StringType()),
                         T.StructField("reason", T.StringType(), False), T.StructField("detail", T.StringType()),
                         T.StructField("rejected_at", T.TimestampType(), False),
                         T.StructField("run_id", T.StringType(), False)])


def _spark_schema(schema: pa.Schema):
    """The Spark schema of an Arrow schema (nullability kept: Iceberg refuses nullable values
    for its required columns)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def _stderr():
    import sys

    return sys.stderr
