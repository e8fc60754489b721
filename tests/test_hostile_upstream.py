"""Hostile upstream: what real producers send, through the real stream, ends as a row or a dead letter.

One run of a featurizer and a scorer (threads, real broker, real model, real Parquet) takes
messages from foreign clients and odd senders, interleaved with ordinary photos:

- librdkafka (confluent-kafka's client) batches compressed with gzip, snappy, lz4 and zstd;
- Debian's kcat (librdkafka 2.0.2, Apache Kafka only): compressed files, and a header key that
  is not UTF-8, which kafka-python cannot parse at all;
- null header values (Java's ``headers.add(k, null)``), duplicate headers;
- plain producers: raw bytes, no headers, a file name or no key; an uppercase sha256 key;
- a 600,000-character ``source`` header; a JPEG with malformed EXIF; garbage bytes;
- an undecodable message larger than the dead-letter topic allows.

Then every offset is checked against the stream invariant (:mod:`tests.invariant`), and each
case against its expected outcome.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from consumers.featurizer import Featurizer
from consumers.scorer import Scorer
from pipeline.kafka.kafka_io import make_admin
from producers.produce import ImageProducer
from tests import bad_images
from tests.invariant import assert_stream_invariant, featurizer_outcomes, read_all
from tests.stream_helpers import WorkerThread, train_model, unique_settings

pytestmark = pytest.mark.stream

REPO = Path(__file__).resolve().parent.parent
PHOTOS = sorted((REPO / "examples" / "test").glob("*.jpg"))
CODECS = ("gzip", "snappy", "lz4", "zstd")
#: an undecodable value over the dead-letter topic's 1 MiB limit, under the images topic's 4 MiB
OVERSIZE = 1_300_000


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _header(record: Any, name: str) -> str | None:
    for k, v in record.headers or []:
        if k == name:
            return (v or b"").decode("utf-8", "replace")
    return None


def _apache_kafka(settings) -> bool:
    """kcat's librdkafka 2.0.2 can't parse Tansu 0.6's ApiVersion reply (docs/broker.md)."""
    from tests.broker_fixture import session_broker_kind

    return session_broker_kind() == "kafka"


def _big_images_topic(settings) -> None:
    """Let the images topic take a 4 MiB message (the dead-letter topic keeps the default)."""
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = make_admin(settings)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, settings.images_topic,
                                            {"max.message.bytes": str(4 * 1024 * 1024)})])
    except Exception:  # noqa: BLE001 - Tansu 0.6 has no topic configs and takes any size
        pass
    finally:
        admin.close()


def _librdkafka_producer(settings, **config):
    confluent_kafka = pytest.importorskip("confluent_kafka")
    return confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers,
                                     "message.max.bytes": 8 * 1024 * 1024, **config})


def _send_librdkafka(settings, expected: dict[str, str]) -> None:
    """Foreign producers: librdkafka, every codec; odd headers and keys; plain bytes."""
    photos = iter(PHOTOS * 4)
    for codec in CODECS:
        producer = _librdkafka_producer(settings, **{"compression.type": codec, "linger.ms": 50})
        for _ in range(2):
            data = next(photos).read_bytes()
            producer.produce(settings.images_topic, value=data, key=f"photo-{codec}.jpg".encode())
            expected[_sha(data)] = "ok"
        assert producer.flush(30) == 0
    producer = _librdkafka_producer(settings)
    data = bad_images.jpeg(seed=101)
    producer.produce(settings.images_topic, value=data, headers=[("label", None), ("source", b"first"),
                                                                 ("source", b"second")])
    expected[_sha(data)] = "ok:dup-null-headers"
    data = bad_images.jpeg(seed=102)
    producer.produce(settings.images_topic, value=data)  # no key, no headers
    expected[_sha(data)] = "ok"
    producer.produce(settings.images_topic, value=b"not an image at all", key=b"garbage")
    expected[_sha(b"not an image at all")] = "unsupported_format"
    data = b"\x00" * 16 + bytes(range(256)) * (OVERSIZE // 256)
    producer.produce(settings.images_topic, value=data, key=b"oversize-garbage")
    expected[_sha(data)] = "oversize"
    assert producer.flush(30) == 0


def _send_ours(settings, expected: dict[str, str]) -> None:
    producer = ImageProducer(settings)
    data = bad_images.jpeg(seed=103)
    assert producer.send(data, "x" * 600_000) is not None
    expected[_sha(data)] = "ok:long-source"
    for case in bad_images.cases():
        if case.name.startswith("jpeg_exif_") and case.expect == "ok":
            assert producer.send(case.data, f"case/{case.name}") is not None
            expected[_sha(case.data)] = "ok"
    assert producer.flush().failed == {}
    producer.close()
    from pipeline.kafka.kafka_io import make_producer

    raw = make_producer(settings)
    data = bad_images.jpeg(seed=104)
    raw.send(settings.images_topic, key=_sha(data).upper().encode(), value=data,
             headers=[("schema-version", b"1"), ("source", b"uppercase-key")])
    expected[_sha(data)] = "ok"
    data = bad_images.jpeg(seed=105)  # a value *and* a claim check: which one is the image?
    raw.send(settings.images_topic, key=b"both", value=data, headers=[("image-uri", b"s3://photos/a.jpg")])
    expected[_sha(data)] = "fetch_refused"
    raw.flush()
    raw.close()


def _send_kcat(settings, expected: dict[str, str], tmp: Path) -> int:
    """Debian's kcat: a compressed file per codec, and one header key that isn't UTF-8."""
    kcat = shutil.which("kcat")
    if kcat is None or not _apache_kafka(settings):
        return 0
    for i, codec in enumerate(CODECS):
        data = bad_images.jpeg(seed=110 + i)
        path = tmp / f"kcat-{codec}.jpg"
        path.write_bytes(data)
        subprocess.run([kcat, "-P", "-b", settings.bootstrap_servers, "-t", settings.images_topic, "-z", codec,
                        "-k", path.name, "-H", "source=kcat", str(path)], check=True, timeout=60)
        expected[_sha(data)] = "ok"
    path = tmp / "kcat-bad-header.jpg"
    path.write_bytes(bad_images.jpeg(seed=120))
    subprocess.run([kcat.encode(), b"-P", b"-b", settings.bootstrap_servers.encode(), b"-t",
                    settings.images_topic.encode(), b"-H", b"\xff\xfekey=v", str(path).encode()],
                   check=True, timeout=60)
    return 1  # one unreadable record


@pytest.fixture(scope="module")
def hostile_run(kafka_settings, tmp_path_factory, effnet):
    tmp = tmp_path_factory.mktemp("hostile")
    settings = unique_settings(kafka_settings, tmp, partitions=2)
    train_model(settings, effnet, REPO / "examples" / "train")
    _big_images_topic(settings)
    expected: dict[str, str] = {}
    featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1))
    scorer = WorkerThread(Scorer(settings, reload_seconds=60))
    try:
        _send_librdkafka(settings, expected)
        _send_ours(settings, expected)
        unreadable = _send_kcat(settings, expected, tmp)
        total = len(read_all(settings, settings.images_topic)) or len(expected) + unreadable
        _wait_for_outcomes(settings, total)
        alive = featurizer.thread.is_alive() and scorer.thread.is_alive()
    finally:
        featurizer.stop()
        scorer.stop()
    return dict(settings=settings, expected=expected, unreadable=unreadable, alive=alive)


