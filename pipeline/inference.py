"""Records in, vectors out: the tf.data input pipeline shared by batch commands and the stream.

``records -> queue -> tf.data: from_generator -> map(decode + preprocess, parallel) -> batch
-> prefetch -> model``.

Why it is shaped like this:
- One ``tf.data`` pipeline per :class:`Inference`, built once and fed through a queue, never
  ending: building and tracing a new pipeline on every call cost ~150 ms whatever the number
  of images, which the stream (one call per Kafka poll) paid on every poll.
- A never-ending dataset's ``batch()`` would wait forever on a half-full batch, so every call
  pads what it feeds to a whole number of batches with empty filler records: a half-full poll
  never waits for images that may not come. Fillers (and images that fail to decode) never
  reach the model: each batch runs only its decoded rows.
- A record that fails to decode flows through as a 1x1 placeholder with its error attached,
  so tf.data never raises mid-iterator; it comes back as a :class:`Failed` in its place and its
  batch-mates go on.
- Parallelism is fixed, not ``AUTOTUNE`` (autotune was seen to stall ~10 s at the end of finite
  datasets); ``deterministic=True`` keeps input order, so the caller can match results to Kafka
  offsets and commit safely. At most ``1 + PREFETCH_BATCHES`` batches are fed ahead of the
  model, so memory stays bounded and decode of batch k+1 overlaps the model on batch k.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from pipeline.decode import DEFAULT_MAX_PIXELS, decode_image
from pipeline.errors import DecodeError
from pipeline.nets.base import Backbone


@dataclass
class ImageRecord:
    """One image to featurize. ``context`` rides along untouched (e.g. Kafka offsets)."""

    image_id: str
    data: bytes
    source: str
    label: str | None = None
    context: Any = None


@dataclass
class Featurized:
    record: ImageRecord
    vector: np.ndarray  # float32 [dim]
    width: int
    height: int


@dataclass
class Failed:
    record: ImageRecord
    reason: str
    detail: str = ""


Result = Featurized | Failed


@dataclass
class StageTimes:
    """Seconds spent per stage, for logs and metrics (decode overlaps model time)."""

    decode_wait: float = 0.0
    model: float = 0.0
    images: int = 0
    batches: int = 0


def default_parallelism() -> int:
    return max(2, min(8, os.cpu_count() or 2))


#: Batches fed ahead of the one the model is working on.
PREFETCH_BATCHES = 1
#: Sequence number of the padding records that complete a call's last batch.
_FILLER = -1


class Inference:
    """Runs one backbone end point over records, with one long-lived tf.data pipeline."""

    def __init__(self, backbone: Backbone, layer: str, batch_size: int = 32,
                 parallel_decode: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.backbone = backbone
        self.layer = backbone.info.resolve_layer(layer)
        self.dim = backbone.info.end_points[self.layer]
        self.batch_size = batch_size
        self.parallel_decode = parallel_decode or default_parallelism()
        self.max_pixels = max_pixels
        self.times = StageTimes()
        self._feed: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._batches: Iterator | None = None
        self._lock = threading.Lock()  # one run() at a time: batches must not interleave

    # -- public -------------------------------------------------------------------------------
    def run(self, records: Iterable[ImageRecord]) -> Iterator[Result]:
        """Yield one result per record, in order; never raises for a bad image."""
        with self._lock:
            yield from self._run(iter(records))

    def close(self) -> None:
        """End the pipeline's feeding generator (also done at interpreter exit)."""
        self._closed.set()

    # -- the loop -----------------------------------------------------------------------------
    def _run(self, source: Iterator[ImageRecord]) -> Iterator[Result]:
        batches = self._pipeline()
        waiting: deque[ImageRecord] = deque()  # fed, result not yet yielded, in order
        fed = 0  # elements fed this call (records + fillers): always drained to a batch boundary
        exhausted = False
        try:
            while True:
                while not exhausted and len(waiting) < self.batch_size * (1 + PREFETCH_BATCHES):
                    record = next(source, None)
                    if record is None:
                        exhausted = True
                        fed += self._pad(fed)
                        break
                    self._feed.put((fed, record.data))
                    waiting.append(record)
                    fed += 1
                if not waiting:
                    return
                started = time.perf_counter()
                batch = next(batches)
                self.times.decode_wait += time.perf_counter() - started
                fed -= self.batch_size
                yield from self._run_batch(waiting, *(t.numpy() for t in batch))
        finally:
            self._drain(batches, fed)

    def _pad(self, fed: int) -> int:
        """Complete the last batch with fillers so a never-ending dataset's batch() returns."""
        missing = -fed % self.batch_size
        for _ in range(missing):
            self._feed.put((_FILLER, b""))
        return missing

    def _drain(self, batches: Iterator, fed: int) -> None:
        """The caller stopped early: discard what is still in the pipeline for this call."""
        if fed <= 0:
            return
        fed += self._pad(fed)
        for _ in range(fed // self.batch_size):
            next(batches)

    def _run_batch(self, waiting: deque[ImageRecord], seq: np.ndarray, pixels: np.ndarray, width: np.ndarray,
                   height: np.ndarray, error: np.ndarray) -> Iterator[Result]:
        real = seq != _FILLER
        ok = real & (error == b"")
        vectors = None
        if ok.any():
            started = time.perf_counter()
            vectors = self.backbone.run(pixels[ok], [self.layer])[self.layer]
            self.times.model += time.perf_counter() - started
        self.times.batches += 1
        row = 0
        for i in np.flatnonzero(real):
            record = waiting.popleft()
            self.times.images += 1
            if ok[i]:
                yield Featurized(record, vectors[row], int(width[i]), int(height[i]))
                row += 1
            else:
                reason, _, detail = error[i].decode().partition(":")
                yield Failed(record, reason, detail.strip())

    # -- the tf.data pipeline -----------------------------------------------------------------
    def _pipeline(self) -> Iterator:
        if self._batches is None:
            self._batches = iter(self._dataset())
            _close_at_exit(self)
        return self._batches

    def _feeder(self) -> Iterator[tuple[int, bytes]]:
        """The dataset's source: blocks on the queue, ends when the Inference is closed."""
        while not self._closed.is_set():
            try:
                yield self._feed.get(timeout=0.1)
            except queue.Empty:
                continue

    def _decode(self, data: bytes) -> tuple[np.ndarray, np.int32, np.int32, bytes]:
        try:
            image = decode_image(bytes(data), self.max_pixels)
        except DecodeError as exc:
            return np.zeros((1, 1, 3), np.uint8), np.int32(0), np.int32(0), f"{exc.reason}: {exc.detail}".encode()
        return image.pixels, np.int32(image.width), np.int32(image.height), b""

    def _dataset(self):
        import tensorflow as tf

        size = self.backbone.info.image_size
        blank = tf.zeros([size, size, 3], tf.float32)

        def prepare(seq, data):
            pixels, width, height, error = tf.numpy_function(
                self._decode, [data], [tf.uint8, tf.int32, tf.int32, tf.string], stateful=False)
            pixels.set_shape([None, None, 3])
            # fillers and failures skip preprocessing: their rows never reach the model
            ready = tf.cond(tf.equal(error, ""), lambda: self.backbone.preprocess(pixels), lambda: blank)
            return seq, ready, width, height, error

        signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string))
        options = tf.data.Options()
        options.autotune.enabled = False
        options.deterministic = True
        return (tf.data.Dataset.from_generator(self._feeder, output_signature=signature)
                .map(prepare, num_parallel_calls=self.parallel_decode, deterministic=True)
                .batch(self.batch_size, drop_remainder=True)
                .prefetch(PREFETCH_BATCHES)
                .with_options(options))


def _close_at_exit(inference: Inference) -> None:
    """Let the feeding generator return at exit, so TF's threads don't wait on the queue."""
    ref = weakref.ref(inference)
    atexit.register(lambda: (lambda i: i and i.close())(ref()))
