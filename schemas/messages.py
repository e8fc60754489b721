"""Kafka message schemas, version 1: image, feature record, label record, dead letter.

Documented for other languages in ``schemas/README.md``. Every boundary validates with the
functions here: the producer before sending, each consumer on receipt. A message that fails
validation raises :class:`SchemaError` with a reason code, and the consumer dead-letters it.

Feature record value (little-endian throughout)::

    bytes 0..3   magic b"DFV1"
    bytes 4..7   uint32 N: length of the JSON header
    next N bytes UTF-8 JSON header (image_id, source, label, backbone, weights_digest, layer,
                 dim, width, height, created_at, ...)
    the rest     dim float32 values

A Java consumer: ``ByteBuffer b = ByteBuffer.wrap(v).order(LITTLE_ENDIAN); b.getInt() /*magic*/;
int n = b.getInt(); ... b.position(8 + n); b.asFloatBuffer().get(vector)``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from pipeline.errors import SchemaError

SCHEMA_VERSION = "1"
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})

# Header names (Kafka header values are bytes; ours are UTF-8 strings).
H_SCHEMA = "schema-version"
H_CONTENT_TYPE = "content-type"
H_SOURCE = "source"
H_PRODUCED_AT = "produced-at"
H_LABEL = "label"

FEATURE_MAGIC = b"DFV1"
FEATURE_CONTENT_TYPE = "application/vnd.go-deeper.features.v1"
LABEL_CONTENT_TYPE = "application/json"
IMAGE_CONTENT_TYPES = {
    "JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "BMP": "image/bmp",
    "WEBP": "image/webp", "TIFF": "image/tiff",
}
Headers = Sequence[tuple[str, bytes]]


# -- what a field that names something may hold ---------------------------------------------------
# Records are validated where they are decoded: whoever can write to a topic can forge a record,
# and a field that names something (an id, a class, a version, a layer) ends up in pages, CSV
# files, logs and file names. A record that fails is a dead letter (scorer) or skipped and
# counted (the UI, the labels reader); it is never shown.

#: An image id: the sha256 of the photo's bytes, lowercase hex (``fullmatch``: no trailing newline).
IMAGE_ID = re.compile(r"[0-9a-f]{64}")
#: A classifier version, a precision: ``v0003``, ``bf16``.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: A backbone, optionally ``@precision``: ``efficientnet_lite0@bf16``.
BACKBONE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(@[A-Za-z0-9][A-Za-z0-9_.-]{0,31})?")
#: A layer spec: end points joined with ``+`` (``prelogits+block_14``).
LAYER = re.compile(r"[A-Za-z0-9_]{1,64}(\+[A-Za-z0-9_]{1,64}){0,15}")
#: A weights digest (sha256 hex of the weights file, or another hash of at most 128 characters).
DIGEST = re.compile(r"[0-9A-Za-z]{1,128}")
#: Longest class name.
MAX_LABEL_CHARS = 128
#: Longest free text field (a source after :func:`consumers.outputs.cap_text`'s cut and marker).
MAX_TEXT_CHARS = 4096 + 64
#: Unicode categories no field may hold: controls (newlines, escapes), format characters
#: (bidirectional overrides, zero-width), line/paragraph separators, surrogates.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
#: A class name may not start with what spreadsheets run as a formula (CSV injection).
_FORMULA_START = "=+-@"


def is_image_id(value: Any) -> bool:
    return isinstance(value, str) and IMAGE_ID.fullmatch(value) is not None


def text_problem(value: Any, limit: int = MAX_TEXT_CHARS) -> str | None:
    """Why ``value`` is not a free text field (a source, an origin), or None."""
    if not isinstance(value, str):
        return "not a string"
    if len(value) > limit:
        return f"longer than {limit} characters"
    if any(unicodedata.category(c) in _UNPRINTABLE for c in value):
        return "holds control or format characters"
    return None


def label_problem(value: Any) -> str | None:
    """Why ``value`` is not a class name, or None. A class name is 1-128 printable characters,
    not starting with a space or a formula character (``= + - @``) nor ending with a space."""
    problem = text_problem(value, MAX_LABEL_CHARS)
    if problem:
        return problem
    if not value or value != value.strip() or value[0] in _FORMULA_START:
        return "empty, padded with spaces, or starting with = + - @"
    return None


def printable(text: str | None) -> str | None:
    """``text`` with every control or format character written as ``\\xNN``/``\\uNNNN``: what a
    foreign producer's header becomes before it is a field of ours (a newline in a source would
    otherwise break every line-based reader downstream)."""
    if text is None or not any(unicodedata.category(c) in _UNPRINTABLE for c in text):
        return text
    return "".join(c if unicodedata.category(c) not in _UNPRINTABLE else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


def _check(name: str, problem: str | None) -> None:
    if problem:
        raise SchemaError(f"{name}: {problem}")


def _pattern(name: str, value: Any, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        _check(name, f"does not match {pattern.pattern}")


def _check_class_map(name: str, values: Any) -> None:
    """Scores or probabilities: class name -> finite number."""
    if not isinstance(values, dict) or len(values) > 10_000:
        _check(name, "not an object of at most 10000 classes")
    for label, number in values.items():
        _check(f"{name} class", label_problem(label))
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            _check(name, "a class's value is not a finite number")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def headers_dict(headers: Headers | None) -> dict[str, str]:
    """Kafka headers -> ``{name: str}``: the last of duplicates wins, a null value (Java's
    ``headers.add(k, null)``) reads as empty, undecodable bytes are replaced."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (headers or [])}


