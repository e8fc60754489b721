"""Stream consumers check the cheap things first: no broker means a quick, clear failure.

Real processes (``python -m pipeline.app.cli ...``) against a loopback port nobody listens on.
Before this, the featurizer imported TensorFlow and loaded its backbone (seconds) and only then
found out that no broker answered.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def _run(tmp_path, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{_closed_port()}", "DEEPER_OFFLINE": "1",
           "DEEPER_DATA_DIR": str(tmp_path / "data"), "DEEPER_CACHE_DIR": str(tmp_path / "cache")}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pipeline.app.cli", *argv, "--wait", "1"], env=env,
                         capture_output=True, text=True, timeout=120)
    return run, time.monotonic() - started


@pytest.mark.parametrize("command", ["featurizer", "scorer", "labels"])
def test_no_broker_fails_fast_before_loading_anything(command, tmp_path):
    run, seconds = _run(tmp_path, command)
    assert run.returncode == 2, run.stderr
    assert "no Kafka broker answered" in run.stderr and "Traceback" not in run.stderr
    if command != "labels":
        assert '"event": "waiting for the broker"' in run.stderr, run.stderr
    assert "thread plan" not in run.stderr and "tensorflow" not in run.stderr.lower()  # no TF, no model
    assert seconds < 30, seconds  # interpreter start + 1 s wait; a model load alone took longer


def test_scorer_refuses_a_registry_that_is_a_file(tmp_path):
    registry = tmp_path / "registry"
    registry.write_text("not a directory")
    run, _ = _run(tmp_path, "scorer", "--registry", str(registry))
    assert run.returncode == 2 and "is not a directory" in run.stderr, run.stderr
    assert "no Kafka broker" not in run.stderr  # said before any broker wait
