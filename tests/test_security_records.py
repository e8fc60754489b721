"""Records are validated where they are decoded, and one odd photo never blocks a retrain.

Anyone who can write to the features or labels topic can forge a record. Every field that names
something (ids, versions, labels, sources, backbones, layers) is checked by the decoders in
:mod:`schemas.messages`; a bad record raises :class:`SchemaError` (the scorer's dead letter, the
UI's and the labels reader's skipped-and-counted record), so it is never rendered or written
to a CSV. What a foreign producer puts in an image message's headers is made safe (or refused)
before it becomes a field of ours, so our own records always pass.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest

from pipeline.errors import DeeperError, SchemaError
from pipeline.learning.classifier import ClassifierSpec
from pipeline.learning.registry import Registry
from pipeline.learning.training import train_and_register
from pipeline.identity import FeatureId
from schemas.messages import (FeatureRecord, LabelRecord, decode_features, decode_label, describe_key,
                              encode_features, encode_label, label_problem, parse_image_message, printable)

IMAGE_ID = hashlib.sha256(b"photo").hexdigest()
MARKUP = '<img src=x onerror="window.__pwned=1">'


def _features(**changes) -> tuple[bytes, bytes, list]:
    fields = dict(image_id=IMAGE_ID, vector=np.zeros(4, np.float32), backbone="efficientnet_lite0",
                  weights_digest="ab" * 32, layer="prelogits", source="cam/1.jpg", label="cars")
    fields.update(changes)
    extra = fields.pop("extra", {})
    key, value, headers = encode_features(FeatureRecord(**fields, extra=extra))
    return IMAGE_ID.encode() if changes.get("image_id") else key, value, headers


def _label(**changes) -> bytes:
    record = LabelRecord(IMAGE_ID, "cars", {"cars": 0.5, "boats": -0.5}, "v0003", "efficientnet_lite0", "prelogits",
                         "cam/1.jpg", probabilities={"cars": 0.7, "boats": 0.3}, confidence=0.7)
    value = json.loads(encode_label(record)[1])
    value.update(changes)
    return json.dumps(value).encode()


def test_good_records_decode():
    assert decode_features(*_features()).image_id == IMAGE_ID
    assert decode_features(*_features(label=MARKUP, source=MARKUP)).label == MARKUP  # text, shown escaped
    assert decode_label(_label()).label == "cars"
    assert decode_label(_label(label=MARKUP, source=MARKUP, scores={MARKUP: 1.0})).label == MARKUP


@pytest.mark.parametrize("changes", [
    {"image_id": f'{"a" * 60}" onmouseover="x'}, {"image_id": "A" * 64}, {"image_id": "a" * 64 + "\n"},
    {"image_id": "a" * 63}, {"backbone": MARKUP}, {"backbone": "x" * 65}, {"layer": "prelogits<b>"},
    {"layer": "a+" * 20 + "a"}, {"weights_digest": "ab/../cd"}, {"source": "cam\n1.jpg"}, {"source": "x" * 5000},
    {"source": "a\u202egpj.exe"}, {"label": "cars\r\n"}, {"label": "=HYPERLINK(\"http://x\")"}, {"label": " cars"},
    {"label": ""}, {"label": "x" * 129}, {"extra": {"precision": MARKUP}}, {"extra": {"origin": "t/0/1\n"}},
    {"extra": {"kafka_key": "k\x1b[2J"}},
])
def test_forged_feature_records_are_refused(changes):
    with pytest.raises(SchemaError):
        decode_features(*_features(**changes))


@pytest.mark.parametrize("changes", [
    {"image_id": f'{"a" * 60}" onmouseover="x'}, {"image_id": "a" * 64 + "\n"}, {"image_id": None},
    {"classifier_version": MARKUP}, {"classifier_version": "v1\n"}, {"backbone": MARKUP}, {"layer": "<b>"},
    {"label": "x\ny"}, {"label": "+cmd"}, {"label": 7}, {"scores": {"a\nb": 1.0}}, {"scores": {"a": "1"}},
    {"scores": {"a": float("inf")}}, {"scores": []}, {"probabilities": {"=1+1": 0.5}}, {"confidence": 3},
    {"confidence": True}, {"unknown": "yes"}, {"source": "a\x00b"}, {"origin": "x" * 600},
    {"kafka_key": "\x07bell"}, {"scored_at": "now\r\n"}, {"surprise": 1},
])
def test_forged_label_records_are_refused(changes):
    with pytest.raises(SchemaError):
        decode_label(_label(**changes))


def test_a_producer_label_that_is_no_class_name_is_refused_and_a_source_made_printable():
    data = b"\xff\xd8 not decoded here"
    with pytest.raises(SchemaError, match="label header"):
        parse_image_message(b"k", data, [("label", b"cars\nboats")])
    with pytest.raises(SchemaError, match="label header"):
        parse_image_message(b"k", data, [("label", b"=cmd|' /C calc'!A0")])
    assert parse_image_message(b"k", data, [("label", MARKUP.encode())]).label == MARKUP
    assert printable("cam\n7/\u202eimg.jpg\x1b") == "cam\\x0a7/\\u202eimg.jpg\\x1b"
    assert describe_key(b"plain-key") == "plain-key"
    assert describe_key(b"line\nbreak").startswith("base64:") and describe_key(b"base64:AA").startswith("base64:")


def test_the_featurizer_writes_only_records_that_decode():
    """A hostile source header and key, as the featurizer turns them into a feature record."""
    from consumers.outputs import cap_text

    source = cap_text(printable("cam\n" + "x" * 6000 + MARKUP))
    key = cap_text(describe_key(("k" * 9000).encode()))
    decoded = decode_features(*_features(source=source, extra={"kafka_key": key, "origin": "t/0/1"}))
    assert decoded.source == source and decoded.extra["kafka_key"] == key


# --------------------------------------------------------------------------- retraining


META = FeatureId("synthetic", "0" * 64, "prelogits", 4, "")


def _blobs(labels: list[str]) -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = {name: rng.normal(0, 5, 4) for name in set(labels)}
    return np.stack([centres[name] + rng.normal(0, 0.1, 4) for name in labels]).astype(np.float32)


def test_one_odd_photo_does_not_block_retraining(tmp_path, caplog):
    labels = ["cars"] * 4 + ["boats"] * 4 + ["typo-carz", "unknown", "=cmd"]
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(labels))]
    caplog.set_level(logging.WARNING)
    outcome = train_and_register(ids, labels, _blobs(labels), META, ClassifierSpec(), Registry(tmp_path))
    assert sorted(outcome.classes) == ["boats", "cars"] and outcome.n_images == 8
    assert set(outcome.left_out) == {"typo-carz", "unknown", "=cmd"}
    lines = [r.getMessage() for r in caplog.records if "left out of this training" in r.getMessage()]
    assert len(lines) == 1 and "'typo-carz' (1 photo" in lines[0]
    assert Registry(tmp_path).load_current().metadata["left_out"] == outcome.left_out


def test_fewer_than_two_usable_classes_is_a_clear_error(tmp_path):
    labels = ["cars"] * 3 + ["boats"]
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(labels))]
    with pytest.raises(DeeperError, match=r"at least two classes with at least 2 images.*'boats': 1 photo"):
        train_and_register(ids, labels, _blobs(labels), META, ClassifierSpec(), Registry(tmp_path))


def test_label_rule_examples():
    for good in ("cars", "Porsche 911 (1965)", "café", "a,b", "_misc", MARKUP):
        assert label_problem(good) is None, good
    for bad in ("", " x", "x ", "-1", "@x", "=x", "+x", "a\tb", "a\u200bb", None, 3):
        assert label_problem(bad), bad


def test_the_producer_refuses_a_label_that_is_no_class_name(kafka_settings, tmp_path):
    """``deeper produce --labels-from-folders`` on a folder named ``=cmd``: refused at the
    producer with the reason, instead of a dead letter downstream."""
    from producers.produce import ImageProducer
    from tests.stream_helpers import unique_settings

    producer = ImageProducer(unique_settings(kafka_settings, tmp_path, partitions=1))
    try:
        assert producer.send(b"\xff\xd8 photo", "cam/1.jpg", "=cmd") is None
        assert producer.send_reference("s3://b/k.jpg", "cam/2.jpg", "cars\nboats", image_id=IMAGE_ID) is None
        summary = producer.flush()
    finally:
        producer.close()
    assert "is not a class name" in summary.failed["cam/1.jpg"] and "cam/2.jpg" in summary.failed