def record_header(record: Any, name: str) -> str | None:
    """A Kafka record's header ``name`` as text (the first of duplicates; None if absent, a null
    value reads as empty, undecodable bytes are replaced): how readers of dead letters get at
    ``dlq-*`` and the rig at ``source``."""
    for key, value in record.headers or []:
        if key == name:
            return (value or b"").decode("utf-8", "replace")
    return None


def to_headers(values: Mapping[str, str | None]) -> list[tuple[str, bytes]]:
    return [(k, v.encode()) for k, v in values.items() if v is not None]


def _check_version(headers: Mapping[str, str]) -> None:
    version = headers.get(H_SCHEMA)
    if version is None:
        raise SchemaError("missing schema-version header")
    if version not in SUPPORTED_VERSIONS:
        raise SchemaError(f"unknown schema version {version!r}; this consumer reads {sorted(SUPPORTED_VERSIONS)}")


# -- images -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageMessage:
    image_id: str  # the key: sha256 hex of the value
    data: bytes  # the value: the image file's bytes, untouched
    source: str
    content_type: str
    produced_at: str
    label: str | None = None
    original_key: bytes | None = None  # the key it came with (a foreign producer's, or ours)

    def key(self) -> bytes:
        return self.image_id.encode()

    def headers(self) -> list[tuple[str, bytes]]:
        return to_headers({H_SCHEMA: SCHEMA_VERSION, H_CONTENT_TYPE: self.content_type, H_SOURCE: self.source,
                           H_PRODUCED_AT: self.produced_at, H_LABEL: self.label})


def image_id(data: bytes) -> str:
    """The image's identity everywhere (Kafka key, Parquet row, table row, cache, claim-check
    object name): the sha256 of its bytes, in lower-case hex."""
    return hashlib.sha256(data).hexdigest()


def make_image_message(data: bytes, source: str, content_type: str = "application/octet-stream",
                       label: str | None = None) -> ImageMessage:
    return ImageMessage(image_id(data), data, source, content_type, now_iso(), label)


#: How the featurizer reads the images topic (``DEEPER_IMAGE_CONTRACT``).
CONTRACTS = ("open", "strict")


def parse_image_message(key: bytes | None, value: bytes | None, headers: Headers | None, contract: str = "open",
                        source_header: str = H_SOURCE, label_header: str = H_LABEL) -> ImageMessage:
    """An image message from any producer; raise :class:`SchemaError` for one that can't be an image.

    ``open`` (the default): any non-empty value is an image, whoever sent it; its id is the
    sha256 of its bytes and its key is kept as it came (``original_key``). Only a message that
    says it is ours (a ``schema-version`` header) must keep our rules: a known version, and a
    key equal to the sha256 of the value (either case), which catches corruption.
    ``strict``: every message must be ours.
    """
    if contract not in CONTRACTS:
        raise SchemaError(f"unknown image contract {contract!r}; choose one of {', '.join(CONTRACTS)}")
    h = headers_dict(headers)
    ours = H_SCHEMA in h
    if contract == "strict" or ours:
        _check_version(h)
    if value is None:
        raise SchemaError("null value (tombstone) on the images topic")
    identity = image_id(value)
    if contract == "strict" or ours:
        claimed = (key or b"").decode("utf-8", "replace").strip().lower()
        if not is_image_id(claimed):
            raise SchemaError("key is not a sha256 hex image id")
        if claimed != identity:
            raise SchemaError("key does not match sha256 of the value (corrupted or mis-keyed message)")
    label = h.get(label_header) or None
    if label is not None:
        _check(f"{label_header} header (a known label must be a class name)", label_problem(label))
    return ImageMessage(identity, value, h.get(source_header, ""), h.get(H_CONTENT_TYPE, ""),
                        h.get(H_PRODUCED_AT, ""), label, original_key=key)


