"""The scorer consumer: features topic -> the registry's *current* classifier -> labels topic.

Hot reload: before each batch the scorer reads the registry's ``current.json`` (one small file,
at most once a second); when it names a new version, the scorer loads and verifies it and
switches between two batches, so no message is scored twice or skipped around the switch. A
new version that fails its checksum is refused and the previous one keeps serving, loudly.

A vector whose backbone, weights, layer or size doesn't match the classifier, or that isn't a
valid feature record, goes to the dead-letter topic with the reason.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Sequence

import numpy as np

from consumers.worker import StreamWorker
from pipeline.config import Settings
from pipeline.errors import RegistryError, SchemaError
from pipeline.logs import event
from pipeline.registry import ModelVersion, Registry
from schemas.messages import FeatureRecord, LabelRecord, decode_features, encode_label

log = logging.getLogger(__name__)

class Scorer(StreamWorker):
    stage = "scorer"

    def __init__(self, settings: Settings, group_id: str | None = None, batch_size: int = 256,
                 reload_seconds: float = 1.0, wait_for_model: float = 60.0):
        super().__init__(settings, settings.features_topic, group_id or settings.scorer_group,
                         max_poll_records=batch_size,
                         checkpoint_seconds=1.0)
        self.registry = Registry(settings.registry_dir)
        self.reload_seconds = reload_seconds
        self._checked = 0.0
        self.model: ModelVersion = self._first_model(wait_for_model)

    # -- model management -------------------------------------------------------------------
    def _first_model(self, wait: float) -> ModelVersion:
        deadline = time.monotonic() + wait
        while True:
            try:
                model = self.registry.load_current()
                self._announce(model, "serving model")
                return model
            except RegistryError as exc:
                if time.monotonic() > deadline:
                    raise
                event(log, "waiting for a current model", logging.WARNING, error=str(exc))
                time.sleep(2)

    def maybe_reload(self) -> None:
        """Switch to a new current version if there is one and it verifies."""
        if time.monotonic() - self._checked < self.reload_seconds:
            return
        self._checked = time.monotonic()
        try:
            version = self.registry.current_version()
            if version is None or version == self.model.version:
                return
            model = self.registry.load_current()
        except RegistryError as exc:
            event(log, "new model refused; still serving the previous one", logging.ERROR,
                  error=str(exc), serving=self.model.version)
            return
        self._announce(model, "switched model", previous=self.model.version)
        self.model = model

    def _announce(self, model: ModelVersion, message: str, **fields: Any) -> None:
        self.metrics.model_version.clear()
        self.metrics.model_version.labels(model.version).set(1)
        event(log, message, version=model.version, classes=model.classifier.classes,
              features=model.feature_meta.describe(), **fields)

    # -- StreamWorker -----------------------------------------------------------------------
    def process(self, messages: Sequence[Any]) -> None:
        self.maybe_reload()
        model = self.model  # one version for the whole batch
        good: list[tuple[Any, FeatureRecord]] = []
        for m in messages:
            try:
                record = decode_features(m.key, m.value, m.headers)
                self._check_matches(record, model)
            except SchemaError as exc:
                self.dead_letter(m, "invalid_features", str(exc))
                continue
            except MismatchedFeatures as exc:
                self.dead_letter(m, "features_mismatch", str(exc))
                continue
            good.append((m, record))
        if good:
            self._score(good, model)

    def _score(self, good: list[tuple[Any, FeatureRecord]], model: ModelVersion) -> None:
        started = time.perf_counter()
        scores = model.classifier.decision(np.stack([r.vector for _, r in good]))
        classes = model.classifier.classes
        for (_, record), s in zip(good, scores):
            label = LabelRecord(record.image_id, classes[int(np.argmax(s))],
                                {c: round(float(v), 6) for c, v in zip(classes, s)}, model.version,
                                record.backbone, record.layer, record.source)
            self.send(self.settings.labels_topic, *encode_label(label))
        self.metrics.images.labels(self.stage).inc(len(good))
        self.metrics.stage_seconds.labels(self.stage, "model").observe(time.perf_counter() - started)
        event(log, "batch", scored=len(good), version=model.version, seconds=round(time.perf_counter() - started, 4))

    @staticmethod
    def _check_matches(record: FeatureRecord, model: ModelVersion) -> None:
        meta = model.feature_meta
        problems = []
        if record.backbone != meta.backbone:
            problems.append(f"backbone {record.backbone} != {meta.backbone}")
        if record.layer != meta.layer:
            problems.append(f"layer {record.layer} != {meta.layer}")
        if record.dim != meta.dim:
            problems.append(f"dim {record.dim} != {meta.dim}")
        if record.weights_digest != meta.weights_digest:
            problems.append(f"weights {record.weights_digest[:12]} != {meta.weights_digest[:12]}")
        if problems:
            raise MismatchedFeatures(f"vector doesn't fit classifier {model.version}: " + "; ".join(problems))


class MismatchedFeatures(Exception):
    """The vector is valid but was made by another backbone/layer than the classifier's."""


def cmd_scorer(args: argparse.Namespace) -> int:
    from pipeline.kafka_io import ensure_topics, wait_for_broker
    from pipeline.logs import setup_json_logging
    from pipeline.metrics import serve

    setup_json_logging()
    settings = Settings.from_env(registry_dir=args.registry)
    wait_for_broker(settings, timeout=args.wait)
    ensure_topics(settings, {settings.features_topic: args.partitions, settings.labels_topic: args.partitions,
                             settings.dead_letter_topic: 1})
    serve(int(settings.metrics_port), settings.metrics_addr)
    worker = Scorer(settings, args.group, args.batch_size, wait_for_model=args.wait_for_model)
    worker.install_signal_handlers()
    worker.run(max_idle_seconds=args.exit_when_idle)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("scorer", help="run the scorer consumer (features topic -> labels topic)")
    p.add_argument("--registry", help="model registry directory (default $DEEPER_REGISTRY)")
    p.add_argument("--group", default=None, help="consumer group id (default $DEEPER_SCORER_GROUP)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the broker")
    p.add_argument("--wait-for-model", type=float, default=300.0, help="seconds to wait for a current model")
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS")
    p.set_defaults(func=cmd_scorer)
