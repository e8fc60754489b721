"""Security settings: from the environment to every Kafka client we build, and never into a log.

* ``KAFKA_SECURITY_PROTOCOL``/``KAFKA_SASL_*``/``KAFKA_SSL_*`` reach every producer, consumer and
  admin client, including the ones the ``deeper featurizer``/``scorer``/``produce``/``labels``
  commands build (the kafka-python classes are swapped for recorders there, so nothing connects),
  and kafka-python itself accepts them (real clients, configured without a broker to talk to).
* No Kafka client is built anywhere but :mod:`pipeline.kafka.kafka_io` (so none can skip the settings).
* The SASL password never shows up in a log line, an exception, ``repr``/``str`` of the settings or
  :meth:`Settings.redacted`, with every logger at DEBUG, through a real worker start and through
  failing SASL connections.

That the local broker listens on 127.0.0.1 only is checked on real sockets by
``tests/test_broker.py::test_broker_listens_on_loopback_only``; here only the defaults are checked.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import errors as kafka_errors

import pipeline.kafka.kafka_io as kafka_io
from consumers.scorer import Scorer
from consumers.worker import StreamWorker
from pipeline.app.broker import local as broker
from pipeline.learning.classifier import ClassifierSpec, fit
from pipeline.config import ENVIRONMENT, Settings
from pipeline.logs import JsonFormatter
from pipeline.identity import FeatureId
from pipeline.learning.registry import Registry
from schemas.messages import FeatureRecord, encode_features
from tests.stream_helpers import WorkerThread, read_topic, unique_settings

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "pa55-W0rd_never-logged"  # distinctive, so a substring search can't match by accident

SECURE_ENVIRONMENTS = {
    "sasl_ssl-plain": {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "deeper",
        "KAFKA_SASL_PASSWORD": PASSWORD, "KAFKA_SSL_CAFILE": "/etc/deeper/ca.pem"},
    "sasl_ssl-scram-sha-256-mtls": {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "KAFKA_SASL_USERNAME": "deeper", "KAFKA_SASL_PASSWORD": PASSWORD, "KAFKA_SSL_CAFILE": "/etc/deeper/ca.pem",
        "KAFKA_SSL_CERTFILE": "/etc/deeper/client.pem", "KAFKA_SSL_KEYFILE": "/etc/deeper/client.key"},
    "ssl-mtls": {
        "KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/etc/deeper/ca.pem",
        "KAFKA_SSL_CERTFILE": "/etc/deeper/client.pem", "KAFKA_SSL_KEYFILE": "/etc/deeper/client.key"},
}


def _expected_client_config(env: dict[str, str]) -> dict[str, Any]:
    """What kafka-python must be given for ``env``, in kafka-python's own argument names."""
    names = {"KAFKA_SECURITY_PROTOCOL": "security_protocol", "KAFKA_SASL_MECHANISM": "sasl_mechanism",
             "KAFKA_SASL_USERNAME": "sasl_plain_username", "KAFKA_SASL_PASSWORD": "sasl_plain_password",
             "KAFKA_SSL_CAFILE": "ssl_cafile", "KAFKA_SSL_CERTFILE": "ssl_certfile",
             "KAFKA_SSL_KEYFILE": "ssl_keyfile"}
    return {names[k]: v for k, v in env.items() if k in names}


def _closed_port() -> str:
    return f"127.0.0.1:{broker.free_port()}"


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("name", sorted(SECURE_ENVIRONMENTS))
def test_security_settings_come_from_the_environment(name):
    env = {"KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9093, kafka-2:9093", **SECURE_ENVIRONMENTS[name]}
    config = Settings.from_env(env).kafka_client_config()
    assert config["bootstrap_servers"] == ["kafka-1:9093", "kafka-2:9093"]
    for key, value in _expected_client_config(env).items():
        assert config[key] == value, key
    if "KAFKA_SASL_MECHANISM" not in env:
        assert not {k for k in config if k.startswith("sasl_")}
    unset = Settings.from_env({}).kafka_client_config()
    assert unset == {"bootstrap_servers": ["127.0.0.1:9092"], "security_protocol": "PLAINTEXT"}


def test_settings_never_show_the_password():
    settings = Settings.from_env({**SECURE_ENVIRONMENTS["sasl_ssl-plain"], "KAFKA_BOOTSTRAP_SERVERS": "k:9093"})
    assert settings.sasl_password == PASSWORD
    for text in (repr(settings), str(settings), f"{settings}", json.dumps(settings.redacted()),
                 repr(settings.redacted()), repr(settings.kafka_client_config()), str(settings.kafka_client_config())):
        assert PASSWORD not in text
    assert settings.redacted()["sasl_password"] == "***"
    assert settings.redacted()["sasl_username"] == "deeper"  # not a secret: kept for debugging
    assert Settings().redacted()["sasl_password"] == ""  # nothing to hide, nothing hidden
    config = settings.kafka_client_config()
    assert config["sasl_plain_password"] == PASSWORD  # the clients still get the real value
    assert "***" in repr(config) and PASSWORD.encode() in config["sasl_plain_password"].encode()


