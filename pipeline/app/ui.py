"""``deeper ui``: a local web page on the running stream, with a review-and-retrain loop.

What the page shows comes from the stream itself, kept in bounded memory:

- :class:`StreamWatcher` reads the labels and dead-letter topics without a consumer group
  (it never moves the pipeline's offsets): the last ``recent`` labelled photos, labels per
  second over the last minute (from the records' Kafka timestamps, so a backlog read at start
  does not look like a burst), and dead letters counted by their ``dlq-reason`` header.
- :class:`LagWatcher` asks for the featurizer's and scorer's committed offsets (a consumer
  with the group's id but a manual assignment: it never joins the group nor commits).
- :class:`Thumbnails` fetches a photo's original bytes through its stored row's provenance
  (image id -> ``kafka_topic/partition/offset`` in the feature table or a Parquet part -> one
  assign+seek+poll), decodes it with
  :func:`pipeline.model.decode.decode_image` and keeps small JPEGs in an LRU bounded in bytes.

The review queue orders photos by what most needs a person (:func:`review_order`): unknown ones
first (novel, most novel first; then unconfident), then the rest, least confident first. A
correction may name a class the model does not have yet (a novel photo is often the first of
one); Retrain then learns it. A correction is one ``image_id,label`` row in
a CSV (``deeper train --labels`` reads it), rewritten atomically on every change. "Retrain"
runs what ``deeper train --features TABLE --labels CSV`` runs (the feature table of the current
model's identity, its snapshot recorded and tagged; ``DEEPER_SINK=parquet``: the Parquet parts),
in a background thread, and registers a new current version; the running scorers switch to it
by themselves.

The server is the standard library's threaded ``http.server`` and binds 127.0.0.1 by default.
Its model of the world (docs/security.md): every record it shows may be forged by whoever can
write to the labels, features or dead-letter topics, and every request may come from a page in
the reviewer's browser. So:

- records are validated where they are decoded (:mod:`schemas.messages`); a bad one is counted,
  never shown, and what is shown is rendered by ``ui_page.js`` with DOM setters only, under a
  Content-Security-Policy that runs no inline script and loads nothing from elsewhere;
- ``Host`` is checked on every request (loopback names, plus ``--allow-host`` names when it
  listens beyond loopback, which it refuses to do without one): a DNS-rebinding page is refused;
- state-changing requests must be JSON ``POST``s (a cross-site form cannot send one) with a
  ``Content-Length`` that is present, numeric and at most :data:`MAX_BODY_BYTES`, and JSON no
  deeper than :data:`MAX_JSON_DEPTH`; every malformed request gets an answer (400/411/413),
  never a dropped connection, and a body is never read past its cap;
- corrections are written only for an exact image id and a valid class name, so the CSV
  ``deeper train`` reads has one safe row per correction.
"""

from __future__ import annotations

import argparse
import csv
import io
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from PIL import Image

from pipeline.config import Settings
from pipeline.model.decode import decode_image
from pipeline.errors import DecodeError, DeeperError, SchemaError
from pipeline.kafka.client import TopicPartition, kafka_errors
from pipeline.kafka.kafka_io import consumer_lag, make_consumer, wait_for_broker
from pipeline.kafka.topic_reader import topic_partitions
from pipeline.logs import event
from schemas.messages import decode_label, is_image_id, label_problem, printable, record_header

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_RECENT = 500
PAGE = Path(__file__).with_name("ui_page.html")
#: How much of the state one ``/api/state`` answer carries (the page shows these).
LATEST_SHOWN = 24
REVIEW_SHOWN = 12
DEAD_LETTERS_SHOWN = 10
THROUGHPUT_WINDOW_S = 60
THUMB_SIZE = 160
#: Thumbnails are ~5-10 KB; this keeps a few hundred.
THUMB_CACHE_BYTES = 4 * 1024 * 1024
#: A photo without a thumbnail is looked for again after this long (the page keeps asking).
THUMB_MISS_SECONDS = 5.0
#: Files the page is made of (no inline script or style: see :data:`SECURITY_HEADERS`).
ASSETS = {"/ui.js": ("ui_page.js", "text/javascript; charset=utf-8"),
          "/ui.css": ("ui_page.css", "text/css; charset=utf-8")}