def describe_key(key: bytes | None) -> str | None:
    """A message key as text for JSON and Parquet: printable UTF-8 as is, other bytes (control
    characters included) as ``base64:...``."""
    if key is None:
        return None
    try:
        text = key.decode("utf-8")
        if text_problem(text, limit=len(text)) is None and not text.startswith("base64:"):
            return text
    except UnicodeDecodeError:
        pass
    return "base64:" + base64.b64encode(key).decode()


# -- features -----------------------------------------------------------------------------------
@dataclass
class FeatureRecord:
    image_id: str
    vector: np.ndarray  # float32 [dim]
    backbone: str
    weights_digest: str
    layer: str
    source: str = ""
    label: str | None = None
    width: int = 0
    height: int = 0
    created_at: str = field(default_factory=now_iso)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])


def encode_features(record: FeatureRecord) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """-> (key, value, headers) for the features topic."""
    header = {"image_id": record.image_id, "source": record.source, "label": record.label,
              "backbone": record.backbone, "weights_digest": record.weights_digest, "layer": record.layer,
              "dim": record.dim, "width": record.width, "height": record.height,
              "created_at": record.created_at, **record.extra}
    head = json.dumps(header, separators=(",", ":")).encode()
    body = np.asarray(record.vector, dtype="<f4").tobytes()
    value = FEATURE_MAGIC + struct.pack("<I", len(head)) + head + body
    headers = to_headers({H_SCHEMA: SCHEMA_VERSION, H_CONTENT_TYPE: FEATURE_CONTENT_TYPE, H_SOURCE: record.source})
    return record.image_id.encode(), value, headers


