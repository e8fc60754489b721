"""Pytest fixtures giving tests a Kafka broker: Tansu, Apache Kafka, or an external one.

``tests/conftest.py`` does ``from tests.broker_fixture import *``. Which broker the session uses:

* ``KAFKA_BOOTSTRAP_SERVERS`` set: that broker (e.g. the Apache Kafka of docker-compose.yml).
  Its kind is taken to be Apache Kafka unless ``DEEPER_TEST_BROKER=tansu`` says otherwise.
* else ``DEEPER_TEST_BROKER=kafka``: Apache Kafka (:mod:`pipeline.app.broker.apache_kafka`, installed on
  first use) started on free loopback ports, stopped at the end.
* else (``DEEPER_TEST_BROKER`` unset or ``tansu``): one in-memory Tansu on a free port.

``broker_kind`` says which (``"tansu"`` or ``"kafka"``), so a test that needs Apache Kafka can
skip on Tansu with a reason (``needs_apache_kafka``). ``start_restartable_broker(state_dir)`` starts a
private broker of the session's kind (durable, restartable with ``pipeline.app.broker.local.restart``).
Topic names get a per-session suffix so a shared broker never mixes runs.
"""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pipeline.app.broker import local as broker
from pipeline.config import ENVIRONMENT, Settings
from pipeline.kafka.kafka_io import wait_for_broker

__all__ = ["kafka_settings", "broker_kind", "needs_apache_kafka", "unique_topic", "kafka_topic",
           "make_unique_topic_name", "SESSION_SUFFIX", "session_broker_kind", "start_restartable_broker"]

#: Added to every topic and group name of this test session.
SESSION_SUFFIX = uuid.uuid4().hex[:8]
#: Selects the session's broker: ``tansu`` (default) or ``kafka`` (Apache Kafka).
BROKER_VARIABLE = "DEEPER_TEST_BROKER"

_counter = itertools.count()


def session_broker_kind() -> str:
    """``"tansu"`` or ``"kafka"``: the kind of broker this test session runs against."""
    kind = os.environ.get(BROKER_VARIABLE, "").strip().lower()
    if not kind:
        return "kafka" if _external() else "tansu"
    if kind not in broker.KINDS:
        raise pytest.UsageError(f"{BROKER_VARIABLE}={kind!r}: use one of {', '.join(broker.KINDS)}")
    return kind



def start_restartable_broker(state_dir: Path, port: int | None = None) -> broker.BrokerInfo:
    """A private broker of the session's kind that keeps its data across ``broker.restart``.

    Tansu runs durable (S3 via localbucket), Apache Kafka always is. Skips with the reason when
    that broker cannot run here; the caller stops it with ``broker.stop(state_dir)``.
    """
    kind = session_broker_kind()
    reason = broker.unavailable_reason(kind, durable=True)
    if reason:
        pytest.skip(f"no {kind} broker for this test: {reason}")
    return broker.start(state_dir, port=port or broker.free_port(), durable=True, kind=kind)



def make_unique_topic_name(prefix: str = "test") -> str:
    """A topic name no other test (of this or another session) uses."""
    return f"{prefix}.{SESSION_SUFFIX}.{next(_counter)}"


def _external() -> str | None:
    return os.environ.get(ENVIRONMENT["bootstrap_servers"][0]) or None


def _session_settings(bootstrap_servers: str) -> Settings:
    """Settings whose pipeline topics are private to this session."""
    return Settings.from_env(
        bootstrap_servers=bootstrap_servers,
        images_topic=f"deeper.images.{SESSION_SUFFIX}",
        features_topic=f"deeper.features.{SESSION_SUFFIX}",
        labels_topic=f"deeper.labels.{SESSION_SUFFIX}",
        dead_letter_topic=f"deeper.dead-letters.{SESSION_SUFFIX}",
    )


@pytest.fixture(scope="session")
def broker_kind() -> str:
    """``"tansu"`` or ``"kafka"``: which broker ``kafka_settings`` points at."""
    return session_broker_kind()


@pytest.fixture
def needs_apache_kafka(broker_kind: str) -> None:
    """Skip on Tansu: for clients or behaviour only Apache Kafka serves (e.g. Debian's kcat)."""
    if broker_kind != "kafka":
        pytest.skip(f"needs Apache Kafka, the session broker is {broker_kind} "
                    f"(run with {BROKER_VARIABLE}=kafka)")


@pytest.fixture(scope="session")
def kafka_settings(tmp_path_factory: pytest.TempPathFactory, broker_kind: str) -> Iterator[Settings]:
    """Settings pointing at a reachable broker, with session-unique topic names."""
    external = _external()
    if external:
        settings = _session_settings(external)
        wait_for_broker(settings, timeout=30)
        yield settings
        return
    reason = broker.unavailable_reason(broker_kind)
    if reason:
        if broker_kind == "kafka":  # asked for explicitly: a missing broker is a failure
            pytest.fail(f"{BROKER_VARIABLE}=kafka but Apache Kafka cannot run here: {reason}")
        pytest.skip(f"no Kafka broker for this test: {reason}")
    state_dir: Path = tmp_path_factory.mktemp(broker_kind)
    info = broker.start(state_dir, port=broker.free_port(), kind=broker_kind)
    try:
        yield _session_settings(info.bootstrap_servers)
    finally:
        broker.stop(state_dir)


@pytest.fixture
def unique_topic() -> Callable[[str], str]:
    """A factory of fresh topic names: ``unique_topic("images")``."""
    return make_unique_topic_name


@pytest.fixture
def kafka_topic(request: pytest.FixtureRequest) -> str:
    """One fresh topic name, prefixed with the test's name for readable broker listings."""
    return make_unique_topic_name(request.node.name.split("[")[0][:40])
