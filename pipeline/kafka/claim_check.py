"""Claim checks: an image message that carries a reference to the photo instead of its bytes.

A photo too large for a Kafka message (or already in object storage) is sent as a message whose
value is empty and whose :data:`IMAGE_URI_HEADER` header names where the bytes are:
``s3://bucket/key``, ``https://...``, ``http://...`` or ``file:///path``. The key is still the
sha256 of the photo's bytes, so an image has one identity whether it came inline or by
reference, and the featurizer's usual check (key == sha256 of the bytes) also catches an object
that was overwritten after it was referenced. :func:`resolve_value` is what a consumer calls;
:func:`fetch_image` does the fetching, always within :class:`FetchLimits` (a size cap, enforced
while streaming so an oversize object is abandoned early, and one deadline for the whole fetch)
and :mod:`pipeline.kafka.fetch_policy` (what a stranger's message may make us fetch: nothing,
by default), and raises only :class:`FetchFailed`: ``fetch_refused`` naming the rule, or
``fetch_failed`` saying nothing a server answered.

Choices, and why:

- S3 through pyarrow's ``S3FileSystem``, not hand-signed HTTP: pyarrow is already a dependency,
  and the AWS SDK inside it brings the whole credential chain (``AWS_ACCESS_KEY_ID``/
  ``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, profiles, instance and pod roles) and SigV4
  signing, so no secret passes through our settings. Its per-request timeouts
  (``connect_timeout``/``request_timeout``, a low-speed limit under curl) get the time left of
  the deadline; retries are off so a stall costs one timeout, not three. The endpoint is the
  operator's (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``: MinIO, localbucket, ...), so it is
  trusted; which buckets a message may name is the policy's (``DEEPER_FETCH_S3``).
- HTTP(S) through :mod:`pipeline.kafka.pinned_http`: a connection to the address the policy
  checked (no second DNS lookup), one deadline for connect, TLS, headers and body, the size cap
  checked against ``Content-Length`` first and then while reading; redirects re-checked here.
- ``file://`` reads **the featurizer's own disk**: only regular files under ``file_root``
  (after resolving symlinks and ``..``), opened without following a symlink swapped in since and
  without blocking on a FIFO. Use it for a shared volume that producers and featurizers mount.
"""

from __future__ import annotations

import functools
import http.client
import os
import stat
import time
import urllib.parse
from typing import Any, Callable, Sequence

from pipeline.kafka import fetch_policy as policy
from pipeline.kafka import pinned_http
from pipeline.kafka.fetch_policy import FetchFailed, FetchLimits, FetchRefused  # callers' names for them
from schemas.messages import image_id

#: Header whose value is the URI of the image's bytes; the message value is then empty.
IMAGE_URI_HEADER = "image-uri"

_FILE_CHUNK = 64 * 1024
_S3_CHUNK = 4 * 1024 * 1024  # each pyarrow read is one ranged GET: keep them few


# --------------------------------------------------------------------------- consumers' entry point


