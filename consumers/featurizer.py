"""The featurizer consumer: images topic -> backbone -> the feature table (or Parquet) + features topic.

One consumer group on the images topic; run more processes with the same group to share its
partitions. Each poll is submitted to :class:`pipeline.model.inference.Inference` (the same tf.data
path ``deeper featurize`` uses: parallel decode, batches cut by size or time, a model thread)
and the loop goes back to polling while the model works; up to ``MAX_IN_FLIGHT_BATCHES``
batches' worth of messages are in flight. Finished polls are collected in order: rows go to
the sink it is given (:mod:`pipeline.storage.sink`: by default the Iceberg feature table,
``DEEPER_SINK=parquet`` for part files named by topic/partition/offset), feature records to the
features topic, and both are committed with the consumed offsets at each checkpoint
(:mod:`consumers.worker`).

Any message is an image (``DEEPER_IMAGE_CONTRACT=open``): a foreign producer's raw bytes with
any key or none, or a claim check (:mod:`pipeline.kafka.claim_check`) naming where the bytes are,
fetched off the poll loop within the fetch policy and one deadline (:mod:`consumers.claims`). A
message that can't be an image, an image that doesn't decode, and any error while handling one
message become that message's dead letter; its batch-mates carry on.

When the registry's current classifier needs another layer of the same backbone, the
featurizer follows it at the next checkpoint, so a ``deeper train --reference`` never leaves
the scorer without vectors it can use; another backbone needs a restart, said loudly.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from consumers.claims import ClaimFetcher, PollWork, Refusal
from consumers.outputs import cap_text
from consumers.worker import StreamWorker
from pipeline.config import Settings
from pipeline.kafka import claim_check
from pipeline.model.featurize import feature_meta
from pipeline.identity import split_backbone
from pipeline.model.inference import (
    DEFAULT_BATCH_TIMEOUT,
    Failed,
    Featurized,
    ImageRecord,
    Inference,
    StageTimes,
)
from pipeline.logs import event
from pipeline.model.nets.base import Backbone
from pipeline.storage.parquet_writer import FeatureRow
from pipeline.storage.sink import Sink, build_sink
from schemas.messages import FeatureRecord, describe_key, encode_features, parse_image_message, printable

if TYPE_CHECKING:
    from pipeline.model.threads import ThreadPlan

log = logging.getLogger(__name__)

#: Messages in flight (submitted, not yet collected), in batches: enough that the model always
#: has the next batch decoded while the loop polls, few enough to bound memory (raw photos).
MAX_IN_FLIGHT_BATCHES = 3
#: Buffered rows are stored (one table commit, or part files) and, with exactly-once, outputs
#: become visible at least this often while photos keep coming; when the input goes quiet at
#: once (consumers/worker.py, QUIET_POLL_MS). Outputs of a checkpoint's transaction are invisible
#: to read_committed readers until it commits, and a checkpoint must store the rows it covers
#: first, so this is exactly-once's latency bound under load; a longer roll means fewer, larger
#: data files and fewer snapshots.
ROLL_SECONDS = 5.0
#: How often the featurizer looks at the registry's current model (one small file read).
FOLLOW_SECONDS = 5.0


def features_dir(settings: Settings) -> Path:
    """The Parquet sink's root (``DEEPER_SINK=parquet``)."""
    return Path(settings.features_location())


