"""A backfill killed half way (SIGKILL of the driver, its JVM and its Python workers) and run
again ends with every photo in the table exactly once: committed chunks are kept and skipped,
the chunk in flight is all or nothing (one Iceberg commit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from pipeline.storage import table
from tests.conftest import EXAMPLES, REPO
from tests.spark_helpers import MODEL, lake
from tests.test_backfill import deeper

PHOTOS = 48
CHUNK = 4


def _distinct(data: bytes, index: int) -> bytes:
    """The same JPEG with a comment segment naming ``index``: other bytes, the same pixels."""
    tag = f"go-deeper test copy {index}".encode()
    return data[:2] + b"\xff\xfe" + (len(tag) + 2).to_bytes(2, "big") + tag + data[2:]


def _backfill_commits(settings, name: str) -> int:
    try:
        snapshots = table.load_catalog(settings).load_table(name).metadata.snapshots
    except Exception:  # noqa: BLE001 - not created yet
        return 0
    return sum(1 for s in snapshots if s.summary.additional_properties.get(table.WRITER) == "backfill")


def test_a_backfill_killed_half_way_and_run_again_has_every_photo_once(spark_env, tmp_path):
    sources = sorted(EXAMPLES.rglob("*.jpg"))
    photos = lake(tmp_path / "lake", {f"{i:03d}.jpg": _distinct(sources[i % len(sources)].read_bytes(), i)
                                      for i in range(PHOTOS)})
    name = "deeper.bf_killed"
    settings = spark_env.settings()
    command = [sys.executable, "-m", "pipeline.app.cli", "backfill", str(photos), "--table", name,
               "--chunk-size", str(CHUNK), "--master", "local[2]", "--model", MODEL, "-q"]
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: driver, JVM, workers
    try:
        deadline = time.monotonic() + 300
        while _backfill_commits(settings, name) < 1:
            assert process.poll() is None, f"the backfill ended before any commit:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no commit in 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    at_kill = table.load_catalog(settings).load_table(name).scan().to_arrow().num_rows
    assert 0 < at_kill < PHOTOS, f"the kill should land half way: {at_kill} of {PHOTOS} rows were committed"

    rc, out, err = deeper("backfill", photos, "--table", name)
    assert rc == 0, err
    assert f"featurized {PHOTOS - at_kill}, skipped {at_kill} already present" in out
    rows = table.load_catalog(settings).load_table(name).scan().to_arrow()
    counts = Counter(rows.column("image_id").to_pylist())
    assert len(counts) == PHOTOS and set(counts.values()) == {1}
    assert sorted(rows.column("source").to_pylist()) == sorted(str(p) for p in Path(photos).glob("*.jpg"))