def decode_features(key: bytes | None, value: bytes | None, headers: Headers | None) -> FeatureRecord:
    """Parse and validate a feature record; raise :class:`SchemaError` with the reason."""
    _check_version(headers_dict(headers))
    if not value or len(value) < 8:
        raise SchemaError("feature record truncated (shorter than its 8-byte prefix)")
    if value[:4] != FEATURE_MAGIC:
        raise SchemaError(f"bad magic {value[:4]!r}; expected {FEATURE_MAGIC!r}")
    (n,) = struct.unpack("<I", value[4:8])
    if 8 + n > len(value):
        raise SchemaError("feature record truncated inside its JSON header")
    try:
        header = json.loads(value[8:8 + n])
        dim = int(header["dim"])
        fields = {k: header[k] for k in ("image_id", "backbone", "weights_digest", "layer")}
        source, label = header.get("source", ""), header.get("label")
        if not all(isinstance(v, str) for v in (*fields.values(), source)) or not isinstance(label, (str, type(None))):
            raise TypeError("image_id, backbone, weights_digest, layer and source must be strings, label a string or null")
        width, height = int(header.get("width", 0)), int(header.get("height", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SchemaError(f"feature header invalid: {exc}") from None
    body = value[8 + n:]
    if len(body) != 4 * dim:
        raise SchemaError(f"vector has {len(body)} bytes, header says dim {dim} ({4 * dim} bytes)")
    if key is not None and key.decode("utf-8", "replace") != fields["image_id"]:
        raise SchemaError("key does not match the record's image_id")
    vector = np.frombuffer(body, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all():
        raise SchemaError("vector contains NaN or infinity")
    _check_feature_header(header, width, height)
    known = {"image_id", "backbone", "weights_digest", "layer", "dim", "source", "label", "width", "height",
             "created_at"}
    return FeatureRecord(vector=vector, source=source, label=label, width=width, height=height,
                         created_at=str(header.get("created_at", "")),
                         extra={k: v for k, v in header.items() if k not in known}, **fields)


def _check_feature_header(header: dict[str, Any], width: int, height: int) -> None:
    """Every field of a feature record that names something, against its pattern."""
    if not is_image_id(header["image_id"]):
        _check("image_id", "not 64 lowercase hex digits")
    _pattern("backbone", header["backbone"], BACKBONE)
    _pattern("weights_digest", header["weights_digest"], DIGEST)
    _pattern("layer", header["layer"], LAYER)
    _check("source", text_problem(header.get("source", "")))
    if header.get("label") is not None:
        _check("label", label_problem(header["label"]))
    if "precision" in header:
        _pattern("precision", header["precision"], NAME)
    for name in ("origin", "created_at"):
        if name in header:
            _check(name, text_problem(header[name], 512))
    if header.get("kafka_key") is not None:
        _check("kafka_key", text_problem(header["kafka_key"]))
    if not (0 <= width <= 1_000_000 and 0 <= height <= 1_000_000):
        _check("width/height", "out of range")


# -- labels -------------------------------------------------------------------------------------
@dataclass
class LabelRecord:
    """Version 2 adds ``probabilities``, ``confidence`` and ``unknown``, and provenance:
    ``origin`` (the feature record it labels, ``topic/partition/offset``), ``image_origin`` (the
    image message behind it) and ``kafka_key`` (that message's own key, for foreign producers'
    keys: UTF-8 text, or ``base64:...``). Version 1 records (which lack them) still decode, with
    None/None/False and empty provenance: "no calibration", not "zero confidence".
    Version 3 adds ``novelty`` and ``unknown_reason`` (``novel`` or ``unconfident``); a version 2
    record decodes with novelty None, and an unknown one with the reason it could only have had."""

    SCHEMA_VERSION: ClassVar[str] = "3"
    READS: ClassVar[frozenset[str]] = frozenset({"1", "2", "3"})

    image_id: str
    label: str  # the top class, or the unknown label when ``unknown``
    scores: dict[str, float]
    classifier_version: str
    backbone: str
    layer: str
    source: str = ""
    scored_at: str = field(default_factory=now_iso)
    probabilities: dict[str, float] | None = None  # calibrated, sum to 1; None: uncalibrated model
    confidence: float | None = None  # probability of the top-scoring class; None: uncalibrated model
    unknown: bool = False  # the confidence was below the model's threshold
    origin: str = ""  # features topic/partition/offset this label is for
    image_origin: str = ""  # images topic/partition/offset of the photo
    kafka_key: str | None = None  # the image message's original key
    novelty: float | None = None  # distance to the training photos; None: model without a summary
    unknown_reason: str | None = None  # "novel" or "unconfident" when ``unknown``, else None


def encode_label(record: LabelRecord) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    value = {"schema_version": LabelRecord.SCHEMA_VERSION, **record.__dict__}
    headers = to_headers({H_SCHEMA: LabelRecord.SCHEMA_VERSION, H_CONTENT_TYPE: LABEL_CONTENT_TYPE,
                          H_SOURCE: record.source})
    return record.image_id.encode(), json.dumps(value).encode(), headers


def decode_label(value: bytes) -> LabelRecord:
    """A label record of any version in ``LabelRecord.READS``; fields a version lacks get defaults."""
    try:
        data = json.loads(value)
        version = str(data.pop("schema_version"))
        if version not in LabelRecord.READS:
            raise ValueError(f"unknown schema version {version!r}; this reader reads {sorted(LabelRecord.READS)}")
        if version == "2" and data.get("unknown") and not data.get("unknown_reason"):
            data["unknown_reason"] = "unconfident"  # the only reason a version 2 record could be unknown
        record = LabelRecord(**data)
        check_label_record(record)
        return record
    except (ValueError, KeyError, TypeError, AttributeError, SchemaError) as exc:
        raise SchemaError(f"label record invalid: {exc}") from None


def check_label_record(record: LabelRecord) -> None:
    """Every field of a label record that names something, against its pattern."""
    if not is_image_id(record.image_id):
        _check("image_id", "not 64 lowercase hex digits")
    _check("label", label_problem(record.label))
    _check_class_map("scores", record.scores)
    if record.probabilities is not None:
        _check_class_map("probabilities", record.probabilities)
    _pattern("classifier_version", record.classifier_version, NAME)
    _pattern("backbone", record.backbone, BACKBONE)
    _pattern("layer", record.layer, LAYER)
    _check("source", text_problem(record.source))
    for name in ("scored_at", "origin", "image_origin"):
        _check(name, text_problem(getattr(record, name), 512))
    if record.kafka_key is not None:
        _check("kafka_key", text_problem(record.kafka_key))
    confidence = record.confidence
    if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
                                   or not 0.0 <= confidence <= 1.0):
        _check("confidence", "not a number from 0 to 1")
    if not isinstance(record.unknown, bool):
        _check("unknown", "not true or false")
    novelty = record.novelty
    if novelty is not None and (isinstance(novelty, bool) or not isinstance(novelty, (int, float))
                                or not 0.0 <= novelty <= 2.0):
        _check("novelty", "not a cosine distance from 0 to 2")
    if record.unknown_reason not in (None, "novel", "unconfident"):
        _check("unknown_reason", "not novel or unconfident")


# -- dead letters -------------------------------------------------------------------------------
DLQ_PREFIX = "dlq-"


def dead_letter_headers(original: Headers | None, reason: str, detail: str, stage: str, topic: str,
                        partition: int, offset: int) -> list[tuple[str, bytes]]:
    """The original headers plus why/where: enough to find, fix and replay the message."""
    extra = to_headers({f"{DLQ_PREFIX}reason": reason, f"{DLQ_PREFIX}detail": detail[:1000],
                        f"{DLQ_PREFIX}stage": stage, f"{DLQ_PREFIX}source-topic": topic,
                        f"{DLQ_PREFIX}source-partition": str(partition), f"{DLQ_PREFIX}source-offset": str(offset),
                        f"{DLQ_PREFIX}time": now_iso()})
    kept = [(k, v) for k, v in (original or []) if not k.startswith(DLQ_PREFIX)]
    return kept + extra