#: On every answer: scripts and styles only from this server's own files (no inline script, so
#: injected markup could not run even if some were rendered), nothing framed, nothing sniffed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: Largest request body read (a correction is ~120 bytes).
MAX_BODY_BYTES = 64 * 1024
#: Deepest JSON nesting accepted (ours is 1; Python's parser recurses and would give up ~1000).
MAX_JSON_DEPTH = 16
#: A dead letter's reason as shown; anything else is counted under one name (a forged dead
#: letter may not grow the page's reason table without bound).
DEAD_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


# --------------------------------------------------------------------------- reading topics
def confidence_of(record: Any) -> float:
    """The label's confidence: the record's calibrated ``confidence`` when it carries one.

    Older records carry only the classifier's decision scores; their softmax ranks photos the
    same way for the review queue (a small margin between the best two classes is a low value),
    though it is not a calibrated probability.
    """
    given = getattr(record, "confidence", None)
    if isinstance(given, (int, float)) and math.isfinite(given):
        return float(given)
    scores = [float(v) for v in (record.scores or {}).values()]
    if not scores:
        return 0.0
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return 1.0 / sum(weights)


@dataclass
class LabelView:
    """One labelled photo as the page shows it."""

    image_id: str
    label: str
    confidence: float
    scores: dict[str, float]
    version: str
    source: str
    name: str
    at_ms: int
    unknown: bool = False
    unknown_reason: str | None = None  # "novel" or "unconfident" when unknown
    novelty: float | None = None  # None: labelled by a model without a novelty summary

    @classmethod
    def from_message(cls, message) -> "LabelView":
        record = decode_label(message.value)  # validated there: a forged field never gets this far
        reason = (record.unknown_reason or "unconfident") if record.unknown else None
        return cls(record.image_id, record.label, round(confidence_of(record), 4), record.scores,
                   record.classifier_version, record.source, Path(record.source).name or record.image_id[:12],
                   int(message.timestamp or 0), record.unknown, reason, record.novelty)


#: Review ranks of :attr:`LabelView.unknown_reason`: novel photos are what the model has never
#: seen (a new class, or a camera gone wrong), unconfident ones sit between two known classes.
_REVIEW_RANK = {"novel": 0, "unconfident": 1}


def review_order(item: Any) -> tuple:
    """Sort key of the review queue: unknown first (novel, the most novel first; then
    unconfident), then every other photo, least confident first. ``item``: a :class:`LabelView`
    or a label record (the demo's review round uses the same order)."""
    confidence = confidence_of(item)
    if getattr(item, "unknown", False):
        rank = _REVIEW_RANK.get(getattr(item, "unknown_reason", None) or "unconfident", 1)
        return (rank, -(getattr(item, "novelty", None) or 0.0) if rank == 0 else confidence)
    return (len(_REVIEW_RANK), confidence)


class _Background:
    """A daemon thread running ``self._run`` until :meth:`stop` (the page's watchers)."""

    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