def _wait_for_outcomes(settings, total: int, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = featurizer_outcomes(settings)
        if sum(1 for o in out.offsets if out.processed[o] or out.dead[o]) >= total and \
                len(read_all(settings, settings.labels_topic)) >= sum(out.processed.values()):
            return
        time.sleep(2)


def test_the_stream_survives_every_hostile_message(hostile_run):
    assert hostile_run["alive"], "a worker died on hostile input"


def test_every_offset_ends_as_a_row_or_a_dead_letter(hostile_run):
    summary = assert_stream_invariant(hostile_run["settings"])
    assert summary["images"] >= len(hostile_run["expected"]) + hostile_run["unreadable"]


def test_each_message_has_its_expected_outcome(hostile_run):
    settings, expected = hostile_run["settings"], hostile_run["expected"]
    labelled = {r.key.decode() for r in read_all(settings, settings.labels_topic)}
    dead = {}
    for d in read_all(settings, settings.dead_letter_topic):
        dead[d.key] = d
    for image_id, outcome in expected.items():
        if outcome.startswith("ok"):
            assert image_id in labelled, f"{image_id[:12]} ({outcome}) was not labelled"
    reasons = {(_header(d, "dlq-reason"), _header(d, "dlq-value-omitted") is not None) for d in dead.values()}
    assert ("unsupported_format", False) in reasons
    assert ("fetch_refused", False) in reasons, "a message with a value and a claim check must be refused"
    assert ("unsupported_format", True) in reasons, "the oversize message's dead letter must omit its value"


def test_foreign_keys_and_odd_headers_are_kept_as_provenance(hostile_run):
    from schemas.messages import decode_features

    settings = hostile_run["settings"]
    records = [decode_features(r.key, r.value, r.headers) for r in read_all(settings, settings.features_topic)]
    keys = {r.extra.get("kafka_key") for r in records}
    assert {f"photo-{codec}.jpg" for codec in CODECS} <= keys, "a foreign producer's key must be kept"
    by_source = {r.source for r in records}
    assert "second" in by_source, "duplicate headers: the last one wins"
    long = [r.source for r in records if r.source.startswith("xxxx")]
    assert long and len(long[0]) < 10_000 and "truncated 595904 chars" in long[0]
    assert any(s.startswith(f"kafka://{settings.images_topic}/") for s in by_source), \
        "a message without a source gets its position as source"


def test_unreadable_records_are_dead_lettered_with_their_position(hostile_run):
    if not hostile_run["unreadable"]:
        pytest.skip("needs Debian's kcat on Apache Kafka to send a header key that isn't UTF-8")
    settings = hostile_run["settings"]
    dead = [d for d in read_all(settings, settings.dead_letter_topic) if _header(d, "dlq-reason") == "unreadable_record"]
    assert len(dead) == 1
    assert _header(dead[0], "dlq-source-topic") == settings.images_topic
    assert _header(dead[0], "dlq-source-offset") is not None


def test_oversize_dead_letter_keeps_position_and_headers(hostile_run):
    settings = hostile_run["settings"]
    dead = [d for d in read_all(settings, settings.dead_letter_topic) if _header(d, "dlq-value-omitted")]
    assert len(dead) == 1
    d = dead[0]
    assert d.key == b"oversize-garbage" and d.value in (b"", None)
    assert _header(d, "dlq-value-omitted").startswith(str(OVERSIZE - OVERSIZE % 256 + 16))
    assert _header(d, "dlq-source-partition") is not None and _header(d, "dlq-stage") == "featurizer"

