"""Output records that always fit: size limits per topic, dead letters cut to size, field caps.

One setting (``DEEPER_MAX_MESSAGE_BYTES``) is the message size limit of every producer in the
stack; a topic whose ``max.message.bytes`` is lower (an operator's choice) lowers it for that
topic. A record over its topic's limit would fail its whole checkpoint, and in a transaction
every record with it, so sizes are checked before sending, and a refusal the broker still
sends back lowers the learnt limit for the retry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from pipeline.config import Settings
from pipeline.kafka.client import kafka_errors
from pipeline.kafka.kafka_io import topic_message_limits
from pipeline.logs import event

log = logging.getLogger(__name__)

#: Bytes a record adds to its key, value and headers in a v2 batch (varints, attributes,
#: batch header): generous, so an estimate under the limit is never refused.
RECORD_MARGIN = 512
#: Longest text field (source, label, header value) an output keeps; longer ones are cut
#: and end with :data:`TRUNCATED`.
MAX_FIELD_CHARS = 4096
TRUNCATED = "...[truncated {n} chars]"

Headers = Sequence[tuple[str, bytes | None]]


def cap_text(text: str | None, limit: int = MAX_FIELD_CHARS) -> str | None:
    """``text`` cut to ``limit`` characters with a marker saying how much went."""
    if text is None or len(text) <= limit:
        return text
    marker = TRUNCATED.format(n=len(text) - limit)
    return text[:limit] + marker


@dataclass
class Unreadable:
    """Where a record the client could not parse sat: a dead letter's only knowledge of it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes | None = None
    headers: list = field(default_factory=list)


class OutputLimits:
    """The size limit of each output topic, learnt from the broker and from refusals."""

    def __init__(self, settings: Settings, topics: Iterable[str]):
        self.default = settings.message_limit
        self._topics = list(topics)
        self._settings = settings
        self._limits: dict[str, int] | None = None

    def load(self) -> dict[str, int]:
        """The topics' own limits (asked once; a broker that won't say leaves the default)."""
        if self._limits is None:
            self._limits = topic_message_limits(self._settings, self._topics)
        return self._limits

    def limit(self, topic: str) -> int:
        return min(self.default, self.load().get(topic, self.default)) - RECORD_MARGIN

    @staticmethod
    def record_size(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
        return (len(key or b"") + len(value or b"")
                + sum(len(k.encode("utf-8", "surrogateescape")) + len(v or b"") for k, v in (headers or [])))

    def learn(self, errors: Iterable[BaseException]) -> None:
        """A broker refused a record as too large: halve our idea of that limit until it fits."""
        too_large = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError)
        if any(isinstance(e, too_large) for e in errors):
            self.default = max(64 * 1024, self.default // 2)
            event(log, "broker refused a record as too large; lowering the output size limit", logging.WARNING,
                  limit=self.default)


def clean_headers(headers: Headers | None) -> list[tuple[str, bytes]]:
    """Headers a producer can send: null values become empty (Java's ``headers.add(k, null)``)."""
    return [(k, v if v is not None else b"") for k, v in (headers or [])]


def fit_dead_letter(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]],
                    limits: OutputLimits, topic: str) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """The dead letter as whole as its topic allows: value, then long headers, then the rest go.

    Position (``dlq-source-*``), reason and the omission markers are never cut.
    """
    limit = limits.limit(topic)
    value = value or b""
    headers = clean_headers(headers)
    if limits.record_size(key, value, headers) <= limit:
        return key, value, headers
    headers = headers + [("dlq-value-omitted", f"{len(value)} bytes: over the dead-letter topic's limit".encode())]
    value = b""
    if limits.record_size(key, value, headers) <= limit:
        return key, value, headers
    cut = [(k, v if k.startswith("dlq-") or len(v) <= MAX_FIELD_CHARS
            else v[:MAX_FIELD_CHARS] + TRUNCATED.format(n=len(v) - MAX_FIELD_CHARS).encode()) for k, v in headers]
    if limits.record_size(key, value, cut) <= limit:
        return key, value, cut
    ours = [(k, v) for k, v in cut if k.startswith("dlq-")]
    ours.append(("dlq-headers-omitted", str(len(cut) - len(ours)).encode()))
    return (key if key is None or len(key) <= MAX_FIELD_CHARS else None), value, ours
