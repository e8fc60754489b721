"""Producing images to the images topic: a Python API (:class:`ImageProducer`) and ``deeper produce``.

Each message is the file's bytes untouched (value), its sha256 (key, so a re-sent photo lands
on the same partition and downstream upserts see one image), and headers for content type,
source, time and schema version. Delivery is acks=all and idempotent where the broker allows.

Nothing is dropped silently: a file that can't be read, or is over the message size limit, or
whose send the broker rejects, is counted and reported by name, and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from kafka.errors import KafkaError
from tqdm import tqdm

from pipeline.config import Settings
from pipeline.errors import DeeperError
from schemas.messages import IMAGE_CONTENT_TYPES, ImageMessage, make_image_message

log = logging.getLogger(__name__)

#: Bytes a message needs beyond its key and value (record + header overhead), kept as margin.
_OVERHEAD = 1024

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


def sniff_content_type(data: bytes) -> str:
    """A content type from magic bytes (cheap; the featurizer decides what's really valid)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return IMAGE_CONTENT_TYPES["WEBP"]
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return IMAGE_CONTENT_TYPES[fmt]
    return "application/octet-stream"


@dataclass
class ProduceSummary:
    sent: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # source -> reason
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (f"produced {self.sent} images ({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s "
                f"({rate:.1f}/s); {len(self.failed)} failed")


class ImageProducer:
    """Send images from an application; ``flush()`` before trusting the summary."""

    def __init__(self, settings: Settings, topic: str | None = None, producer=None):
        from pipeline.kafka_io import make_producer

        self.settings = settings
        self.topic = topic or settings.images_topic
        self.max_bytes = int(settings.max_message_bytes)
        self.summary = ProduceSummary()
        self._unacked: dict[str, object] = {}  # source -> future, until acked or failed
        self._producer = producer or make_producer(settings, max_request_size=self.max_bytes)
        self._started = time.monotonic()

    def send(self, data: bytes, source: str, label: str | None = None,
             content_type: str | None = None) -> ImageMessage | None:
        """Queue one image; returns the message, or None if refused up front (see summary)."""
        message = make_image_message(data, source, content_type or sniff_content_type(data), label)
        size = len(data) + len(message.key()) + _OVERHEAD
        if size > self.max_bytes:
            self._fail(source, f"too large: {len(data)} bytes is over the {self.max_bytes}-byte message limit "
                               "(DEEPER_MAX_MESSAGE_BYTES; the broker's message.max.bytes must allow it too)")
            return None
        try:
            future = self._producer.send(self.topic, key=message.key(), value=data, headers=message.headers())
        except KafkaError as exc:  # e.g. no metadata within max_block_ms: the broker is away
            self._fail(source, f"not sent: {exc!r}")
            return None
        self._unacked[source] = future
        future.add_callback(self._sent, source, len(data))
        future.add_errback(lambda exc: self._fail(source, f"broker refused: {exc!r}"))
        return message

    def send_file(self, path: str | Path, label: str | None = None) -> ImageMessage | None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            self._fail(str(path), f"unreadable: {exc.strerror or exc}")
            return None
        if not data:
            self._fail(str(path), "empty file")
            return None
        return self.send(data, str(path), label)

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
        from pipeline.kafka_io import close_producer

        close_producer(self._producer)

    def _sent(self, source: str, size: int, _metadata) -> None:
        self._unacked.pop(source, None)
        self.summary.sent += 1
        self.summary.bytes += size

    def _fail(self, source: str, reason: str) -> None:
        self._unacked.pop(source, None)
        self.summary.failed[source] = reason
        log.warning("not produced: %s: %s", source, reason)


def _paths(inputs: list[str], labels_from_folders: bool) -> Iterator[tuple[Path, str | None]]:
    """Files, directories, or '-' (one path per line on stdin), lazily."""
    from pipeline.photos import find_photos

    for item in inputs:
        if item == "-":
            for line in sys.stdin:
                if line.strip():
                    yield Path(line.strip()), None
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
    from pipeline.kafka_io import ensure_topics, wait_for_broker

    wait_for_broker(settings, timeout=args.wait)
    ensure_topics(settings, {settings.images_topic: args.partitions})
    producer = ImageProducer(settings)
    paths = list(_paths(args.inputs, args.labels_from_folders)) if "-" not in args.inputs else _paths(args.inputs, False)
    total = len(paths) if isinstance(paths, list) else None
    try:
        summary = produce_paths(producer, paths, not args.quiet, total)
    finally:
        producer.close()
    for source, reason in summary.failed.items():
        print(f"FAILED {source}: {reason}", file=sys.stderr)
    print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser("produce", help="send photos to the images topic")
    p.add_argument("inputs", nargs="+", help="photo files, directories, or - to read paths from stdin")
    p.add_argument("--topic", help="images topic (default $DEEPER_IMAGES_TOPIC)")
    p.add_argument("--labels-from-folders", action="store_true", help="send the sub-folder name as a label header")
    p.add_argument("--partitions", type=int, default=4, help="partitions if the topic must be created")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the broker")
    p.add_argument("-q", "--quiet", action="store_true")
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
