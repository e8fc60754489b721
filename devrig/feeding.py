"""Producing photos for rig runs, through the project's own :class:`ImageProducer`."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Sequence

from devrig.photos import Photo


def send_photos(producer, photos: Sequence[Photo], rate: float | None = None) -> list[tuple[str, str]]:
    """Send ``photos`` (at ``rate`` per second, else at once), flush; (image id, produced-at) each.

    Raises if any photo was not sent: a benchmark or test that lost a photo measures nothing.
    """
    sent = []
    started = time.monotonic()
    for k, photo in enumerate(photos):
        if rate:
            delay = started + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        message = producer.send(photo.data, photo.source, photo.label)
        if message is None:
            raise RuntimeError(f"not produced: {producer.summary.failed}")
        sent.append((message.image_id, message.produced_at))
    producer.flush()
    if producer.summary.failed:
        raise RuntimeError(f"not acknowledged: {producer.summary.failed}")
    return sent


class Feeder(threading.Thread):
    """Produces photos and re-sends exactly the ones that failed, as an application would.

    ``release(n)`` allows the first ``n`` photos to go out (at most ``rate`` per second, in
    chunks of ``chunk``); after every chunk it flushes and reads ``summary.failed``, which names
    the failed photos by source, and queues those again. If several chunks in a row fail
    entirely, the producer is closed and a new one is built (a fatal producer error never heals).
    A re-sent photo whose first send did reach the broker is on the images topic twice: that
    is the producer's duplicate, not the stream's (the outcome counts tell them apart).
    """

    def __init__(self, settings, photos: Sequence[Photo], rate: float = 60.0, chunk: int = 8):
        super().__init__(daemon=True, name="feeder")
        self.settings = settings
        self.photos = list(photos)
        self.by_source = {p.source: p for p in self.photos}
        self.rate = rate
        self.chunk = chunk
        self._allowed = 0
        self._cond = threading.Condition()
        self.acked: dict[str, float] = {}  # image id -> time of its (last) acknowledgement
        self.failures: list[dict[str, Any]] = []  # one per failed send: source, reason, time
        self.resent = 0
        self.producers_built = 0
        self.send_errors = 0
        self.accounting_mismatches = 0
        self.error: BaseException | None = None

    @property
    def released(self) -> int:
        """How many photos may go out so far."""
        return self._allowed

    def release(self, n: int | None = None) -> None:
        with self._cond:
            self._allowed = len(self.photos) if n is None else min(len(self.photos), max(self._allowed, n))
            self._cond.notify_all()

    def finish(self, timeout: float = 600.0) -> None:
        """Release everything and wait until every photo has been acknowledged."""
        self.release()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"producer did not finish within {timeout:.0f} s: "
                                 f"{len(self.acked)}/{len(self.photos)} acknowledged")
        if self.error:
            raise self.error

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by finish()
            self.error = exc

    def report(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for f in self.failures:
            key = f["reason"].split("(")[0][:80]
            reasons[key] = reasons.get(key, 0) + 1
        return {"acknowledged": len(self.acked), "failed_sends": len(self.failures), "resent": self.resent,
                "send_raised": self.send_errors, "summary_mismatches": self.accounting_mismatches,
                "producers_built": self.producers_built, "failure_reasons": reasons}

    def _new_producer(self):
        from producers.produce import ImageProducer

        self.producers_built += 1
        return ImageProducer(self.settings)

    def _next_chunk(self, todo: deque[Photo], next_index: int) -> int:
        with self._cond:
            while not todo and next_index >= self._allowed:
                self._cond.wait(0.5)
            while next_index < self._allowed and len(todo) < self.chunk:
                todo.append(self.photos[next_index])
                next_index += 1
        return next_index

    def _send_chunk(self, producer, batch: list[Photo]) -> dict[str, str]:
        """Send and flush ``batch``; the photos that failed, by source, with the reason."""
        from pipeline.kafka.client import KafkaError

        failed: dict[str, str] = {}
        sent_before = producer.summary.sent
        for photo in batch:
            try:
                producer.send(photo.data, photo.source, photo.label)
            except KafkaError as exc:  # e.g. metadata not available within max_block_ms
                self.send_errors += 1
                failed[photo.source] = f"send raised {exc!r}"
        producer.flush(timeout=60)  # what isn't acknowledged in time is in summary.failed
        failed.update({s: r for s, r in producer.summary.failed.items() if s in self.by_source})
        producer.summary.failed.clear()  # handled here: re-sent by the caller
        if producer.summary.sent - sent_before + len(failed) != len(batch):
            self.accounting_mismatches += 1  # the summary lost track of a photo
        return failed

    def _run(self) -> None:
        producer = self._new_producer()
        todo: deque[Photo] = deque()
        next_index = sent_total = all_failed_streak = 0
        started = time.monotonic()
        try:
            while len(self.acked) < len(self.photos):
                next_index = self._next_chunk(todo, next_index)
                batch = [todo.popleft() for _ in range(min(self.chunk, len(todo)))]
                if not batch:
                    continue
                failed = self._send_chunk(producer, batch)
                now = time.time()
                for photo in batch:
                    if photo.source in failed:
                        self.failures.append({"source": photo.source, "reason": failed[photo.source][:200], "at": now})
                        todo.append(photo)
                        self.resent += 1
                    else:
                        self.acked[photo.image_id] = now
                all_failed_streak = all_failed_streak + 1 if len(failed) == len(batch) else 0
                if all_failed_streak >= 3:
                    producer.close()
                    producer = self._new_producer()
                    all_failed_streak = 0
                if failed:
                    time.sleep(0.5)  # the broker is probably away; don't spin
                sent_total += len(batch)
                ahead = sent_total / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            producer.close()

