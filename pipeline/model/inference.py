"""Records in, vectors out: the tf.data input pipeline shared by batch commands and the stream.

``submit(records) -> queue -> tf.data: from_generator -> map(decode + preprocess, parallel)
-> batch -> prefetch -> model thread -> Submission``.

Decode: plain JPEGs (most photos) are decoded and cropped by TensorFlow inside the graph
(:mod:`pipeline.model.graph_decode`: the same pixels, no Python); every other photo, and any
the graph refuses, by :func:`pipeline.model.decode.decode_image` (Pillow), which gives every
bad input its reason.

Why it is shaped like this:
- One ``tf.data`` pipeline per :class:`Inference`, built once and fed through a queue, never
  ending: building and tracing a new pipeline on every call cost ~150 ms whatever the number
  of images, which the stream (one call per Kafka poll) paid on every poll.
- The model runs in its own thread, so :meth:`Inference.submit` returns at once: the stream
  featurizer polls Kafka, writes Parquet and produces while the model works (kafka-python
  fetches only inside ``poll()``, so a poll loop that waits on the model leaves the network idle).
- Batches are cut by size *or* by time: records from consecutive submissions share a batch,
  and a partial batch goes out completed with filler records once ``batch_timeout`` has passed
  since its first record *and* a model thread is free to take it (while every model thread is
  busy it keeps filling: a batch of 3 would waste the model's next turn, and queueing behind
  small batches was what made latency long at moderate rates). A never-ending dataset's
  ``batch()`` would otherwise wait forever on a slow stream. Fillers (and images that fail to
  decode) never reach the model: each batch runs only its decoded rows.
- A record that fails to decode flows through as a 1x1 placeholder with its error attached,
  so tf.data never raises mid-iterator; it comes back as a :class:`Failed` in its place and its
  batch-mates go on.
- Parallelism is fixed, not ``AUTOTUNE`` (autotune was seen to stall ~10 s at the end of finite
  datasets); ``deterministic=True`` keeps input order, so results match submissions in order
  and the caller can commit Kafka offsets safely. ``PREFETCH_BATCHES`` bounds what is decoded
  ahead of the model, so decode of batch k+1 overlaps the model on batch k.
"""

from __future__ import annotations

import atexit
import io
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from pipeline.model.decode import DEFAULT_MAX_PIXELS, covering_side, decode_image, graph_plan, upright_size
from pipeline.errors import DecodeError
from pipeline.logs import event
from pipeline.model import graph_decode, threads
from pipeline.model.nets.base import Backbone

log = logging.getLogger(__name__)


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


def default_parallelism() -> int:
    return max(2, min(8, os.cpu_count() or 2))


#: Batches decoded ahead of the one the model is working on.
PREFETCH_BATCHES = 1
#: Default wait for a partial batch to fill, from its first record: short against a batch's
#: model time (~100-200 ms for 32 photos on 2 cores), long enough that back-to-back polls meet.
DEFAULT_BATCH_TIMEOUT = 0.02
#: Sequence number of the padding records that complete a batch cut by time.
_FILLER = -1