class StreamWatcher(_Background):
    """Background reader of the labels and dead-letter topics; bounded state, no group.

    Labels start at the last ``recent`` records of each partition; dead letters are read from
    the beginning (only their per-reason counts and the last few are kept).
    """

    def __init__(self, settings: Settings, recent: int = DEFAULT_RECENT, poll_ms: int = 300):
        self.settings = settings
        self.recent = recent
        self.poll_ms = poll_ms
        self._lock = threading.Lock()
        self._labels: OrderedDict[str, LabelView] = OrderedDict()  # image id -> latest, oldest first
        self._per_second: Counter[int] = Counter()  # epoch second -> labels
        self._dead_reasons: Counter[str] = Counter()
        self._dead_recent: list[dict[str, str]] = []
        self._invalid_labels = 0
        self.error: str | None = None
        super().__init__("ui-stream")

    # -- background loop ----------------------------------------------------------------------
    def _run(self) -> None:
        consumer, refreshed = None, 0.0
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = make_consumer(self.settings, None, [], max_poll_records=500,
                                             max_partition_fetch_bytes=4 * 1024 * 1024)
                    refreshed = 0.0
                if time.monotonic() - refreshed > 5:
                    self._reassign(consumer)
                    refreshed = time.monotonic()
                if consumer.assignment():
                    for batch in consumer.poll(timeout_ms=self.poll_ms).values():
                        self._take(batch)
                else:
                    self._stop.wait(self.poll_ms / 1000)
                self.error = None
            except Exception as exc:  # noqa: BLE001 - the page says so; the watcher retries
                self.error = f"reading the stream: {exc}"
                log.warning("ui stream watcher: %s", exc, exc_info=not isinstance(exc, kafka_errors.KafkaError))
                consumer = _close_quietly(consumer)
                self._stop.wait(2)
        _close_quietly(consumer)

    def _reassign(self, consumer) -> None:
        """Follow the topics' partitions (new ones start at their last ``recent`` records)."""
        labels = topic_partitions(consumer, self.settings.labels_topic)
        dead = topic_partitions(consumer, self.settings.dead_letter_topic)
        before = consumer.assignment()
        wanted = labels + dead
        new = [tp for tp in wanted if tp not in before]
        if not new:
            return
        consumer.assign(wanted)
        new_labels = [tp for tp in new if tp.topic == self.settings.labels_topic]
        new_dead = [tp for tp in new if tp.topic == self.settings.dead_letter_topic]
        if new_dead:
            consumer.seek_to_beginning(*new_dead)
        if new_labels:
            # End offsets may be reported low by some brokers; that only makes us read more.
            start, end = consumer.beginning_offsets(new_labels), consumer.end_offsets(new_labels)
            for tp in new_labels:
                consumer.seek(tp, max(start[tp], end[tp] - self.recent))

    def _take(self, batch) -> None:
        for message in batch:
            if message.topic == self.settings.dead_letter_topic:
                self._take_dead_letter(message)
            else:
                self._take_label(message)

    def _take_label(self, message) -> None:
        try:
            view = LabelView.from_message(message)
        except SchemaError:
            with self._lock:
                self._invalid_labels += 1
            return
        with self._lock:
            self._labels.pop(view.image_id, None)
            self._labels[view.image_id] = view
            while len(self._labels) > self.recent:
                self._labels.popitem(last=False)
            second = view.at_ms // 1000
            if second >= time.time() - THROUGHPUT_WINDOW_S:
                self._per_second[second] += 1

    def _take_dead_letter(self, message) -> None:
        """Anyone who can write to the dead-letter topic can forge one: its headers are shown
        as bounded, printable text, and an odd reason is counted as ``(invalid reason)``."""
        item = {name: printable((record_header(message, f"dlq-{name}") or "")[:300]) or "" for name in
                ("reason", "detail", "stage", "source-topic", "source-partition", "source-offset")}
        if not item["reason"]:
            item["reason"] = "(no reason header)"
        elif not DEAD_REASON.fullmatch(item["reason"]):
            item["reason"] = "(invalid reason)"
        with self._lock:
            self._dead_reasons[item["reason"]] += 1
            self._dead_recent = ([item] + self._dead_recent)[:DEAD_LETTERS_SHOWN]

    # -- what the page asks for ---------------------------------------------------------------
    def labels(self) -> list[LabelView]:
        """Retained photos, newest first."""
        with self._lock:
            return list(reversed(self._labels.values()))

    def throughput(self) -> float:
        """Labels per second over the last minute (by record timestamp)."""
        cutoff = int(time.time()) - THROUGHPUT_WINDOW_S
        with self._lock:
            for second in [s for s in self._per_second if s < cutoff]:
                del self._per_second[second]
            return sum(self._per_second.values()) / THROUGHPUT_WINDOW_S

    def dead_letters(self) -> dict[str, Any]:
        with self._lock:
            return {"total": sum(self._dead_reasons.values()), "by_reason": dict(self._dead_reasons.most_common()),
                    "recent": list(self._dead_recent), "invalid_label_records": self._invalid_labels}


def _close_quietly(client) -> None:
    if client is not None:
        try:
            client.close()
        except Exception as exc:  # noqa: BLE001 - closing a client of a dead broker
            log.debug("closing a Kafka client: %s", exc)
    return None


class LagWatcher(_Background):
    """Consumer lag of the featurizer and scorer groups, refreshed every few seconds.

    Each group gets one consumer carrying its group id but manually assigned, so it only reads
    the group's committed offsets: it never joins the group, never commits, never rebalances it.
    """

    def __init__(self, settings: Settings, every_s: float = 5.0):
        self.groups = {"featurizer": (settings.featurizer_group, settings.images_topic),
                       "scorer": (settings.scorer_group, settings.features_topic)}
        self.settings = settings
        self.every_s = every_s
        self._lag: dict[str, dict[str, Any]] = {}
        super().__init__("ui-lag")

    def lag(self) -> dict[str, dict[str, Any]]:
        return dict(self._lag)

    def _run(self) -> None:
        consumers: dict[str, Any] = {}
        while not self._stop.is_set():
            self._lag = {name: self._measure(consumers, name, group, topic)
                         for name, (group, topic) in self.groups.items()}
            self._stop.wait(self.every_s)
        for consumer in consumers.values():
            _close_quietly(consumer)

    def _measure(self, consumers: dict[str, Any], name: str, group: str, topic: str) -> dict[str, Any]:
        out: dict[str, Any] = {"group": group, "topic": topic, "lag": None, "error": None}
        try:
            if name not in consumers:
                consumers[name] = make_consumer(self.settings, group, [])
            consumer = consumers[name]
            partitions = topic_partitions(consumer, topic)
            if partitions:
                consumer.assign(partitions)
                lag = consumer_lag(consumer)
                out["lag"] = None if lag is None else sum(lag.values())
        except Exception as exc:  # noqa: BLE001 - shown on the page, retried next round
            out["error"] = str(exc)
            _close_quietly(consumers.pop(name, None))
        return out


