"""Poison across restarts: a message that kills the featurizer itself can't stall its partition.

A real ``deeper featurizer`` process whose decoder SIGKILLs the process on one chosen photo
(:mod:`tests.poison_hook`) is restarted, as a supervisor would, until the stream is drained.
The attempt count rides on the committed offset's metadata (Apache Kafka) or in a local file
(Tansu drops commit metadata): after ``DEEPER_MAX_ATTEMPTS`` runs died on it, the message is
dead-lettered as ``poison`` without being touched, and every other photo becomes a row.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from producers.produce import ImageProducer
from tests import bad_images
from tests.invariant import assert_stream_invariant, featurizer_outcomes
from tests.stream_helpers import unique_settings

pytestmark = pytest.mark.stream

REPO = Path(__file__).resolve().parent.parent
MAX_RUNS = 8


def _featurizer(settings, poison: str) -> subprocess.CompletedProcess:
    env = settings.child_env(DEEPER_TEST_POISON_SHA256=poison, TF_CPP_MIN_LOG_LEVEL="2", DEEPER_OFFLINE="1")
    command = [sys.executable, "-m", "tests.poison_hook", "featurizer", "--model", "efficientnet_lite0",
               "--layer", "prelogits", "--batch-size", "4", "--roll-seconds", "1", "--exit-when-idle", "6",
               "--partitions", "1"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300)


def test_a_message_that_kills_the_process_is_dead_lettered_as_poison(kafka_settings, tmp_path, cache_dir, effnet):
    settings = unique_settings(kafka_settings, tmp_path, partitions=1, cache_dir=str(cache_dir), max_attempts="3")
    photos = [bad_images.jpeg(seed=200 + i) for i in range(12)]
    poison = photos[6]
    producer = ImageProducer(settings)
    for i, data in enumerate(photos):
        assert producer.send(data, f"photo-{i}") is not None
    assert producer.flush().failed == {}
    producer.close()

    deaths = 0
    for _ in range(MAX_RUNS):
        run = _featurizer(settings, hashlib.sha256(poison).hexdigest())
        if run.returncode == 0:
            break
        assert run.returncode == -9, run.stderr.decode(errors="replace")[-3000:]
        deaths += 1
    else:
        pytest.fail(f"the featurizer never got past the poison in {MAX_RUNS} runs")

    outcomes = featurizer_outcomes(settings)
    reasons = {o: r for o, r in outcomes.reasons.items()}
    assert list(reasons.values()) == ["poison"], reasons
    poisoned = next(iter(reasons))
    assert poisoned[2] == 6, "the dead letter names the message that killed the process"
    assert 3 <= deaths <= 4, f"{deaths} runs died: the limit is 3 attempts at the poison itself"
    summary = assert_stream_invariant(settings, scorer=False)
    assert summary["rows"] >= 11
