"""Claim checks that hang must not hold up the stream (a real broker, featurizer and scorer).

Ten claim checks name a server that accepts connections and never answers; twenty ordinary
photos follow. Fetched inline, each claim check held the poll loop for a whole deadline and
the photos behind them waited for all ten (51 s measured with the 5 s default). Fetched in the
featurizer's pool, off the poll loop, within one deadline counted from their poll, they may
delay the ordinary photos by at most one deadline: their labels must all arrive within
deadline + 2 s of being sent. A claim check outside the allowlist is refused without a request.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from consumers.featurizer import Featurizer
from consumers.scorer import Scorer
from pipeline.kafka.claim_check import IMAGE_URI_HEADER
from pipeline.kafka.kafka_io import close_producer, make_producer
from pipeline.model.featurize import default_cache
from producers.produce import ImageProducer
from tests.claim_check_servers import Handler, serve
from tests.stream_helpers import WorkerThread, header, read_topic, train_model, unique_settings

pytestmark = pytest.mark.stream

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEADLINE_S = 2.0
HANGING = 10
ORDINARY = 20


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts every connection, reads the request, never answers (until the test ends)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def _produce_photos(settings, paths: list[Path]) -> dict[str, Path]:
    producer = ImageProducer(settings)
    sent = {producer.send_file(p).image_id: p for p in paths}
    assert producer.flush().sent == len(paths)
    producer.close()
    return sent


def _labels_arrival(settings, ids: set[str], timeout: float) -> dict[str, float]:
    """When each id's label became readable (read_committed), by the monotonic clock."""
    seen: dict[str, float] = {}

    def until(records) -> bool:
        now = time.monotonic()
        for r in records:
            seen.setdefault(r.key.decode(), now)
        return ids <= seen.keys()

    read_topic(settings, settings.labels_topic, until, timeout=timeout)
    return {i: seen[i] for i in ids if i in seen}


def test_hanging_claim_checks_delay_other_photos_by_at_most_one_deadline(kafka_settings, tmp_path, effnet,
                                                                           cache_dir, silent_port, capsys):
    photos = sorted((EXAMPLES / "train").rglob("*.jpg")) + sorted((EXAMPLES / "test").glob("*.jpg"))
    assert len(photos) > ORDINARY + 1
    with serve("127.0.0.1") as elsewhere:
        settings = unique_settings(kafka_settings, tmp_path, partitions=1, fetch_timeout_s=str(DEADLINE_S),
                                   fetch_hosts=f"127.0.0.1:{silent_port}", fetch_allow_nets="127.0.0.0/8")
        train_model(settings, effnet, EXAMPLES / "train", default_cache(cache_dir))
        featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1))
        scorer = WorkerThread(Scorer(settings))
        try:
            warm = _produce_photos(settings, photos[:1])  # model, pipelines and transactions warm
            assert _labels_arrival(settings, set(warm), timeout=120).keys() == warm.keys()

            raw = make_producer(settings)
            for i in range(HANGING):
                raw.send(settings.images_topic, key=f"hang-{i}".encode(), value=b"",
                         headers=[(IMAGE_URI_HEADER, f"http://127.0.0.1:{silent_port}/photo-{i}.jpg".encode())])
            before = len(Handler.requests)
            raw.send(settings.images_topic, key=b"not-allowed", value=b"",  # another port: not in the allowlist
                     headers=[(IMAGE_URI_HEADER, f"http://127.0.0.1:{elsewhere}/photo".encode())])
            raw.flush()
            close_producer(raw)
            sent_at = time.monotonic()
            ordinary = _produce_photos(settings, photos[1:1 + ORDINARY])
            flushed_at = time.monotonic()
            arrivals = _labels_arrival(settings, set(ordinary), timeout=120)
            dead = read_topic(settings, settings.dead_letter_topic, lambda rs: len(rs) >= HANGING + 1, timeout=60)
        finally:
            featurizer.stop()
            scorer.stop()
        assert Handler.requests[before:] == [], "the claim check outside DEEPER_FETCH_HOSTS reached its server"

    assert arrivals.keys() == ordinary.keys()
    last = max(arrivals.values()) - flushed_at
    first = min(arrivals.values()) - flushed_at
    with capsys.disabled():
        print(f"\n{HANGING} hanging claim checks (deadline {DEADLINE_S:g} s), then {ORDINARY} photos: labels "
              f"{first:.2f}..{last:.2f} s after the photos were sent (producing them took "
              f"{flushed_at - sent_at:.2f} s); bound {DEADLINE_S + 2:g} s")
    assert last <= DEADLINE_S + 2.0, f"the last ordinary label came {last:.2f} s after its photo was sent"
    reasons = sorted((header(d, "dlq-reason"), header(d, "dlq-detail").split(":")[0]) for d in dead)
    assert reasons == [("fetch_failed", "http")] * HANGING + [("fetch_refused", "hosts")], reasons
    details = {header(d, "dlq-detail") for d in dead if header(d, "dlq-reason") == "fetch_failed"}
    assert len(details) == 1 and str(silent_port) not in details.pop()  # nothing about the server


def test_default_settings_fetch_nothing_in_the_stream(kafka_settings, tmp_path, effnet):
    """The featurizer as it starts with no fetch settings: every claim check is a dead letter
    ``fetch_refused`` and none reaches a server."""
    with serve("127.0.0.1") as port:
        settings = unique_settings(kafka_settings, tmp_path, partitions=1)
        assert (settings.fetch_hosts, settings.fetch_s3, settings.fetch_allow_nets, settings.fetch_file_root) == \
            ("", "", "", "")
        featurizer = WorkerThread(Featurizer(settings, effnet, "prelogits", batch_size=8, roll_seconds=1))
        uris = [f"http://127.0.0.1:{port}/photo", f"http://localhost:{port}/photo", "http://169.254.169.254/",
                "s3://photos/cars/a.jpg", f"file://{tmp_path}/a.jpg", "http://[::ffff:127.0.0.1]/"]
        before = len(Handler.requests)
        try:
            raw = make_producer(settings)
            for i, uri in enumerate(uris):
                raw.send(settings.images_topic, key=f"c{i}".encode(), value=b"", headers=[(IMAGE_URI_HEADER, uri.encode())])
            raw.flush()
            close_producer(raw)
            dead = read_topic(settings, settings.dead_letter_topic, lambda rs: len(rs) >= len(uris), timeout=90)
        finally:
            featurizer.stop()
        assert Handler.requests[before:] == []
    assert [header(d, "dlq-reason") for d in dead] == ["fetch_refused"] * len(uris)
    assert {header(d, "dlq-detail").split(":")[0] for d in dead} == {"hosts", "s3", "scheme"}