# --------------------------------------------------------------------------- thumbnails
class ThumbnailUnavailable(DeeperError):
    """No thumbnail for this photo (yet): not in Parquet yet, or its message is gone."""


class Thumbnails:
    """Small JPEGs of stream photos, fetched through Parquet provenance, in a byte-bounded LRU.

    A label can arrive before the featurizer's Parquet part holding its row is written (parts
    roll every few seconds), so a miss is not remembered for long: the page asks again.
    """

    def __init__(self, settings: Settings, max_bytes: int = THUMB_CACHE_BYTES, size: int = THUMB_SIZE):
        self.settings = settings
        self.features = settings.features_location()
        self.max_bytes = max_bytes
        self.size = size
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._misses: dict[str, tuple[float, str]] = {}  # image id -> (when, why), briefly
        self._fetch_lock = threading.Lock()  # one Kafka consumer, not thread-safe
        self._consumer = None

    def get(self, image_id: str) -> bytes:
        with self._cache_lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        data = self._make_or_remember_miss(image_id)
        with self._cache_lock:
            if image_id not in self._cache:
                self._cache[image_id] = data
                self._cache_bytes += len(data)
            while self._cache_bytes > self.max_bytes and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._cache_bytes -= len(dropped)
        return data

    def _make_or_remember_miss(self, image_id: str) -> bytes:
        """Make the thumbnail; a recent miss answers at once instead of scanning Parquet again."""
        now = time.monotonic()
        with self._cache_lock:
            self._misses = {k: v for k, v in self._misses.items() if now - v[0] < THUMB_MISS_SECONDS}
            if image_id in self._misses:
                raise ThumbnailUnavailable(self._misses[image_id][1])
        try:
            return self._make(image_id)
        except ThumbnailUnavailable as exc:
            with self._cache_lock:
                self._misses[image_id] = (now, str(exc))
            raise

    def cached(self) -> tuple[int, int]:
        """(thumbnails, bytes) held now."""
        with self._cache_lock:
            return len(self._cache), self._cache_bytes

    def close(self) -> None:
        with self._fetch_lock:
            self._consumer = _close_quietly(self._consumer)

    def _make(self, image_id: str) -> bytes:
        topic, partition, offset = self.provenance(image_id)
        original = self._fetch(image_id, TopicPartition(topic, partition), offset)
        try:
            image = Image.fromarray(decode_image(original).pixels)
        except DecodeError as exc:
            raise ThumbnailUnavailable(f"photo {image_id[:12]} does not decode: {exc}") from None
        image.thumbnail((self.size, self.size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        return buffer.getvalue()

    def provenance(self, image_id: str) -> tuple[str, int, int]:
        """Where the photo's message is: its row in the feature table, or the newest Parquet part
        that has its row, says."""
        if self.settings.sink_kind == "table":
            return self._table_provenance(image_id)
        import pyarrow.parquet as pq

        from pipeline import storage

        try:
            files = storage.list_parquet(self.features)
        except storage.StorageError:  # nothing written yet
            files = []
        columns = ["image_id", "kafka_topic", "kafka_partition", "kafka_offset"]
        for path in sorted(files, key=_mtime, reverse=True):
            try:
                table = pq.read_table(storage.open_input(path), columns=columns,
                                      filters=[("image_id", "==", image_id)])
            except (OSError, ValueError, storage.StorageError) as exc:  # a part being replaced, or one without provenance
                log.debug("skipping %s for provenance: %s", path, exc)
                continue
            for row in table.to_pylist():
                if row["kafka_topic"] is not None and row["kafka_offset"] is not None:
                    return row["kafka_topic"], int(row["kafka_partition"]), int(row["kafka_offset"])
        raise ThumbnailUnavailable(f"photo {image_id[:12]} has no Parquet row with Kafka provenance yet")

    def _table_provenance(self, image_id: str) -> tuple[str, int, int]:
        from pipeline.storage import table as tables
        from pipeline.storage.table_reader import kafka_position

        try:
            name = tables.newest_table(self.settings)
            found = kafka_position(tables.load_named(self.settings, name), image_id) if name else None
        except DeeperError as exc:
            raise ThumbnailUnavailable(f"photo {image_id[:12]}: the feature table cannot be read ({exc})") from None
        if found is None:
            raise ThumbnailUnavailable(f"photo {image_id[:12]} has no row with Kafka provenance in the table yet")
        return found

    def _fetch(self, image_id: str, tp: TopicPartition, offset: int, timeout_s: float = 10.0) -> bytes:
        """The one original message, by assign + seek + poll; its key must be the image id."""
        with self._fetch_lock:
            if self._consumer is None:
                fetch_bytes = max(1024 * 1024, int(self.settings.max_message_bytes) + 64 * 1024)
                self._consumer = make_consumer(self.settings, None, [], max_poll_records=1,
                                               max_partition_fetch_bytes=fetch_bytes)
            consumer = self._consumer
            consumer.assign([tp])
            consumer.seek(tp, offset)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for message in consumer.poll(timeout_ms=500).get(tp, []):
                    if message.offset != offset:
                        raise ThumbnailUnavailable(f"{tp.topic}/{tp.partition}@{offset} is gone (retention?)")
                    if (message.key or b"").decode("utf-8", "replace") != image_id:
                        raise ThumbnailUnavailable(f"{tp.topic}/{tp.partition}@{offset} is another photo")
                    if not message.value:
                        raise ThumbnailUnavailable(f"{tp.topic}/{tp.partition}@{offset} carries no bytes "
                                                   "(a claim check: the ui does not fetch references)")
                    return message.value
        raise ThumbnailUnavailable(f"{tp.topic}/{tp.partition}@{offset} did not arrive within {timeout_s:.0f} s")


def _mtime(path: Any) -> float:
    """Newest first where the file system says (local parts); object storage keeps name order."""
    try:
        return Path(path).stat().st_mtime if not str(path).startswith("s3://") else 0.0
    except OSError:
        return 0.0


# --------------------------------------------------------------------------- corrections, retraining
class Corrections:
    """``image_id,label`` rows a reviewer chose, in the CSV ``deeper train --labels`` reads.

    Every change rewrites the whole file through a temporary file, fsync and rename, so a crash
    leaves the previous version or the new one, never half a file.
    """

    def __init__(self, path: str | Path):
        from pipeline.learning.training import labels_from_csv

        self.path = Path(path)
        self._lock = threading.Lock()
        self._table: dict[str, str] = labels_from_csv(self.path) if self.path.is_file() else {}

    def set(self, image_id: str, label: str) -> int:
        """Record one correction (the latest for a photo wins); return how many there are."""
        with self._lock:
            self._table[image_id] = label
            self._write()
            return len(self._table)

    def table(self) -> dict[str, str]:
        with self._lock:
            return dict(self._table)

    def _write(self) -> None:
        from pipeline.storage import write_bytes_atomic

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image_id", "label"])
        writer.writerows(sorted(self._table.items()))
        write_bytes_atomic(self.path, buffer.getvalue().encode("utf-8"))


@dataclass
class RetrainStatus:
    state: str = "idle"  # idle, running, done, failed
    step: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    version: str | None = None
    cv_accuracy: float | None = None
    n_train: int | None = None
    classes: list[str] | None = None
    error: str | None = None
    left_out_line: str = ""  # classes this training left out, and why


class Retrainer:
    """Runs ``deeper train --features TABLE --labels CORRECTIONS`` in a background thread."""

    def __init__(self, settings: Settings, corrections: Corrections):
        self.settings = settings
        self.corrections = corrections
        self._status = RetrainStatus()
        self._lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self._status)

    def start(self) -> bool:
        """Start a run; False when one is already running."""
        with self._lock:
            if self._status.state == "running":
                return False
            self._status = RetrainStatus("running", "starting", started_at=time.time())
        threading.Thread(target=self._run, name="ui-retrain", daemon=True).start()
        return True

    def _step(self, step: str) -> None:
        with self._lock:
            self._status.step = step

    def _run(self) -> None:
        try:
            outcome = self._train()
        except Exception as exc:  # noqa: BLE001 - the page shows why; unexpected ones are logged
            if not isinstance(exc, DeeperError):
                log.exception("retraining failed")
            with self._lock:
                self._status.state, self._status.error = "failed", str(exc)
                self._status.finished_at = time.time()
            return
        with self._lock:
            s = self._status
            s.state, s.step, s.finished_at = "done", "registered", time.time()
            s.version, s.cv_accuracy, s.n_train = outcome.version, outcome.cv.accuracy, outcome.n_images
            s.classes, s.left_out_line = list(outcome.classes), outcome.left_out_line()
        event(log, "retrained from the ui", version=outcome.version, n_train=outcome.n_images,
              cv_accuracy=outcome.cv.accuracy)

    def _train(self):
        from pipeline.storage.parquet_reader import read_features
        from pipeline.learning.registry import Registry
        from pipeline.learning.training import DEFAULT_SPEC, apply_labels, train_and_register

        registry = Registry(self.settings.registry_dir)
        if self.settings.sink_kind == "table":
            return self._train_from_table(registry)
        self._step("reading features")
        fs = read_features([self.settings.features_location()])
        labels = apply_labels(fs.image_ids, fs.sources, fs.labels, self.corrections.table())
        self._step(f"cross-validating and fitting on {sum(1 for x in labels if x)} labelled photos")
        provenance = {"source": "parquet", "paths": [self.settings.features_location()], "rows": len(fs)}
        return train_and_register(fs.image_ids, labels, fs.vectors, fs.meta, DEFAULT_SPEC, registry,
                                  unknown_label=self.settings.unknown_label, provenance=provenance)

    def _train_from_table(self, registry):
        """The table of the current model's identity (the newest table without a model), current snapshot."""
        from pipeline.errors import RegistryError
        from pipeline.learning.from_table import train_from_table
        from pipeline.storage import table as tables

        try:
            name = tables.table_name(self.settings, registry.load_current().feature_meta)
        except RegistryError:
            name = tables.newest_table(self.settings)
        if name is None:
            raise DeeperError(f"no feature table in {tables.describe_catalog(self.settings)} yet")
        self._step(f"reading table {name} and fitting")
        outcome, _ = train_from_table(self.settings, registry, name, labels=self.corrections.table())
        return outcome


# --------------------------------------------------------------------------- the app
class UiApp:
    """Everything the HTTP handler needs; built once per server."""

    def __init__(self, settings: Settings, recent: int = DEFAULT_RECENT, corrections_path: str | Path | None = None):
        from pipeline.learning.registry import Registry

        self.settings = settings
        self.registry = Registry(settings.registry_dir)
        self.stream = StreamWatcher(settings, recent)
        self.lag = LagWatcher(settings)
        self.thumbnails = Thumbnails(settings)
        self.corrections = Corrections(corrections_path or Path(settings.data_dir) / "corrections.csv")
        self.retrainer = Retrainer(settings, self.corrections)
        self._model_cache: tuple[str, dict[str, Any]] | None = None

    def start(self) -> "UiApp":
        self.stream.start()
        self.lag.start()
        return self

    def close(self) -> None:
        self.stream.stop()
        self.lag.stop()
        self.thumbnails.close()

    def model(self) -> dict[str, Any]:
        """The current model's summary (re-read only when ``current`` moves)."""
        try:
            version = self.registry.current_version()
            if version is None:
                return {"version": None, "error": f"no current model in {self.registry.root}"}
            if self._model_cache is None or self._model_cache[0] != version:
                m = self.registry.load(version).metadata
                cv, features = m.get("cv") or {}, m.get("features") or {}
                self._model_cache = (version, {
                    "version": version, "classes": m.get("classes", []), "backbone": features.get("backbone"),
                    "layer": features.get("layer"), "classifier": (m.get("classifier") or {}).get("kind"),
                    "cv_accuracy": cv.get("accuracy"), "cv_method": cv.get("method"),
                    "n_train": m.get("n_train"), "created_at": m.get("created_at")})
            return self._model_cache[1]
        except DeeperError as exc:
            return {"version": None, "error": str(exc)}

    def state(self) -> dict[str, Any]:
        labels = self.stream.labels()
        corrected = self.corrections.table()
        review = sorted((v for v in labels if v.image_id not in corrected), key=review_order)
        thumbs, thumb_bytes = self.thumbnails.cached()
        return {
            "model": self.model(),
            "latest": [asdict(v) for v in labels[:LATEST_SHOWN]],
            "review": [asdict(v) for v in review[:REVIEW_SHOWN]],
            "class_counts": dict(Counter(v.label for v in labels).most_common()),
            "retained": len(labels),
            "throughput_per_s": round(self.stream.throughput(), 3),
            "lag": self.lag.lag(),
            "dead_letters": self.stream.dead_letters(),
            "corrections": {"count": len(corrected), "path": str(self.corrections.path),
                            "recent": [{"image_id": k, "label": v} for k, v in list(corrected.items())[-10:]]},
            "retrain": self.retrainer.status(),
            "thumbnails": {"cached": thumbs, "bytes": thumb_bytes},
            "stream_error": self.stream.error,
            "topics": {"labels": self.settings.labels_topic, "dead_letters": self.settings.dead_letter_topic},
        }

    def correct(self, body: dict[str, Any]) -> dict[str, Any]:
        image_id, label = body.get("image_id"), body.get("label")
        if not is_image_id(image_id):
            raise BadRequest("image_id must be a photo's sha256 (exactly 64 lowercase hex digits)")
        problem = label_problem(label.strip()) if isinstance(label, str) else "not a string"
        if problem:
            raise BadRequest(f"label must be a class name: {problem}")
        if label.strip() == self.settings.unknown_label:
            raise BadRequest(f"{self.settings.unknown_label!r} is what the scorer says when no class fits; pick a class")
        count = self.corrections.set(image_id, label.strip())
        return {"image_id": image_id, "label": label.strip(), "count": count}


class BadRequest(DeeperError):
    """The request is malformed; the answer says how."""


# --------------------------------------------------------------------------- HTTP
class HttpError(DeeperError):
    """A request this server answers with ``status`` and a one-line reason."""

    def __init__(self, status: HTTPStatus, message: str):
        self.status = status
        super().__init__(message)


def json_depth(text: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text, brackets inside strings not counted.

    Measured before parsing, because Python's parser recurses: a 64 KiB body of ``[`` raised
    RecursionError, which dropped the connection without an answer.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


class Handler(BaseHTTPRequestHandler):
    server: "UiServer"
    server_version = "deeper-ui"
    #: Seconds a client may take to send its request (a slow one holds a thread only this long).
    timeout = 30

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _answer(self, route: Callable[[], None]) -> None:
        """Every request gets an answer: a refusal is its status, anything else a 500."""
        try:
            self._check_host()
            route()
        except HttpError as exc:
            self._json(exc.status, {"error": str(exc)})
        except BadRequest as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception:  # noqa: BLE001 - logged here; the client gets a 500, not a dropped connection
            log.exception("ui request %s %s failed", self.command, self.path[:200])
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (see the ui's log)"})

    def _get(self) -> None:
        path = urlsplit(self.path).path
        if path == "/":
            self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path in ASSETS:
            name, content_type = ASSETS[path]
            self._send(HTTPStatus.OK, PAGE.with_name(name).read_bytes(), content_type)
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self.server.app.state())
        elif path == "/api/retrain":
            self._json(HTTPStatus.OK, self.server.app.retrainer.status())
        elif path.startswith("/api/thumb/"):
            self._thumbnail(path.removeprefix("/api/thumb/").removesuffix(".jpg"))
        else:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such page")

    def _post(self) -> None:
        path = urlsplit(self.path).path
        actions: dict[str, Callable[[dict[str, Any]], tuple[HTTPStatus, dict[str, Any]]]] = {
            "/api/corrections": lambda body: (HTTPStatus.OK, self.server.app.correct(body)),
            "/api/retrain": self._retrain,
        }
        if path not in actions:
            self.close_connection = True  # its body, if any, is not read
            raise HttpError(HTTPStatus.NOT_FOUND, "no such action")
        status, answer = actions[path](self._body())
        self._json(status, answer)

    def _retrain(self, _body: dict[str, Any]) -> tuple[HTTPStatus, dict[str, Any]]:
        started = self.server.app.retrainer.start()
        return (HTTPStatus.ACCEPTED if started else HTTPStatus.CONFLICT), self.server.app.retrainer.status()

    def _body(self) -> dict[str, Any]:
        """The JSON object sent; only ``application/json`` (cross-site forms cannot send it).

        The length is checked before a byte of the body is read: missing (or chunked) is 411,
        not a single non-negative number is 400, over :data:`MAX_BODY_BYTES` is 413. A refused
        body is never read, so the connection is closed after the answer.
        """
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        text = lengths[0].strip()
        if len(lengths) > 1 or not text.isascii() or not text.isdigit():
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length must be one non-negative number")
        length = int(text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY_BYTES} bytes")
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, "the body ended before its Content-Length")
        if self.headers.get_content_type() != "application/json":
            raise BadRequest("send application/json")
        if json_depth(data) > MAX_JSON_DEPTH:
            raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            body = json.loads(data or b"{}")
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("send a JSON object")
        return body

    def _thumbnail(self, image_id: str) -> None:
        if not is_image_id(image_id):
            raise BadRequest("not an image id")
        try:
            data = self.server.app.thumbnails.get(image_id)
        except ThumbnailUnavailable as exc:
            raise HttpError(HTTPStatus.NOT_FOUND, str(exc)) from None
        except kafka_errors.KafkaError as exc:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, f"Kafka: {exc}") from None
        # Content-addressed (the id is the photo's sha256): the same URL never changes.
        self._send(HTTPStatus.OK, data, "image/jpeg", cache="max-age=86400, immutable")

    def _check_host(self) -> None:
        """Only the names this server is reached by: a DNS-rebinding page (its own name, our
        address) is refused, whatever address the server listens on."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.allowed_hosts:
            self.close_connection = True
            raise HttpError(HTTPStatus.FORBIDDEN, "unexpected Host header (see deeper ui --allow-host)")

    def _json(self, status: HTTPStatus, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        """Every answer, http.server's own error pages included, carries the security headers."""
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("ui %s - %s", self.address_string(), format % args)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_hosts: Sequence[str]) -> None:
    """Beyond loopback only with the names the page will be reached by (``--allow-host``)."""
    if not is_loopback(host) and not [h for h in allow_hosts if h.strip()]:
        raise DeeperError(f"deeper ui listens beyond this machine on {host} only with --allow-host NAME "
                          "(the names the page will be reached by; requests for any other Host are refused)")


