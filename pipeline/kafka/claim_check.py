"""Claim checks: an image message that carries a reference to the photo instead of its bytes.

A photo too large for a Kafka message (or already in object storage) is sent as a message whose
value is empty and whose :data:`IMAGE_URI_HEADER` header names where the bytes are:
``s3://bucket/key``, ``https://...``, ``http://...`` or ``file:///path``. The key is still the
sha256 of the photo's bytes, so an image has one identity whether it came inline or by
reference, and the featurizer's usual check (key == sha256 of the bytes) also catches an object
that was overwritten after it was referenced. :func:`resolve_value` is what a consumer calls;
:func:`fetch_image` does the fetching, always within :class:`FetchLimits` (a size cap, enforced
while streaming so an oversize object is abandoned early, and a deadline), and raises only
:class:`FetchFailed` with a reason code.

Choices, and why:

- S3 through pyarrow's ``S3FileSystem``, not hand-signed HTTP: pyarrow is already a dependency,
  and the AWS SDK inside it brings the whole credential chain (``AWS_ACCESS_KEY_ID``/
  ``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, profiles, instance and pod roles) and SigV4
  signing, so no secret passes through our settings. Its per-request timeouts
  (``connect_timeout``/``request_timeout``, a low-speed limit under curl) bound a stalled server;
  retries are off so a stall costs one timeout, not three. Endpoint (``AWS_ENDPOINT_URL_S3``
  or ``AWS_ENDPOINT_URL``: MinIO, localbucket, ...), region and credentials are
  :func:`pipeline.storage.s3_options`'s, as for feature files; :class:`FetchLimits` may name
  another endpoint or region.
- HTTP(S) through urllib: the size cap is checked against ``Content-Length`` first and then
  while streaming (a server that lies or sends no length is cut off at ``max_bytes + 1``);
  ``read1`` returns as soon as any bytes arrive, so the deadline is checked between reads and a
  server that drips a byte at a time is abandoned too. Redirects may only lead to http(s).
- ``file://`` reads **the featurizer's own disk**: whoever can produce to the images topic could
  otherwise make the featurizer read (and feed to a model whose outputs they may see) any file
  it can open. It is therefore off unless ``file_root`` is set, and then only regular files
  under that directory (after resolving symlinks and ``..``) are read; FIFOs and devices are
  refused without blocking. Use it for a shared volume that producers and featurizers mount.
- ``http(s)://`` lets a producer make the featurizer send GET requests (server-side request
  forgery: internal services, cloud metadata endpoints). Where producers are not trusted, drop
  ``http``/``https`` from ``schemes`` and keep ``s3`` only.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.errors import DeeperError

#: Header whose value is the URI of the image's bytes; the message value is then empty.
IMAGE_URI_HEADER = "image-uri"
#: Largest object fetched: bounds the memory of each in-flight image (a 40-megapixel JPEG, the
#: decoder's pixel budget, is 10-25 MB; the featurizer holds a few batches of raw photos).
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: Seconds allowed for one fetch (and for each network wait within it).
DEFAULT_TIMEOUT_S = 5.0
#: Schemes fetched by default; ``file`` is added only by setting ``file_root``.
DEFAULT_SCHEMES = frozenset({"s3", "http", "https"})
#: Reason codes of :class:`FetchFailed` (the featurizer's dead-letter reasons).
REASONS = ("fetch_failed", "too_large", "timeout", "not_found", "forbidden", "unsupported_scheme",
           "invalid_uri")

_HTTP_CHUNK = 64 * 1024
_S3_CHUNK = 4 * 1024 * 1024  # each pyarrow read is one ranged GET: keep them few
_USER_AGENT = "go-deeper-claim-check/1"


class FetchFailed(DeeperError):
    """A claim check could not be redeemed; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class FetchLimits:
    """What a claim check may fetch, how much and how fast; built from the settings."""

    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    schemes: frozenset[str] = DEFAULT_SCHEMES
    #: file:// is refused unless this is set; then only files under it are read.
    file_root: str | None = None
    #: ``http://host:port`` of an S3-compatible server; empty: AWS itself.
    s3_endpoint: str = ""
    s3_region: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> "FetchLimits":
        """From the ``DEEPER_FETCH_*`` settings; S3's endpoint and region stay the AWS SDK's
        variables, read in one place (:func:`pipeline.storage.s3_options`)."""
        schemes = settings.fetch_schemes or ",".join(sorted(DEFAULT_SCHEMES))
        return cls(max_bytes=int(settings.fetch_max_bytes or DEFAULT_MAX_BYTES),
                   timeout_s=float(settings.fetch_timeout_s or DEFAULT_TIMEOUT_S),
                   schemes=frozenset(s.strip().lower() for s in schemes.split(",") if s.strip()),
                   file_root=settings.fetch_file_root or None)


# --------------------------------------------------------------------------- consumers' entry point


