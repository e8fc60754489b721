"""A reusable fault-injection harness for the streaming pipeline (real everything, no mocks).

What it puts together:

* :func:`synthetic_photos`: N distinct small JPEGs drawn in code (random shapes + noise, one
  seed each), so distinct bytes give distinct sha256 image ids;
* :class:`LocalBroker`: a durable local Tansu broker (S3 through ``localbucket`` on disk) that
  can be restarted cleanly or crashed (SIGKILL) and restarted, keeping its data;
  its S3 is :mod:`pipeline.local_s3` (localbucket plus ``If-Match``: without it Tansu hands out
  offsets twice after a restart, docs/faults.md); :class:`ConditionalS3` can switch that off;
* :class:`WorkerProcess`: ``python -m pipeline.cli featurizer|scorer`` as a real subprocess
  that can be SIGKILLed and started again; each incarnation logs JSON to its own file, which is
  how recovery times are measured (kill -> next ``partitions assigned`` -> next ``batch``);
* :class:`Feeder`: a producer thread using the project's :class:`producers.produce.ImageProducer`
  the way an application would: send, ``flush()``, read ``summary.failed`` and re-send exactly
  the photos that failed (and build a new producer if one stays broken);
* :class:`Pipeline`: fresh topics, consumer groups, data dir and registry for one scenario,
  the two workers, a classifier trained from the stream's own Parquet, and :meth:`Pipeline.verify`,
  which reads everything back (Parquet through ``pipeline.parquet_reader`` and raw with pyarrow,
  the labels and dead-letter topics) and counts duplicates and missing ids;
* three scenarios (:func:`featurizer_crashes`, :func:`scorer_crashes`, :func:`broker_restarts`),
  :func:`run_scenario` (a fresh durable broker per scenario), and :func:`summarize` /
  :func:`format_summary` for the summary.

Why fresh group ids per scenario: Tansu 0.6 stops answering joins on a group that emptied after
having two members (docs/broker.md), and a killed member stays in its group until its 6 s
session timeout, so a replacement started at once briefly shares the group with the corpse.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from pipeline import local_s3

REPO = Path(__file__).resolve().parents[2]

#: Arguments every featurizer incarnation runs with: EfficientNet-Lite0, a part file every 2 s.
FEATURIZER_ARGS = ["--model", "efficientnet_lite0", "--layer", "prelogits", "--roll-seconds", "2",
                   "--batch-size", "16", "--partitions", "4"]
SCORER_ARGS = ["--wait-for-model", "300", "--partitions", "4"]


def durable_broker_available() -> str | None:
    """None if a durable local broker can run here, else the reason it cannot."""
    import importlib.util

    from pipeline import broker

    try:
        broker.tansu_binary()
    except broker.BrokerError as exc:
        return str(exc)
    if importlib.util.find_spec(broker.LOCALBUCKET_PACKAGE) is None:
        return f"durable mode needs localbucket (pip install {broker.LOCALBUCKET_PIP})"
    return None


# --------------------------------------------------------------------------- photos


@dataclass(frozen=True)
class Photo:
    image_id: str
    source: str
    label: str
    data: bytes


def synthetic_photo(seed: int, index: int, size: int = 96) -> tuple[bytes, str]:
    """One JPEG: random background, 2-5 random ellipses ("round") or boxes ("boxy"), noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    label = "round" if index % 2 == 0 else "boxy"
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
        w, h = (int(v) for v in rng.integers(12, size // 2, 2))
        box = [x0, y0, min(size - 1, x0 + w), min(size - 1, y0 + h)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if label == "round" else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(image, np.float32) + rng.normal(0.0, 10.0, (size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue(), label


def synthetic_photos(n: int, seed: int = 0, size: int = 96, prefix: str = "synthetic") -> list[Photo]:
    """``n`` distinct photos (distinct bytes, so distinct sha256 ids), reproducible from ``seed``."""
    photos, seen = [], set()
    for i in range(n):
        data, label = synthetic_photo(seed, i, size)
        image_id = hashlib.sha256(data).hexdigest()
        if image_id in seen:  # would need two identical noise fields: never seen, but checked
            raise AssertionError(f"synthetic photo {i} (seed {seed}) repeats an earlier one")
        seen.add(image_id)
        photos.append(Photo(image_id, f"{prefix}/{seed}/{i:05d}-{label}.jpg", label, data))
    return photos


# --------------------------------------------------------------------------- broker


class LocalBroker:
    """A local Tansu broker in durable mode: data (records, topics, offsets) survive restarts."""

    def __init__(self, state_dir: Path, durable: bool = True):
        self.state_dir = Path(state_dir)
        self.durable = durable
        self.info = None
        self.restarts: list[dict[str, Any]] = []

    def start(self) -> "LocalBroker":
        from pipeline import broker

        self.info = broker.start(self.state_dir, port=broker.free_port(), durable=self.durable)
        return self

    @property
    def bootstrap_servers(self) -> str:
        assert self.info is not None, "broker not started"
        return self.info.bootstrap_servers

    def restart(self, crash: bool = False) -> dict[str, Any]:
        """Stop (SIGTERM, or SIGKILL when ``crash``) and start again on the same port."""
        from pipeline import broker

        down = time.time()
        self.info = broker.restart(self.state_dir, grace_s=0 if crash else 10.0)
        record = {"kind": "broker_crash" if crash else "broker_restart", "at": down,
                  "broker_back_s": round(time.time() - down, 3)}
        self.restarts.append(record)
        return record

    def stop(self) -> None:
        from pipeline import broker

        broker.stop(self.state_dir, grace_s=5.0)


# --------------------------------------------------------------------------- S3 conditional writes

class ConditionalS3:
    """``enabled=False`` runs durable brokers on localbucket as shipped, to reproduce the loss.

    :mod:`pipeline.broker` serves durable storage through :mod:`pipeline.local_s3` (localbucket
    plus ``If-Match``); this context manager switches that off for one scenario and back.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._saved: bool | None = None

    def __enter__(self) -> "ConditionalS3":
        from pipeline import broker

        self._saved, broker.CONDITIONAL_S3 = broker.CONDITIONAL_S3, self.enabled
        return self

    def __exit__(self, *exc) -> None:
        from pipeline import broker

        if self._saved is not None:
            broker.CONDITIONAL_S3 = self._saved
            self._saved = None


def broker_log_findings(state_dir: Path) -> dict[str, int]:
    """Count the broker-side symptoms in the logs: refused stale writes, offsets taken twice."""
    state_dir = Path(state_dir)

    def count(name: str, needle: str) -> int:
        try:
            return (state_dir / name).read_text(errors="replace").count(needle)
        except OSError:
            return 0

    return {"s3_if_match_refused": count("localbucket.log", local_s3.IF_MATCH_REFUSED),
            "tansu_batch_already_exists": count("tansu.log", "AlreadyExists")}


# --------------------------------------------------------------------------- worker processes


def _log_time(entry: dict[str, Any]) -> float | None:
    try:
        return dt.datetime.fromisoformat(entry["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class Incarnation:
    """One run of a worker process, from start to its kill or stop."""

    role: str
    index: int
    process: subprocess.Popen
    log_path: Path
    started_at: float
    ended_at: float | None = None
    killed: bool = False
    returncode: int | None = None

    def events(self) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                entry["_t"] = _log_time(entry)
                out.append(entry)
        return out

    def first(self, event: str, after: float = 0.0) -> float | None:
        """Time of the first ``event`` in this incarnation's log at or after ``after``."""
        for entry in self.events():
            if entry.get("event") == event and entry["_t"] is not None and entry["_t"] >= after:
                return entry["_t"]
        return None

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, event: str, timeout: float, after: float = 0.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.first(event, after)
            if t is not None:
                return t
            if not self.alive():
                return None
            time.sleep(0.1)
        return None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class WorkerProcess:
    """``python -m pipeline.cli ROLE ...`` as a real subprocess, restartable after a kill."""

    def __init__(self, role: str, env: dict[str, str], log_dir: Path, args: Sequence[str]):
        self.role = role
        self.env = env
        self.log_dir = Path(log_dir)
        self.args = list(args)
        self.incarnations: list[Incarnation] = []
        self.unexpected_exits: list[dict[str, Any]] = []

    @property
    def current(self) -> Incarnation:
        return self.incarnations[-1]

    def start(self) -> Incarnation:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        index = len(self.incarnations)
        log_path = self.log_dir / f"{self.role}-{index:02d}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", self.role, *self.args],
                                       stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=self.env, cwd=REPO)
        incarnation = Incarnation(self.role, index, process, log_path, time.time())
        self.incarnations.append(incarnation)
        return incarnation

    def kill(self) -> float:
        """SIGKILL the current incarnation (no shutdown code runs); return the kill time."""
        inc = self.current
        at = time.time()
        inc.process.send_signal(signal.SIGKILL)
        inc.returncode = inc.process.wait(30)
        inc.ended_at, inc.killed = at, True
        return at

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM: the worker checkpoints and leaves its group; return the exit status."""
        inc = self.current
        if inc.alive():
            inc.process.send_signal(signal.SIGTERM)
            try:
                inc.returncode = inc.process.wait(timeout)
            except subprocess.TimeoutExpired:
                inc.process.kill()
                inc.returncode = inc.process.wait(30)
                self.unexpected_exits.append({"index": inc.index, "why": f"ignored SIGTERM for {timeout:.0f} s"})
        else:
            inc.returncode = inc.process.returncode
        inc.ended_at = time.time()
        return int(inc.returncode)

    def ensure_running(self) -> bool:
        """Restart the worker if it died on its own (as a supervisor would); True if it had to."""
        inc = self.current
        if inc.alive():
            return False
        inc.returncode, inc.ended_at = inc.process.returncode, time.time()
        self.unexpected_exits.append({"index": inc.index, "returncode": inc.returncode, "log_tail": inc.tail()})
        self.start()
        return True

    def close(self) -> None:
        """Kill whatever still runs (cleanup after a failed scenario)."""
        for inc in self.incarnations:
            if inc.alive():
                inc.process.kill()
                inc.process.wait(30)


# --------------------------------------------------------------------------- producing


class Feeder(threading.Thread):
    """Produces photos through :class:`ImageProducer` and re-sends exactly the ones that failed.

    ``release(n)`` allows the first ``n`` photos to go out (at most ``rate`` per second, in
    chunks of ``chunk``); after every chunk it flushes and reads ``summary.failed``, which names
    the failed photos by source, and queues those again. If several chunks in a row fail
    entirely, the producer is closed and a new one is built (a fatal producer error never heals).
    """

    def __init__(self, settings, photos: Sequence[Photo], rate: float = 60.0, chunk: int = 8):
        super().__init__(daemon=True, name="feeder")
        self.settings = settings
        self.photos = list(photos)
        self.by_source = {p.source: p for p in self.photos}
        self.rate = rate
        self.chunk = chunk
        self._allowed = 0
        self._cond = threading.Condition()
        self.acked: dict[str, float] = {}  # image id -> time of its (last) acknowledgement
        self.failures: list[dict[str, Any]] = []  # one per failed send: source, reason, time
        self.resent = 0
        self.producers_built = 0
        self.send_errors = 0
        self.accounting_mismatches = 0
        self.error: BaseException | None = None

    def release(self, n: int | None = None) -> None:
        with self._cond:
            self._allowed = len(self.photos) if n is None else min(len(self.photos), max(self._allowed, n))
            self._cond.notify_all()

    def finish(self, timeout: float = 600.0) -> None:
        """Release everything and wait until every photo has been acknowledged."""
        self.release()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"producer did not finish within {timeout:.0f} s: "
                                 f"{len(self.acked)}/{len(self.photos)} acknowledged")
        if self.error:
            raise self.error

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by finish()
            self.error = exc

    def _new_producer(self):
        from producers.produce import ImageProducer

        self.producers_built += 1
        return ImageProducer(self.settings)

    def _run(self) -> None:
        from kafka.errors import KafkaError

        producer = self._new_producer()
        todo: deque[Photo] = deque()
        next_index = 0
        started = time.monotonic()
        sent_total = 0
        all_failed_streak = 0
        try:
            while len(self.acked) < len(self.photos):
                with self._cond:
                    while not todo and next_index >= self._allowed:
                        self._cond.wait(0.5)
                    while next_index < self._allowed and len(todo) < self.chunk:
                        todo.append(self.photos[next_index])
                        next_index += 1
                batch = [todo.popleft() for _ in range(min(self.chunk, len(todo)))]
                if not batch:
                    continue
                failed_now: dict[str, str] = {}
                sent_before = producer.summary.sent
                for photo in batch:
                    try:
                        producer.send(photo.data, photo.source, photo.label)
                    except KafkaError as exc:  # e.g. metadata not available within max_block_ms
                        self.send_errors += 1
                        failed_now[photo.source] = f"send raised {exc!r}"
                self._flush(producer)
                failed_now.update({s: r for s, r in producer.summary.failed.items() if s in self.by_source})
                producer.summary.failed.clear()  # handled here: re-sent below
                if producer.summary.sent - sent_before + len(failed_now) != len(batch):
                    self.accounting_mismatches += 1  # the summary lost track of a photo
                now = time.time()
                for photo in batch:
                    if photo.source in failed_now:
                        self.failures.append({"source": photo.source, "reason": failed_now[photo.source][:200],
                                              "at": now})
                        todo.append(photo)
                        self.resent += 1
                    else:
                        self.acked[photo.image_id] = now
                all_failed_streak = all_failed_streak + 1 if len(failed_now) == len(batch) else 0
                if all_failed_streak >= 3:
                    producer.close()
                    producer = self._new_producer()
                    all_failed_streak = 0
                if failed_now:
                    time.sleep(0.5)  # the broker is probably away; don't spin
                sent_total += len(batch)
                ahead = sent_total / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            producer.close()

    @staticmethod
    def _flush(producer) -> None:
        """Flush until every future is done (a flush timeout only means "not yet")."""
        from kafka.errors import KafkaTimeoutError

        deadline = time.monotonic() + 300
        while True:
            try:
                producer.flush(timeout=30)
                return
            except KafkaTimeoutError:
                if time.monotonic() > deadline:
                    raise


# --------------------------------------------------------------------------- reading back


def read_records(settings, topic: str, until: Callable[[list[Any]], bool] | None = None,
                 timeout: float = 120.0, quiet_s: float = 4.0, tick: Callable[[], Any] | None = None
                 ) -> list[Any]:
    """Every record of ``topic`` from the beginning (assign, no group).

    Stops when ``until(records)`` holds, or when nothing new arrived for ``quiet_s`` seconds
    after ``until`` held or when there is no ``until``, or at ``timeout``. End offsets are not
    used: Tansu under-reports them (docs/broker.md). ``tick`` is called between polls.
    """
    from kafka import TopicPartition

    from pipeline.kafka_io import make_consumer

    consumer = make_consumer(settings, None, [])
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        while not partitions and time.monotonic() < deadline:
            found = consumer.partitions_for_topic(topic)
            partitions = [TopicPartition(topic, p) for p in sorted(found)] if found else None
            if not partitions:
                time.sleep(0.2)
        if not partitions:
            return []
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            if tick is not None:
                tick()
            got = [r for part in consumer.poll(timeout_ms=300).values() for r in part]
            if got:
                records.extend(got)
                last_new = time.monotonic()
            satisfied = until is None or until(records)
            if until is not None and satisfied:
                return records
            if until is None and time.monotonic() - last_new > quiet_s:
                return records
        return records
    finally:
        consumer.close()


def parquet_state(features_root: Path) -> dict[str, Any]:
    """What is on disk: finished part files (raw rows, ids), temp files, unreadable parts."""
    import pyarrow.parquet as pq

    from pipeline.parquet_reader import feature_files
    from pipeline.parquet_writer import TEMP_PREFIX

    root = Path(features_root)
    everything = sorted(root.rglob("*")) if root.exists() else []
    temps = [p for p in everything if p.is_file() and p.name.startswith(TEMP_PREFIX)]
    parts = feature_files([root]) if root.exists() else []
    ids: list[str] = []
    broken = []
    for part in parts:
        try:
            table = pq.read_table(part, columns=["image_id"])  # reads every row group: whole file
            if table.num_rows != pq.ParquetFile(part).metadata.num_rows:
                broken.append(str(part))
            ids.extend(table.column("image_id").to_pylist())
        except Exception as exc:  # noqa: BLE001 - a half-written part file would land here
            broken.append(f"{part}: {exc!r}")
    return {"parts": parts, "temps": temps, "raw_ids": ids, "broken": broken,
            "temps_listed_by_reader": [str(p) for p in parts if p.name.startswith(TEMP_PREFIX)]}


class TempWatcher(threading.Thread):
    """Scans the features directory while faults happen: how many temp files ever appeared."""

    def __init__(self, root: Path, every_s: float = 0.25):
        super().__init__(daemon=True, name="temp-watcher")
        self.root = Path(root)
        self.every_s = every_s
        self.seen: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        from pipeline.parquet_writer import TEMP_PREFIX

        while not self._halt.is_set():
            if self.root.exists():
                try:
                    self.seen.update(str(p) for p in self.root.rglob(f"{TEMP_PREFIX}*"))
                except OSError:
                    pass  # a temp file renamed while walking
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# --------------------------------------------------------------------------- one scenario's pipeline


class Pipeline:
    """Fresh topics/groups/data dir/registry on the broker, and the two worker processes."""

    def __init__(self, broker: LocalBroker, root: Path, cache_dir: Path, name: str, partitions: int = 4):
        from pipeline.config import Settings
        from pipeline.kafka_io import ensure_topics

        self.name = name
        self.root = Path(root)
        self.broker = broker
        tag = f"{name}-{uuid.uuid4().hex[:6]}"
        self.settings = Settings.from_env(
            bootstrap_servers=broker.bootstrap_servers, images_topic=f"{tag}.images",
            features_topic=f"{tag}.features", labels_topic=f"{tag}.labels",
            dead_letter_topic=f"{tag}.dead-letters", featurizer_group=f"{tag}.featurizer",
            scorer_group=f"{tag}.scorer", data_dir=str(self.root / "data"),
            registry_dir=str(self.root / "registry"), cache_dir=str(cache_dir), model="efficientnet_lite0",
            metrics_port="0")
        ensure_topics(self.settings, {self.settings.images_topic: partitions,
                                      self.settings.features_topic: partitions,
                                      self.settings.labels_topic: partitions, self.settings.dead_letter_topic: 1})
        s = self.settings
        self.env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": s.bootstrap_servers,
                    "DEEPER_IMAGES_TOPIC": s.images_topic, "DEEPER_FEATURES_TOPIC": s.features_topic,
                    "DEEPER_LABELS_TOPIC": s.labels_topic, "DEEPER_DEAD_LETTER_TOPIC": s.dead_letter_topic,
                    "DEEPER_FEATURIZER_GROUP": s.featurizer_group, "DEEPER_SCORER_GROUP": s.scorer_group,
                    "DEEPER_DATA_DIR": s.data_dir, "DEEPER_REGISTRY": s.registry_dir,
                    "DEEPER_CACHE_DIR": s.cache_dir, "DEEPER_MODEL": "efficientnet_lite0",
                    "DEEPER_METRICS_PORT": "0", "DEEPER_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                    "PYTHONUNBUFFERED": "1"}
        self.featurizer = WorkerProcess("featurizer", self.env, self.root / "logs", FEATURIZER_ARGS)
        self.scorer = WorkerProcess("scorer", self.env, self.root / "logs", SCORER_ARGS)
        self.temps = TempWatcher(self.features_root)
        self.temps.start()
        self.planted: set[str] = set()  # temp files the harness made itself

    @property
    def features_root(self) -> Path:
        return Path(self.settings.data_dir) / "features"

    def unique_ids(self) -> set[str]:
        from pipeline.parquet_reader import feature_files, read_features

        if not self.features_root.exists() or not feature_files([self.features_root]):
            return set()
        return set(read_features([self.features_root]).image_ids)

    def wait_rows(self, ids: set[str], timeout: float, supervise: Sequence[WorkerProcess] = ()) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in supervise:
                worker.ensure_running()
            if ids <= self.unique_ids():
                return True
            time.sleep(0.5)
        return False

    def wait_labels(self, ids: set[str], timeout: float, supervise: Sequence[WorkerProcess] = ()) -> bool:
        seen: set[str] = set()
        done = [0]  # records already looked at (the list only grows)

        def until(records: list[Any]) -> bool:
            seen.update(r.key.decode() for r in records[done[0]:])
            done[0] = len(records)
            return ids <= seen

        last_check = [0.0]

        def tick() -> None:
            if time.monotonic() - last_check[0] > 1.0:
                last_check[0] = time.monotonic()
                for worker in supervise:
                    worker.ensure_running()

        read_records(self.settings, self.settings.labels_topic, until, timeout=timeout, tick=tick)
        return ids <= seen

    def train(self, photos: Sequence[Photo], timeout: float = 180.0) -> str:
        """Train the scorer's classifier from the stream's own Parquet rows of ``photos``."""
        from pipeline.parquet_reader import read_features
        from pipeline.registry import Registry
        from pipeline.training import DEFAULT_SPEC, train_and_register

        ids = {p.image_id for p in photos}
        if not self.wait_rows(ids, timeout, supervise=[self.featurizer]):
            raise AssertionError(f"training photos never reached Parquet:\n{self.featurizer.current.tail()}")
        fs = read_features([self.features_root])
        keep = [i for i, image_id in enumerate(fs.image_ids) if image_id in ids]
        outcome = train_and_register([fs.image_ids[i] for i in keep], [fs.labels[i] for i in keep],
                                     fs.vectors[keep], fs.meta, DEFAULT_SPEC, Registry(self.settings.registry_dir))
        return outcome.version

    def plant_stale_temp_file(self, age_s: float = 3600.0) -> Path:
        """An hour-old ``.tmp-`` file, as a featurizer killed mid-write long ago leaves it."""
        from pipeline.parquet_writer import TEMP_PREFIX

        directory = self.features_root / "date=2000-01-01" / "backbone=efficientnet_lite0"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}-part-stale.parquet"
        path.write_bytes(b"PAR1 half a file")
        old = time.time() - age_s
        os.utime(path, (old, old))
        self.planted.add(str(path))
        return path

    def plant_half_written_file(self) -> Path | None:
        """Leave what a kill during a part-file write leaves: a truncated ``.tmp-`` file."""
        from pipeline.parquet_reader import feature_files
        from pipeline.parquet_writer import TEMP_PREFIX

        parts = feature_files([self.features_root]) if self.features_root.exists() else []
        if not parts:
            return None
        data = parts[0].read_bytes()
        planted = parts[0].parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{parts[0].name}"
        planted.write_bytes(data[: len(data) // 2])
        return planted

    def verify(self, produced: Iterable[str], labels: bool, timeout: float = 180.0) -> dict[str, Any]:
        """Read everything back and count: rows raw/unique, duplicates, missing, labels, dead letters."""
        from pipeline.parquet_reader import read_features
        from schemas.messages import decode_label

        produced = set(produced)
        planted = self.plant_half_written_file()
        self.temps.stop()
        state = parquet_state(self.features_root)
        fs = read_features([self.features_root]) if state["parts"] else None
        unique = set(fs.image_ids) if fs else set()
        out: dict[str, Any] = {
            "images_in": len(produced),
            "part_files": len(state["parts"]),
            "rows_raw": len(state["raw_ids"]),
            "rows_unique": len(unique),
            "row_duplicates": len(state["raw_ids"]) - len(set(state["raw_ids"])),
            "reader_dropped": fs.duplicates_dropped if fs else 0,
            "reader_one_row_per_id": bool(fs) and len(fs.image_ids) == len(set(fs.image_ids)),
            "missing": len(produced - unique),
            "unexpected_rows": len(unique - produced),
            "temp_files_seen_during_run": len(self.temps.seen - self.planted - {str(planted)}),
            "stale_temp_files_left": len([t for t in state["temps"] if t != planted and str(t) not in self.planted]),
            "planted_half_written_file_ignored": planted is not None and not state["temps_listed_by_reader"],
            "temp_files_read": len(state["temps_listed_by_reader"]),
            "broken_part_files": state["broken"],
        }
        if planted is not None:
            planted.unlink()
        dead = read_records(self.settings, self.settings.dead_letter_topic, timeout=15, quiet_s=2)
        out["dead_letters"] = len(dead)
        if labels:
            records = read_records(self.settings, self.settings.labels_topic,
                                   lambda rs: produced <= {r.key.decode() for r in rs}, timeout=timeout)
            decoded = [(r.key.decode(), decode_label(r.value)) for r in records]
            keys = [k for k, _ in decoded]
            by_id: dict[str, set[str]] = {}
            for k, record in decoded:
                by_id.setdefault(k, set()).add(record.label)
            out.update({
                "labels_raw": len(records),
                "labels_unique": len(set(keys)),
                "label_duplicates": len(records) - len(set(keys)),
                "labels_missing": len(produced - set(keys)),
                "label_keys_match_image_id": all(k == record.image_id for k, record in decoded),
                "duplicate_labels_disagreeing": sum(1 for labs in by_id.values() if len(labs) > 1),
            })
        return out

    def close(self) -> None:
        self.featurizer.close()
        self.scorer.close()
        self.temps.stop()


# --------------------------------------------------------------------------- recovery times


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def kill_recoveries(worker: WorkerProcess) -> list[dict[str, Any]]:
    """For each killed incarnation: how long until the next one was up, owned partitions, worked."""
    out = []
    for inc, nxt in zip(worker.incarnations, worker.incarnations[1:]):
        if not inc.killed or inc.ended_at is None:
            continue
        kill = inc.ended_at
        out.append({
            "killed_incarnation": inc.index,
            "killed_after_s": _rounded(kill - inc.started_at),
            "batches_before_kill": inc.count("batch"),
            "process_up_s": _rounded((nxt.first(f"{worker.role} started") or float("nan")) - kill),
            "partitions_assigned_s": _rounded((nxt.first("partitions assigned") or float("nan")) - kill),
            "first_batch_s": _rounded((nxt.first("batch") or float("nan")) - kill),
        })
    return out


def restart_recoveries(broker: LocalBroker, workers: Sequence[WorkerProcess], feeder: Feeder
                       ) -> list[dict[str, Any]]:
    """For each broker restart: broker back, each worker's next batch, the producer's next ack."""
    out = []
    for r in broker.restarts:
        back = r["at"] + r["broker_back_s"]
        row = dict(r)
        row.pop("at")
        for worker in workers:
            firsts = [t for inc in worker.incarnations if (t := inc.first("batch", after=back)) is not None]
            row[f"{worker.role}_first_batch_s"] = _rounded(min(firsts) - r["at"]) if firsts else None
        acks = [t for t in feeder.acked.values() if t >= back]
        row["producer_first_ack_s"] = _rounded(min(acks) - r["at"]) if acks else None
        out.append(row)
    return out


def _nan_to_none(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in rows]


# --------------------------------------------------------------------------- scenarios


@dataclass
class ScenarioResult:
    name: str
    faults: dict[str, int]
    counts: dict[str, Any]
    recovery: list[dict[str, Any]]
    producer: dict[str, Any]
    workers: dict[str, Any]
    wall_s: float
    problems: list[str] = field(default_factory=list)
    broker: dict[str, Any] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "clean": self.clean, "problems": self.problems, "faults": self.faults,
                "wall_s": round(self.wall_s, 1), **self.counts, "producer": self.producer,
                "workers": self.workers, "broker": self.broker, "recovery": self.recovery}


def _producer_report(feeder: Feeder) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for f in feeder.failures:
        key = f["reason"].split("(")[0][:80]
        reasons[key] = reasons.get(key, 0) + 1
    return {"acknowledged": len(feeder.acked), "failed_sends": len(feeder.failures), "resent": feeder.resent,
            "send_raised": feeder.send_errors, "summary_mismatches": feeder.accounting_mismatches,
            "producers_built": feeder.producers_built,
            "failure_reasons": reasons}


def _workers_report(workers: Sequence[WorkerProcess]) -> dict[str, Any]:
    def total(worker: WorkerProcess, event: str) -> int:
        return sum(inc.count(event) for inc in worker.incarnations)

    return {w.role: {"incarnations": len(w.incarnations),
                     "exit_codes": [inc.returncode for inc in w.incarnations],
                     "unexpected_exits": w.unexpected_exits,
                     "failed_checkpoints": total(w, "produce failed; rewinding to last commit"),
                     "producers_replaced": total(w, "producer replaced after a fatal error")} for w in workers}


def _problems(counts: dict[str, Any], workers: Sequence[WorkerProcess], labels: bool) -> list[str]:
    problems = []
    if counts["missing"]:
        problems.append(f"{counts['missing']} image ids have no Parquet row")
    if not counts["reader_one_row_per_id"]:
        problems.append("the reader returned more than one row for an image id")
    if counts["unexpected_rows"]:
        problems.append(f"{counts['unexpected_rows']} rows for ids that were never produced")
    if counts["temp_files_read"] or not counts["planted_half_written_file_ignored"]:
        problems.append("the reader listed a .tmp- file")
    if counts["broken_part_files"]:
        problems.append(f"half-written or unreadable part files: {counts['broken_part_files']}")
    if counts.get("stale_temp_file_removed_at_start") is False:
        problems.append("the featurizer did not remove an hour-old .tmp- file at start")
    if counts["dead_letters"]:
        problems.append(f"{counts['dead_letters']} dead letters for valid photos")
    if labels:
        if counts["labels_missing"]:
            problems.append(f"{counts['labels_missing']} image ids have no label")
        if not counts["label_keys_match_image_id"]:
            problems.append("a label record's key is not its image id")
    for w in workers:
        last = w.current
        if last.returncode != 0:
            problems.append(f"the final {w.role} run exited with {last.returncode}:\n{last.tail()}")
    return problems


def _wait_count(inc: Incarnation, event: str, n: int, timeout: float) -> bool:
    """Poll the log tightly until it holds ``n`` ``event`` lines (to kill right after one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and inc.alive():
        try:
            text = inc.log_path.read_bytes()
        except OSError:
            text = b""
        if text.count(f'"event": "{event}"'.encode()) >= n:
            return True
        time.sleep(0.005)
    return False


def _kill_loop(worker: WorkerProcess, feeder: Feeder, kills: int, first: int, total: int, rng: random.Random,
               kill_span: tuple[float, float], aim_at: str, log: Callable[[str], None]) -> list[str]:
    """SIGKILL ``worker`` ``kills`` times, restarting it at once each time; return each kill's moment.

    Before kill k the producer may send ``first + (total - first) * (k + 1) / (kills + 1)``
    photos, so every incarnation has work. Each kill waits until the incarnation has done a
    batch, then alternates: a random delay within ``kill_span`` ("random"), or right after the
    next ``aim_at`` log line ("after_<event>"): for the featurizer that is a part file's
    rename, the narrow window before the offsets are committed that makes duplicates.
    """
    moments = []
    for k in range(kills):
        feeder.release(first + (total - first) * (k + 1) // (kills + 1))
        inc = worker.current
        if inc.wait_for("batch", timeout=120, after=inc.started_at) is None and not inc.alive():
            worker.ensure_running()
            continue
        moment = "random"
        if k % 2 == 1 and _wait_count(inc, aim_at, inc.count(aim_at) + 1, 30):
            moment = "after_" + aim_at.replace(" ", "_")
        else:
            time.sleep(rng.uniform(*kill_span))
        worker.kill()
        moments.append(moment)
        log(f"  {worker.role} kill {k + 1}/{kills} ({moment}, after {inc.count('batch')} batches); restarting")
        worker.start()
    return moments


def _with_moments(rows: list[dict[str, Any]], moments: Sequence[str]) -> list[dict[str, Any]]:
    for row, moment in zip(rows, moments):
        row["moment"] = moment
    return _nan_to_none(rows)


def _scenario_pipeline(broker: LocalBroker, root: Path, cache_dir: Path, name: str, n_images: int, seed: int,
                       rate: float) -> tuple[Pipeline, list[Photo], Feeder]:
    """A scenario's fresh pipeline, its ``n_images`` distinct photos and the (not yet started) feeder."""
    pipe = Pipeline(broker, root, cache_dir, name)
    photos = synthetic_photos(n_images, seed=seed, prefix=name.split("-")[0])
    return pipe, photos, Feeder(pipe.settings, photos, rate=rate)


def featurizer_crashes(broker: LocalBroker, root: Path, cache_dir: Path, n_images: int, kills: int,
                       seed: int = 1, kill_span: tuple[float, float] = (0.2, 4.0), rate: float = 40.0,
                       log: Callable[[str], None] = print) -> ScenarioResult:
    """SIGKILL the featurizer ``kills`` times while images stream in; a clean run drains the rest."""
    rng = random.Random(seed)
    started = time.monotonic()
    pipe, photos, feeder = _scenario_pipeline(broker, root, cache_dir, "fz-crash", n_images, seed, rate)
    stale = pipe.plant_stale_temp_file()
    try:
        pipe.featurizer.start()
        feeder.start()
        moments = _kill_loop(pipe.featurizer, feeder, kills, 0, n_images, rng, kill_span,
                             "parquet part written", log)
        feeder.finish()
        ids = {p.image_id for p in photos}
        drained = pipe.wait_rows(ids, timeout=300, supervise=[pipe.featurizer])
        rc = pipe.featurizer.stop()
        log(f"  final featurizer run drained={drained} exit={rc}")
        counts = pipe.verify(ids, labels=False)
        counts["stale_temp_file_removed_at_start"] = not stale.exists()
        faults = {"featurizer_kill": sum(inc.killed for inc in pipe.featurizer.incarnations)}
        return ScenarioResult("featurizer_crashes", faults, counts,
                              _with_moments(kill_recoveries(pipe.featurizer), moments),
                              _producer_report(feeder), _workers_report([pipe.featurizer]),
                              time.monotonic() - started, _problems(counts, [pipe.featurizer], labels=False))
    finally:
        pipe.close()


def _bootstrap_model(pipe: Pipeline, photos: Sequence[Photo], feeder: Feeder, n_train: int,
                     log: Callable[[str], None]) -> str:
    """Start the feeder and featurizer, stream the first ``n_train`` photos, train on their
    Parquet rows, then start the scorer on that model."""
    feeder.start()
    pipe.featurizer.start()
    feeder.release(n_train)
    version = pipe.train(photos[:n_train])
    log(f"  classifier {version} trained from the stream's Parquet")
    pipe.scorer.start()
    return version


def scorer_crashes(broker: LocalBroker, root: Path, cache_dir: Path, n_images: int, kills: int, seed: int = 2,
                   kill_span: tuple[float, float] = (0.2, 3.0), rate: float = 40.0, n_train: int = 16,
                   log: Callable[[str], None] = print) -> ScenarioResult:
    """The featurizer runs steadily; the scorer is SIGKILLed ``kills`` times mid-stream."""
    rng = random.Random(seed)
    started = time.monotonic()
    pipe, photos, feeder = _scenario_pipeline(broker, root, cache_dir, "sc-crash", n_images, seed, rate)
    workers = [pipe.featurizer, pipe.scorer]
    try:
        _bootstrap_model(pipe, photos, feeder, n_train, log)
        moments = _kill_loop(pipe.scorer, feeder, kills, n_train, n_images, rng, kill_span, "batch", log)
        feeder.finish()
        ids = {p.image_id for p in photos}
        drained = pipe.wait_rows(ids, 300, workers) and pipe.wait_labels(ids, 300, workers)
        rcs = [w.stop() for w in workers]
        log(f"  final runs drained={drained} exit={rcs}")
        counts = pipe.verify(ids, labels=True)
        faults = {"scorer_kill": sum(inc.killed for inc in pipe.scorer.incarnations)}
        return ScenarioResult("scorer_crashes", faults, counts, _with_moments(kill_recoveries(pipe.scorer), moments),
                              _producer_report(feeder), _workers_report(workers), time.monotonic() - started,
                              _problems(counts, workers, labels=True))
    finally:
        pipe.close()


def broker_restarts(broker: LocalBroker, root: Path, cache_dir: Path, n_images: int, restarts: int,
                    seed: int = 3, restart_span: tuple[float, float] = (0.5, 3.0), rate: float = 20.0,
                    n_train: int = 16, crash_every: int = 0,
                    log: Callable[[str], None] = print) -> ScenarioResult:
    """Producer, featurizer and scorer run; the broker restarts ``restarts`` times mid-stream.

    Every ``crash_every``-th restart is a crash (SIGKILL of Tansu and localbucket) instead of a
    clean stop; the data survives either way (durable mode). Before restart k the producer may
    send its next share of photos at ``rate`` per second, so the restart lands mid-stream, and
    the next restart waits until the featurizer has done a batch again (it recovered).
    """
    rng = random.Random(seed)
    started = time.monotonic()
    pipe, photos, feeder = _scenario_pipeline(broker, root, cache_dir, "br-restart", n_images, seed, rate)
    workers = [pipe.featurizer, pipe.scorer]
    try:
        _bootstrap_model(pipe, photos, feeder, n_train, log)
        pipe.scorer.current.wait_for("batch", timeout=120)
        last = time.time()
        rest = n_images - n_train
        for k in range(restarts):
            feeder.release(n_train + rest * (k + 1) // (restarts + 1))
            if pipe.featurizer.current.wait_for("batch", timeout=120, after=last) is None:
                log("  (no featurizer batch since the last restart within 120 s)")
            time.sleep(rng.uniform(*restart_span))
            crash = crash_every > 0 and (k + 1) % crash_every == 0
            record = broker.restart(crash=crash)
            last = time.time()
            log(f"  broker {'crash' if crash else 'restart'} {k + 1}/{restarts}: back in {record['broker_back_s']} s")
            for worker in workers:
                if worker.ensure_running():
                    log(f"  the {worker.role} died with the broker; restarted it")
        feeder.finish()
        ids = {p.image_id for p in photos}
        drained = pipe.wait_rows(ids, 300, workers) and pipe.wait_labels(ids, 300, workers)
        rcs = [w.stop() for w in workers]
        log(f"  final runs drained={drained} exit={rcs}")
        counts = pipe.verify(ids, labels=True)
        faults: dict[str, int] = {}
        for r in broker.restarts:
            faults[r["kind"]] = faults.get(r["kind"], 0) + 1
        recovery = restart_recoveries(broker, workers, feeder)
        problems = _problems(counts, workers, labels=True)
        for w in workers:
            if w.unexpected_exits:
                problems.append(f"the {w.role} exited on its own {len(w.unexpected_exits)} time(s)")
        return ScenarioResult("broker_restarts", faults, counts, recovery, _producer_report(feeder),
                              _workers_report(workers), time.monotonic() - started, problems)
    finally:
        pipe.close()


SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "featurizer_crashes": featurizer_crashes,
    "scorer_crashes": scorer_crashes,
    "broker_restarts": broker_restarts,
}


def run_scenario(name: str, workdir: Path, cache_dir: Path, conditional_s3: bool = True,
                 **kwargs: Any) -> ScenarioResult:
    """Start a fresh durable broker, run scenario ``name`` on it, stop it, attach broker findings.

    ``conditional_s3`` (default) serves the broker's S3 through :mod:`pipeline.local_s3`;
    False runs localbucket as shipped, which can lose records after a broker restart.
    """
    workdir = Path(workdir)
    state = workdir / "broker"
    with ConditionalS3(conditional_s3):
        broker = LocalBroker(state).start()
        try:
            result = SCENARIOS[name](broker, workdir / "scenario", Path(cache_dir), **kwargs)
        finally:
            broker.stop()
    s3 = "localbucket + If-Match shim" if conditional_s3 else "localbucket as shipped"
    result.broker = {"durable": True, "s3": s3, **broker_log_findings(state)}
    return result


# --------------------------------------------------------------------------- summary


def summarize(results: Sequence[ScenarioResult], wall_s: float) -> dict[str, Any]:
    """Totals over scenarios plus each scenario's details (the JSON the long form writes)."""
    faults: dict[str, int] = {}
    for r in results:
        for kind, n in r.faults.items():
            faults[kind] = faults.get(kind, 0) + n

    def total(key: str) -> int:
        return sum(int(r.counts.get(key, 0)) for r in results)

    recoveries: dict[str, list[float]] = {}
    for r in results:
        for row in r.recovery:
            for key, value in row.items():
                if key.endswith("_s") and key not in ("killed_after_s",) and isinstance(value, (int, float)):
                    recoveries.setdefault(f"{r.name}.{key}", []).append(float(value))
    return {
        "clean": all(r.clean for r in results),
        "faults": faults,
        "images_in": total("images_in"),
        "rows_raw": total("rows_raw"),
        "rows_unique": total("rows_unique"),
        "row_duplicates": total("row_duplicates"),
        "missing": total("missing"),
        "dead_letters": total("dead_letters"),
        "labels_raw": total("labels_raw"),
        "labels_unique": total("labels_unique"),
        "label_duplicates": total("label_duplicates"),
        "labels_missing": total("labels_missing"),
        "producer_failed_sends": sum(r.producer["failed_sends"] for r in results),
        "producer_resent": sum(r.producer["resent"] for r in results),
        "recovery_s": {k: {"min": round(min(v), 2), "median": round(statistics.median(v), 2),
                           "max": round(max(v), 2), "n": len(v)} for k, v in sorted(recoveries.items())},
        "wall_s": round(wall_s, 1),
        "scenarios": [r.to_dict() for r in results],
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"fault suite: {'CLEAN' if summary['clean'] else 'NOT CLEAN'} in {summary['wall_s']} s",
             "faults injected: " + ", ".join(f"{k}={v}" for k, v in summary["faults"].items())]
    header = (f"{'scenario':<20}{'faults':>7}{'in':>6}{'rows raw':>9}{'unique':>7}{'dups':>6}{'missing':>8}"
              f"{'dead':>5}{'labels raw':>11}{'unique':>7}{'dups':>6}{'resent':>7}{'wall s':>8}")
    lines.append(header)
    for s in summary["scenarios"]:
        lines.append(f"{s['name']:<20}{sum(s['faults'].values()):>7}{s['images_in']:>6}{s['rows_raw']:>9}"
                     f"{s['rows_unique']:>7}{s['row_duplicates']:>6}{s['missing']:>8}{s['dead_letters']:>5}"
                     f"{s.get('labels_raw', '-'):>11}{s.get('labels_unique', '-'):>7}"
                     f"{s.get('label_duplicates', '-'):>6}{s['producer']['resent']:>7}{s['wall_s']:>8}")
    labelled = any("labels_raw" in s for s in summary["scenarios"])
    labels = [summary[k] if labelled else "-" for k in ("labels_raw", "labels_unique", "label_duplicates")]
    lines.append(f"{'total':<20}{sum(summary['faults'].values()):>7}{summary['images_in']:>6}{summary['rows_raw']:>9}"
                 f"{summary['rows_unique']:>7}{summary['row_duplicates']:>6}{summary['missing']:>8}"
                 f"{summary['dead_letters']:>5}{labels[0]:>11}{labels[1]:>7}"
                 f"{labels[2]:>6}{summary['producer_resent']:>7}{summary['wall_s']:>8}")
    for key, stats in summary["recovery_s"].items():
        lines.append(f"recovery {key}: median {stats['median']} s (min {stats['min']}, max {stats['max']}, "
                     f"n={stats['n']})")
    for s in summary["scenarios"]:
        for problem in s["problems"]:
            lines.append(f"PROBLEM {s['name']}: {problem}")
    return "\n".join(lines)
