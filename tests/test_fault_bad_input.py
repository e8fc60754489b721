"""Bad input through the real stream: nothing crashes a worker, nothing is lost, every refusal says why.

Every kind of bad or unusual image file from :mod:`tests.bad_images` goes through the real producer,
broker, featurizer (real EfficientNet-Lite0) and scorer, interleaved with good photos, together with
messages that are not valid image messages at all. Each one must end up in exactly one place: a
Parquet row plus a label (files decode treats as "ok"), or the dead-letter topic with its expected
``dlq-reason`` and the original key, value, headers and source offset (everything else). The
oversize file never reaches the broker: the producer refuses it up front and says so.

The scorer gets the same treatment with feature records it cannot use (wrong size, wrong type,
NaN, unknown backbone, ...); ``tests/test_stream.py::test_scorer_dead_letters_vectors_it_cannot_score``
already covers a known-but-wrong backbone, a 10-d vector, a record cut inside its JSON header and
schema version 99, so those are not repeated here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pytest

from consumers.featurizer import Featurizer, features_dir
from consumers.scorer import Scorer
from pipeline.model.featurize import default_cache
from pipeline.kafka.kafka_io import make_producer
from pipeline.storage.parquet_reader import read_features
from pipeline.learning.registry import Registry
from producers.produce import ImageProducer
from schemas.messages import FEATURE_MAGIC, FeatureRecord, LabelRecord, decode_label, encode_features, encode_label
from tests import bad_images
from tests.stream_helpers import WorkerThread, header, read_topic, train_model, unique_settings

pytestmark = pytest.mark.stream

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
DLQ = "dlq-"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def trained(kafka_settings, tmp_path_factory, effnet, cache_dir):
    """One classifier for the module (examples/train: buildings, fish, tools): (registry dir, version)."""
    tmp = tmp_path_factory.mktemp("bad-input-model")
    settings = dataclasses.replace(kafka_settings, registry_dir=str(tmp / "registry"))
    version = train_model(settings, effnet, EXAMPLES / "train", default_cache(cache_dir))
    return settings.registry_dir, version


def _settings(kafka_settings, tmp_path, trained):
    return dataclasses.replace(unique_settings(kafka_settings, tmp_path), registry_dir=trained[0])


def _by_source(records) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records:
        source = header(r, "source")
        assert source not in out, f"two records with source {source!r}"
        out[source] = r
    return out


def _original_headers(record) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in record.headers or [] if not k.startswith(DLQ)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_alive(*threads: WorkerThread) -> None:
    for t in threads:
        assert t.error is None, f"{t.worker.stage} crashed: {t.error!r}"
        assert t.thread.is_alive(), f"{t.worker.stage} stopped on its own"


def _labels(settings, ids: set[str], timeout: float = 120) -> dict[str, list[LabelRecord]]:
    records = read_topic(settings, settings.labels_topic, lambda rs: ids <= {r.key.decode() for r in rs}, timeout)
    out: dict[str, list[LabelRecord]] = {}
    for r in records:
        out.setdefault(r.key.decode(), []).append(decode_label(r.value))
    return out


# --------------------------------------------------------------------------- images


def _invalid_image_messages() -> dict[str, tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """Messages on the images topic that aren't valid image messages: source -> (key, value, headers)."""
    def good_headers(source: str, version: bytes = b"1") -> list[tuple[str, bytes]]:
        return [("schema-version", version), ("content-type", b"image/jpeg"), ("source", source.encode())]

    out = {}
    data = bad_images.jpeg(seed=22)
    out["invalid/key-not-sha256-of-value"] = (_sha(data + b"x").encode(), data,
                                              good_headers("invalid/key-not-sha256-of-value"))
    data = bad_images.jpeg(seed=23)
    out["invalid/key-not-hex"] = (b"photo-23.jpg", data, good_headers("invalid/key-not-hex"))
    data = bad_images.jpeg(seed=24)
    out["invalid/null-key"] = (None, data, good_headers("invalid/null-key"))
    out["invalid/null-value"] = (_sha(b"deleted photo").encode(), None, good_headers("invalid/null-value"))
    data = bad_images.jpeg(seed=25)
    out["invalid/unknown-schema-version"] = (_sha(data).encode(), data,
                                             good_headers("invalid/unknown-schema-version", b"2"))
    return out


