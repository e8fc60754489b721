"""Exactly-once into object storage: kill -9 the featurizer mid-stream, and nothing is written twice.

A real ``deeper featurizer`` process writes its Parquet parts to ``s3://`` (the project's local
S3 server) with ``DEEPER_GUARANTEE=exactly-once``, and is SIGKILLed twice while it works. After
it is restarted and the stream drained:

- every image offset is in exactly one raw Parquet row (counted before any de-duplication)
  and one committed feature record, or one dead letter (:mod:`tests.invariant`);
- the read-time de-duplication, kept as a safety net, removes nothing;
- ``deeper train --features s3://...`` trains from what is there.

On Tansu 0.6, whose transactions don't hide aborted records (docs/broker.md), the Parquet half
holds (file names fixed by offsets) and the topic half is checked at-least-once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.app.cli import main as deeper
from pipeline.storage.parquet_reader import read_features
from producers.produce import ImageProducer
from tests import bad_images
from tests.broker_fixture import session_broker_kind
from tests.invariant import assert_stream_invariant, featurizer_outcomes
from tests.stream_helpers import unique_settings
from tests.test_s3_features import s3, s3_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.stream

REPO = Path(__file__).resolve().parent.parent
N_PHOTOS = 60


def _start(settings) -> subprocess.Popen:
    env = settings.child_env(TF_CPP_MIN_LOG_LEVEL="2", DEEPER_OFFLINE="1")
    code = "import sys; from pipeline.app.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "featurizer", "--model", "efficientnet_lite0",
                             "--layer", "prelogits", "--batch-size", "8", "--roll-seconds", "1",
                             "--exit-when-idle", "25", "--partitions", "2"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _raw_rows(location: str) -> Counter:
    rows: Counter = Counter()
    for path in storage.list_parquet(location):
        table = pq.read_table(storage.open_input(path), columns=["kafka_topic", "kafka_partition", "kafka_offset"])
        rows.update(zip(*(table.column(c).to_pylist() for c in table.column_names)))
    return rows


def _kill_when(process: subprocess.Popen, location: str, rows_at_least: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("the featurizer exited before it could be killed: "
                        + process.stderr.read().decode(errors="replace")[-2000:])
        try:
            if sum(_raw_rows(location).values()) >= rows_at_least:
                break
        except storage.StorageError:
            pass
        time.sleep(0.3)
    time.sleep(0.4)  # into the next checkpoint's work: rows in flight, a transaction open
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.no_stream_invariant  # checked inside, while the S3 server and its credentials are still there
def test_kill_9_mid_stream_leaves_no_duplicate_rows_in_object_storage(kafka_settings, tmp_path, cache_dir, effnet, s3,
                                                                      capsys):
    settings = unique_settings(kafka_settings, tmp_path, partitions=2, features_uri=s3, cache_dir=str(cache_dir),
                               guarantee="exactly-once")
    producer = ImageProducer(settings)
    for i in range(N_PHOTOS):
        assert producer.send(bad_images.jpeg(seed=300 + i), f"photo-{i}", label="even" if i % 2 == 0 else "odd")
    assert producer.flush().failed == {}
    producer.close()

    for rows_at_least in (8, 30):
        _kill_when(_start(settings), s3, rows_at_least)
    last = _start(settings)
    assert last.wait(timeout=300) == 0, last.stderr.read().decode(errors="replace")[-3000:]

    raw = _raw_rows(s3)
    repeated = {offset: n for offset, n in raw.items() if n > 1}
    assert not repeated, f"rows written twice on disk: {sorted(repeated)[:10]}"
    assert len(raw) == N_PHOTOS
    exactly_once = session_broker_kind() == "kafka"
    summary = assert_stream_invariant(settings, exactly_once=exactly_once, scorer=False)
    assert summary["rows"] == N_PHOTOS and not featurizer_outcomes(settings).reasons

    features = read_features([s3])
    assert len(features) == N_PHOTOS and features.duplicates_dropped == 0
    code = deeper(["train", "--features", s3, "--registry", str(tmp_path / "registry"), "--quiet"])
    assert code == 0, capsys.readouterr().err