class Featurizer(StreamWorker):
    """``sink``: where rows go (:func:`pipeline.storage.sink.build_sink` from the settings if not
    given); the featurizer only adds rows and switches identity, the worker does the rest."""

    stage = "featurizer"

    def __init__(self, settings: Settings, backbone: Backbone, layer: str = "logits", batch_size: int = 32,
                 group_id: str | None = None, roll_rows: int = 5000, roll_seconds: float = ROLL_SECONDS,
                 batch_timeout: float = DEFAULT_BATCH_TIMEOUT, model_threads: int = 1, follow_model: bool = False,
                 sink: Sink | None = None):
        self.meta = feature_meta(backbone, layer)
        self.follow_model = follow_model  # switch layers with the registry (when --layer was not given)
        super().__init__(settings, settings.images_topic, group_id or settings.featurizer_group,
                         max_poll_records=batch_size,
                         checkpoint_seconds=min(5.0, roll_seconds),
                         max_in_flight=MAX_IN_FLIGHT_BATCHES * batch_size,
                         sink=sink or build_sink(settings, self.meta, roll_rows, roll_seconds),
                         output_topics=[settings.features_topic],
                         # photos are ~100 KB-1 MB: kafka-python's 1 MiB per partition holds few
                         max_partition_fetch_bytes=16 * 1024 * 1024)
        self.backbone = backbone
        self.inference = Inference(backbone, layer, batch_size, batch_timeout=batch_timeout,
                                   model_threads=model_threads)
        self._submitted: deque[PollWork] = deque()
        self._submitted_messages = 0
        self._logged_times = StageTimes()
        self._followed = time.monotonic()
        self._followed_version: str | None = None
        self.fetch_limits = claim_check.FetchLimits.from_settings(settings)
        # one fetch thread per message that may be in flight: claim checks never queue for one
        self.claims = ClaimFetcher(self.fetch_limits, (MAX_IN_FLIGHT_BATCHES + 1) * batch_size)

    # -- StreamWorker -----------------------------------------------------------------------
    def submit(self, messages: Sequence[Any]) -> None:
        self._follow_model()
        self._submitted.append(self.claims.start(messages, self.inference, self._image_record))
        self._submitted_messages += len(messages)

    def collect(self, block: bool) -> list[Sequence[Any]]:
        for work in self._submitted:
            work.advance()
        finished = []
        while self._submitted and (self._submitted[0].done() or (block and not finished)):
            work = self._submitted.popleft()
            work.wait()
            self._submitted_messages -= len(work.messages)
            self._write(work)
            finished.append(work.messages)
        return finished

    def in_flight(self) -> int:
        return self._submitted_messages

    def abandon(self) -> None:
        for work in self._submitted:
            work.cancel()
        self._submitted.clear()
        self._submitted_messages = 0

    def close(self, checkpoint: bool = True) -> None:
        try:
            super().close(checkpoint)
        finally:
            self.claims.close()

    def _write(self, work: PollWork) -> None:
        """One poll's outcomes, in its message order: rows to the sink, feature records and
        dead letters out.

        Each outcome is handled on its own: whatever goes wrong with one message becomes its
        dead letter, never its batch-mates' problem.
        """
        rows = []
        for message, outcome in work.outcomes():
            try:
                if isinstance(outcome, Featurized):
                    row = self._row(outcome, message)
                    if self.send(self.settings.features_topic, *encode_features(self._feature_record(row, message)),
                                 origin=message):
                        rows.append(row)
                elif isinstance(outcome, Failed):
                    self.dead_letter(message, outcome.reason, outcome.detail)
                else:
                    self._refuse(message, outcome)
            except Exception as exc:  # noqa: BLE001 - contained: this message's dead letter
                self.dead_letter(message, "internal_error", f"{type(exc).__name__}: {exc}")
        self.sink.add(rows)
        self.metrics.images.labels(self.stage).inc(len(rows))
        self.metrics.batch_seconds.labels(self.stage).observe(work.seconds())
        self._log_batch(len(work.messages), len(rows), work.seconds())

    def _refuse(self, message: Any, refusal: Refusal) -> None:
        """A message that never reached the model; what a server answered goes to our log only."""
        if refusal.cause:
            event(log, "claim check not redeemed", logging.WARNING, reason=refusal.reason,
                  cause=refusal.cause[:500], uri=(claim_check.reference_uri(message.headers) or "")[:300],
                  topic=message.topic, partition=message.partition, offset=message.offset)
        self.dead_letter(message, refusal.reason, refusal.detail)

    # -- helpers ----------------------------------------------------------------------------
    def _image_record(self, m: Any, value: bytes | None) -> ImageRecord:
        """The model's record of a message whose bytes (inline or fetched) are ``value``."""
        image = parse_image_message(m.key, value, m.headers, self.settings.image_contract,
                                    self.settings.source_header, self.settings.label_header)
        source = cap_text(printable(image.source)) or f"kafka://{m.topic}/{m.partition}/{m.offset}"
        return ImageRecord(image.image_id, image.data, source, image.label, context=m)

    @staticmethod
    def _row(result: Featurized, m: Any) -> FeatureRow:
        r = result.record
        return FeatureRow(r.image_id, r.source, r.label, result.width, result.height, result.vector,
                          m.topic, m.partition, m.offset, m.key)

    def _feature_record(self, row: FeatureRow, m: Any) -> FeatureRecord:
        origin = {"precision": self.meta.precision, "origin": f"{m.topic}/{m.partition}/{m.offset}",
                  "kafka_key": cap_text(describe_key(m.key))}
        return FeatureRecord(row.image_id, row.vector, self.meta.backbone, self.meta.weights_digest,
                             self.meta.layer, row.source, row.label, row.width, row.height, extra=origin)

    def _follow_model(self) -> None:
        """Switch to the layer the registry's current classifier needs (same backbone only)."""
        if not self.follow_model or time.monotonic() - self._followed < FOLLOW_SECONDS:
            return
        self._followed = time.monotonic()
        version, wanted = _current_model_meta(self.settings, self._followed_version)
        if version == self._followed_version:
            return
        self._followed_version = version
        differences = [] if wanted is None else wanted.differences(self.meta)
        if not differences:
            return
        if any(not d.startswith(("layer", "dim")) for d in differences):
            event(log, "the current classifier needs another backbone; restart the featurizer with it",
                  logging.ERROR, producing=self.meta.describe(), needed=wanted.describe())
            return
        if not self.checkpoint(reason="model change"):
            return
        event(log, "following the current classifier: switching layer", logging.WARNING,
              previous=self.meta.layer, layer=wanted.layer)
        self.meta = feature_meta(self.backbone, wanted.layer)
        self.inference.layer = wanted.layer
        self.sink.switch(self.meta)

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
              decode_wait_s=round(wait_s, 4), in_flight=self.in_flight(), buffered_rows=len(self.sink))


