"""Claim checks against real servers: the project's local S3 (localbucket) and http.server.

Each failure must come back as :class:`FetchFailed` with its reason, within the limits: an
oversize object is abandoned early (the servers record how much they got to send), a stalled
server costs one timeout, file:// reads only under its root.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Iterator

import pytest

from pipeline.kafka import claim_check
from pipeline.kafka.broker import free_port
from pipeline.kafka.claim_check import IMAGE_URI_HEADER, FetchFailed, FetchLimits, fetch_image, resolve_value
from tests.claim_check_servers import BIG, PHOTO, Handler, http_url, s3  # noqa: F401 (fixtures)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def _reason(uri: str, limits: FetchLimits) -> FetchFailed:
    with pytest.raises(FetchFailed) as caught:
        fetch_image(uri, limits)
    assert caught.value.reason in claim_check.REASONS
    return caught.value


# --------------------------------------------------------------------------- http


def test_http_fetches_the_photo(http_url):
    assert fetch_image(f"{http_url}/photo", FetchLimits()) == PHOTO


def test_http_404_is_not_found_and_403_forbidden(http_url):
    assert _reason(f"{http_url}/missing", FetchLimits()).reason == "not_found"
    assert _reason(f"{http_url}/forbidden", FetchLimits()).reason == "forbidden"


@pytest.mark.parametrize("route", ["huge", "huge-nolength"])
def test_http_oversize_is_abandoned_early(http_url, route):
    started = time.monotonic()
    error = _reason(f"{http_url}/{route}", FetchLimits(max_bytes=1024 * 1024))
    assert error.reason == "too_large"
    assert time.monotonic() - started < 3
    assert Handler.finished[route].wait(5), "the server is still sending: the client did not hang up"
    assert Handler.sent[route] < BIG // 4, "the client read (nearly) everything before refusing"


def test_http_stalled_server_times_out(http_url):
    started = time.monotonic()
    assert _reason(f"{http_url}/stall", FetchLimits(timeout_s=0.5)).reason == "timeout"
    assert time.monotonic() - started < 2


def test_http_dripping_server_hits_the_deadline(http_url):
    """Each byte arrives well within the socket timeout; only the overall deadline stops it."""
    started = time.monotonic()
    error = _reason(f"{http_url}/drip", FetchLimits(timeout_s=1.0))
    assert error.reason == "timeout" and "bytes so far" in error.detail
    assert time.monotonic() - started < 3


def test_http_redirect_may_not_leave_http(http_url):
    assert _reason(f"{http_url}/to-ftp", FetchLimits()).reason == "unsupported_scheme"


def test_connection_refused_is_fetch_failed():
    assert _reason(f"http://127.0.0.1:{free_port()}/photo", FetchLimits()).reason == "fetch_failed"


@pytest.mark.parametrize("uri", ["ftp://example.com/a.jpg", "gopher://x/1", "/etc/passwd", "data:image/png;base64,AA",
                                 "file:///etc/passwd"])
def test_unsupported_schemes_are_refused_without_io(uri):
    assert _reason(uri, FetchLimits()).reason == "unsupported_scheme"


def test_schemes_can_be_restricted(http_url):
    error = _reason(f"{http_url}/photo", FetchLimits(schemes=frozenset({"s3"})))
    assert error.reason == "unsupported_scheme" and "allowed fetch schemes" in error.detail


# --------------------------------------------------------------------------- s3


def _s3_limits(s3: dict, **kw) -> FetchLimits:
    return FetchLimits(s3_endpoint=s3["endpoint"], s3_region="us-east-1", **kw)


def test_s3_fetches_the_object(s3):
    assert fetch_image("s3://photos/cars/a.jpg", _s3_limits(s3)) == PHOTO


def test_s3_configuration_is_storages(s3, monkeypatch):
    """With no endpoint in the limits, the AWS variables (read by pipeline.storage, as for feature
    files) say where S3 is; an endpoint in the limits wins over them."""
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["endpoint"])
    assert fetch_image("s3://photos/cars/a.jpg", FetchLimits()) == PHOTO
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert fetch_image("s3://photos/cars/a.jpg", _s3_limits(s3)) == PHOTO
    assert _reason("s3://photos/cars/a.jpg", FetchLimits(timeout_s=1.0)).reason in ("fetch_failed", "timeout")


@pytest.mark.parametrize("uri", ["s3://photos/cars/missing.jpg", "s3://no-such-bucket/a.jpg", "s3://photos/cars"])
def test_s3_missing_object_is_not_found(s3, uri):
    assert _reason(uri, _s3_limits(s3)).reason == "not_found"


@pytest.mark.parametrize("uri", ["s3://photos", "s3:///a.jpg", "s3://photos/dir/"])
def test_s3_malformed_uri_is_invalid(s3, uri):
    assert _reason(uri, _s3_limits(s3)).reason == "invalid_uri"


def test_s3_oversize_is_refused_from_its_size_without_a_get(s3):
    assert _reason("s3://photos/big.bin", _s3_limits(s3, max_bytes=1024 * 1024)).reason == "too_large"
    requests = [line for line in s3["log"].read_text().splitlines() if "/photos/big.bin" in line]
    assert requests and not any('"GET ' in line for line in requests), requests


def test_s3_stalled_endpoint_times_out(silent_port):
    started = time.monotonic()
    limits = FetchLimits(s3_endpoint=f"http://127.0.0.1:{silent_port}", s3_region="us-east-1", timeout_s=1.0)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "x")
        env.setenv("AWS_SECRET_ACCESS_KEY", "y")
        assert _reason("s3://photos/a.jpg", limits).reason == "timeout"
    assert time.monotonic() - started < 5


def test_upload_then_fetch_round_trip(s3):
    limits = _s3_limits(s3)
    uri = claim_check.upload_s3("s3://photos/claims/", PHOTO, ".jpg", limits, "image/jpeg")
    assert uri == f"s3://photos/claims/{hashlib.sha256(PHOTO).hexdigest()}.jpg"
    assert fetch_image(uri, limits) == PHOTO


# --------------------------------------------------------------------------- file


def test_file_is_off_unless_a_root_is_set(tmp_path):
    (tmp_path / "a.jpg").write_bytes(PHOTO)
    error = _reason((tmp_path / "a.jpg").as_uri(), FetchLimits())
    assert error.reason == "unsupported_scheme" and "this machine's disk" in error.detail


def test_file_reads_under_its_root_including_non_utf8_names(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    (tmp_path / name).write_bytes(PHOTO)
    assert fetch_image((tmp_path / name).as_uri(), FetchLimits(file_root=str(tmp_path))) == PHOTO


def test_file_outside_the_root_or_escaping_by_symlink_is_forbidden(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret.jpg"
    root.mkdir()
    outside.write_bytes(PHOTO)
    (root / "link.jpg").symlink_to(outside)
    limits = FetchLimits(file_root=str(root))
    assert _reason(outside.as_uri(), limits).reason == "forbidden"
    assert _reason((root / "link.jpg").as_uri(), limits).reason == "forbidden"
    assert _reason((root / ".." / "secret.jpg").as_uri(), limits).reason == "forbidden"
    assert _reason((root / "missing.jpg").as_uri(), limits).reason == "not_found"


def test_file_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    assert _reason((tmp_path / "pipe.jpg").as_uri(), FetchLimits(file_root=str(tmp_path))).reason == "forbidden"


def test_file_oversize_is_refused(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"\0" * 2048)
    limits = FetchLimits(file_root=str(tmp_path), max_bytes=1024)
    assert _reason((tmp_path / "big.jpg").as_uri(), limits).reason == "too_large"


# --------------------------------------------------------------------------- the consumer's entry point


def test_resolve_value_passes_inline_messages_through_and_fetches_references(http_url):
    limits = FetchLimits()
    assert resolve_value(b"k", b"inline", [("source", b"a.jpg")], limits) == b"inline"
    assert resolve_value(b"k", b"", [(IMAGE_URI_HEADER, f"{http_url}/photo".encode())], limits) == PHOTO
    with pytest.raises(FetchFailed) as caught:
        resolve_value(b"k", b"inline", [(IMAGE_URI_HEADER, f"{http_url}/photo".encode())], limits)
    assert caught.value.reason == "invalid_uri"


def test_limits_come_from_the_settings():
    from pipeline.config import Settings

    assert FetchLimits.from_settings(Settings.from_env({})) == FetchLimits()
    limits = FetchLimits.from_settings(Settings.from_env({"DEEPER_FETCH_MAX_BYTES": "1000",
                                                         "DEEPER_FETCH_SCHEMES": "s3", "DEEPER_FETCH_FILE_ROOT": "/srv"}))
    assert (limits.max_bytes, limits.schemes, limits.file_root) == (1000, frozenset({"s3"}), "/srv")
