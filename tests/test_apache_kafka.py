"""Apache Kafka as a local broker (pipeline.app.broker.apache_kafka, run by pipeline.app.broker.local).

One real broker (a JVM) per module, in a tmp state dir on free loopback ports: install (Maven,
once per cache), start, produce/consume, a photo-size record, a transaction, kcat (Debian's
librdkafka 2.0.2 cannot talk to Tansu 0.6, it can to Apache Kafka), a crash and a restart
on the same data, stop. Skips where Java or Maven is missing; CI installs both (.ci/run).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka import errors as kafka_errors

from pipeline.app.broker import apache_kafka, local as broker
from pipeline.kafka import kafka_io
from tests.test_broker import listening_addresses, pid_alive, poll_until, read_all

pytestmark = [
    pytest.mark.stream,
    pytest.mark.skipif(apache_kafka.unavailable_reason() is not None,
                       reason=f"Apache Kafka cannot run here: {apache_kafka.unavailable_reason()}"),
]


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.BrokerInfo]:
    state_dir = tmp_path_factory.mktemp("apache-kafka")
    info = broker.start(state_dir, port=broker.free_port(), kind="kafka")
    try:
        yield info
    finally:
        broker.stop(state_dir, grace_s=5)


def _topic(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def test_install_is_idempotent() -> None:
    libs = apache_kafka.install()
    assert (libs / f"kafka_{apache_kafka.SCALA_VERSION}-{apache_kafka.KAFKA_VERSION}.jar").is_file()
    assert list(libs.glob("log4j-slf4j-impl-*.jar")), "without an slf4j binding the broker logs nothing"
    started = time.monotonic()
    assert apache_kafka.install() == libs
    assert time.monotonic() - started < 1.0  # present: no Maven run


def test_broker_runs_on_loopback_with_its_pid_and_log(kafka: broker.BrokerInfo) -> None:
    assert kafka.kind == "kafka" and pid_alive(kafka.pid)
    assert broker.status(Path(kafka.state_dir)) == kafka
    assert kafka.controller_port is not None
    for port in (kafka.port, kafka.controller_port):  # Java binds IPv6 sockets: ::ffff:127.0.0.1 is IPv4 loopback
        assert {a.removeprefix("::ffff:") for a in listening_addresses(port)} == {"127.0.0.1"}
    assert "Kafka Server started" in kafka.log_path.read_text()


def test_round_trip_through_a_consumer_group(kafka: broker.BrokerInfo) -> None:
    settings, topic = kafka.settings(), _topic("round-trip")
    kafka_io.ensure_topics(settings, {topic: 2})
    producer = kafka_io.make_producer(settings)
    assert kafka_io.producer_is_idempotent(producer)
    sent = {f"k{i}".encode(): f"v{i}".encode() for i in range(20)}
    for key, value in sent.items():
        producer.send(topic, value, key=key)
    assert kafka_io.close_producer(producer)

    consumer = kafka_io.make_consumer(settings, f"{topic}.group", [topic])
    try:
        records = poll_until(consumer, len(sent))
        assert {r.key: r.value for r in records} == sent
    finally:
        consumer.close()


def test_photo_size_records_pass_and_the_broker_limit_holds(kafka: broker.BrokerInfo) -> None:
    """12 MiB passes (camera photos); over message.max.bytes the *broker* refuses."""
    settings, topic = kafka.settings(), _topic("photos")
    kafka_io.ensure_topics(settings, {topic: 1})
    limit = apache_kafka.MAX_MESSAGE_BYTES
    producer = kafka_io.make_producer(settings, max_request_size=2 * limit)
    try:
        photo = b"\xff" * (12 * 1024 * 1024)
        producer.send(topic, photo).get(timeout=60)
        with pytest.raises(kafka_errors.MessageSizeTooLargeError):
            producer.send(topic, b"x" * (limit + 1024)).get(timeout=60)
    finally:
        kafka_io.close_producer(producer)
    consumer = KafkaConsumer(**settings.kafka_client_config(), auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000,
                             fetch_max_bytes=2 * limit, max_partition_fetch_bytes=2 * limit)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        assert [record.value for record in consumer] == [photo]
    finally:
        consumer.close()


def test_a_transaction_commits_on_one_node(kafka: broker.BrokerInfo) -> None:
    """Needs the one-replica transaction log settings (BROKER_SETTINGS)."""
    confluent_kafka = pytest.importorskip("confluent_kafka")
    topic = _topic("txn")
    kafka_io.ensure_topics(kafka.settings(), {topic: 1})
    producer = confluent_kafka.Producer({"bootstrap.servers": kafka.bootstrap_servers,
                                         "transactional.id": f"{topic}.tx"})
    producer.init_transactions(60)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, f"committed-{i}".encode())
    producer.commit_transaction(60)
    producer.begin_transaction()
    producer.produce(topic, b"aborted")
    producer.abort_transaction(60)
    consumer = KafkaConsumer(**kafka.settings().kafka_client_config(), auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000,
                             isolation_level="read_committed")
    try:
        consumer.assign([TopicPartition(topic, 0)])
        assert [record.value for record in consumer] == [f"committed-{i}".encode() for i in range(3)]
    finally:
        consumer.close()


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (apt-get install kcat)")
def test_kcat_round_trip(kafka: broker.BrokerInfo) -> None:
    topic = _topic("kcat")
    kafka_io.ensure_topics(kafka.settings(), {topic: 1})
    lines = [f"kcat-{i}" for i in range(5)]
    produced = subprocess.run(["kcat", "-b", kafka.bootstrap_servers, "-t", topic, "-P"],
                              input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
    assert produced.returncode == 0, produced.stderr
    consumed = subprocess.run(["kcat", "-b", kafka.bootstrap_servers, "-t", topic, "-C", "-o", "beginning",
                               "-e", "-q"], capture_output=True, text=True, timeout=60)
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout.splitlines() == lines


def test_crash_and_restart_keep_records_and_offsets(kafka: broker.BrokerInfo) -> None:
    """SIGKILL, then start on the same data and ports (what the fault tests do to the broker)."""
    settings, topic, state_dir = kafka.settings(), _topic("restart"), Path(kafka.state_dir)
    kafka_io.ensure_topics(settings, {topic: 2})
    producer = kafka_io.make_producer(settings)
    sent = [f"record-{i}".encode() for i in range(20)]
    for i, value in enumerate(sent):
        producer.send(topic, value, key=str(i).encode())
    assert kafka_io.close_producer(producer)
    group = KafkaConsumer(**settings.kafka_client_config(), group_id=f"{topic}.group", enable_auto_commit=False)
    group.commit({TopicPartition(topic, 0): OffsetAndMetadata(3, "", -1)})
    group.close()

    crashed = broker.restart(state_dir, grace_s=0)
    assert not pid_alive(kafka.pid)
    assert (crashed.port, crashed.controller_port, crashed.kind) == (kafka.port, kafka.controller_port, "kafka")
    assert sorted(read_all(settings, topic, 2, timeout_ms=5000)) == sorted(sent)
    restarted = broker.restart(state_dir)  # clean: SIGTERM, controlled shutdown
    assert not pid_alive(crashed.pid) and pid_alive(restarted.pid)
    group = KafkaConsumer(**settings.kafka_client_config(), group_id=f"{topic}.group", enable_auto_commit=False)
    try:
        assert group.committed(TopicPartition(topic, 0)) == 3
    finally:
        group.close()


def test_stop_ends_the_broker(tmp_path: Path) -> None:
    """A broker of its own (the module's must stay up for the others); the CLI's --kafka."""
    state_dir = tmp_path / "broker"
    assert broker.main(["--state-dir", str(state_dir), "start", "--kafka", "--port", str(broker.free_port())]) == 0
    info = broker.status(state_dir)
    assert info is not None and info.kind == "kafka"
    assert broker.stop(state_dir) is True
    assert not pid_alive(info.pid)
    assert broker.status(state_dir) is None
    assert not kafka_io.broker_answers(info.settings(), timeout_s=0.5)