def _current_model_meta(settings: Settings, known: str | None):
    """(current version, its feature identity); the identity is read only for a new version."""
    from pipeline.errors import RegistryError
    from pipeline.learning.registry import Registry

    registry = Registry(settings.registry_dir)
    try:
        version = registry.current_version()
        if version is None or version == known:
            return version, None
        return version, registry.load_current().feature_meta
    except (RegistryError, OSError, ValueError):
        return known, None


def stream_backbone_and_layer(settings: Settings, model: str | None, layer: str | None) -> tuple[str, str]:
    """Defaults that match what the scorer will need: the current classifier's backbone and layer.

    Explicit flags win; without a classifier yet, the settings' model and training's default
    layer are used.
    """
    from pipeline.errors import RegistryError
    from pipeline.learning.registry import Registry
    from pipeline.learning.training import DEFAULT_LAYER

    try:
        current = Registry(settings.registry_dir).load_current().feature_meta
    except RegistryError:
        current = None
    chosen_model = model or (current.qualified_name if current and settings.model == "auto" else settings.model)
    same_backbone = current is not None and current.backbone == split_backbone(chosen_model)[0]
    chosen_layer = layer or (current.layer if same_backbone else DEFAULT_LAYER)
    return chosen_model, chosen_layer


def gpu_batch_size(requested: int, gpus: Sequence[Any]) -> int:
    """On a GPU, batches of 32 leave it idle; raise them (TF places the model there itself)."""
    if gpus:
        event(log, "GPU found; the model runs on it", gpus=[g.name for g in gpus])
        return max(requested, 128)
    return requested


def _thread_plan(precision: str | None, model_threads: int, gpu: bool) -> ThreadPlan:
    """Set TensorFlow's pools for the stream before anything runs (see :mod:`pipeline.model.threads`)."""
    from pipeline.model import precision as precision_lib
    from pipeline.model import threads

    plan = threads.stream_plan(precision_lib.check(precision), gpu=gpu, model_threads=model_threads)
    if not threads.apply(plan):  # TensorFlow already running (e.g. embedded): its pools suit one model thread
        plan = threads.DEFAULT_POOLS
    return plan


def _settle_thread_plan(plan: ThreadPlan, backbone: Backbone, layer: str, batch_size: int) -> ThreadPlan:
    """Measure (a few seconds, synthetic photos) whether batches side by side pay here; log the plan."""
    import numpy as np

    from pipeline.model import threads

    size = backbone.info.image_size
    batch = np.zeros((batch_size, size, size, 3), np.float32)
    plan = threads.settle(plan, lambda: backbone.run(batch, [layer]))
    event(log, "thread plan", model_threads=plan.model_threads, intra_op=plan.intra_op, inter_op=plan.inter_op,
          why=plan.why)
    return plan


