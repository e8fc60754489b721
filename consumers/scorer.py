"""The scorer consumer: features topic -> the registry's *current* classifier -> labels topic.

Hot reload: before each batch the scorer reads the registry's ``current.json`` (one small
file); when it names a new version, the scorer loads and verifies it and switches between two
batches, so no message is scored twice or skipped around the switch, and the first batch after
the switch is already labelled by the new version. A new version that fails its checksum is
refused and the previous one keeps serving, loudly (tried again at most once a second).

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
from pipeline.errors import IncompatibleFeatures, RegistryError, SchemaError
from pipeline.identity import FeatureId
from pipeline.logs import event
from pipeline.learning.registry import ModelVersion, Registry
from pipeline.learning.scoring import score
from schemas.messages import FeatureRecord, LabelRecord, decode_features, encode_label

log = logging.getLogger(__name__)

#: How many of the newest registry versions a vector the current model doesn't fit is tried on.
FALLBACK_VERSIONS = 20

class Scorer(StreamWorker):
    stage = "scorer"

    def __init__(self, settings: Settings, group_id: str | None = None, batch_size: int = 256,
                 reload_seconds: float = 1.0, wait_for_model: float = 60.0):
        super().__init__(settings, settings.features_topic, group_id or settings.scorer_group,
                         max_poll_records=batch_size,
                         checkpoint_seconds=1.0,
                         output_topics=[settings.labels_topic])
        self.registry = Registry(settings.registry_dir)
        self.reload_seconds = reload_seconds
        self._loaded: dict[str, ModelVersion] = {}  # versions read for vectors the current one doesn't fit
        self._fallback_announced: set[str] = set()
        self._retry_after = 0.0  # after a refused version: when to read the registry again
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
        """Switch to a new current version if there is one and it verifies.

        The registry's pointer (one small file) is read before every batch, so the batch after
        a version becomes current is labelled by it. A version that can't be loaded is refused,
        logged, and tried again at most every ``reload_seconds``.
        """
        if time.monotonic() < self._retry_after:
            return
        try:
            version = self.registry.current_version()
            if version is None or version == self.model.version:
                return
            model = self.registry.load_current()
        except RegistryError as exc:
            self._retry_after = time.monotonic() + self.reload_seconds
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
        """Decode, match a model, score; any failure is that message's dead letter alone."""
        self.maybe_reload()
        model = self.model  # one version for the whole batch
        by_model: dict[str, list[tuple[Any, FeatureRecord]]] = {}
        models: dict[str, ModelVersion] = {}
        for m in messages:
            try:
                record = decode_features(m.key, m.value, m.headers)
                chosen = self._model_for(record, model)
            except SchemaError as exc:
                self.dead_letter(m, "invalid_features", str(exc))
                continue
            except IncompatibleFeatures as exc:
                self.dead_letter(m, "features_mismatch", str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - contained: this message's dead letter
                self.dead_letter(m, "internal_error", f"{type(exc).__name__}: {exc}")
                continue
            models[chosen.version] = chosen
            by_model.setdefault(chosen.version, []).append((m, record))
        for version, good in by_model.items():
            self._score_contained(good, models[version])

    def _score_contained(self, good: list[tuple[Any, FeatureRecord]], model: ModelVersion) -> None:
        """Score a batch; if that fails, score one by one so only the culprits are dead-lettered."""
        try:
            self._score(good, model)
            return
        except Exception:  # noqa: BLE001 - narrowed below
            pass
        for item in good:
            try:
                self._score([item], model)
            except Exception as exc:  # noqa: BLE001 - contained
                self.dead_letter(item[0], "internal_error", f"scoring failed: {type(exc).__name__}: {exc}")

    def _model_for(self, record: FeatureRecord, current: ModelVersion) -> ModelVersion:
        """The current model if the vector fits it, else the newest registered one that does.

        After a model change (``deeper train --reference`` picks another layer) vectors made
        the old way keep arriving until the featurizer follows; they are labelled by the last
        model that fits them instead of dead-lettered, and that is said loudly (log, metric,
        ``deeper models``). Only a vector no registered model fits is a ``features_mismatch``.
        """
        try:
            self._check_matches(record, current)
            return current
        except IncompatibleFeatures as mismatch:
            fallback = self._fitting_model(record)
            if fallback is None:
                raise mismatch
        self.metrics.fallback_scored.labels(fallback.version).inc()
        if fallback.version not in self._fallback_announced:
            self._fallback_announced.add(fallback.version)
            event(log, "vectors don't fit the current model; labelling them with the last model that fits",
                  logging.ERROR, current=current.version, fallback=fallback.version,
                  vectors=FeatureId.from_record(record).describe(),
                  fix="restart the featurizer so it makes the current model's vectors")
        return fallback

    def _fitting_model(self, record: FeatureRecord) -> ModelVersion | None:
        for version in reversed(self.registry.versions()[-FALLBACK_VERSIONS:]):
            model = self._loaded.get(version)
            if model is None:
                try:
                    model = self._loaded[version] = self.registry.load(version)
                except RegistryError:
                    continue
            try:
                self._check_matches(record, model)
                return model
            except IncompatibleFeatures:
                continue
        return None

    def _score(self, good: list[tuple[Any, FeatureRecord]], model: ModelVersion) -> None:
        def _rounded(values: dict[str, float] | None) -> dict[str, float] | None:
            return None if values is None else {c: round(v, 6) for c, v in values.items()}

        started = time.perf_counter()
        for (m, record), r in zip(good, score(model.classifier, np.stack([rec.vector for _, rec in good]),
                                                  self.settings.unknown_label)):
            label = LabelRecord(record.image_id, r.label, _rounded(r.scores), model.version, record.backbone,
                                record.layer, record.source, probabilities=_rounded(r.probabilities),
                                confidence=None if r.confidence is None else round(r.confidence, 6),
                                unknown=r.unknown, origin=f"{m.topic}/{m.partition}/{m.offset}",
                                image_origin=str(record.extra.get("origin", "")),
                                kafka_key=record.extra.get("kafka_key"),
                                novelty=None if r.novelty is None else round(r.novelty, 6),
                                unknown_reason=r.unknown_reason)
            self.send(self.settings.labels_topic, *encode_label(label), origin=m)
        self.metrics.images.labels(self.stage).inc(len(good))
        self.metrics.stage_seconds.labels(self.stage, "model").observe(time.perf_counter() - started)
        event(log, "batch", scored=len(good), version=model.version, seconds=round(time.perf_counter() - started, 4))

    @staticmethod
    def _check_matches(record: FeatureRecord, model: ModelVersion) -> None:
        """Raise :class:`IncompatibleFeatures` if the vector wasn't made the classifier's way."""
        FeatureId.from_record(record).check_compatible(model.feature_meta,
                                                       what=f"vector vs classifier {model.version}")


def cmd_scorer(args: argparse.Namespace) -> int:
    from consumers.startup import await_broker
    from pipeline.kafka.kafka_io import ensure_topics
    from pipeline.logs import setup_json_logging
    from pipeline.metrics import serve

    setup_json_logging()
    settings = Settings.from_env(registry_dir=args.registry, features_topic=args.features_topic,
                                 labels_topic=args.labels_topic, dead_letter_topic=args.dead_letter_topic)
    _check_registry(settings.registry_dir)  # cheap, and a wrong --registry shouldn't wait for a broker first
    await_broker(settings, args.wait)
    ensure_topics(settings, {settings.features_topic: args.partitions, settings.labels_topic: args.partitions,
                             settings.dead_letter_topic: 1})
    serve(int(settings.metrics_port), settings.metrics_addr)
    worker = Scorer(settings, args.group, args.batch_size, wait_for_model=args.wait_for_model)
    worker.install_signal_handlers()
    worker.run(max_idle_seconds=args.exit_when_idle)
    return 0


def _check_registry(registry_dir: str) -> None:
    """Refuse a registry path that can never hold a model; say so if it holds none yet."""
    import os
    from pathlib import Path

    path = Path(registry_dir)
    if path.exists() and not path.is_dir():
        raise RegistryError(f"registry {registry_dir} is not a directory")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise RegistryError(f"registry {registry_dir} is not readable")
    if Registry(registry_dir).current_version() is None:
        event(log, "no current model yet; train one with `deeper train`", logging.WARNING, registry=registry_dir)


def add_parser(sub) -> None:
    from consumers.startup import add_stage_options, add_wait_option

    p = sub.add_parser("scorer", help="run the scorer consumer (features topic -> labels topic)")
    add_stage_options(p, {"features_topic": "topic to read feature vectors from",
                          "labels_topic": "topic to write labels to",
                          "dead_letter_topic": "topic for vectors that cannot be scored"}, "scorer_group")
    p.add_argument("--registry", metavar="DIR",
                   help="model registry whose current version is served (default: $DEEPER_REGISTRY or "
                        "$DEEPER_DATA_DIR/registry)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="vectors per poll and scoring run")
    p.add_argument("--partitions", type=int, default=4, metavar="N", help="partitions for topics it must create")
    add_wait_option(p, 60.0)
    p.add_argument("--wait-for-model", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the registry to have a current model")
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="stop after this long without messages (batch jobs, tests; default: never)")
    p.set_defaults(func=cmd_scorer)
