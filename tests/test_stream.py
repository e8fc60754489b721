"""The streaming pipeline against a real broker: producer -> featurizer -> Parquet + features -> scorer -> labels."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.dataset as pads
import pytest
from PIL import Image

from consumers.featurizer import Featurizer, features_dir
from consumers.scorer import Scorer
from pipeline.model.featurize import default_cache
from pipeline.kafka.kafka_io import make_producer
from pipeline.storage.parquet_reader import read_features
from pipeline.learning.registry import Registry
from producers.produce import ImageProducer
from schemas.messages import (FeatureRecord, decode_label, encode_features, make_image_message)
from tests.stream_helpers import WorkerThread, header, read_topic, train_model, unique_settings

pytestmark = pytest.mark.stream

REPO = Path(__file__).resolve().parent.parent


def _labels(settings, ids, timeout=120):
    """Label records by image id, read until every id has one."""
    records = read_topic(settings, settings.labels_topic,
                         lambda rs: ids <= {r.key.decode() for r in rs}, timeout)
    out = {}
    for r in records:
        out.setdefault(r.key.decode(), []).append(decode_label(r.value))
    return out


def _produce(settings, paths):
    producer = ImageProducer(settings)
    messages = {}
    for p in paths:
        message = producer.send_file(p)
        assert message is not None, producer.summary.failed
        messages[message.image_id] = Path(p)
    summary = producer.flush()
    producer.close()
    assert summary.sent == len(paths) and not summary.failed
    return messages


def _metric_values(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _truncated_jpeg(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 3]


@pytest.fixture
def cars_model(kafka_settings, tmp_path, effnet, cache_dir, cars):
    settings = unique_settings(kafka_settings, tmp_path)
    version = train_model(settings, effnet, cars / "train", default_cache(cache_dir))
    return settings, version


def test_photos_in_parquet_rows_and_labels_out(cars_model, effnet, cars):
    """N photos in -> N Parquet rows (pyarrow, DuckDB, polars) -> N labels, right for the cars test set."""
    settings, version = cars_model
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=2))
    scorer = WorkerThread(Scorer(settings))
    try:
        photos = sorted((cars / "test").glob("*.jpg")) + sorted((cars / "train" / "classic").glob("*.jpg"))[:3]
        sent = _produce(settings, photos)
        labels = _labels(settings, set(sent))
    finally:
        featurizer.stop()
        scorer.stop()
    assert set(labels) == set(sent)
    truth = {row["file"]: row["label"] for row in csv.DictReader(open(cars / "test_labels.csv"))}
    # The closed-set decision (the top score) is right for every car; the label is that class, or
    # `unknown` where the model abstains (too far from every training photo, or not confident).
    records = {p.name: labels[i][0] for i, p in sent.items() if p.name in truth}
    right = [max(r.scores, key=r.scores.get) == truth[name] for name, r in records.items()]
    assert len(right) == 7 and sum(right) == 7, f"{sum(right)}/7 cars ranked right"
    assert all(r.label == (settings.unknown_label if r.unknown else max(r.scores, key=r.scores.get)) for r in records.values())
    assert {r.classifier_version for rs in labels.values() for r in rs} == {version}
    assert all(r.backbone == "efficientnet_lite0" and set(r.scores) == {"classic", "modern"}
               for rs in labels.values() for r in rs)

    root = features_dir(settings)
    table = pads.dataset(root, format="parquet", partitioning="hive").to_table()
    assert sorted(set(table.column("image_id").to_pylist())) == sorted(sent)
    assert set(table.column("backbone").to_pylist()) == {"efficientnet_lite0"}  # from the partition directory
    glob = str(root / "**" / "*.parquet")
    assert duckdb.sql(f"SELECT count(DISTINCT image_id) FROM read_parquet('{glob}')").fetchall()[0][0] == len(sent)
    assert duckdb.sql(f"SELECT max(len(vector)) FROM read_parquet('{glob}')").fetchall()[0][0] == 1280
    frame = pl.read_parquet(glob)
    assert frame["image_id"].n_unique() == len(sent)
    fs = read_features([root])
    assert len(fs) == len(sent) and fs.vectors.shape == (len(sent), 1280)
    assert {Path(s).name for s in fs.sources} == {p.name for p in sent.values()}


def test_corrupt_photo_is_dead_lettered_while_batch_mates_are_labelled(cars_model, effnet, cars):
    settings, _ = cars_model
    good = sorted((cars / "test").glob("*.jpg"))[:3]
    bad = {"truncated": _truncated_jpeg(good[0]), "html": b"<html><body>not a photo</body></html>"}
    from pipeline.app.broker import local as broker
    from pipeline.metrics import serve

    port = broker.free_port()
    serve(port)
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=16, roll_seconds=2))
    scorer = WorkerThread(Scorer(settings))
    try:
        producer = ImageProducer(settings)
        bad_ids = {producer.send(data, f"bad/{name}").image_id: name for name, data in bad.items()}
        good_ids = {producer.send_file(p).image_id for p in good}
        producer.flush()
        producer.close()
        labels = _labels(settings, good_ids)
        dead = read_topic(settings, settings.dead_letter_topic, lambda rs: len(rs) >= 2)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        featurizer.stop()
        scorer.stop()
    metrics = _metric_values(scrape)
    assert metrics['deeper_dead_letters_total{reason="truncated",stage="featurizer"}'] >= 1
    assert metrics['deeper_dead_letters_total{reason="unsupported_format",stage="featurizer"}'] >= 1
    assert metrics['deeper_images_total{stage="featurizer"}'] >= 3
    assert metrics['deeper_images_total{stage="scorer"}'] >= 3
    assert metrics['deeper_stage_seconds_count{stage="featurizer",step="model"}'] >= 1
    assert good_ids <= set(labels)
    assert not set(bad_ids) & set(labels)
    assert len(dead) == 2
    by_key = {d.key.decode(): d for d in dead}
    assert set(by_key) == set(bad_ids)
    for key, record in by_key.items():
        expected = {"truncated": "truncated", "html": "unsupported_format"}[bad_ids[key]]
        assert header(record, "dlq-reason") == expected
        assert header(record, "dlq-stage") == "featurizer"
        assert header(record, "dlq-source-topic") == settings.images_topic
        assert header(record, "dlq-source-offset") is not None
        assert header(record, "source") == f"bad/{bad_ids[key]}"
        assert record.value == bad[bad_ids[key]]  # the original bytes, to fix and replay
    rows = read_features([features_dir(settings)])
    assert set(rows.image_ids) == good_ids


def test_offline_retraining_from_stream_parquet_is_hot_reloaded(cars_model, effnet, cars, tmp_path):
    """Stream -> Parquet -> ``deeper train --features --labels CSV`` -> the running scorer switches."""
    from pipeline.app.cli import main as deeper
    from pipeline.storage.parquet_reader import feature_files

    settings, v1 = cars_model
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1))
    scorer = WorkerThread(Scorer(settings, reload_seconds=0.2))
    swap = {"classic": "modern", "modern": "classic"}
    try:
        producer = ImageProducer(settings)
        train = sorted((cars / "train").rglob("*.jpg"))
        first = {producer.send_file(p, label=p.parent.name).image_id: p for p in train}
        producer.flush()
        producer.close()
        labels_1 = _labels(settings, set(first))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the featurizer rolls a part file every second
            root = features_dir(settings)
            if root.exists() and feature_files([root]) and len(read_features([root])) == len(train):
                break
            time.sleep(0.5)
        stored = read_features([features_dir(settings)])
        assert sorted(stored.labels) == sorted(p.parent.name for p in train)  # the label column, from headers
        relabel = tmp_path / "relabel.csv"
        relabel.write_text("source,label\n" + "".join(f"{p.name},{swap[p.parent.name]}\n" for p in train))
        assert deeper(["train", "--features", str(features_dir(settings)), "--labels", str(relabel),
                       "--registry", settings.registry_dir, "-q"]) == 0
        v2 = Registry(settings.registry_dir).current_version()
        assert v2 != v1
        time.sleep(1.0)  # the scorer checks the pointer every 0.2 s
        second = _produce(settings, sorted((cars / "test").glob("*.jpg")))
        labels_2 = _labels(settings, set(second) | set(first))
    finally:
        featurizer.stop()
        scorer.stop()
    assert {r.classifier_version for i in first for r in labels_1[i]} == {v1}
    for image_id in first:  # v1's labels for the first photos stay, none re-scored or lost
        assert [r.classifier_version for r in labels_2[image_id]] == [v1]
    truth = {row["file"]: row["label"] for row in csv.DictReader(open(cars / "test_labels.csv"))}
    assert {labels_2[i][-1].classifier_version for i in second} == {v2}
    swapped = [labels_2[i][-1].label == swap[truth[p.name]] for i, p in second.items()]
    assert sum(swapped) >= 6, f"v2 (swapped classes) labelled {sum(swapped)}/7 as swapped"


def test_scorer_dead_letters_vectors_it_cannot_score(cars_model):
    import numpy as np

    settings, _ = cars_model
    scorer = WorkerThread(Scorer(settings))
    try:
        model = Registry(settings.registry_dir).load_current().feature_meta
        producer = make_producer(settings)
        good_vector = np.zeros(model.dim, np.float32)
        cases = {
            "wrong_backbone": FeatureRecord("a" * 64, good_vector, "inception_v1", model.weights_digest, model.layer),
            "wrong_size": FeatureRecord("b" * 64, np.zeros(10, np.float32), model.backbone, model.weights_digest,
                                        model.layer),
            "good": FeatureRecord("c" * 64, good_vector, model.backbone, model.weights_digest, model.layer),
        }
        for record in cases.values():
            key, value, headers = encode_features(record)
            producer.send(settings.features_topic, key=key, value=value, headers=headers)
        key, value, headers = encode_features(cases["good"])
        producer.send(settings.features_topic, key=b"d" * 64, value=value[:20], headers=headers)  # truncated
        producer.send(settings.features_topic, key=b"e" * 64, value=value,
                      headers=[("schema-version", b"99")])  # unknown schema version
        producer.flush()
        producer.close()
        dead = read_topic(settings, settings.dead_letter_topic, lambda rs: len(rs) >= 4)
        labels = _labels(settings, {"c" * 64})
    finally:
        scorer.stop()
    reasons = {d.key.decode()[0]: header(d, "dlq-reason") for d in dead}
    assert reasons == {"a": "features_mismatch", "b": "features_mismatch", "d": "invalid_features",
                       "e": "invalid_features"}
    assert "c" * 64 in labels


def test_two_featurizers_in_one_group_share_the_partitions(cars_model, effnet, cars):
    settings, _ = cars_model
    workers = [Featurizer(settings, effnet, "prelogits", batch_size=4, roll_seconds=1) for _ in range(2)]
    threads = [WorkerThread(w) for w in workers]
    scorer = WorkerThread(Scorer(settings))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(w.consumer.assignment() for w in workers):
            time.sleep(0.5)
        assignments = [set(w.consumer.assignment()) for w in workers]
        photos = sorted((cars / "train").rglob("*.jpg"))
        sent = _produce(settings, photos)
        labels = _labels(settings, set(sent))
    finally:
        for t in threads:
            t.stop()
        scorer.stop()
    assert all(assignments), f"both members must own partitions: {assignments}"
    assert not assignments[0] & assignments[1]
    assert len(assignments[0] | assignments[1]) == 4
    assert set(labels) == set(sent)
    assert all(w.inference.times.images > 0 for w in workers), "both featurizers did work"
    rows = read_features([features_dir(settings)])
    assert set(rows.image_ids) == set(sent)


def test_outputs_are_committed_as_soon_as_the_input_goes_quiet(cars_model, effnet, cars):
    """With a 10-minute roll, a burst's Parquet part and labels still come long before the roll: the
    featurizer commits when a poll finds the input quiet, not at the roll (exactly-once latency)."""
    settings, _ = cars_model
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=600))
    scorer = WorkerThread(Scorer(settings))
    try:
        sent = _produce(settings, sorted((cars / "test").glob("*.jpg")))
        labels = _labels(settings, set(sent), timeout=90)  # read_committed: only committed features are scored
        parts = sorted(features_dir(settings).rglob("*.parquet"))
    finally:
        featurizer.stop()
        scorer.stop()
    assert set(labels) == set(sent)
    assert parts and set(read_features([features_dir(settings)]).image_ids) == set(sent)


def test_producer_reports_oversize_and_unreadable_files(kafka_settings, tmp_path):
    """With ``fit_to_limit=False`` an oversize photo is refused and named, never silently dropped."""
    import dataclasses

    settings = dataclasses.replace(unique_settings(kafka_settings, tmp_path), max_message_bytes="200000")
    big = tmp_path / "big.png"
    Image.effect_noise((600, 600), 80).convert("RGB").save(big)  # incompressible: ~1 MB
    assert big.stat().st_size > 200_000
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), "red").save(small)
    producer = ImageProducer(settings, fit_to_limit=False)
    assert producer.send_file(big) is None
    assert producer.send_file(tmp_path / "missing.jpg") is None
    assert producer.send_file(small) is not None
    summary = producer.flush()
    producer.close()
    assert summary.sent == 1
    assert "too large" in summary.failed[str(big)]
    assert "unreadable" in summary.failed[str(tmp_path / "missing.jpg")]


def test_producer_reencodes_oversize_photos_to_fit_by_default(kafka_settings, tmp_path):
    import dataclasses

    settings = dataclasses.replace(unique_settings(kafka_settings, tmp_path), max_message_bytes="200000")
    big = tmp_path / "big.png"
    Image.effect_noise((600, 600), 80).convert("RGB").save(big)
    assert big.stat().st_size > 200_000
    producer = ImageProducer(settings)
    message = producer.send_file(big)
    summary = producer.flush()
    producer.close()
    assert message is not None and summary.sent == 1 and not summary.failed
    records = read_topic(settings, settings.images_topic, lambda rs: len(rs) >= 1)
    assert [r.key.decode() for r in records] == [message.image_id]
    arrived = records[0].value
    assert len(arrived) <= 200_000
    assert message.image_id == hashlib.sha256(arrived).hexdigest()  # the id names the bytes that arrived
    assert Image.open(io.BytesIO(arrived)).size[0] > 0  # still a photo


def test_produce_command_reads_paths_from_stdin(kafka_settings, tmp_path):
    settings = unique_settings(kafka_settings, tmp_path)
    paths = []
    for i, colour in enumerate(("red", "green", "blue")):
        p = tmp_path / f"{colour}.png"
        Image.new("RGB", (40, 40), colour).save(p)
        paths.append(str(p))
    paths.append(str(tmp_path / "nope.jpg"))
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
           "DEEPER_IMAGES_TOPIC": settings.images_topic}
    done = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "produce", "-", "-q"], input="\n".join(paths),
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1, done.stderr  # one path failed, and the command says so
    assert "produced 3 images" in done.stderr and "nope.jpg" in done.stderr
    records = read_topic(settings, settings.images_topic, lambda rs: len(rs) >= 3)
    assert len(records) == 3
    for r in records:
        message = make_image_message(r.value, "")
        assert r.key.decode() == message.image_id
        assert header(r, "content-type") == "image/png"
        assert header(r, "schema-version") == "1"