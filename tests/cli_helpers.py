"""Running the ``deeper`` command in-process, offline, with a private registry and data dir.

``from tests.cli_helpers import deeper, offline_cli  # noqa: F401`` in a test module gives each of
its tests that environment (``offline_cli`` is an autouse fixture) and ``deeper(capsys, *argv)``.
"""

from __future__ import annotations

import os

import pytest

from pipeline.app.cli import main

MODEL = "efficientnet_lite0"


def deeper(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``deeper ARGV --model efficientnet_lite0 -q``."""
    capsys.readouterr()
    rc = main([*(a if isinstance(a, str) else os.fspath(a) for a in argv), "--model", MODEL, "-q"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(autouse=True)
def offline_cli(monkeypatch, cache_dir, tmp_path):
    monkeypatch.setenv("DEEPER_OFFLINE", "1")
    monkeypatch.setenv("DEEPER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("DEEPER_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.setenv("DEEPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DEEPER_UNKNOWN_LABEL", raising=False)