@pytest.fixture(scope="module")
def bad_input_run(kafka_settings, tmp_path_factory, effnet, trained):
    """Produce every bad-image case, interleaved with good photos and invalid messages, through
    a featurizer and a scorer running in threads; collect what came out where."""
    settings = _settings(kafka_settings, tmp_path_factory.mktemp("bad-input"), trained)
    cases = bad_images.cases()
    goods = sorted((EXAMPLES / "test").glob("*.jpg"))
    invalid = _invalid_image_messages()
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1))
    scorer = WorkerThread(Scorer(settings, reload_seconds=60))
    sent: dict[str, Any] = {}  # source -> Case | Path | "invalid"
    try:
        producer = ImageProducer(settings, fit_to_limit=False)  # the refusal is what is tested here
        every = max(1, len(cases) // len(goods))
        queue = list(goods)
        for i, case in enumerate(cases):
            if i % every == 0 and queue:  # a good photo every few bad ones: they share batches
                path = queue.pop(0)
                assert producer.send_file(path) is not None
                sent[str(path)] = path
            if producer.send(case.data, f"case/{case.name}") is not None:
                sent[f"case/{case.name}"] = case
        for path in queue:
            assert producer.send_file(path) is not None
            sent[str(path)] = path
        summary = producer.flush()
        producer.close()
        raw = make_producer(settings)
        for source, (key, value, headers) in invalid.items():
            raw.send(settings.images_topic, key=key, value=value, headers=headers)
            sent[source] = "invalid"
        # no go-deeper headers at all: any other producer's photo, an image like any other
        foreign = bad_images.jpeg(seed=21)
        raw.send(settings.images_topic, key=_sha(foreign).encode(), value=foreign,
                 headers=[("content-type", b"image/jpeg"), ("source", b"foreign/no-schema-version")])
        raw.flush()
        raw.close()

        dead_expected = sum(1 for s in sent.values() if s == "invalid"
                            or (isinstance(s, bad_images.Case) and s.expect == "dead_letter"))
        ok_ids = {_sha(s.data) for s in sent.values() if isinstance(s, bad_images.Case) and s.expect == "ok"}
        good_ids = {_sha(p.read_bytes()) for p in goods} | {_sha(foreign)}
        dead = read_topic(settings, settings.dead_letter_topic, lambda rs: len(rs) >= dead_expected, timeout=180)
        labels = _labels(settings, ok_ids | good_ids, timeout=180)
        images = read_topic(settings, settings.images_topic, lambda rs: len(rs) >= len(sent))
        _assert_alive(featurizer, scorer)
        alive = True
    finally:
        featurizer.stop()
        scorer.stop()
    return dict(settings=settings, cases=cases, goods=goods, invalid=invalid, sent=sent, summary=summary,
                dead=dead, labels=labels, images=images, ok_ids=ok_ids, good_ids=good_ids, alive=alive,
                version=trained[1])


def test_there_are_enough_kinds_of_bad_input():
    cases = bad_images.cases()
    assert len(cases) >= 25
    assert {c.reason for c in cases if c.expect == "dead_letter"} >= {
        "empty", "unsupported_format", "too_large", "too_small", "truncated", "corrupt"}
    assert [c.name for c in cases if c.oversize] == ["jpeg_oversize_noise"]


def test_oversize_image_is_refused_by_the_producer_with_a_reason(bad_input_run):
    run = bad_input_run
    oversize = [c for c in run["cases"] if c.oversize]
    for case in oversize:
        source = f"case/{case.name}"
        assert source not in run["sent"]
        assert "too large" in run["summary"].failed[source]
        assert "DEEPER_MAX_MESSAGE_BYTES" in run["summary"].failed[source]
        assert source not in _by_source(run["images"]), "the oversize image reached the broker"
    assert set(run["summary"].failed) == {f"case/{c.name}" for c in oversize}
    assert run["summary"].sent == len(run["sent"]) - len(run["invalid"])


def test_each_bad_image_is_featurized_or_dead_lettered_with_its_reason(bad_input_run):
    run = bad_input_run
    settings = run["settings"]
    dead = _by_source(run["dead"])
    images = _by_source(run["images"])
    streamed = [c for c in run["cases"] if not c.oversize]
    outcome: dict[str, str] = {}
    for case in streamed:
        source = f"case/{case.name}"
        image_id = _sha(case.data)
        if source in dead:
            outcome[case.name] = header(dead[source], "dlq-reason")
        elif image_id in run["labels"]:
            outcome[case.name] = "ok"
        else:
            outcome[case.name] = "lost"
    expected = {c.name: c.reason if c.expect == "dead_letter" else "ok" for c in streamed}
    assert outcome == expected

    for case in streamed:
        source = f"case/{case.name}"
        if case.expect != "dead_letter":
            continue
        d, original = dead[source], images[source]
        assert d.key == original.key == _sha(case.data).encode()
        assert d.value == original.value == case.data, f"{case.name}: dead letter must carry the original bytes"
        assert _original_headers(d) == list(original.headers), f"{case.name}: original headers changed"
        assert header(d, "dlq-stage") == "featurizer"
        assert header(d, "dlq-source-topic") == settings.images_topic
        assert header(d, "dlq-source-partition") == str(original.partition)
        assert header(d, "dlq-source-offset") == str(original.offset)
        assert header(d, "dlq-detail"), f"{case.name}: no detail"
        assert header(d, "dlq-time")


def test_invalid_image_messages_are_dead_lettered_as_invalid_message(bad_input_run):
    run = bad_input_run
    settings = run["settings"]
    dead = _by_source(run["dead"])
    images = _by_source(run["images"])
    details = {}
    for source, (key, value, headers) in run["invalid"].items():
        assert source in dead, f"{source} was not dead-lettered"
        d, original = dead[source], images[source]
        assert header(d, "dlq-reason") == "invalid_message", source
        assert d.key == key == original.key
        if value is None:  # a tombstone: the dead letter can only carry "no bytes"
            assert original.value is None and d.value in (None, b"")
        else:
            assert d.value == value == original.value
        assert _original_headers(d) == headers == list(original.headers)
        assert header(d, "dlq-stage") == "featurizer"
        assert header(d, "dlq-source-topic") == settings.images_topic
        assert (header(d, "dlq-source-partition"), header(d, "dlq-source-offset")) == (
            str(original.partition), str(original.offset))
        details[source] = header(d, "dlq-detail")
    assert "unknown schema version" in details["invalid/unknown-schema-version"]
    assert "does not match sha256" in details["invalid/key-not-sha256-of-value"]
    assert "null value" in details["invalid/null-value"]
    assert not {_sha(v) for _, v, _ in run["invalid"].values() if v} & set(run["labels"])


def test_good_photos_in_the_same_batches_are_featurized_and_labelled(bad_input_run):
    run = bad_input_run
    assert run["alive"], "a worker crashed or stopped on bad input"
    labels = run["labels"]
    assert run["good_ids"] <= set(labels)
    assert run["ok_ids"] <= set(labels)
    for image_id in run["good_ids"] | run["ok_ids"]:
        assert len(labels[image_id]) == 1, "no worker restarted, so nothing is labelled twice"
        assert labels[image_id][0].classifier_version == run["version"]
    # the "ok" files really shared batches with bad ones: they arrived interleaved on each partition
    by_partition: dict[int, list[str]] = {}
    for r in sorted(run["images"], key=lambda r: (r.partition, r.offset)):
        by_partition.setdefault(r.partition, []).append(header(r, "source"))
    assert all(any(s.startswith("case/") for s in sources) for sources in by_partition.values())


def test_parquet_rows_are_the_ok_cases_plus_the_good_photos(bad_input_run):
    run = bad_input_run
    root = features_dir(run["settings"])
    table = pads.dataset(root, format="parquet", partitioning="hive").to_table()
    ids = table.column("image_id").to_pylist()
    expected = run["ok_ids"] | run["good_ids"]
    ok_cases = [c for c in run["cases"] if c.expect == "ok" and not c.oversize]
    assert len(ids) == len(expected) == len(ok_cases) + 9 + 1  # the good photos and the foreign one
    assert set(ids) == expected
    fs = read_features([root])
    assert len(fs) == len(expected) and fs.duplicates_dropped == 0
    assert np.isfinite(fs.vectors).all()
    sizes = dict(zip(table.column("image_id").to_pylist(),
                     zip(table.column("width").to_pylist(), table.column("height").to_pylist())))
    for case in run["cases"]:
        if case.expect == "ok" and not case.oversize:
            assert sizes[_sha(case.data)] == case.size, case.name


# --------------------------------------------------------------------------- features


def _feature_value(header_obj: Any, body: bytes) -> bytes:
    head = header_obj if isinstance(header_obj, bytes) else json.dumps(header_obj).encode()
    return FEATURE_MAGIC + struct.pack("<I", len(head)) + head + body


def _bad_feature_messages(meta, rng) -> dict[str, tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """name -> (expected dlq-reason, key, value, headers): everything a scorer can be sent by mistake."""
    def record(name: str, vector=None, **changes) -> FeatureRecord:
        fields = dict(backbone=meta.backbone, weights_digest=meta.weights_digest, layer=meta.layer, source=name)
        fields.update(changes)
        v = rng.normal(size=meta.dim).astype(np.float32) if vector is None else vector
        return FeatureRecord(_sha(name.encode()), v, **fields)

    def msg(reason: str, rec: FeatureRecord, key=None, value=None, headers=None, mutate=None):
        k, v, h = encode_features(rec)
        if mutate:
            v = mutate(v)
        return (reason, k if key is None else key, v if value is None else value, h if headers is None else headers)

    def fv_headers(name: str) -> list[tuple[str, bytes]]:
        return [("schema-version", b"1"), ("content-type", b"application/vnd.go-deeper.features.v1"),
                ("source", name.encode())]

    nan = rng.normal(size=meta.dim).astype(np.float32)
    nan[7] = np.nan
    inf = rng.normal(size=meta.dim).astype(np.float32)
    inf[3] = np.inf
    good_header = json.loads(encode_features(record("x"))[1][8:-4 * meta.dim])
    body = rng.normal(size=meta.dim).astype("<f4").tobytes()
    jpeg = bad_images.jpeg(seed=31)
    label_key, label_value, label_headers = encode_label(
        LabelRecord(_sha(b"label"), "fish", {"fish": 1.0}, "v0001", meta.backbone, meta.layer, "fv/label-record"))
    return {
        "fv/vector-cut-short": msg("invalid_features", record("fv/vector-cut-short"), mutate=lambda v: v[:-100]),
        "fv/one-float-missing": msg("invalid_features", record("fv/one-float-missing"), mutate=lambda v: v[:-4]),
        "fv/nan": msg("invalid_features", record("fv/nan", nan)),
        "fv/inf": msg("invalid_features", record("fv/inf", inf)),
        "fv/label-record": ("invalid_features", label_key, label_value, label_headers),  # wrong topic
        "fv/raw-image-bytes": ("invalid_features", _sha(jpeg).encode(), jpeg, fv_headers("fv/raw-image-bytes")),
        "fv/no-schema-version": msg("invalid_features", record("fv/no-schema-version"),
                                    headers=[("source", b"fv/no-schema-version")]),
        "fv/schema-version-2": msg("invalid_features", record("fv/schema-version-2"),
                                   headers=fv_headers("fv/schema-version-2")[1:] + [("schema-version", b"2")]),
        "fv/null-value": ("invalid_features", _sha(b"null").encode(), None, fv_headers("fv/null-value")),
        "fv/empty-value": ("invalid_features", _sha(b"empty").encode(), b"", fv_headers("fv/empty-value")),
        "fv/header-not-json": ("invalid_features", _sha(b"nj").encode(), _feature_value(b"{not json", body),
                               fv_headers("fv/header-not-json")),
        "fv/header-not-utf8": ("invalid_features", _sha(b"nu").encode(), _feature_value(b"\xff\xfe{}", body),
                               fv_headers("fv/header-not-utf8")),
        "fv/header-is-a-list": ("invalid_features", _sha(b"list").encode(), _feature_value([1, 2], body),
                                fv_headers("fv/header-is-a-list")),
        "fv/header-without-backbone": (
            "invalid_features", good_header["image_id"].encode(),
            _feature_value({k: v for k, v in good_header.items() if k != "backbone"}, body),
            fv_headers("fv/header-without-backbone")),
        "fv/dim-not-a-number": ("invalid_features", good_header["image_id"].encode(),
                                _feature_value({**good_header, "dim": "many"}, body),
                                fv_headers("fv/dim-not-a-number")),
        "fv/header-length-4gb": ("invalid_features", _sha(b"4g").encode(),
                                 FEATURE_MAGIC + struct.pack("<I", 0xFFFFFFFF) + b"{}" + body,
                                 fv_headers("fv/header-length-4gb")),
        "fv/key-not-image-id": msg("invalid_features", record("fv/key-not-image-id"), key=_sha(b"other").encode()),
        "fv/unknown-backbone": msg("features_mismatch", record("fv/unknown-backbone", backbone="resnet_9000")),
        "fv/other-layer": msg("features_mismatch",
                              record("fv/other-layer", rng.normal(size=1000).astype(np.float32), layer="logits")),
        "fv/other-weights": msg("features_mismatch", record("fv/other-weights", weights_digest="0" * 64)),
    }


def test_scorer_dead_letters_feature_messages_it_cannot_use_and_keeps_labelling(kafka_settings, tmp_path, trained):
    settings = _settings(kafka_settings, tmp_path, trained)
    meta = Registry(settings.registry_dir).load_current().feature_meta
    rng = np.random.default_rng(5)
    bad = _bad_feature_messages(meta, rng)
    good_before = [FeatureRecord(_sha(f"before-{i}".encode()), rng.normal(size=meta.dim).astype(np.float32),
                                 meta.backbone, meta.weights_digest, meta.layer, f"good/before-{i}") for i in range(2)]
    good_after = [FeatureRecord(_sha(f"after-{i}".encode()), rng.normal(size=meta.dim).astype(np.float32),
                                meta.backbone, meta.weights_digest, meta.layer, f"good/after-{i}") for i in range(4)]
    scorer = WorkerThread(Scorer(settings, batch_size=8))
    try:
        producer = make_producer(settings)

        def send(key, value, headers):
            producer.send(settings.features_topic, key=key, value=value, headers=headers, partition=0)

        for r in good_before:
            send(*encode_features(r))
        for _, key, value, headers in bad.values():  # all on one partition, in order: the good ones come after
            send(key, value, headers)
        for r in good_after:
            send(*encode_features(r))
        producer.flush()
        producer.close()
        dead = read_topic(settings, settings.dead_letter_topic, lambda rs: len(rs) >= len(bad))
        labels = _labels(settings, {r.image_id for r in good_before + good_after})
        features = read_topic(settings, settings.features_topic,
                              lambda rs: len(rs) >= len(bad) + len(good_before) + len(good_after))
        _assert_alive(scorer)
    finally:
        scorer.stop()
    dead_by_source = _by_source(dead)
    originals = _by_source(features)
    assert {s: header(d, "dlq-reason") for s, d in dead_by_source.items()} == {s: b[0] for s, b in bad.items()}
    for source, (reason, key, value, headers) in bad.items():
        d, original = dead_by_source[source], originals[source]
        assert d.key == key
        assert d.value == (value or b"") or (value is None and d.value is None), source
        assert _original_headers(d) == headers
        assert header(d, "dlq-stage") == "scorer"
        assert header(d, "dlq-source-topic") == settings.features_topic
        assert (header(d, "dlq-source-partition"), header(d, "dlq-source-offset")) == (
            str(original.partition), str(original.offset))
    assert "NaN" in header(dead_by_source["fv/nan"], "dlq-detail")
    assert "magic" in header(dead_by_source["fv/raw-image-bytes"], "dlq-detail")
    assert "resnet_9000" in header(dead_by_source["fv/unknown-backbone"], "dlq-detail")
    for r in good_before + good_after:
        assert [label.classifier_version for label in labels[r.image_id]] == [trained[1]]
    assert not {_sha(s.encode()) for s in bad} & set(labels)


def test_scorer_survives_feature_headers_with_fields_of_the_wrong_type(kafka_settings, tmp_path, trained):
    settings = _settings(kafka_settings, tmp_path, trained)
    meta = Registry(settings.registry_dir).load_current().feature_meta
    rng = np.random.default_rng(6)
    body = rng.normal(size=meta.dim).astype("<f4").tobytes()
    base = {"image_id": _sha(b"typed"), "backbone": meta.backbone, "weights_digest": meta.weights_digest,
            "layer": meta.layer, "dim": meta.dim, "source": "fv/typed"}
    bad = {
        "fv/width-not-a-number": {**base, "image_id": _sha(b"w"), "width": "wide"},
        "fv/source-not-a-string": {**base, "image_id": _sha(b"s"), "source": 12},
        "fv/image-id-not-a-string": {**base, "image_id": 12345},
    }
    good = FeatureRecord(_sha(b"typed-good"), rng.normal(size=meta.dim).astype(np.float32), meta.backbone,
                         meta.weights_digest, meta.layer, "good/typed")
    scorer = WorkerThread(Scorer(settings, batch_size=8))
    try:
        producer = make_producer(settings)
        for name, head in bad.items():
            key = None if not isinstance(head["image_id"], str) else head["image_id"].encode()
            producer.send(settings.features_topic, key=key, value=_feature_value(head, body), partition=0,
                          headers=[("schema-version", b"1"), ("source", name.encode())])
        key, value, headers = encode_features(good)
        producer.send(settings.features_topic, key=key, value=value, headers=headers, partition=0)
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 30
        labels: dict = {}
        while time.monotonic() < deadline and scorer.thread.is_alive() and good.image_id not in labels:
            try:
                labels = _labels(settings, {good.image_id}, timeout=3)
            except AssertionError:  # nothing labelled yet: ask again until the deadline
                continue
        _assert_alive(scorer)
        dead = read_topic(settings, settings.dead_letter_topic, lambda rs: len(rs) >= len(bad), timeout=10)
    finally:
        scorer.worker.stop_event.set()
        scorer.thread.join(60)
    assert {header(d, "source"): header(d, "dlq-reason") for d in dead} == {n: "invalid_features" for n in bad}
    assert good.image_id in labels