def cmd_featurizer(args: argparse.Namespace) -> int:
    from consumers.startup import await_broker
    from pipeline.kafka.kafka_io import ensure_topics
    from pipeline.logs import setup_json_logging
    from pipeline.metrics import serve
    from pipeline.model.nets.factory import load_backbone

    setup_json_logging()
    settings = Settings.from_env(model=args.model, cache_dir=args.cache_dir, registry_dir=args.registry,
                                 images_topic=args.images_topic, features_topic=args.features_topic,
                                 dead_letter_topic=args.dead_letter_topic)
    # the cheap checks first (consumers/startup.py): loading the backbone takes seconds
    await_broker(settings, args.wait)
    ensure_topics(settings, {settings.images_topic: args.partitions, settings.features_topic: args.partitions,
                             settings.dead_letter_topic: 1})
    model, layer = stream_backbone_and_layer(settings, args.model, args.layer)  # reads the registry
    serve(int(settings.metrics_port), settings.metrics_addr)
    import tensorflow as tf

    named = split_backbone(model)[1] if "@" in model else None  # NAME@PRECISION wins
    precision = None if named else (getattr(args, "precision", None) or settings.precision)
    gpus = tf.config.list_physical_devices("GPU")  # lists devices without starting TF's runtime
    plan = _thread_plan(named or precision, args.model_threads, bool(gpus))
    backbone = load_backbone(model, weights=args.weights, cache_dir=settings.cache_dir,
                             progress=False, announce=lambda msg: event(log, msg), precision=precision)
    batch_size = gpu_batch_size(args.batch_size, gpus)
    plan = _settle_thread_plan(plan, backbone, layer, batch_size)
    sink = build_sink(settings, feature_meta(backbone, layer), args.roll_rows, args.roll_seconds)
    sink.open()  # a table of another identity is refused here, in one line
    event(log, "sink", sink=sink.kind, where=sink.describe())
    worker = Featurizer(settings, backbone, layer, batch_size, args.group,
                        args.roll_rows, args.roll_seconds, args.batch_timeout_ms / 1000.0, plan.model_threads,
                        follow_model=args.layer is None, sink=sink)
    event(log, "inference warmed up", seconds=round(worker.inference.warm_up(), 3))
    worker.install_signal_handlers()
    worker.run(max_idle_seconds=args.exit_when_idle)
    return 0


def add_parser(sub) -> None:
    from consumers.startup import add_stage_options, add_wait_option
    from pipeline.cli_help import from_setting
    from pipeline.model.nets.factory import MODEL_CHOICES, PRECISION_CHOICES

    p = sub.add_parser("featurizer", help="run the featurizer consumer (images topic -> feature table + features topic)")
    add_stage_options(p, {"images_topic": "topic to read photos from",
                          "features_topic": "topic to write feature vectors to",
                          "dead_letter_topic": "topic for photos that cannot be featurized"}, "featurizer_group")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                   help="backbone (default: the current classifier's, else $DEEPER_MODEL or auto)")
    p.add_argument("--weights", metavar="FILE", help="explicit weights file instead of the cache or a download")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                   help="compute precision " + from_setting("precision"))
    p.add_argument("--layer", default=None,
                   help="end point (default: the current classifier's layer, else training's default)")
    p.add_argument("--cache-dir", metavar="DIR", help="weights cache " + from_setting("cache_dir"))
    p.add_argument("--registry", metavar="DIR", help="model registry whose current classifier picks the "
                   "backbone and layer (default: $DEEPER_REGISTRY or $DEEPER_DATA_DIR/registry)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="photos per model run; raised to 128 on a GPU")
    p.add_argument("--batch-timeout-ms", type=float, default=DEFAULT_BATCH_TIMEOUT * 1000, metavar="MS",
                   help="longest a partial batch waits for more photos before it runs")
    p.add_argument("--model-threads", type=int, default=0, metavar="N",
                   help="batches the model runs side by side, cores split between them; "
                        "0 = measured at start (a few seconds), one on a GPU or TF-Lite")
    p.add_argument("--partitions", type=int, default=4, metavar="N", help="partitions for topics it must create")
    p.add_argument("--roll-rows", type=int, default=5000, metavar="N",
                   help="rows buffered before a checkpoint stores them (a table commit or Parquet part files)")
    p.add_argument("--roll-seconds", type=float, default=ROLL_SECONDS, metavar="SECONDS",
                   help="seconds before buffered rows are stored while photos keep coming (also as soon as "
                        "they stop): one table commit (or part file) per checkpoint; with exactly-once also "
                        "the longest a featurized photo waits to be visible downstream")
    add_wait_option(p, 60.0)
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="stop after this long without messages (batch jobs, tests; default: never)")
    p.set_defaults(func=cmd_featurizer)
