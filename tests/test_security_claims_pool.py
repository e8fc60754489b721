"""The featurizer's claim-check pool (consumers/claims.py) with the real model, no broker.

One poll's inline photos go to the model at once while its claim checks are fetched; the poll
is done when every message has its one outcome, in the poll's order; a fetch that overruns its
deadline is given up at the deadline plus the grace (its late result is dropped, not counted);
a cancelled poll (a rewind) produces nothing, however its fetches end.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from consumers import claims
from consumers.claims import ClaimFetcher, Refusal
from pipeline.kafka.claim_check import IMAGE_URI_HEADER, FetchLimits
from pipeline.model.inference import Featurized, ImageRecord, Inference
from schemas.messages import parse_image_message
from tests.claim_check_servers import PHOTO, serve

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass
class Message:
    """What the pool reads of a consumed record."""

    offset: int
    value: bytes | None
    headers: list = field(default_factory=list)
    key: bytes | None = None
    topic: str = "images"
    partition: int = 0


def make(m: Message, value: bytes | None) -> ImageRecord:
    image = parse_image_message(m.key, value, m.headers)
    return ImageRecord(image.image_id, image.data, f"offset-{m.offset}", context=m)


def claim(offset: int, uri: str) -> Message:
    return Message(offset, b"", [(IMAGE_URI_HEADER, uri.encode())])


@pytest.fixture(scope="module")
def inference(effnet):
    inference = Inference(effnet, "prelogits", batch_size=8, model_threads=1)
    inference.warm_up()  # the pipeline's first batch costs seconds of tracing: not what is measured here
    return inference


@pytest.fixture
def silent():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    for conn in held:
        conn.close()
    server.close()


def test_inline_photos_do_not_wait_for_claim_checks_and_outcomes_keep_the_poll_order(inference, silent):
    photos = [p.read_bytes() for p in sorted((EXAMPLES / "test").glob("*.jpg"))[:3]]
    with serve("127.0.0.1") as port:
        limits = FetchLimits(hosts=(f"127.0.0.1:{silent}", f"127.0.0.1:{port}"),
                             allow_nets=(ipaddress.ip_network("127.0.0.0/8"),), timeout_s=1.5)
        pool = ClaimFetcher(limits, workers=8)
        messages = [Message(0, photos[0]), claim(1, f"http://127.0.0.1:{silent}/hang.jpg"), Message(2, photos[1]),
                    claim(3, f"http://127.0.0.1:{port}/photo"), Message(4, None), Message(5, photos[2]),
                    claim(6, "http://10.0.0.1/x.jpg")]
        started = time.monotonic()
        work = pool.start(messages, inference, make)
        work.submissions[0].wait()  # the inline photos: featurized while the claim check still hangs
        inline_s = time.monotonic() - started
        assert not work.done()
        while not work.done():
            time.sleep(0.02)
        total_s = time.monotonic() - started
        outcomes = work.outcomes()
        pool.close()
    assert inline_s < 1.5 <= total_s < 1.5 + claims.FETCH_GRACE_S + 1.0, (inline_s, total_s)
    assert [m.offset for m, _ in outcomes] == list(range(7))
    kinds = [type(o).__name__ if not isinstance(o, Refusal) else o.reason for _, o in outcomes]
    assert kinds == ["Featurized", "fetch_failed", "Featurized", "Featurized", "invalid_message", "Featurized",
                     "fetch_refused"]
    assert outcomes[3][1].record.image_id == hashlib.sha256(PHOTO).hexdigest()
    assert isinstance(outcomes[3][1], Featurized)


def test_an_overrunning_fetch_is_given_up_and_its_late_result_dropped(inference, monkeypatch):
    """A fetcher that ignores its deadline (a stalled client library): the poll ends at the
    deadline plus the grace with a ``fetch_failed``, and the result that comes later is not used."""
    monkeypatch.setattr(claims, "FETCH_GRACE_S", 0.3)
    finished = threading.Event()

    def stuck(m, value):
        time.sleep(2.0)
        finished.set()
        return make(m, PHOTO)

    pool = ClaimFetcher(FetchLimits(timeout_s=0.5, hosts=("*",)), workers=2)
    monkeypatch.setattr(pool, "_fetch", lambda m, make_record, deadline: stuck(m, None))
    started = time.monotonic()
    work = pool.start([claim(0, "http://photos.example/a.jpg")], inference, make)
    work.wait()
    assert time.monotonic() - started < 1.5
    (message, outcome), = work.outcomes()
    assert isinstance(outcome, Refusal) and outcome.reason == "fetch_failed" and "past its deadline" in outcome.cause
    assert finished.wait(5)
    assert work.outcomes()[0][1] is outcome  # the late result changed nothing
    pool.close()


def test_a_cancelled_poll_produces_nothing(inference, silent):
    """A rewind drops a poll in flight: fetches queued never run, running ones end by the
    deadline, and no submission of it reaches the model afterwards."""
    limits = FetchLimits(hosts=(f"127.0.0.1:{silent}",), allow_nets=(ipaddress.ip_network("127.0.0.0/8"),),
                         timeout_s=0.5)
    pool = ClaimFetcher(limits, workers=1)  # one thread: the second fetch waits in the queue
    work = pool.start([claim(0, f"http://127.0.0.1:{silent}/a.jpg"), claim(1, f"http://127.0.0.1:{silent}/b.jpg")],
                      inference, make)
    work.cancel()
    assert work.fetches[1][1].cancelled()
    time.sleep(1.0)  # the running fetch ends by its deadline
    assert work.fetches[0][1].done()
    assert len(work.submissions) == 1 and work.submissions[0].records == []  # nothing fetched reached the model
    pool.close()
