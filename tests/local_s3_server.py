"""The project's local S3 server (``pipeline/app/broker/local_s3.py``, i.e. localbucket) for tests:
one way to start it, used by every fixture that needs real S3."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.app.broker.local import free_port

LOCAL_S3 = Path(__file__).resolve().parent.parent / "pipeline" / "app" / "broker" / "local_s3.py"


@contextmanager
def local_s3(root: Path, log: Path, timeout: float = 20) -> Iterator[str]:
    """Serve ``root`` (one folder per bucket) on a free loopback port; yield the endpoint URL."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(LOCAL_S3), "--host", "127.0.0.1", "--port", str(port),
                                    str(root)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answering(endpoint, process, timeout)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_until_answering(endpoint: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("local S3 server exited at start")
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    pytest.fail("local S3 server did not answer")
