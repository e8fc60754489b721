"""Pytest fixtures giving tests a Kafka broker: a real one if configured, else a local Tansu.

``tests/conftest.py`` does ``from tests.broker_fixture import *``. With
``KAFKA_BOOTSTRAP_SERVERS`` set, tests run against that broker (e.g. the Apache Kafka of
docker-compose.yml), which is how we check nothing depends on Tansu. Without it, one
in-memory Tansu per test session is started on a free loopback port and stopped at the end.
Topic names get a per-session suffix so a shared broker never mixes runs.
"""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pipeline import broker
from pipeline.config import ENVIRONMENT, Settings
from pipeline.kafka_io import wait_for_broker

__all__ = ["kafka_settings", "unique_topic", "kafka_topic", "make_unique_topic_name", "SESSION_SUFFIX"]

#: Added to every topic and group name of this test session.
SESSION_SUFFIX = uuid.uuid4().hex[:8]

_counter = itertools.count()


def make_unique_topic_name(prefix: str = "test") -> str:
    """A topic name no other test (of this or another session) uses."""
    return f"{prefix}.{SESSION_SUFFIX}.{next(_counter)}"


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
def kafka_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at a reachable broker, with session-unique topic names."""
    external = os.environ.get(ENVIRONMENT["bootstrap_servers"][0])
    if external:
        settings = _session_settings(external)
        wait_for_broker(settings, timeout=30)
        yield settings
        return
    try:
        broker.tansu_binary()
    except broker.BrokerError as exc:
        pytest.skip(f"no Kafka broker for this test: {exc}")
    state_dir: Path = tmp_path_factory.mktemp("tansu")
    info = broker.start(state_dir, port=broker.free_port())
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
