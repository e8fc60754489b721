"""Records in, vectors out: the tf.data input pipeline shared by batch commands and the stream.

``records -> decode (Pillow, parallel) -> backbone.preprocess (TF) -> batch -> prefetch -> model``.

Why it is shaped like this:
- A record that fails to decode still flows through the pipeline as a 1x1 placeholder with its
  error attached, so tf.data never raises mid-iterator and the rest of the batch goes on; the
  placeholder's output is discarded and the record comes back as a :class:`Failed`.
- Parallelism is fixed, not ``AUTOTUNE``: autotune was seen to stall ~10 s at the end of
  finite datasets, which a stream that builds one per poll cannot afford.
- Results come out in input order (``deterministic=True``), so the caller can match them to
  Kafka offsets and commit safely.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
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
    extra: dict[str, float] = field(default_factory=dict)


def default_parallelism() -> int:
    return max(2, min(8, os.cpu_count() or 2))


class Inference:
    """Runs one backbone end point over records, with tf.data doing decode and batching."""

    def __init__(self, backbone: Backbone, layer: str, batch_size: int = 32,
                 parallel_decode: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.backbone = backbone
        self.layer = backbone.info.resolve_layer(layer)
        self.dim = backbone.info.end_points[self.layer]
        self.batch_size = batch_size
        self.parallel_decode = parallel_decode or default_parallelism()
        self.max_pixels = max_pixels
        self.times = StageTimes()

    def run(self, records: Iterable[ImageRecord]) -> Iterator[Result]:
        """Yield one result per record, in order; never raises for a bad image."""
        pending: dict[int, ImageRecord] = {}
        dataset = self._dataset(records, pending)
        iterator = iter(dataset)
        while True:
            started = time.perf_counter()
            try:
                index, pixels, width, height, error = next(iterator)
            except StopIteration:
                return
            self.times.decode_wait += time.perf_counter() - started
            yield from self._run_batch(pending, index.numpy(), pixels.numpy(), width.numpy(), height.numpy(),
                                       error.numpy())

    def _run_batch(self, pending: dict[int, ImageRecord], index: np.ndarray, pixels: np.ndarray,
                   width: np.ndarray, height: np.ndarray, error: np.ndarray) -> Iterator[Result]:
        ok = np.array([e == b"" for e in error])
        vectors = None
        if ok.any():
            started = time.perf_counter()
            vectors = self.backbone.run(pixels[ok], [self.layer])[self.layer]
            self.times.model += time.perf_counter() - started
        self.times.batches += 1
        row = 0
        for i, idx in enumerate(index):
            record = pending.pop(int(idx))
            self.times.images += 1
            if ok[i]:
                yield Featurized(record, vectors[row], int(width[i]), int(height[i]))
                row += 1
            else:
                reason, _, detail = error[i].decode().partition(":")
                yield Failed(record, reason, detail.strip())

    def _dataset(self, records: Iterable[ImageRecord], pending: dict[int, ImageRecord]):
        import tensorflow as tf

        def numbered() -> Iterator[tuple[int, bytes]]:
            for i, record in enumerate(records):
                pending[i] = record
                yield i, record.data

        def decode(data: bytes) -> tuple[np.ndarray, np.int32, np.int32, bytes]:
            try:
                image = decode_image(bytes(data), self.max_pixels)
            except DecodeError as exc:
                return np.zeros((1, 1, 3), np.uint8), np.int32(0), np.int32(0), f"{exc.reason}: {exc.detail}".encode()
            return image.pixels, np.int32(image.width), np.int32(image.height), b""

        def prepare(index, data):
            pixels, width, height, error = tf.numpy_function(
                decode, [data], [tf.uint8, tf.int32, tf.int32, tf.string], stateful=False)
            pixels.set_shape([None, None, 3])
            return index, self.backbone.preprocess(pixels), width, height, error

        signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string))
        options = tf.data.Options()
        options.autotune.enabled = False
        options.deterministic = True
        return (tf.data.Dataset.from_generator(numbered, output_signature=signature)
                .map(prepare, num_parallel_calls=self.parallel_decode, deterministic=True)
                .batch(self.batch_size)
                .prefetch(2)
                .with_options(options))
