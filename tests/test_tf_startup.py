"""TensorFlow's start-up lines stay off stderr; everything else on stderr gets through
(pipeline/model/tf_startup.py). The real import is checked on the ``deeper featurizer``
processes of tests/test_group_join.py, whose logs must hold none of these lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.model.tf_startup import is_noise

REPO = Path(__file__).resolve().parent.parent

#: What TensorFlow 2.21 printed at ``import tensorflow`` with TF_CPP_MIN_LOG_LEVEL=2, twice.
STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796592793.777202    8881 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. "
    "To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
]
#: Lines that must get through: TensorFlow's own errors and ours.
KEPT = [
    "E0000 00:00:1796592815.380573    8881 util.cc:131] oneDNN supports DT_UINT8 only on platforms with AVX-512.",
    "Traceback (most recent call last):",
    "deeper: error: the registry is not readable",
]

_CHILD = """
import os, sys
from pipeline.model.tf_startup import _filtered_stderr
lines = sys.argv[1:]
os.write(2, b"before\\n")
with _filtered_stderr():
    for line in lines:
        os.write(2, line.encode() + b"\\n")
    sys.stderr.write("python-level line\\n")
os.write(2, b"after\\n")
"""


def test_the_filter_drops_only_the_startup_lines_and_keeps_their_order() -> None:
    lines = [STARTUP[0], KEPT[0], STARTUP[1], KEPT[1], STARTUP[0], KEPT[2], STARTUP[1]]
    done = subprocess.run([sys.executable, "-c", _CHILD, *lines], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["before", *KEPT, "python-level line", "after"]


def test_noise_is_recognised_exactly() -> None:
    assert all(is_noise(line.encode()) for line in STARTUP)
    assert not any(is_noise(line.encode()) for line in KEPT)
    assert not is_noise(b"W0000 00:00:1.0    1 port.cc:153] oneDNN custom operations are on.")  # a warning: kept
