"""Novelty in the stream, and a novel photo reviewed into a new class, against a real broker.

The cars model sees photos of other things (the ImageNet samples): each label record says
``unknown``, why (``novel``) and how far (``novelty``). A reviewer then names the cats a new
class in the UI's corrections CSV, the UI's Retrain runs ``deeper train --features --labels``'s
path on the stream's Parquet, the registry gets a version with the new class, and the running
scorer labels the next cat with it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from consumers.featurizer import Featurizer, features_dir
from consumers.scorer import Scorer
from pipeline.app.ui import Corrections, Retrainer
from pipeline.learning.registry import Registry
from pipeline.model.featurize import default_cache
from pipeline.storage.parquet_reader import feature_files, read_features
from producers.produce import ImageProducer
from schemas.messages import decode_label
from tests.stream_helpers import WorkerThread, read_topic, train_model, unique_settings

pytestmark = pytest.mark.stream

CATS = ("chelsea.png", "grumpy-cat_224x224.jpg", "cat-with-tongue_224x224.jpg")


def _labels(settings, ids, count=1, timeout=120):
    """Label records by image id, read until every id has ``count`` of them."""
    def enough(records):
        seen: dict[str, int] = {}
        for r in records:
            seen[r.key.decode()] = seen.get(r.key.decode(), 0) + 1
        return all(seen.get(i, 0) >= count for i in ids)

    out: dict[str, list] = {}
    for r in read_topic(settings, settings.labels_topic, enough, timeout):
        out.setdefault(r.key.decode(), []).append(decode_label(r.value))
    return out


def _send(settings, paths, labels=None) -> dict[str, Path]:
    producer = ImageProducer(settings)
    sent = {producer.send_file(p, label=(labels or {}).get(p)).image_id: p for p in paths}
    producer.flush()
    producer.close()
    return sent


def _wait_for_rows(settings, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the featurizer rolls a part file every second
        root = features_dir(settings)
        if root.exists() and feature_files([root]) and len(read_features([root])) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} Parquet rows after {timeout:.0f} s")


def test_other_things_are_novel_and_a_reviewed_new_class_is_learned(kafka_settings, tmp_path, effnet, cache_dir,
                                                                    cars, imagenet_samples):
    settings = unique_settings(kafka_settings, tmp_path)
    v1 = train_model(settings, effnet, cars / "train", default_cache(cache_dir))
    threshold = Registry(settings.registry_dir).load(v1).classifier.novelty_threshold
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1))
    scorer = WorkerThread(Scorer(settings, reload_seconds=0.2))
    try:
        train = sorted((cars / "train").rglob("*.jpg"))
        others = sorted(p for p in imagenet_samples.iterdir() if p.suffix in (".jpg", ".png"))
        sent = _send(settings, train + sorted((cars / "test").glob("*.jpg")) + others,
                     {p: p.parent.name for p in train})
        first = _labels(settings, set(sent))
        _wait_for_rows(settings, len(sent))

        corrections = Corrections(tmp_path / "corrections.csv")
        cats = {i for i, p in sent.items() if p.name in CATS}
        for image_id in cats:
            corrections.set(image_id, "cat")
        retrainer = Retrainer(settings, corrections)
        assert retrainer.start()
        deadline = time.monotonic() + 120
        while retrainer.status()["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        status = retrainer.status()
        assert status["state"] == "done", status
        time.sleep(1.0)  # the scorer reads the pointer before every batch
        chelsea = next(p for p in others if p.name == "chelsea.png")
        again = _send(settings, [chelsea])
        second = _labels(settings, set(again), count=2)
    finally:
        featurizer.stop()
        scorer.stop()

    by_name = {sent[i].name: records[0] for i, records in first.items()}
    assert all(r.classifier_version == v1 and r.novelty is not None for r in by_name.values())
    for path in others:
        record = by_name[path.name]
        assert record.unknown and record.label == "unknown" and record.unknown_reason == "novel", record
        assert record.novelty > threshold
    for record in by_name.values():
        assert (record.unknown_reason is not None) == record.unknown
        assert record.unknown_reason != "novel" or record.novelty > threshold
    cars_novel = [n for n, r in by_name.items() if r.unknown_reason == "novel" and n not in {p.name for p in others}]
    assert len(cars_novel) <= 2, cars_novel  # 1 of 27 in-class photos is novel on this model

    v2 = status["version"]
    assert v2 != v1 and Registry(settings.registry_dir).current_version() == v2
    assert sorted(status["classes"]) == ["cat", "classic", "modern"]
    latest = second[next(iter(again))][-1]
    assert latest.classifier_version == v2 and latest.unknown_reason != "novel"
    assert max(latest.scores, key=latest.scores.get) == "cat"
    assert latest.novelty == pytest.approx(0.0, abs=1e-3)  # the same photo is in the training set now
