"""The featurizer consumer: images topic -> backbone -> Parquet part files + features topic.

One consumer group on the images topic; run more processes with the same group to share its
partitions. Each poll is submitted to :class:`pipeline.inference.Inference` (the same tf.data
path ``deeper featurize`` uses: parallel decode, batches cut by size or time, a model thread)
and the loop goes back to polling while the model works; up to ``MAX_IN_FLIGHT_BATCHES``
batches' worth of messages are in flight. Finished polls are collected in order: rows go to
the rolling Parquet writer, and offsets are committed only after the part file is renamed into
place and every feature record and dead letter is acknowledged (see :mod:`consumers.worker`).
A message that isn't a valid image message, or an image that doesn't decode, is
dead-lettered with its reason; its batch-mates carry on.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from consumers.worker import StreamWorker
from pipeline.config import Settings
from pipeline.errors import SchemaError
from pipeline.featurize import feature_meta
from pipeline.inference import (
    DEFAULT_BATCH_TIMEOUT,
    Featurized,
    ImageRecord,
    Inference,
    StageTimes,
    Submission,
)
from pipeline.logs import event
from pipeline.nets.base import Backbone
from pipeline.parquet_writer import TEMP_PREFIX, FeatureRow, RollingParquetWriter
from schemas.messages import FeatureRecord, encode_features, parse_image_message

if TYPE_CHECKING:
    from pipeline.threads import ThreadPlan

log = logging.getLogger(__name__)

#: Messages in flight (submitted, not yet collected), in batches: enough that the model always
#: has the next batch decoded while the loop polls, few enough to bound memory (raw photos).
MAX_IN_FLIGHT_BATCHES = 3
#: A temporary part file older than this is left over from a writer killed mid-write.
STALE_TEMP_SECONDS = 120.0


def features_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "features"


def remove_stale_temp_files(root: Path, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete ``.tmp-`` part files a killed featurizer left behind; return what was removed.

    A SIGKILL during a part-file write leaves its temporary file (the rename never happens, so
    readers never see it and its rows are redone from Kafka). Only files older than
    ``older_than_s`` go: a featurizer sharing this directory may be writing a fresh one now.
    """
    removed: list[Path] = []
    if not root.exists():
        return removed
    cutoff = time.time() - older_than_s
    for path in root.rglob(f"{TEMP_PREFIX}*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # renamed or removed meanwhile
    if removed:
        event(log, "removed stale temporary part files", files=len(removed))
    return removed


class Featurizer(StreamWorker):
    stage = "featurizer"

    def __init__(self, settings: Settings, backbone: Backbone, layer: str = "logits", batch_size: int = 32,
                 group_id: str | None = None, roll_rows: int = 5000, roll_seconds: float = 30.0,
                 batch_timeout: float = DEFAULT_BATCH_TIMEOUT, model_threads: int = 1):
        super().__init__(settings, settings.images_topic, group_id or settings.featurizer_group,
                         max_poll_records=batch_size,
                         checkpoint_seconds=min(5.0, roll_seconds),
                         max_in_flight=MAX_IN_FLIGHT_BATCHES * batch_size,
                         # photos are ~100 KB-1 MB: kafka-python's 1 MiB per partition holds few
                         max_partition_fetch_bytes=16 * 1024 * 1024)
        self.inference = Inference(backbone, layer, batch_size, batch_timeout=batch_timeout,
                                   model_threads=model_threads)
        self.meta = feature_meta(backbone, layer)
        self.writer = RollingParquetWriter(features_dir(settings), self.meta, roll_rows, roll_seconds)
        self._submitted: deque[tuple[Sequence[Any], Submission]] = deque()
        self._submitted_messages = 0
        self._logged_times = StageTimes()
        remove_stale_temp_files(features_dir(settings))

    # -- StreamWorker -----------------------------------------------------------------------
    def submit(self, messages: Sequence[Any]) -> None:
        self._submitted.append((messages, self.inference.submit(self._valid_records(messages))))
        self._submitted_messages += len(messages)

    def collect(self, block: bool) -> list[Sequence[Any]]:
        finished = []
        while self._submitted and (self._submitted[0][1].done() or (block and not finished)):
            messages, submission = self._submitted.popleft()
            self._submitted_messages -= len(messages)
            self._write(messages, submission)
            finished.append(messages)
        return finished

    def in_flight(self) -> int:
        return self._submitted_messages

    def abandon(self) -> None:
        for _, submission in self._submitted:
            submission.cancel()
        self._submitted.clear()
        self._submitted_messages = 0

    def _write(self, messages: Sequence[Any], submission: Submission) -> None:
        """One poll's results: rows to the Parquet buffer, feature records and dead letters out."""
        rows = []
        for result in submission.wait():
            message = result.record.context
            if isinstance(result, Featurized):
                rows.append(self._row(result, message))
                self.send(self.settings.features_topic, *encode_features(self._feature_record(rows[-1])))
            else:
                self.dead_letter(message, result.reason, result.detail)
        self.writer.add(rows)
        self.metrics.images.labels(self.stage).inc(len(rows))
        self.metrics.batch_seconds.labels(self.stage).observe(submission.seconds())
        self._log_batch(len(messages), len(rows), submission.seconds())

    def flush_sink(self) -> None:
        started = time.perf_counter()
        path = self.writer.flush()
        if path is not None:
            self.metrics.flushes.inc()
            self.metrics.stage_seconds.labels(self.stage, "write").observe(time.perf_counter() - started)
            event(log, "parquet part written", path=str(path))

    def sink_due(self) -> bool:
        return self.writer.due()

    def has_buffered_sink(self) -> bool:
        return len(self.writer) > 0

    def discard_sink(self) -> None:
        self.writer.discard()

    # -- helpers ----------------------------------------------------------------------------
    def _valid_records(self, messages: Sequence[Any]) -> list[ImageRecord]:
        records = []
        for m in messages:
            try:
                image = parse_image_message(m.key, m.value, m.headers)
            except SchemaError as exc:
                self.dead_letter(m, "invalid_message", str(exc))
                continue
            source = image.source or f"kafka://{m.topic}/{m.partition}/{m.offset}"
            records.append(ImageRecord(image.image_id, image.data, source, image.label, context=m))
        return records

    @staticmethod
    def _row(result: Featurized, m: Any) -> FeatureRow:
        r = result.record
        return FeatureRow(r.image_id, r.source, r.label, result.width, result.height, result.vector,
                          m.topic, m.partition, m.offset)

    def _feature_record(self, row: FeatureRow) -> FeatureRecord:
        return FeatureRecord(row.image_id, row.vector, self.meta.backbone, self.meta.weights_digest,
                             self.meta.layer, row.source, row.label, row.width, row.height)

    def _log_batch(self, consumed: int, featurized: int, seconds: float) -> None:
        """One poll done; with the model thread's work since the previous poll (its batches
        combine polls, so they are counted apart: ``model_batches``/``model_rows``)."""
        now, last = self.inference.times, self._logged_times
        model_s, wait_s = now.model - last.model, now.decode_wait - last.decode_wait
        batches, model_rows = now.batches - last.batches, now.model_rows - last.model_rows
        self._logged_times = StageTimes(**vars(now))
        self.metrics.stage_seconds.labels(self.stage, "decode_wait").observe(wait_s)
        self.metrics.stage_seconds.labels(self.stage, "model").observe(model_s)
        event(log, "batch", consumed=consumed, featurized=featurized, dead_letters=consumed - featurized,
              seconds=round(seconds, 4), model_batches=batches, model_rows=model_rows, model_s=round(model_s, 4),
              decode_wait_s=round(wait_s, 4), in_flight=self.in_flight(), buffered_rows=len(self.writer))


def stream_backbone_and_layer(settings: Settings, model: str | None, layer: str | None) -> tuple[str, str]:
    """Defaults that match what the scorer will need: the current classifier's backbone and layer.

    Explicit flags win; without a classifier yet, the settings' model and training's default
    layer are used.
    """
    from pipeline.errors import RegistryError
    from pipeline.registry import Registry
    from pipeline.training import DEFAULT_LAYER

    try:
        current = Registry(settings.registry_dir).load_current().feature_meta
    except RegistryError:
        current = None
    chosen_model = model or (current.backbone if current and settings.model == "auto" else settings.model)
    chosen_layer = layer or (current.layer if current and current.backbone == chosen_model else DEFAULT_LAYER)
    return chosen_model, chosen_layer


def gpu_batch_size(requested: int, gpus: Sequence[Any]) -> int:
    """On a GPU, batches of 32 leave it idle; raise them (TF places the model there itself)."""
    if gpus:
        event(log, "GPU found; the model runs on it", gpus=[g.name for g in gpus])
        return max(requested, 128)
    return requested


def _thread_plan(precision: str | None, model_threads: int, gpu: bool) -> ThreadPlan:
    """Set TensorFlow's pools for the stream before anything runs (see :mod:`pipeline.threads`)."""
    from pipeline import precision as precision_lib
    from pipeline import threads

    plan = threads.stream_plan(precision_lib.check(precision), gpu=gpu, model_threads=model_threads)
    if not threads.apply(plan):  # TensorFlow already running (e.g. embedded): its pools suit one model thread
        plan = threads.DEFAULT_POOLS
    event(log, "thread plan", model_threads=plan.model_threads, intra_op=plan.intra_op, inter_op=plan.inter_op,
          why=plan.why)
    return plan


def cmd_featurizer(args: argparse.Namespace) -> int:
    import tensorflow as tf

    from pipeline.kafka_io import ensure_topics, wait_for_broker
    from pipeline.logs import setup_json_logging
    from pipeline.metrics import serve
    from pipeline.nets.factory import load_backbone

    setup_json_logging()
    settings = Settings.from_env(model=args.model, cache_dir=args.cache_dir)
    model, layer = stream_backbone_and_layer(settings, args.model, args.layer)
    precision = None if "@" in model else (getattr(args, "precision", None) or settings.precision)  # NAME@PRECISION wins
    gpus = tf.config.list_physical_devices("GPU")  # lists devices without starting TF's runtime
    plan = _thread_plan(model.partition("@")[2] or precision, args.model_threads, bool(gpus))
    backbone = load_backbone(model, weights=args.weights, cache_dir=settings.cache_dir,
                             progress=False, announce=lambda msg: event(log, msg), precision=precision)
    wait_for_broker(settings, timeout=args.wait)
    ensure_topics(settings, {settings.images_topic: args.partitions, settings.features_topic: args.partitions,
                             settings.dead_letter_topic: 1})
    serve(int(settings.metrics_port), settings.metrics_addr)
    worker = Featurizer(settings, backbone, layer, gpu_batch_size(args.batch_size, gpus), args.group,
                        args.roll_rows, args.roll_seconds, args.batch_timeout_ms / 1000.0, plan.model_threads)
    worker.install_signal_handlers()
    worker.run(max_idle_seconds=args.exit_when_idle)
    return 0


def add_parser(sub) -> None:
    from pipeline.nets.factory import MODEL_CHOICES

    p = sub.add_parser("featurizer", help="run the featurizer consumer (images topic -> Parquet + features topic)")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None)
    p.add_argument("--weights")
    p.add_argument("--precision", default=None, help="fp32 (default $DEEPER_PRECISION), bf16, fp32-lite, int8")
    p.add_argument("--cache-dir")
    p.add_argument("--layer", default=None,
                   help="end point (default: the current classifier's layer, else training's default)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=DEFAULT_BATCH_TIMEOUT * 1000,
                   help="longest a partial batch waits for more photos before it runs (default %(default)g)")
    p.add_argument("--model-threads", type=int, default=0,
                   help="batches the model runs side by side, cores split between them "
                        "(default 0: the plan in pipeline/threads.py, one on CPU today)")
    p.add_argument("--group", default=None, help="consumer group id (default $DEEPER_FEATURIZER_GROUP)")
    p.add_argument("--partitions", type=int, default=4, help="partitions for topics it must create")
    p.add_argument("--roll-rows", type=int, default=5000, help="rows per Parquet part file (at most)")
    p.add_argument("--roll-seconds", type=float, default=30.0, help="seconds before a part file is rolled")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the broker")
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="stop after this long without messages (batch jobs, tests)")
    p.set_defaults(func=cmd_featurizer)