def test_default_settings_stay_on_loopback():
    """The local broker itself: tests/test_broker.py::test_broker_listens_on_loopback_only."""
    settings = Settings.from_env({})
    assert settings.bootstrap_servers.startswith("127.0.0.1:")
    assert settings.metrics_addr == "127.0.0.1" and broker.HOST == "127.0.0.1"
    assert settings.security_protocol == "PLAINTEXT"  # plaintext is only for the loopback dev broker


# --------------------------------------------------------------------------- every client


class _Future:
    def add_callback(self, fn, *args, **kwargs):
        fn(*args, None, **kwargs)
        return self

    def add_errback(self, fn, *args, **kwargs):
        return self

    def failed(self):
        return False


class _Recorder:
    """Stands in for the kafka-python classes: records each client's configuration, connects nowhere."""

    def __init__(self):
        self.built: list[tuple[str, dict[str, Any]]] = []
        recorder = self

        class Producer:
            def __init__(self, **config):
                recorder.built.append(("producer", config))
                self.config = config

            def init_transactions(self):  # exactly-once workers' transactional producer
                pass

            def send(self, *args, **kwargs):
                return _Future()

            def flush(self, timeout=None):
                pass

            def close(self, timeout=None):
                pass

        class Consumer:
            def __init__(self, *topics, **config):
                recorder.built.append(("consumer", config))
                self.config = config

            def subscribe(self, topics, listener=None):
                pass

            def poll(self, timeout_ms=0, **kwargs):
                time.sleep(min(timeout_ms, 50) / 1000)
                return {}

            def assignment(self):
                return set()

            def partitions_for_topic(self, topic):
                return {0}

            def assign(self, partitions):
                pass

            def seek_to_beginning(self, *partitions):
                pass

            def pause(self, *partitions):
                pass

            def resume(self, *partitions):
                pass

            def close(self, autocommit=True):
                pass

        class Admin:
            def __init__(self, **config):
                recorder.built.append(("admin", config))
                self.config = config

            def list_topics(self):
                return []

            def create_topics(self, request, timeout_ms=None, raise_errors=True):
                return {"topics": [{"name": name, "error_code": 0} for name in request]}

            def wait_for_topics(self, topics, timeout_ms=None):
                pass

            def describe_topics(self, topics):
                return []

            def close(self):
                pass

        self.Producer, self.Consumer, self.Admin = Producer, Consumer, Admin

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.built]


