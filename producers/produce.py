"""Producing images to the images topic: a Python API (:class:`ImageProducer`) and ``deeper produce``.

Each message is a photo's bytes (value), their sha256 (key, so a re-sent photo lands on the same
partition and downstream upserts see one image), and headers for content type, source, time and
schema version. Delivery is acks=all and idempotent where the broker allows.

The bytes are the file's, untouched, unless the photo must change to be sent:

- ``max_side`` (``--max-side N``): a photo whose long side is over N px is re-encoded to N px.
- A photo over the message limit (``DEEPER_MAX_MESSAGE_BYTES``) is re-encoded, smaller until it
  fits (``fit_to_limit``, the default; each such photo is named in the summary), or, with a
  ``claim_check_prefix``, uploaded to S3 untouched and sent as a claim check (an empty value and
  an ``image-uri`` header, :mod:`pipeline.kafka.claim_check`) that the featurizer redeems.

Re-encoding decodes through :func:`pipeline.model.decode.decode_image`, the featurizer's own decoder, so
EXIF orientation is applied first and the pixels are the ones the featurizer would have seen;
a JPEG (or HEIF/AVIF) stays JPEG at quality 90, a WebP stays WebP, lossless formats become PNG.
EXIF (GPS included) is not carried over. The message id is the sha256 of the bytes actually
sent; the source stays the original file's path.

Sources and labels are text: file names that aren't UTF-8 are shown with ``\\xNN`` escapes
(:func:`pipeline.model.photos.display_path`), so they can be sent, logged and written anywhere.

Nothing is dropped silently: a file that can't be read, or is over the limit and can't be made to
fit, or whose send the broker rejects, is counted and reported by name, and the command exits
non-zero.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from pipeline.kafka.client import KafkaError
from pipeline.kafka.claim_check import IMAGE_URI_HEADER, FetchFailed, FetchLimits, fetch_image, upload_s3
from pipeline.cli_help import from_setting
from pipeline.config import Settings
from pipeline.errors import DecodeError, DeeperError
from pipeline.model.photos import display_path
from schemas import messages
from schemas.messages import IMAGE_CONTENT_TYPES, ImageMessage, label_problem, make_image_message, now_iso

log = logging.getLogger(__name__)

#: Bytes a message needs beyond its key, value and headers (record and batch framing), kept as margin.
_OVERHEAD = 1024
#: Quality of re-encoded JPEG and WebP: no visible loss, and far above what a CNN resolves.
REENCODE_QUALITY = 90
#: The fit-to-limit loop stops shrinking here: below it the photo has less detail than a
#: backbone's 224-px input (after its central crop) needs; such a photo is reported, not sent.
MIN_FIT_SIDE = 256

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
_SUFFIXES = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/bmp": ".bmp",
             "image/webp": ".webp", "image/tiff": ".tif"}


def sniff_content_type(data: bytes) -> str:
    """A content type from magic bytes (cheap; the featurizer decides what's really valid)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return IMAGE_CONTENT_TYPES["WEBP"]
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return IMAGE_CONTENT_TYPES[fmt]
    return "application/octet-stream"


def source_text(source: str | bytes | os.PathLike) -> str:
    """A source or label as UTF-8-safe text (see :func:`pipeline.model.photos.display_path`)."""
    try:
        return display_path(source) if not isinstance(source, bytes) else source.decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name produced
        return str(source).encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- re-encoding


@dataclass(frozen=True)
class Encoded:
    data: bytes
    width: int
    height: int
    content_type: str
    original: tuple[int, int]  # the photo's upright width and height before re-encoding


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as stored, from the header alone; None if Pillow can't tell."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 (any failure: the caller decodes fully or sends untouched)
        return None


def _output_format(source_format: str) -> tuple[str, str]:
    """(Pillow format, content type) for a re-encoded photo: lossy stays lossy, lossless PNG."""
    if source_format in ("JPEG", "MPO", "HEIF", "AVIF"):
        return "JPEG", IMAGE_CONTENT_TYPES["JPEG"]
    if source_format == "WEBP":
        return "WEBP", IMAGE_CONTENT_TYPES["WEBP"]
    return "PNG", IMAGE_CONTENT_TYPES["PNG"]


def reencode(data: bytes, max_side: int | None = None, budget: int | None = None) -> Encoded:
    """Decode ``data`` upright and encode it again with its long side at most ``max_side``,
    shrinking further (down to :data:`MIN_FIT_SIDE`) until it is at most ``budget`` bytes.

    The result may still be over ``budget``: the caller checks. Raises :class:`DecodeError`
    when the photo can't be decoded (the featurizer would refuse it too).
    """
    from PIL import Image

    from pipeline.model.decode import decode_image

    stored = _header_size(data)
    long_side = max(stored) if stored else None
    side = min(long_side, max_side) if long_side and max_side else (long_side or max_side)
    if side and budget and len(data) > budget:  # first guess: bytes grow with the pixel count
        side = max(MIN_FIT_SIDE, min(side, int(side * math.sqrt(budget / len(data)))))
    # decode just big enough: JPEGs through DCT scaling, others by box reduction
    min_side = math.ceil(side * min(stored) / max(stored)) if stored and side and side < max(stored) else None
    decoded = decode_image(data, min_side=min_side)
    pixels = Image.fromarray(decoded.pixels)
    out_format, content_type = _output_format(decoded.format)
    side = min(side or max(pixels.size), max(decoded.width, decoded.height))
    while True:
        image = _resized(pixels, side)
        out = io.BytesIO()
        options = {"quality": REENCODE_QUALITY} if out_format in ("JPEG", "WEBP") else {}
        image.save(out, out_format, **options)
        encoded = Encoded(out.getvalue(), image.width, image.height, content_type, (decoded.width, decoded.height))
        if budget is None or len(encoded.data) <= budget or side <= MIN_FIT_SIDE:
            return encoded
        side = max(MIN_FIT_SIDE, min(side - 1, int(side * math.sqrt(budget / len(encoded.data)) * 0.95)))


def _resized(image, side: int):
    from PIL import Image

    scale = side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# --------------------------------------------------------------------------- the producer


@dataclass(frozen=True)
class Reencoded:
    """One photo sent re-encoded: why, and its size before and after."""

    source: str
    why: str  # "max_side" or "limit"
    before: tuple[int, int, int]  # upright width, height, bytes
    after: tuple[int, int, int]

    def line(self) -> str:
        (w, h, n), (w2, h2, n2) = self.before, self.after
        why = "long side over --max-side" if self.why == "max_side" else "over the message limit"
        return f"re-encoded {self.source}: {w}x{h} {_mb(n)} -> {w2}x{h2} {_mb(n2)} ({why})"


@dataclass
class ProduceSummary:
    sent: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # source -> reason
    reencoded: list[Reencoded] = field(default_factory=list)
    claim_checks: int = 0  # of ``sent``: references, their bytes in object storage
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        extra = ""
        if self.reencoded:
            fitted = sum(1 for r in self.reencoded if r.why == "limit")
            extra += f"; {len(self.reencoded)} re-encoded ({fitted} to fit the message limit)"
        if self.claim_checks:
            extra += f"; {self.claim_checks} sent as claim checks"
        return (f"produced {self.sent} images ({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s "
                f"({rate:.1f}/s){extra}; {len(self.failed)} failed")


class ImageProducer:
    """Send images from an application; ``flush()`` before trusting the summary.

    ``max_side``: re-encode photos whose long side is over it. ``fit_to_limit``: re-encode
    photos over the message limit until they fit (off: refuse them). ``claim_check_prefix``
    (``s3://bucket/prefix``): upload photos over the limit and send claim checks instead;
    ``fetch_limits`` says where S3 is (endpoint, region) and bounds :meth:`send_reference`'s
    fetch of an unknown reference.
    """

    def __init__(self, settings: Settings, topic: str | None = None, producer=None, *, max_side: int | None = None,
                 fit_to_limit: bool = True, claim_check_prefix: str | None = None,
                 fetch_limits: FetchLimits | None = None):
        from pipeline.kafka.kafka_io import make_producer

        if max_side is not None and max_side < MIN_FIT_SIDE:
            raise DeeperError(f"--max-side {max_side}: at least {MIN_FIT_SIDE} px (a backbone needs that much detail)")
        self.settings = settings
        self.topic = topic or settings.images_topic
        self.max_bytes = settings.message_limit
        self.max_side = max_side
        self.fit_to_limit = fit_to_limit
        self.claim_check_prefix = claim_check_prefix
        self.fetch_limits = fetch_limits or FetchLimits.from_settings(settings)
        self.summary = ProduceSummary()
        self._unacked: dict[str, object] = {}  # source -> future, until acked or failed
        self._producer = producer or make_producer(settings, max_request_size=self.max_bytes)
        self._started = time.monotonic()

    def send(self, data: bytes, source: str, label: str | None = None,
             content_type: str | None = None) -> ImageMessage | None:
        """Queue one image; returns the message sent (re-encoded, or a claim check, when it had
        to be), or None if refused up front (see the summary)."""
        source = source_text(source)
        label = source_text(label) if label is not None else None
        if self._label_refused(source, label):
            return None
        content_type = content_type or sniff_content_type(data)
        budget = self._budget(source, label)
        if self.max_side:
            data, content_type = self._limit_side(data, content_type, source)
        if len(data) > budget:
            if self.claim_check_prefix:
                return self._send_claim_check(data, source, label, content_type)
            if not self.fit_to_limit:
                self._fail(source, self._too_large(len(data)))
                return None
            fitted = self._fit(data, source, budget)
            if fitted is None:
                return None
            data, content_type = fitted
        message = make_image_message(data, source, content_type, label)
        return self._send(message, data, source)

    def send_file(self, path: str | Path, label: str | None = None) -> ImageMessage | None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            self._fail(source_text(path), f"unreadable: {exc.strerror or exc}")
            return None
        if not data:
            self._fail(source_text(path), "empty file")
            return None
        return self.send(data, source_text(path), label)

    def send_reference(self, uri: str, source: str | None = None, label: str | None = None, *,
                       image_id: str | None = None, content_type: str = "") -> ImageMessage | None:
        """Queue a claim check: an empty value and an ``image-uri`` header naming the photo.

        The key must be the sha256 of the bytes at ``uri`` (the featurizer checks it): pass
        ``image_id`` if you know it, else the photo is fetched once here (within
        ``fetch_limits``), which also proves the reference can be redeemed.
        """
        source = source_text(source if source is not None else uri)
        if image_id is None:
            try:
                data = fetch_image(uri, self.fetch_limits)
            except FetchFailed as exc:
                self._fail(source, f"claim check not sent: {exc}" + (f" ({exc.cause})" if exc.cause else ""))
                return None
            image_id, content_type = messages.image_id(data), content_type or sniff_content_type(data)
        label = source_text(label) if label is not None else None
        if self._label_refused(source, label):
            return None
        message = ImageMessage(image_id, b"", source, content_type or "application/octet-stream", now_iso(), label)
        return self._send(message, b"", source, uri)

    def _label_refused(self, source: str, label: str | None) -> bool:
        """A known label must be a class name (the featurizer dead-letters any other): refused here."""
        problem = label_problem(label) if label is not None else None
        if problem:
            self._fail(source, f"label {label[:80]!r} is not a class name: {problem}")
        return problem is not None

    def flush(self, timeout: float | None = 60) -> ProduceSummary:
        """Wait for every queued image's acknowledgement; what isn't acked in time is failed."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as exc:
            for source in list(self._unacked):
                self._fail(source, f"not acknowledged within {timeout} s: {exc!r}")
        self.summary.seconds = time.monotonic() - self._started
        return self.summary

    def close(self) -> None:
        from pipeline.kafka.kafka_io import close_producer

        close_producer(self._producer)

    # -- helpers ----------------------------------------------------------------------------
    def _budget(self, source: str, label: str | None) -> int:
        """Bytes the value may have: the limit less key, headers (with the longest content type:
        a re-encoding may change it) and framing."""
        probe = make_image_message(b"", source, "application/octet-stream", label)
        headers = sum(len(k) + len(v) for k, v in probe.headers())
        return self.max_bytes - _OVERHEAD - len(probe.key()) - headers

    def _too_large(self, size: int) -> str:
        return (f"too large: {size} bytes is over the {self.max_bytes}-byte message limit "
                "(DEEPER_MAX_MESSAGE_BYTES; the broker's message.max.bytes must allow it too)")

    def _limit_side(self, data: bytes, content_type: str, source: str) -> tuple[bytes, str]:
        """``data`` re-encoded to ``max_side`` if its long side is over it, else unchanged."""
        max_side = self.max_side or 0
        stored = _header_size(data)  # None: a format Pillow opens only through decode (HEIF)
        if stored is not None and max(stored) <= max_side:
            return data, content_type
        try:
            encoded = reencode(data, max_side)
        except DecodeError:  # not ours to judge: the featurizer dead-letters it with the reason
            return data, content_type
        if max(encoded.original) <= max_side:
            return data, content_type
        self.summary.reencoded.append(Reencoded(source, "max_side", (*encoded.original, len(data)),
                                                (encoded.width, encoded.height, len(encoded.data))))
        return encoded.data, encoded.content_type

    def _fit(self, data: bytes, source: str, budget: int) -> tuple[bytes, str] | None:
        """``data`` re-encoded to fit ``budget`` bytes, or None (failed, with the reason)."""
        try:
            encoded = reencode(data, None, budget)
        except DecodeError as exc:
            self._fail(source, f"{self._too_large(len(data))}; it can't be re-encoded smaller: {exc}")
            return None
        if len(encoded.data) > budget:
            self._fail(source, f"{self._too_large(len(data))}; still {len(encoded.data)} bytes re-encoded at "
                               f"{encoded.width}x{encoded.height} (the smallest allowed: {MIN_FIT_SIDE} px)")
            return None
        done = Reencoded(source, "limit", (*encoded.original, len(data)),
                         (encoded.width, encoded.height, len(encoded.data)))
        self.summary.reencoded.append(done)
        log.info("%s", done.line())
        return encoded.data, encoded.content_type

    def _send_claim_check(self, data: bytes, source: str, label: str | None, content_type: str) -> ImageMessage | None:
        try:
            uri = upload_s3(self.claim_check_prefix or "", data, _SUFFIXES.get(content_type, ""), self.fetch_limits,
                            content_type)
        except FetchFailed as exc:
            self._fail(source, f"claim check upload failed: {exc}" + (f" ({exc.cause})" if exc.cause else ""))
            return None
        return self.send_reference(uri, source, label, image_id=messages.image_id(data),
                                   content_type=content_type)

    def _send(self, message: ImageMessage, data: bytes, source: str, uri: str | None = None) -> ImageMessage | None:
        headers = message.headers() + ([(IMAGE_URI_HEADER, uri.encode())] if uri else [])
        try:
            future = self._producer.send(self.topic, key=message.key(), value=data, headers=headers)
        except KafkaError as exc:  # e.g. no metadata within max_block_ms: the broker is away
            self._fail(source, f"not sent: {exc!r}")
            return None
        self._unacked[source] = future
        future.add_callback(self._sent, source, len(data), uri is not None)
        future.add_errback(lambda exc: self._fail(source, f"broker refused: {exc!r}"))
        return message

    def _sent(self, source: str, size: int, reference: bool, _metadata) -> None:
        self._unacked.pop(source, None)
        self.summary.sent += 1
        self.summary.bytes += size
        self.summary.claim_checks += reference

    def _fail(self, source: str, reason: str) -> None:
        self._unacked.pop(source, None)
        self.summary.failed[source] = reason
        log.warning("not produced: %s: %s", source, reason)


def _paths(inputs: list[str], labels_from_folders: bool) -> Iterator[tuple[Path, str | None]]:
    """Files, directories, or '-' (one path per line on stdin, any bytes a file name may hold), lazily."""
    from pipeline.model.photos import find_photos

    for item in inputs:
        if item == "-":
            for line in sys.stdin.buffer:
                if line.strip():
                    yield Path(os.fsdecode(line.strip())), None
        else:
            for photo in find_photos([item], labels_from_folders):
                yield photo.path, photo.label


def produce_paths(producer: ImageProducer, paths: Iterable[tuple[Path, str | None]], progress: bool = True,
                  total: int | None = None) -> ProduceSummary:
    bar = tqdm(total=total, desc="produce", unit="img", disable=not progress, file=sys.stderr)
    for path, label in paths:
        producer.send_file(path, label)
        bar.update(1)
    bar.close()
    return producer.flush()


def cmd_produce(args: argparse.Namespace) -> int:
    settings = Settings.from_env(images_topic=args.topic)
    from pipeline.kafka.kafka_io import ensure_topics, wait_for_broker

    options = vars(args)  # callers building a Namespace by hand may omit the newer options
    wait_for_broker(settings, timeout=args.wait)
    ensure_topics(settings, {settings.images_topic: args.partitions})
    producer = ImageProducer(settings, max_side=options.get("max_side"), fit_to_limit=not options.get("no_fit"),
                             claim_check_prefix=options.get("claim_check_prefix"))
    paths = list(_paths(args.inputs, args.labels_from_folders)) if "-" not in args.inputs else _paths(args.inputs, False)
    total = len(paths) if isinstance(paths, list) else None
    try:
        summary = produce_paths(producer, paths, not args.quiet, total)
    finally:
        producer.close()
    for done in summary.reencoded:
        if done.why == "limit":
            print(done.line(), file=sys.stderr)
    for source, reason in summary.failed.items():
        print(f"FAILED {source}: {reason}", file=sys.stderr)
    print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser("produce", help="send photos to the images topic")
    p.add_argument("inputs", nargs="+", help="photo files, directories, or - to read paths from stdin")
    p.add_argument("--topic", "--images-topic", dest="topic", metavar="TOPIC",
                   help=f"images topic to send to {from_setting('images_topic')}")
    p.add_argument("--labels-from-folders", action="store_true", help="send the sub-folder name as a label header")
    p.add_argument("--max-side", type=int, metavar="PX",
                   help=f"re-encode photos whose long side is over PX (at least {MIN_FIT_SIDE}), upright")
    p.add_argument("--no-fit", action="store_true",
                   help="refuse photos over the message limit instead of re-encoding them smaller")
    p.add_argument("--claim-check-prefix", metavar="S3_URI",
                   help="upload photos over the message limit to s3://bucket/prefix and send references instead")
    p.add_argument("--partitions", type=int, default=4, help="partitions if the topic must be created")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the broker")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_produce)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deeper-produce")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["produce", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except DeeperError as exc:
        print(f"deeper produce: error: {exc}", file=sys.stderr)
        return 2