class UiServer(ThreadingHTTPServer):
    """The page's HTTP server; ``port=0`` picks a free one (tests).

    ``allow_hosts``: names (and addresses) the page may be reached by beyond the loopback
    ones; needed, and refused without, when ``host`` is not a loopback address.
    """

    daemon_threads = True

    def __init__(self, app: UiApp, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 allow_hosts: Sequence[str] = ()):
        check_bind(host, allow_hosts)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.app = app
        bound = self.server_address[1]
        names = [*LOOPBACK_HOSTS, *(h.strip().lower() for h in allow_hosts if h.strip())]
        self.allowed_hosts = set()
        for name in names:
            shown = f"[{name}]" if ":" in name else name
            self.allowed_hosts |= {f"{shown}:{bound}", *([shown] if bound == 80 else [])}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve_in_thread(app: UiApp, host: str = "127.0.0.1", port: int = 0, allow_hosts: Sequence[str] = ()) -> UiServer:
    """Start the app and its server in background threads (tests, embedding)."""
    server = UiServer(app.start(), host, port, allow_hosts)
    threading.Thread(target=server.serve_forever, name="ui-http", daemon=True).start()
    return server


# --------------------------------------------------------------------------- CLI
def cmd_ui(args: argparse.Namespace) -> int:
    check_bind(args.host, args.allow_host)  # before waiting for the broker: a wrong command line fails at once
    settings = Settings.from_env(registry_dir=args.registry)
    wait_for_broker(settings, timeout=args.wait)
    app = UiApp(settings, args.recent, args.corrections)
    try:
        server = UiServer(app, args.host, args.port, args.allow_host)
    except OSError as exc:
        raise DeeperError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    if not is_loopback(args.host):
        log.warning("deeper ui listens on %s for %s: anyone who can reach it can add corrections and retrain "
                    "(there is no login)", args.host, ", ".join(args.allow_host))
    app.start()
    print(f"deeper ui: {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.close()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="local web page: latest labels, lag, dead letters, review and retrain")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "any other address needs --allow-host)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a name (or address) the page is reached by, besides the loopback ones; repeat for more. "
                        "Requests carrying any other Host header are refused (DNS rebinding)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--recent", type=int, default=DEFAULT_RECENT, help="labelled photos kept in memory (default 500)")
    p.add_argument("--corrections", default=None,
                   help="corrections CSV (default $DEEPER_DATA_DIR/corrections.csv; `deeper train --labels` reads it)")
    p.add_argument("--registry", help="model registry directory (default $DEEPER_REGISTRY)")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the broker")
    p.set_defaults(func=cmd_ui)