def reference_uri(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The message's claim-check URI, or None for an ordinary (inline) image message."""
    uri = None
    for name, value in headers or []:
        if name == IMAGE_URI_HEADER:
            uri = (value or b"").decode("utf-8", "replace").strip()
    return uri


def resolve_value(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None,
                  limits: FetchLimits) -> bytes | None:
    """The image bytes a message stands for: its value, or the bytes its claim check names.

    The result goes to ``parse_image_message`` as the value, whose key == sha256 check then
    covers fetched bytes too. A claim check with a non-empty value is refused (which of the two
    would be the image?).
    """
    uri = reference_uri(headers)
    if uri is None:
        return value
    if value:
        raise FetchFailed("invalid_uri", f"message has both a {IMAGE_URI_HEADER} header and a {len(value)}-byte value")
    return fetch_image(uri, limits)


def fetch_image(uri: str, limits: FetchLimits) -> bytes:
    """The bytes at ``uri``, at most ``limits.max_bytes`` of them, within ``limits.timeout_s``.

    Raises :class:`FetchFailed` (and nothing else) with reason ``unsupported_scheme``,
    ``invalid_uri``, ``not_found``, ``forbidden``, ``too_large``, ``timeout`` or ``fetch_failed``.
    """
    scheme = urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri else ""
    fetchers: dict[str, Callable[[str, FetchLimits, float], bytes]] = {
        "s3": _fetch_s3, "http": _fetch_http, "https": _fetch_http, "file": _fetch_file}
    if scheme not in fetchers:
        raise FetchFailed("unsupported_scheme", f"{_short(uri)}: claim checks may be s3://, http(s):// or file://")
    if scheme == "file" and not limits.file_root:
        raise FetchFailed("unsupported_scheme", f"{_short(uri)}: file:// claim checks are off (they read this "
                                                "machine's disk); set a fetch file root to allow a directory")
    if scheme != "file" and scheme not in limits.schemes:
        raise FetchFailed("unsupported_scheme", f"{_short(uri)}: {scheme}:// is not in the allowed fetch schemes "
                                                f"({', '.join(sorted(limits.schemes)) or 'none'})")
    return fetchers[scheme](uri, limits, time.monotonic() + limits.timeout_s)


def _short(uri: str) -> str:
    return uri if len(uri) <= 200 else uri[:200] + "..."


def _read_capped(read: Callable[[int], bytes], chunk: int, uri: str, limits: FetchLimits, deadline: float) -> bytes:
    """Read to EOF, giving up past ``max_bytes`` or the deadline (checked between reads)."""
    parts, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise FetchFailed("timeout",
                              f"{_short(uri)}: not read within {limits.timeout_s:g} s ({total} bytes so far)")
        data = read(chunk)
        if not data:
            return b"".join(parts)
        total += len(data)
        if total > limits.max_bytes:
            raise FetchFailed("too_large", f"{_short(uri)}: more than {limits.max_bytes} bytes (stopped reading)")
        parts.append(data)


def _too_large(uri: str, size: int, limits: FetchLimits) -> FetchFailed:
    return FetchFailed("too_large", f"{_short(uri)}: {size} bytes is over the {limits.max_bytes}-byte fetch limit")


# --------------------------------------------------------------------------- http(s)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; a claim check may only be redirected to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib's signature)
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise FetchFailed("unsupported_scheme", f"{_short(req.full_url)}: redirected to {_short(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects())


def _fetch_http(uri: str, limits: FetchLimits, deadline: float) -> bytes:
    request = urllib.request.Request(uri, headers={"User-Agent": _USER_AGENT, "Accept": "image/*"})
    try:
        with _OPENER.open(request, timeout=limits.timeout_s) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > limits.max_bytes:
                raise _too_large(uri, int(length), limits)
            return _read_capped(response.read1, _HTTP_CHUNK, uri, limits, deadline)
    except urllib.error.HTTPError as exc:
        reason = {404: "not_found", 410: "not_found", 401: "forbidden", 403: "forbidden"}.get(exc.code, "fetch_failed")
        raise FetchFailed(reason, f"{_short(uri)}: HTTP {exc.code} {exc.reason}") from None
    except TimeoutError:
        raise FetchFailed("timeout", f"{_short(uri)}: no answer within {limits.timeout_s:g} s") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise FetchFailed("timeout", f"{_short(uri)}: no answer within {limits.timeout_s:g} s") from None
        raise FetchFailed("fetch_failed", f"{_short(uri)}: {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:  # reset, cut short, malformed URL
        raise FetchFailed("fetch_failed", f"{_short(uri)}: {exc!r}") from None


# --------------------------------------------------------------------------- s3


def _s3_path(uri: str) -> str:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise FetchFailed("invalid_uri", f"{_short(uri)}: expected s3://bucket/key")
    return f"{bucket}/{key}"


def s3_filesystem(endpoint: str, region: str, timeout_s: float):
    """The S3 client for claim checks: :func:`pipeline.storage.s3_options` (the one home of S3
    configuration: endpoint, region and credentials from the AWS variables), ``endpoint`` and
    ``region`` from :class:`FetchLimits` taking precedence where set, plus this module's own
    per-request timeouts and no retries. One client per configuration."""
    from pipeline import storage  # pyarrow loads only when S3 is used, as below

    options = storage.s3_options()
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    if region:
        options["region"] = region
    options.update(connect_timeout=timeout_s, request_timeout=timeout_s)
    return _s3_client(tuple(sorted(options.items())))


@functools.lru_cache(maxsize=8)
def _s3_client(frozen_options: tuple[tuple[str, Any], ...]):
    from pyarrow import fs

    return fs.S3FileSystem(**dict(frozen_options), retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1))


def _s3_error(uri: str, exc: OSError, limits: FetchLimits) -> FetchFailed:
    text = str(exc)
    if isinstance(exc, FileNotFoundError) or "NoSuchKey" in text or "NoSuchBucket" in text:
        return FetchFailed("not_found", f"{_short(uri)}: no such object")
    if "curlCode: 28" in text or "Timeout was reached" in text:
        return FetchFailed("timeout", f"{_short(uri)}: no answer within {limits.timeout_s:g} s")
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text:
        return FetchFailed("forbidden", f"{_short(uri)}: {text}")
    return FetchFailed("fetch_failed", f"{_short(uri)}: {text}")


def _fetch_s3(uri: str, limits: FetchLimits, deadline: float) -> bytes:
    from pyarrow import fs

    path = _s3_path(uri)
    s3 = s3_filesystem(limits.s3_endpoint, limits.s3_region, limits.timeout_s)
    try:
        info = s3.get_file_info(path)
        if info.type != fs.FileType.File:
            raise FetchFailed("not_found", f"{_short(uri)}: no such object")
        if info.size is not None and info.size > limits.max_bytes:
            raise _too_large(uri, info.size, limits)  # from the HEAD: no GET at all
        with s3.open_input_stream(path) as stream:
            return _read_capped(stream.read, _S3_CHUNK, uri, limits, deadline)
    except OSError as exc:
        raise _s3_error(uri, exc, limits) from None


def upload_s3(prefix: str, data: bytes, suffix: str, limits: FetchLimits, content_type: str = "") -> str:
    """Store ``data`` under ``s3://bucket/prefix/<sha256><suffix>``; return that URI.

    Content-addressed names make a re-sent photo overwrite itself instead of piling up, and
    let the featurizer's sha256 check tell a replaced object from the one that was referenced.
    """
    if not prefix.startswith("s3://") or not prefix[len("s3://"):].strip("/"):
        raise FetchFailed("invalid_uri", f"{_short(prefix)}: a claim-check prefix must be s3://bucket[/prefix]")
    uri = f"{prefix.rstrip('/')}/{hashlib.sha256(data).hexdigest()}{suffix}"
    s3 = s3_filesystem(limits.s3_endpoint, limits.s3_region, limits.timeout_s)
    metadata = {"Content-Type": content_type} if content_type else None
    try:
        with s3.open_output_stream(_s3_path(uri), metadata=metadata) as out:
            out.write(data)
    except OSError as exc:
        raise _s3_error(uri, exc, limits) from None
    return uri


# --------------------------------------------------------------------------- file


def _fetch_file(uri: str, limits: FetchLimits, deadline: float) -> bytes:
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise FetchFailed("invalid_uri", f"{_short(uri)}: expected file:///absolute/path on this machine")
    path = Path(os.fsdecode(urllib.parse.unquote_to_bytes(parts.path)))  # any bytes a file name may hold
    root = Path(limits.file_root or "").resolve()
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        raise FetchFailed("not_found", f"{_short(uri)}: no such file") from None
    except (OSError, RuntimeError) as exc:  # permission on a parent, symlink loop
        raise FetchFailed("fetch_failed", f"{_short(uri)}: {exc}") from None
    if not target.is_relative_to(root):
        raise FetchFailed("forbidden", f"{_short(uri)}: outside the fetch file root {root}")
    try:  # O_NONBLOCK: a FIFO must not hang us; O_NOFOLLOW: no symlink swapped in after resolve()
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise FetchFailed("forbidden", f"{_short(uri)}: permission denied") from None
    except OSError as exc:
        raise FetchFailed("fetch_failed", f"{_short(uri)}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FetchFailed("forbidden", f"{_short(uri)}: not a regular file")
        if info.st_size > limits.max_bytes:
            raise _too_large(uri, info.st_size, limits)
        try:
            return _read_capped(file.read, _HTTP_CHUNK, uri, limits, deadline)
        except OSError as exc:
            raise FetchFailed("fetch_failed", f"{_short(uri)}: {exc.strerror or exc}") from None
