"""A model change never silently stops labelling.

``deeper train --reference`` trains on another layer (logits) than the running stream makes
(prelogits). The scorer keeps labelling what arrives with the newest model that fits it,
loudly, and a featurizer started without ``--layer`` follows the registry's current model,
so later photos get the new model's labels. No photo is dead-lettered as ``features_mismatch``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from consumers.featurizer import FOLLOW_SECONDS, Featurizer
from consumers.scorer import Scorer
from pipeline.app.cli import main as deeper
from pipeline.learning.registry import Registry
from pipeline.learning.train_photos import train_from_photos
from producers.produce import ImageProducer
from schemas.messages import decode_label
from tests import bad_images
from tests.invariant import assert_stream_invariant, read_all
from tests.stream_helpers import WorkerThread, unique_settings

pytestmark = pytest.mark.stream

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _produce(settings, seeds) -> set[str]:
    producer = ImageProducer(settings)
    ids = {producer.send(bad_images.jpeg(seed=s), f"photo-{s}").image_id for s in seeds}
    assert producer.flush().failed == {}
    producer.close()
    return ids


def _labels(settings, ids: set[str], timeout: float = 90) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for r in read_all(settings, settings.labels_topic):
            label = decode_label(r.value)
            found[label.image_id] = label.classifier_version
        if ids <= set(found):
            return found
        time.sleep(1)
    pytest.fail(f"{len(ids - set(found))} photos were never labelled")


def test_training_another_layer_never_stops_labelling(kafka_settings, tmp_path, effnet, capsys):
    settings = unique_settings(kafka_settings, tmp_path, partitions=1)
    registry = Registry(settings.registry_dir)
    first = train_from_photos(EXAMPLES / "train", effnet, registry).outcome.version
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=4, roll_seconds=1,
                                         follow_model=True))
    scorer = WorkerThread(Scorer(settings, reload_seconds=0.2))
    try:
        before = _produce(settings, range(400, 404))
        assert set(_labels(settings, before).values()) == {first}
        second = train_from_photos(EXAMPLES / "train", effnet, registry, layer="logits").outcome.version
        during = _produce(settings, range(404, 408))  # still made from prelogits, most likely
        time.sleep(FOLLOW_SECONDS + 2)
        after = _produce(settings, range(408, 412))
        labelled = _labels(settings, before | during | after)
        assert {labelled[i] for i in during} <= {first, second}
        assert {labelled[i] for i in after} == {second}, "the featurizer did not follow the current model"
    finally:
        featurizer.stop()
        scorer.stop()
    summary = assert_stream_invariant(settings)
    assert summary["scorer_dead_letters"] == 0, "a vector was dead-lettered instead of labelled"
    assert deeper(["models", "--registry", settings.registry_dir]) == 0


def test_a_featurizer_pinned_to_its_layer_is_served_by_the_last_model_that_fits(kafka_settings, tmp_path, effnet,
                                                                               capsys, monkeypatch):
    settings = unique_settings(kafka_settings, tmp_path, partitions=1)
    registry = Registry(settings.registry_dir)
    first = train_from_photos(EXAMPLES / "train", effnet, registry).outcome.version
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=4, roll_seconds=1))
    scorer = WorkerThread(Scorer(settings, reload_seconds=0.2))
    try:
        train_from_photos(EXAMPLES / "train", effnet, registry, layer="logits")
        time.sleep(1)
        ids = _produce(settings, range(420, 424))
        assert set(_labels(settings, ids).values()) == {first}, "labelled by the last model that fits"
    finally:
        featurizer.stop()
        scorer.stop()
    monkeypatch.setenv("DEEPER_DATA_DIR", settings.data_dir)
    monkeypatch.setenv("DEEPER_SINK", settings.sink)  # where this stream stored its vectors
    capsys.readouterr()
    assert deeper(["models", "--registry", settings.registry_dir]) == 0
    out = capsys.readouterr().out
    assert "don't fit the current model" in out and "prelogits" in out