@pytest.fixture
def recorder(monkeypatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(kafka_io, "KafkaProducer", rec.Producer)
    monkeypatch.setattr(kafka_io, "KafkaConsumer", rec.Consumer)
    monkeypatch.setattr(kafka_io, "KafkaAdminClient", rec.Admin)
    monkeypatch.setattr(kafka_io, "_any_port_open", lambda settings, timeout_s: True)  # "a broker is there"
    return rec


def _tiny_registry(root: Path, backbone: str = "efficientnet_lite0") -> str:
    rng = np.random.default_rng(0)
    meta = FeatureId(backbone, "ab" * 32, "prelogits", 16)
    x = np.concatenate([rng.normal(i, 1.0, (6, 16)) for i in range(2)])
    Registry(root).save(fit(x, ["a"] * 6 + ["b"] * 6, ClassifierSpec()), meta, {})
    return str(root)


@pytest.mark.parametrize("name", ["sasl_ssl-scram-sha-256-mtls", "sasl_ssl-plain"])
def test_every_client_of_every_command_gets_the_security_settings(name, recorder, monkeypatch, tmp_path, effnet,
                                                                    caplog):
    """The commands read the environment themselves; each client they build must carry it."""
    from pipeline.app.cli import build_parser

    caplog.set_level(logging.DEBUG)
    env = {**SECURE_ENVIRONMENTS[name], "KAFKA_BOOTSTRAP_SERVERS": _closed_port(),
           "DEEPER_DATA_DIR": str(tmp_path / "data"), "DEEPER_REGISTRY": _tiny_registry(tmp_path / "registry"),
           "DEEPER_CACHE_DIR": str(tmp_path / "cache"), "DEEPER_METRICS_PORT": "0"}
    for var, _ in ENVIRONMENT.values():
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr("pipeline.logs.setup_json_logging", lambda *a, **k: None)  # leave pytest's logging be
    monkeypatch.setattr(StreamWorker, "install_signal_handlers", lambda self: None)
    monkeypatch.setattr("pipeline.model.nets.factory.load_backbone", lambda *a, **k: effnet)
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n not really a png, the producer doesn't care")

    built: dict[str, list[str]] = {}
    def deeper(*argv: str) -> int:  # the real command line, parsed as a user's would be
        args = build_parser().parse_args(list(argv))
        return args.func(args)

    commands = {
        "featurizer": lambda: deeper("featurizer", "--batch-size", "8", "--roll-rows", "10", "--roll-seconds", "1",
                                     "--wait", "1", "--exit-when-idle", "0.1"),
        "scorer": lambda: deeper("scorer", "--batch-size", "8", "--wait", "1", "--wait-for-model", "0",
                                 "--exit-when-idle", "0.1"),
        "produce": lambda: deeper("produce", str(photo), "--wait", "1", "-q"),
        "labels": lambda: deeper("labels", "--timeout", "0.2", "--format", "json", "--wait", "1"),
    }
    for command, run in commands.items():
        before = len(recorder.built)
        assert run() == 0, command
        built[command] = recorder.kinds()[before:]
    assert built == {
        # wait for the broker, topics, then the worker: its consumer, its (transactional) producer
        # and one admin asking its output topics' size limits
        "featurizer": ["admin", "admin", "consumer", "producer", "admin"],
        "scorer": ["admin", "admin", "consumer", "producer", "admin"],
        "produce": ["admin", "admin", "producer"],
        "labels": ["admin", "consumer"],  # wait_for_broker, then the reader
    }
    expected = {**_expected_client_config(env), "bootstrap_servers": [env["KAFKA_BOOTSTRAP_SERVERS"]]}
    for kind, config in recorder.built:
        assert {k: config.get(k) for k in expected} == expected, kind
    producer_configs = [c for k, c in recorder.built if k == "producer"]
    assert all(c["acks"] == "all" and c["enable_idempotence"] for c in producer_configs)
    consumer_configs = [c for k, c in recorder.built if k == "consumer"]
    assert all(c["enable_auto_commit"] is False for c in consumer_configs)
    _assert_password_not_logged(caplog)


def test_every_client_factory_passes_the_security_settings(recorder, tmp_path, effnet):
    """The Python API too: factories, the producer class, both workers, the labels reader, topic setup."""
    from consumers.featurizer import Featurizer
    from consumers.labels import follow_labels
    from producers.produce import ImageProducer

    env = {**SECURE_ENVIRONMENTS["sasl_ssl-scram-sha-256-mtls"], "KAFKA_BOOTSTRAP_SERVERS": _closed_port()}
    settings = Settings.from_env(env, data_dir=str(tmp_path / "data"),
                                 registry_dir=_tiny_registry(tmp_path / "registry"))
    kafka_io.make_producer(settings)
    kafka_io.make_producer(settings, acks=1)  # an override may weaken durability, never security
    kafka_io.make_consumer(settings, "g", ["t"])
    kafka_io.make_consumer(settings, None, [])
    kafka_io.make_admin(settings)
    kafka_io.ensure_topics(settings, {"t": 1})
    kafka_io.wait_for_broker(settings, timeout=1)
    ImageProducer(settings)
    Featurizer(settings, effnet, "prelogits", batch_size=4).close()
    Scorer(settings, wait_for_model=0).close()
    follow_labels(settings, set(), timeout=0.1)
    assert recorder.kinds().count("producer") == 5 and recorder.kinds().count("consumer") == 5
    assert recorder.kinds().count("admin") == 5  # + one per worker asking its output topics' size limits
    expected = _expected_client_config(env)
    for kind, config in recorder.built:
        assert {k: config.get(k) for k in expected} == expected, kind


@pytest.mark.parametrize("name", sorted(SECURE_ENVIRONMENTS))
def test_kafka_python_accepts_the_security_settings(name):
    """Real kafka-python clients, configured but not connected (a closed port): each keeps the settings."""
    env = {**SECURE_ENVIRONMENTS[name], "KAFKA_BOOTSTRAP_SERVERS": _closed_port()}
    settings = Settings.from_env(env)
    expected = _expected_client_config(env)
    version = {"api_version": (2, 8)}  # known up front: no bootstrap round trip at construction
    consumer = kafka_io.make_consumer(settings, "g", [], **version)
    producer = kafka_io.make_producer(settings, enable_idempotence=False, **version)
    try:
        for client in (consumer, producer):
            assert {k: client.config[k] for k in expected} == expected
    finally:
        consumer.close()
        kafka_io.close_producer(producer, timeout=1)
    with pytest.raises(kafka_errors.KafkaError):  # admin bootstraps at construction: refused, not misconfigured
        kafka_io.make_admin(settings, bootstrap_timeout_ms=300)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_kafka_python_authenticates_with_the_real_password(mechanism):
    """The password is wrapped so it logs as '***'; kafka-python's SASL code must still send the real one."""
    from kafka.net.sasl import get_sasl_mechanism

    config = Settings(security_protocol="SASL_SSL", sasl_mechanism=mechanism, sasl_username="deeper",
                      sasl_password=PASSWORD).kafka_client_config()
    assert "***" in repr(config) and PASSWORD not in repr(config)
    sasl = get_sasl_mechanism(mechanism)(host="kafka-1", **config)
    if mechanism == "PLAIN":
        assert sasl.auth_bytes() == f"deeper\0deeper\0{PASSWORD}".encode()
    else:
        assert sasl._scram_client.password == PASSWORD.encode()  # what the salted proof is computed from
        assert sasl.auth_bytes().startswith(b"n,,n=deeper,r=")


def test_no_kafka_client_is_built_outside_kafka_io():
    """A client built anywhere else could miss the security settings."""
    classes = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "KafkaClient", "SimpleClient"}
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"__pycache__", "tests", "deeper-data"}]
        for f in (Path(root) / name for name in files if name.endswith(".py")):
            rel = f.relative_to(REPO).as_posix()
            if rel == "pipeline/kafka/kafka_io.py":
                continue
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), rel)):
                if isinstance(node, ast.Call):
                    func = node.func
                    called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                    if called in classes:
                        found.append(f"{rel}:{node.lineno}: {called}(...)")
    assert found == [], "build Kafka clients with pipeline.kafka.kafka_io.make_*:\n" + "\n".join(found)


