"""TensorFlow's start-up lines, kept off stderr in every process the project starts.

``TF_CPP_MIN_LOG_LEVEL`` must be set before TensorFlow is imported, and even then TensorFlow
2.21 prints, twice per process (two of its libraries start oneDNN), lines it writes before its
own logging reads that setting::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796592793.777202    8881 port.cc:153] oneDNN custom operations are on. ...

Every ``deeper featurizer`` in a CI run, a test or the dev rig repeated them. :func:`quiet` (called
first thing by the CLI and the tests) sets the level's default and has the first ``import
tensorflow`` of the process run with stderr passed through a filter that drops exactly these
informational lines (and cpu_feature_guard's, at level 0 shown anyway by TensorFlow) while the
import runs; everything else on stderr passes through at once, errors included. Nothing is
filtered when the user asks TensorFlow for its INFO lines (``TF_CPP_MIN_LOG_LEVEL=0``).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import threading
from typing import Any, Iterator

#: The level the project runs TensorFlow at unless the user set one: warnings and errors only.
DEFAULT_LEVEL = "2"
#: Start-up lines TensorFlow prints whatever ``TF_CPP_MIN_LOG_LEVEL`` says (all informational).
NOISE = (
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"),
    re.compile(rb"^I\d{4} [\d:.]+\s+\d+ port\.cc:\d+\] oneDNN custom operations are on\."),
    re.compile(rb"^I\d{4} [\d:.]+\s+\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"),
    re.compile(rb"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"),
)


def quiet() -> None:
    """Default ``TF_CPP_MIN_LOG_LEVEL`` to warnings and filter the start-up lines of TensorFlow's
    first import in this process (no-op once TensorFlow is imported, or at level 0)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_LEVEL)
    if os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() in ("", "0") or "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def is_noise(line: bytes) -> bool:
    return any(pattern.search(line) for pattern in NOISE)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` the usual way and runs its package's code under :func:`_filtered_stderr`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once per process; the usual finders do the finding
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is not None:
            def exec_quietly(module: Any) -> None:
                with _filtered_stderr():
                    exec_module(module)

            loader.exec_module = exec_quietly  # this loader instance only: it loads nothing else
        return spec


@contextlib.contextmanager
def _filtered_stderr() -> Iterator[None]:
    """File descriptor 2 goes through a pipe; a thread forwards every line but :data:`NOISE`."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to filter
        yield
        return
    os.dup2(write_end, 2)
    os.close(write_end)  # fd 2 is now the pipe's only writer: restoring it ends the pump
    pump = threading.Thread(target=_forward, args=(read_end, saved), name="tf-startup-stderr", daemon=True)
    pump.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        pump.join(2.0)
        if not pump.is_alive():  # else something still holds the pipe: the pump keeps ``saved`` for good
            os.close(saved)


def _forward(read_end: int, target: int) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            _write(target, b"".join(line + b"\n" for line in lines if not is_noise(line)))
        if pending and not is_noise(pending):
            _write(target, pending)


def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