class Submission:
    """The results of one :meth:`Inference.submit`, filled in input order by the model thread."""

    def __init__(self, records: list[ImageRecord]):
        self.records = records
        self.results: list[Result] = []
        self.submitted = time.perf_counter()
        self.completed: float | None = self.submitted if not records else None
        self.cancelled = False
        self._changed = threading.Condition()
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self.completed is not None or self._error is not None

    def wait(self, timeout: float | None = None) -> list[Result]:
        """Every record's result, in order; raises what broke the model thread, if anything."""
        with self._changed:
            if not self._changed.wait_for(self.done, timeout):
                raise TimeoutError(f"{len(self.records) - len(self.results)} of {len(self.records)} images pending")
        self._raise()
        return self.results

    def cancel(self) -> None:
        """The caller no longer wants these results (e.g. its Kafka offsets were rewound): the
        model thread drops them instead of keeping them here."""
        self.cancelled = True

    def seconds(self) -> float:
        """Submit to last result (so far)."""
        return (self.completed or time.perf_counter()) - self.submitted

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the inference thread failed: {self._error!r}") from self._error

    def _result(self, index: int) -> Result:
        """Result ``index``, waiting for it."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.results) > index or self._error is not None)
        self._raise()
        return self.results[index]

    # -- called by the model thread -----------------------------------------------------------
    def _add(self, result: Result, last: bool) -> None:
        with self._changed:
            self.results.append(result)
            if last:
                self.completed = time.perf_counter()
            self._changed.notify_all()

    def _fail(self, error: BaseException) -> None:
        with self._changed:
            self._error = error
            self._changed.notify_all()


@dataclass
class StageTimes:
    """Model-thread totals, for logs and metrics (decode runs in tf.data threads, overlapping the model)."""

    decode_wait: float = 0.0  # waiting for the next decoded batch: idle, or input-bound
    model: float = 0.0
    images: int = 0
    batches: int = 0
    model_rows: int = 0  # rows the model ran: decoded images, not fillers or failures


class Inference:
    """Runs one backbone end point over records: one long-lived tf.data pipeline, model thread(s)."""

    def __init__(self, backbone: Backbone, layer: str, batch_size: int = 32,
                 parallel_decode: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 batch_timeout: float = DEFAULT_BATCH_TIMEOUT, model_threads: int = 1, graph_jpeg: bool = True):
        self.backbone = backbone
        self.layer = backbone.info.resolve_layer(layer)
        self.batch_size = batch_size
        self.parallel_decode = parallel_decode or default_parallelism()
        self.max_pixels = max_pixels
        # decode no larger than the backbone's central crop needs: DCT-scaled JPEGs, ~8x faster at 12 MP
        self.decode_min_side = covering_side(backbone.info.image_size)
        self.batch_timeout = batch_timeout
        # plain JPEGs decode in the graph (pipeline.model.graph_decode), the same pixels without Python;
        # a backbone that can't take a cropped image (no preprocess_cropped) gets Pillow's
        self.graph_jpeg = graph_jpeg and hasattr(backbone, "preprocess_cropped")
        # 0 (threads.MEASURE): one model thread or two, whichever runs this model faster here
        self.model_threads = model_threads if model_threads > 0 else self._measured_model_threads()
        self.times = StageTimes()
        # photos travel through tf.data as keys into this dict, not as string tensors: each
        # string tensor was a copy of the photo in and one out, in the Python the decode threads share
        self._feed: queue.Queue[int] = queue.Queue()
        self._photos: dict[int, bytes] = {}
        self._keys = itertools.count()
        # (submission, record, last of its submission?) fed and awaiting a result, in feed order
        self._waiting: deque[tuple[Submission, ImageRecord, bool]] = deque()
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()  # one submitter at a time: feed order = waiting order
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._batches: Iterator | None = None
        self._take_lock = threading.Lock()  # one model thread takes the next batch (and its records) at a time
        self._turn = threading.Condition()  # results are handed out in batch order
        self._busy = 0  # model threads running the model now (a partial batch waits while all are)
        self._taken = 0  # batches taken by model threads
        self._handed = 0  # batches whose results were handed out

    # -- public -------------------------------------------------------------------------------
    def submit(self, records: Iterable[ImageRecord]) -> Submission:
        """Queue ``records`` and return at once; the model thread fills the Submission in order."""
        submission = Submission(list(records))
        with self._submit_lock:
            self._start()
            for i, record in enumerate(submission.records):
                self._put(submission, record, last=i == len(submission.records) - 1)
        return submission

    def run(self, records: Iterable[ImageRecord]) -> Iterator[Result]:
        """Yield one result per record, in order; never raises for a bad image.

        ``records`` may be a lazy iterator: it is submitted a batch at a time, a few batches
        ahead of the results taken, so the model never waits on the caller and memory stays
        bounded whatever its length.
        """
        source = iter(records)
        in_flight: deque[Submission] = deque()

        def refill() -> None:
            while len(in_flight) < 2 + PREFETCH_BATCHES:
                chunk = list(itertools.islice(source, self.batch_size))
                if not chunk:
                    return
                in_flight.append(self.submit(chunk))

        try:
            refill()
            while in_flight:
                submission = in_flight[0]
                for i in range(len(submission.records)):
                    yield submission._result(i)
                in_flight.popleft()
                refill()
        finally:
            for submission in in_flight:
                submission.cancel()

    def warm_up(self) -> float:
        """Run one synthetic photo through the whole path (decode, tf.data, model) and drop it.

        A fresh pipeline's first batch costs about half a second more than the next ones (the
        iterator and its threads start, the map function is traced); a stream worker pays it
        here, before it consumes, instead of on its first photos. Returns the seconds it took;
        the stage totals (:attr:`times`) are left as they were.
        """
        from PIL import Image

        started = time.perf_counter()
        buffer = io.BytesIO()
        Image.linear_gradient("L").convert("RGB").save(buffer, "JPEG")
        before = StageTimes(**vars(self.times))
        self.submit([ImageRecord("warm-up", buffer.getvalue(), "warm-up")]).wait()
        with self._turn:  # the model thread hands results out and counts them under this lock
            self.times = before
        return time.perf_counter() - started

    def close(self) -> None:
        """End the feeding generator and the model thread (also done at interpreter exit)."""
        self._closed.set()

    # -- feeding ------------------------------------------------------------------------------
    def _measured_model_threads(self) -> int:
        """The thread plan's start-up probe (:func:`pipeline.model.threads.probe`) on a synthetic
        batch of this size; logged as the ``thread plan`` it settles on, with why."""
        size = self.backbone.info.image_size
        batch = np.random.default_rng(0).uniform(-1, 1, (self.batch_size, size, size, 3)).astype(np.float32)
        plan = threads.choose(threads.probe(lambda: self._run(batch)))
        event(log, "thread plan", model_threads=plan.model_threads, intra_op=plan.intra_op, inter_op=plan.inter_op,
              why=plan.why)
        return plan.model_threads

    def _start(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the inference thread failed earlier: {self._error!r}") from self._error
        if not self._threads:
            self._batches = iter(self._dataset())
            for i in range(self.model_threads):
                thread = threading.Thread(target=self._model_loop, name=f"deeper-inference-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
            _close_at_exit(self)

    def _put(self, submission: Submission, record: ImageRecord, last: bool) -> None:
        self._waiting.append((submission, record, last))  # first: the model thread pops in feed order
        key = next(self._keys)
        self._photos[key] = record.data
        self._feed.put(key)

    def _feeder(self) -> Iterator[int]:
        """The dataset's source: photo keys from the queue; completes a batch with fillers
        (:data:`_FILLER`, no photo: they decode as ``empty``) when its time is up."""
        count, deadline = 0, 0.0  # records in the current batch; when it must go out
        while not self._closed.is_set():
            wait = max(0.0, deadline - time.monotonic()) if count else 0.1
            try:
                key = self._feed.get(timeout=wait)
            except queue.Empty:
                if count and self._busy < self.model_threads:  # a model thread is free: don't keep it waiting
                    for _ in range(self.batch_size - count):
                        yield _FILLER
                    count = 0
                elif count:  # every model thread is busy: more photos may still join this batch
                    deadline = time.monotonic() + min(self.batch_timeout, 0.005)
                continue
            if count == 0:
                deadline = time.monotonic() + self.batch_timeout
            yield key
            count = (count + 1) % self.batch_size

    # -- the model threads --------------------------------------------------------------------
    def _model_loop(self) -> None:
        """Take a batch, run the model on its decoded rows, hand results out in batch order.

        With several model threads (each op single-threaded, see :mod:`pipeline.model.threads`),
        batches run side by side; a preempted op then delays only its own batch, where one
        batch split over every core has its other threads wait for the straggler.
        """
        records: list[tuple[Submission, ImageRecord, bool]] = []  # taken, results not handed out yet
        try:
            while True:
                started = time.perf_counter()
                with self._take_lock:
                    batch = next(self._batches, None)
                    if batch is None:  # closed
                        return
                    # np.asarray shares the tensors' memory; .numpy() would copy the batch's pixels
                    seq, pixels, width, height, error = (np.asarray(t) for t in batch)
                    real = seq != _FILLER
                    records = [self._waiting.popleft() for _ in range(int(real.sum()))]
                    ticket = self._taken
                    self._taken += 1
                waited = time.perf_counter() - started
                ok = real & (error == b"")
                with self._turn:
                    self._busy += 1
                try:
                    vectors, model_s, model_errors = self._model(pixels, ok)
                finally:
                    with self._turn:
                        self._busy -= 1
                with self._turn:
                    self._turn.wait_for(lambda: self._handed == ticket or self._error is not None)
                    if self._error is not None:  # another model thread failed: the order is broken
                        raise self._error
                    self._hand_out(records, real, ok, vectors, width, height, error, model_errors)
                    self._account(waited, model_s, len(records), int(ok.sum()))
                    self._handed += 1
                    self._turn.notify_all()
                records = []
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter, never lost in a thread
            self._fail_all(exc, records)

    def _fail_all(self, exc: BaseException, in_hand: list[tuple[Submission, ImageRecord, bool]]) -> None:
        """Every record taken or waiting gets the error; the other model threads stop too."""
        with self._turn:
            self._error = self._error or exc
            self._turn.notify_all()
        for submission, _, _ in in_hand:
            submission._fail(exc)
        with self._take_lock:
            while self._waiting:
                self._waiting.popleft()[0]._fail(exc)

    def _model(self, pixels: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray | None, float, dict[int, str]]:
        """Vectors of the decoded rows (fillers and failures never reach the model).

        If the model fails on the batch, it is run again, then on halves of the batch, down to
        the single images that make it fail: only those fail (``model_error``, by row index),
        their batch-mates get their vectors. A model that fails on every image fails them all,
        one by one, and the stream still goes on.
        """
        if not ok.any():
            return None, 0.0, {}
        started = time.perf_counter()
        rows = pixels if ok.all() else pixels[ok]
        try:
            vectors = self._run(rows)
        except Exception:  # noqa: BLE001 - find the image(s) that break it
            vectors, errors = self._bisect(rows, np.arange(len(rows)))
            return vectors, time.perf_counter() - started, errors
        return vectors, time.perf_counter() - started, {}

    def _run(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.backbone.run(rows, [self.layer])[self.layer])

    def _bisect(self, rows: np.ndarray, index: np.ndarray) -> tuple[np.ndarray | None, dict[int, str]]:
        """Vectors for ``rows`` where they can be had, and ``{row: error}`` where they can't."""
        try:
            return self._run(rows), {}
        except Exception as exc:  # noqa: BLE001 - split until the culprit is alone
            if len(rows) == 1:
                return None, {int(index[0]): f"{type(exc).__name__}: {str(exc)[:300]}"}
        half = len(rows) // 2
        left, left_errors = self._bisect(rows[:half], index[:half])
        right, right_errors = self._bisect(rows[half:], index[half:])
        parts = [v for v in (left, right) if v is not None]
        if not parts:
            return None, {**left_errors, **right_errors}
        width = parts[0].shape[1:]
        out = np.zeros((len(rows), *width), parts[0].dtype)
        if left is not None:
            out[:half] = left
        if right is not None:
            out[half:] = right
        return out, {**left_errors, **right_errors}

    def _hand_out(self, records: list[tuple[Submission, ImageRecord, bool]], real: np.ndarray, ok: np.ndarray,
                  vectors: np.ndarray | None, width: np.ndarray, height: np.ndarray, error: np.ndarray,
                  model_errors: dict[int, str]) -> None:
        row = 0
        for (submission, record, last), i in zip(records, np.flatnonzero(real)):
            if ok[i] and row in model_errors:
                result: Result = Failed(record, "model_error", model_errors[row])
                row += 1
            elif ok[i]:
                result = Featurized(record, vectors[row], int(width[i]), int(height[i]))
                row += 1
            else:
                reason, _, detail = error[i].decode().partition(":")
                result = Failed(record, reason, detail.strip())
            if not submission.cancelled:  # nobody waits for a cancelled submission: let its results go
                submission._add(result, last)

    def _account(self, waited: float, model_s: float, images: int, rows: int) -> None:
        self.times.decode_wait += waited
        self.times.model += model_s
        self.times.batches += 1
        self.times.images += images
        self.times.model_rows += rows

    # -- the tf.data pipeline -----------------------------------------------------------------
    def _inspect(self, key: np.int64) -> tuple[np.ndarray, bytes, np.ndarray, np.int32, np.int32, bytes]:
        """The photo fed as ``key``, ready for the graph: either its JPEG bytes and the plan for
        :func:`graph_decode.decode_central` (stored height, width, crop margins, orientation),
        or, for any photo the graph doesn't take, its pixels from :meth:`_decode_bytes`.
        Each key is read once: its bytes are let go here."""
        data = bytes(self._photos.pop(int(key), b""))
        plan = graph_plan(data, self.max_pixels, self.decode_min_side) if self.graph_jpeg else None
        if plan is None:
            pixels, width, height, error = self._decode_bytes(data)
            return pixels, b"", np.zeros(5, np.int32), width, height, error
        fraction = self.backbone.central_fraction
        geometry = np.array([plan.height, plan.width, graph_decode.central_margin(plan.height, fraction),
                             graph_decode.central_margin(plan.width, fraction), plan.orientation], np.int32)
        width, height = upright_size(plan.width, plan.height, plan.orientation)
        return _NO_PIXELS, data, geometry, np.int32(width), np.int32(height), b""

    def _decode_bytes(self, data: bytes) -> tuple[np.ndarray, np.int32, np.int32, bytes]:
        """Pixels (shrunk to ``decode_min_side``), full-size upright width/height, and error text."""
        try:
            image = decode_image(bytes(data), self.max_pixels, self.decode_min_side)
        except DecodeError as exc:  # decode_image raises nothing else
            return _NO_PIXELS, np.int32(0), np.int32(0), f"{exc.reason}: {exc.detail}".encode()
        return image.pixels, np.int32(image.width), np.int32(image.height), b""

    def _dataset(self) -> Any:
        import tensorflow as tf

        size = self.backbone.info.image_size
        blank = tf.zeros([size, size, 3], tf.float32)

        def ready(pixels, error):  # fillers and failures skip preprocessing: their rows never reach the model
            return tf.cond(tf.equal(error, ""), lambda: self.backbone.preprocess(pixels), lambda: blank)

        def through_pillow(jpeg):  # the graph refused it: decode_image decides, with its reasons
            pixels, width, height, error = tf.numpy_function(
                self._decode_bytes, [jpeg], [tf.uint8, tf.int32, tf.int32, tf.string], stateful=False)
            pixels.set_shape([None, None, 3])
            return ready(pixels, error), width, height, error

        def in_graph(jpeg, geometry, width, height, error):
            height_, width_, top, left, orientation = tf.unstack(geometry)
            cropped, ok = graph_decode.decode_central(jpeg, height_, width_, top, left, orientation)
            return tf.cond(ok, lambda: (self.backbone.preprocess_cropped(cropped), width, height, error),
                           lambda: through_pillow(jpeg))

        def prepare(seq):
            pixels, jpeg, geometry, width, height, error = tf.numpy_function(
                self._inspect, [seq], [tf.uint8, tf.string, tf.int32, tf.int32, tf.int32, tf.string], stateful=False)
            pixels.set_shape([None, None, 3])
            geometry.set_shape([5])
            image, width, height, error = tf.cond(
                tf.equal(jpeg, ""), lambda: (ready(pixels, error), width, height, error),
                lambda: in_graph(jpeg, geometry, width, height, error))
            return seq, image, width, height, error

        signature = tf.TensorSpec([], tf.int64)
        options = tf.data.Options()
        options.autotune.enabled = False
        options.deterministic = True
        return (tf.data.Dataset.from_generator(self._feeder, output_signature=signature)
                .map(prepare, num_parallel_calls=self.parallel_decode, deterministic=True)
                .batch(self.batch_size, drop_remainder=True)
                .prefetch(PREFETCH_BATCHES)
                .with_options(options))


#: What a photo without pixels (a failure, a filler, one left to the graph decode) carries.
_NO_PIXELS = np.zeros((1, 1, 3), np.uint8)


def _close_at_exit(inference: Inference) -> None:
    """Let the feeding generator return at exit, so TF's threads don't wait on the queue."""
    ref = weakref.ref(inference)
    atexit.register(lambda: (lambda i: i and i.close())(ref()))