# --------------------------------------------------------------------------- logs


def _assert_password_not_logged(caplog) -> list[str]:
    json_formatter, text_formatter = JsonFormatter(), logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = []
    for record in caplog.records:
        lines += [json_formatter.format(record), text_formatter.format(record)]
    leaked = [line for line in lines if PASSWORD in line]
    assert leaked == [], f"the password is in {len(leaked)} log lines, e.g. {leaked[0][:300]}"
    return lines


def test_password_never_reaches_a_log_line(kafka_settings, tmp_path, caplog):
    """Every logger at DEBUG: a real worker start and run, real SASL clients failing to connect."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="kafka")

    # kafka-python logs an admin client's whole configuration at DEBUG
    sasl = Settings.from_env({**SECURE_ENVIRONMENTS["sasl_ssl-scram-sha-256-mtls"],
                              "KAFKA_BOOTSTRAP_SERVERS": _closed_port()})
    with pytest.raises(kafka_errors.KafkaError) as refused:
        kafka_io.make_admin(sasl, bootstrap_timeout_ms=300)
    assert PASSWORD not in str(refused.value) and PASSWORD not in repr(refused.value)

    # SASL against the real broker (which has no SASL users): a failed handshake or authentication
    plain = dataclasses.replace(kafka_settings, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                                sasl_username="deeper", sasl_password=PASSWORD)
    try:
        kafka_io.make_admin(plain, bootstrap_timeout_ms=1500).close()
    except kafka_errors.KafkaError as exc:
        assert PASSWORD not in str(exc)

    # a real worker: password configured (PLAINTEXT listener, so the client doesn't use it), start, score, stop
    settings = dataclasses.replace(unique_settings(kafka_settings, tmp_path), sasl_mechanism="PLAIN",
                                   sasl_username="deeper", sasl_password=PASSWORD,
                                   registry_dir=_tiny_registry(tmp_path / "registry"))
    assert settings.kafka_client_config()["sasl_plain_password"] == PASSWORD
    scorer = WorkerThread(Scorer(settings, wait_for_model=0))
    try:
        meta = Registry(settings.registry_dir).load_current().feature_meta
        producer = kafka_io.make_producer(settings)
        good = FeatureRecord(hashlib.sha256(b"good").hexdigest(), np.zeros(16, np.float32), meta.backbone,
                             meta.weights_digest, meta.layer, "good")
        key, value, headers = encode_features(good)
        producer.send(settings.features_topic, key=key, value=value, headers=headers)
        producer.send(settings.features_topic, key=b"bad", value=b"not a feature record",
                      headers=[("schema-version", b"1")])
        producer.flush()
        kafka_io.close_producer(producer)
        read_topic(settings, settings.labels_topic, lambda rs: len(rs) >= 1, timeout=60)
        read_topic(settings, settings.dead_letter_topic, lambda rs: len(rs) >= 1, timeout=60)
    finally:
        scorer.stop()

    lines = _assert_password_not_logged(caplog)
    started = [json.loads(line) for line in lines if line.startswith("{") and '"scorer started"' in line]
    assert started and started[0]["settings"]["sasl_password"] == "***"
    assert any('"dead letter"' in line for line in lines)
    admin_configs = [line for line in lines if "Starting KafkaAdminClient with configuration" in line]
    assert admin_configs, "kafka-python no longer logs its admin configuration: the check above proves less"
    assert all("sasl_plain_password" not in line or "'***'" in line for line in admin_configs)