def reference_uri(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The message's claim-check URI, or None for an ordinary (inline) image message."""
    uri = None
    for name, value in headers or []:
        if name == IMAGE_URI_HEADER:
            uri = (value or b"").decode("utf-8", "replace").strip()
    return uri


def resolve_value(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None,
                  limits: FetchLimits, deadline: float | None = None) -> bytes | None:
    """The image bytes a message stands for: its value, or the bytes its claim check names.

    The result goes to ``parse_image_message`` as the value, whose key == sha256 check then
    covers fetched bytes too. A claim check with a non-empty value is refused (which of the two
    would be the image?). ``deadline`` (``time.monotonic()``): when the fetch must be over;
    default ``limits.timeout_s`` from now.
    """
    uri = reference_uri(headers)
    if uri is None:
        return value
    if value:
        raise FetchRefused("uri", f"the message has both an {IMAGE_URI_HEADER} header and a {len(value)}-byte value")
    return fetch_image(uri, limits, deadline)


def fetch_image(uri: str, limits: FetchLimits, deadline: float | None = None) -> bytes:
    """The bytes at ``uri``, at most ``limits.max_bytes`` of them, before ``deadline``.

    Raises :class:`FetchFailed` (and nothing else): :class:`FetchRefused` where the policy says
    no, else ``fetch_failed`` with one fixed detail and the real cause in ``cause``.
    """
    scheme = policy.check_scheme(uri, limits)
    fetchers: dict[str, Callable[[str, FetchLimits, float], bytes]] = {
        "s3": _fetch_s3, "http": _fetch_http, "https": _fetch_http, "file": _fetch_file}
    return fetchers[scheme](uri, limits, time.monotonic() + limits.timeout_s if deadline is None else deadline)


def _short(uri: str) -> str:
    return uri if len(uri) <= 200 else uri[:200] + "..."


def _read_capped(read: Callable[[int], bytes], chunk: int, scheme: str, limits: FetchLimits,
                 deadline: float) -> bytes:
    """Read to EOF, giving up past ``max_bytes`` or the deadline (checked between reads)."""
    parts, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise policy.failed(scheme, limits, f"not read within the deadline ({total} bytes so far)")
        data = read(chunk)
        if not data:
            return b"".join(parts)
        total += len(data)
        if total > limits.max_bytes:
            raise policy.failed(scheme, limits, f"more than {limits.max_bytes} bytes (stopped reading)")
        parts.append(data)


# --------------------------------------------------------------------------- http(s)


def _fetch_http(uri: str, limits: FetchLimits, deadline: float) -> bytes:
    """GET with every hop checked by the policy: target, resolved addresses, the peer connected to."""
    url, hops = uri, 0
    while True:
        target = policy.http_target(url, limits, after_redirect=hops > 0)
        addresses = policy.connectable(target, limits)
        try:
            response = pinned_http.get(target, addresses, deadline, limits.max_bytes,
                                       lambda peer: policy.check_connected(peer, limits))
        except pinned_http.Expired as exc:
            raise policy.failed(target.scheme, limits, f"{_short(url)}: deadline passed while {exc}") from None
        except pinned_http.Oversize as exc:
            raise policy.failed(target.scheme, limits, f"{_short(url)}: {exc}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset, TLS, malformed
            raise policy.failed(target.scheme, limits, f"{_short(url)}: {exc!r}") from None
        if response.body is not None:
            return response.body
        if response.location is None:
            raise policy.failed(target.scheme, limits, f"{_short(url)}: HTTP {response.status}")
        hops += 1
        policy.check_redirect(target, response.location, hops)
        url = urllib.parse.urljoin(url, response.location)


# --------------------------------------------------------------------------- s3


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


def _s3_cause(uri: str, exc: OSError) -> str:
    text = str(exc)
    if isinstance(exc, FileNotFoundError) or "NoSuchKey" in text or "NoSuchBucket" in text:
        return f"{_short(uri)}: no such object"
    if "curlCode: 28" in text or "Timeout was reached" in text:
        return f"{_short(uri)}: no answer (timeout)"
    return f"{_short(uri)}: {text}"


def _fetch_s3(uri: str, limits: FetchLimits, deadline: float) -> bytes:
    """An object of an allowed bucket/prefix. The endpoint is the operator's, so pyarrow's own
    per-request timeouts bound each request; the deadline is checked between reads (and the
    featurizer stops waiting for any fetch past it)."""
    from pyarrow import fs

    path = policy.s3_path(uri, limits)
    s3 = s3_filesystem(limits.s3_endpoint, limits.s3_region, limits.timeout_s)
    try:
        info = s3.get_file_info(path)
        if info.type != fs.FileType.File:
            raise policy.failed("s3", limits, f"{_short(uri)}: no such object")
        if info.size is not None and info.size > limits.max_bytes:  # from the HEAD: no GET at all
            raise policy.failed("s3", limits, f"{_short(uri)}: {info.size} bytes, over {limits.max_bytes}")
        with s3.open_input_stream(path) as stream:
            return _read_capped(stream.read, _S3_CHUNK, "s3", limits, deadline)
    except OSError as exc:
        raise policy.failed("s3", limits, _s3_cause(uri, exc)) from None


def upload_s3(prefix: str, data: bytes, suffix: str, limits: FetchLimits, content_type: str = "") -> str:
    """Store ``data`` under ``s3://bucket/prefix/<sha256><suffix>``; return that URI.

    Content-addressed names make a re-sent photo overwrite itself instead of piling up, and
    let the featurizer's sha256 check tell a replaced object from the one that was referenced.
    The prefix is the operator's own (``deeper produce --claim-check-prefix``): no fetch policy
    applies to it, but the featurizers' ``DEEPER_FETCH_S3`` must list it for them to fetch.
    Raises :class:`FetchFailed` (its ``cause`` says why).
    """
    if not prefix.startswith("s3://") or not prefix[len("s3://"):].strip("/"):
        raise FetchRefused("uri", f"{_short(prefix)}: a claim-check prefix must be s3://bucket[/prefix]")
    uri = f"{prefix.rstrip('/')}/{image_id(data)}{suffix}"
    s3 = s3_filesystem(limits.s3_endpoint, limits.s3_region, limits.timeout_s)
    metadata = {"Content-Type": content_type} if content_type else None
    try:
        with s3.open_output_stream(uri[len("s3://"):], metadata=metadata) as out:
            out.write(data)
    except OSError as exc:
        raise FetchFailed(policy.FAILED, f"upload to {_short(uri)} failed", _s3_cause(uri, exc)) from None
    return uri


# --------------------------------------------------------------------------- file


def _fetch_file(uri: str, limits: FetchLimits, deadline: float) -> bytes:
    """A regular file under the root. Every way of not getting one (missing, outside, a symlink
    out, a FIFO, unreadable, too large, the root itself) is the same refusal; the descriptor is
    closed on every path out."""
    target = policy.file_path(uri, limits)
    try:  # O_NONBLOCK: a FIFO must not hang us; O_NOFOLLOW: no symlink swapped in after resolve()
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise policy.file_refused(exc.strerror or str(exc)) from None
    try:  # a directory opens too, and os.fdopen refuses it without closing the descriptor
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise policy.file_refused()
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:  # owns fd from here: closed whatever happens below
        if info.st_size > limits.max_bytes:
            raise policy.file_refused(f"{info.st_size} bytes, over {limits.max_bytes}")
        try:
            return _read_capped(file.read, _FILE_CHUNK, "file", limits, deadline)
        except (OSError, FetchFailed) as exc:
            raise policy.file_refused(str(getattr(exc, "cause", "") or exc)) from None
