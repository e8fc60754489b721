"""Claim checks against real servers: the project's local S3 (localbucket) and http.server.

Fetches the policy allows (tests/test_security_fetch.py covers what it refuses) must come back
whole, or as :class:`FetchFailed` within the limits: an oversize object is abandoned early (the
servers record how much they got to send), one deadline bounds the whole fetch, file:// reads
only under its root. Dead letters never carry what a server answered.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import time

import pytest

from pipeline.kafka import claim_check, fetch_policy
from pipeline.app.broker.local import free_port
from pipeline.kafka.claim_check import IMAGE_URI_HEADER, FetchFailed, FetchLimits, fetch_image, resolve_value
from tests.claim_check_servers import BIG, PHOTO, Handler, full_backlog, http_url, s3  # noqa: F401 (fixtures)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def loopback_limits(url: str = "", **kw) -> FetchLimits:
    """What an operator whose photo server lives on loopback sets: that host:port, that range."""
    host = url.split("//", 1)[1].split("/", 1)[0] if url else "127.0.0.1:*"
    return FetchLimits(hosts=(host,), allow_nets=LOOPBACK, **kw)


def _failure(uri: str, limits: FetchLimits) -> FetchFailed:
    with pytest.raises(FetchFailed) as caught:
        fetch_image(uri, limits)
    assert caught.value.reason in fetch_policy.REASONS
    return caught.value


# --------------------------------------------------------------------------- http


def test_http_fetches_the_photo(http_url):
    assert fetch_image(f"{http_url}/photo", loopback_limits(http_url)) == PHOTO


def test_http_errors_say_nothing_a_server_answered(http_url):
    """404, 403, 418 with a banner, a refused connection: one reason, one detail, and the
    server's words only in ``cause`` (the featurizer's log)."""
    limits = loopback_limits()
    failures = [_failure(f"{http_url}/{route}", limits) for route in ("missing", "forbidden", "teapot")]
    failures.append(_failure(f"http://127.0.0.1:{free_port()}/photo", limits))
    assert {(f.reason, f.detail) for f in failures} == {("fetch_failed", failures[0].detail)}
    for f in failures:
        assert "secret-server-banner" not in str(f) and "404" not in f.detail and "403" not in f.detail
    assert "HTTP 404" in failures[0].cause and "HTTP 418" in failures[2].cause


@pytest.mark.parametrize("route", ["huge", "huge-nolength"])
def test_http_oversize_is_abandoned_early(http_url, route):
    started = time.monotonic()
    error = _failure(f"{http_url}/{route}", loopback_limits(http_url, max_bytes=1024 * 1024))
    assert error.reason == "fetch_failed" and "bytes" in error.cause
    assert time.monotonic() - started < 3
    assert Handler.finished[route].wait(5), "the server is still sending: the client did not hang up"
    assert Handler.sent[route] < BIG // 4, "the client read (nearly) everything before refusing"


def test_http_stalled_server_times_out(http_url):
    started = time.monotonic()
    error = _failure(f"{http_url}/stall", loopback_limits(http_url, timeout_s=0.5))
    assert error.reason == "fetch_failed" and "deadline" in error.cause
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("route", ["drip", "drip-headers"])
def test_http_dripping_server_hits_the_one_deadline(http_url, route):
    """Each byte arrives well within any per-read timeout; only the one deadline stops it
    (``drip-headers`` never finishes its headers: urllib's per-read timeout waited 30 s)."""
    started = time.monotonic()
    error = _failure(f"{http_url}/{route}", loopback_limits(http_url, timeout_s=1.0))
    assert "deadline passed while reading the answer" in error.cause, error.cause
    assert time.monotonic() - started < 2.5


def test_hanging_connects_share_the_one_deadline():
    """A name resolving to two addresses that never accept: both tries fit in one deadline."""
    with full_backlog("127.0.0.2") as port, full_backlog("127.0.0.3", port):
        limits = FetchLimits(hosts=(f"photos.test:{port}",), allow_nets=LOOPBACK, timeout_s=1.0,
                             resolver=lambda host, p: ["127.0.0.2", "127.0.0.3"])
        started = time.monotonic()
        error = _failure(f"http://photos.test:{port}/photo", limits)
        assert "deadline passed while connecting" in error.cause
        assert time.monotonic() - started < 1.8


def test_redirects_within_the_policy_are_followed(http_url):
    limits = loopback_limits(http_url)
    assert fetch_image(f"{http_url}/redirect?to=/photo", limits) == PHOTO
    assert fetch_image(f"{http_url}/redirect?code=308&to={http_url}/redirect%3Fto%3D/photo", limits) == PHOTO


def test_the_deadline_is_absolute(http_url):
    """A deadline already passed (a claim check queued past it) fetches nothing."""
    before = len(Handler.requests)
    with pytest.raises(FetchFailed):
        fetch_image(f"{http_url}/photo", loopback_limits(http_url), deadline=time.monotonic() - 0.1)
    assert len(Handler.requests) == before


# --------------------------------------------------------------------------- s3


def _s3_limits(s3: dict, **kw) -> FetchLimits:
    return FetchLimits(s3_endpoint=s3["endpoint"], s3_region="us-east-1", s3_allowed=("photos",), **kw)


def test_s3_fetches_the_object(s3):
    assert fetch_image("s3://photos/cars/a.jpg", _s3_limits(s3)) == PHOTO


def test_s3_configuration_is_storages(s3, monkeypatch):
    """With no endpoint in the limits, the AWS variables (read by pipeline.storage, as for feature
    files) say where S3 is; an endpoint in the limits wins over them."""
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["endpoint"])
    assert fetch_image("s3://photos/cars/a.jpg", FetchLimits(s3_allowed=("photos",))) == PHOTO
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert fetch_image("s3://photos/cars/a.jpg", _s3_limits(s3)) == PHOTO
    error = _failure("s3://photos/cars/a.jpg", FetchLimits(timeout_s=1.0, s3_allowed=("photos",)))
    assert error.reason == "fetch_failed"


@pytest.mark.parametrize("uri", ["s3://photos/cars/missing.jpg", "s3://photos/cars"])
def test_s3_missing_object_is_a_failed_fetch(s3, uri):
    error = _failure(uri, _s3_limits(s3))
    assert error.reason == "fetch_failed" and "no such object" in error.cause


@pytest.mark.parametrize("uri", ["s3://photos", "s3:///a.jpg", "s3://photos/dir/", "s3://photos/a/../b.jpg"])
def test_s3_malformed_uri_is_refused(s3, uri):
    error = _failure(uri, _s3_limits(s3))
    assert error.reason == "fetch_refused" and error.detail.startswith("uri:")


def test_s3_oversize_is_refused_from_its_size_without_a_get(s3):
    error = _failure("s3://photos/big.bin", _s3_limits(s3, max_bytes=1024 * 1024))
    assert error.reason == "fetch_failed" and "over" in error.cause
    requests = [line for line in s3["log"].read_text().splitlines() if "/photos/big.bin" in line]
    assert requests and not any('"GET ' in line for line in requests), requests


def test_s3_stalled_endpoint_times_out():
    with full_backlog() as port:
        started = time.monotonic()
        limits = FetchLimits(s3_endpoint=f"http://127.0.0.1:{port}", s3_region="us-east-1", timeout_s=1.0,
                             s3_allowed=("photos",))
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "x")
            env.setenv("AWS_SECRET_ACCESS_KEY", "y")
            assert _failure("s3://photos/a.jpg", limits).reason == "fetch_failed"
        assert time.monotonic() - started < 5


def test_upload_then_fetch_round_trip(s3):
    limits = _s3_limits(s3)
    uri = claim_check.upload_s3("s3://photos/claims/", PHOTO, ".jpg", limits, "image/jpeg")
    assert uri == f"s3://photos/claims/{hashlib.sha256(PHOTO).hexdigest()}.jpg"
    assert fetch_image(uri, limits) == PHOTO


# --------------------------------------------------------------------------- file


def test_file_reads_under_its_root_including_non_utf8_names(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    (tmp_path / name).write_bytes(PHOTO)
    assert fetch_image((tmp_path / name).as_uri(), FetchLimits(file_root=str(tmp_path))) == PHOTO


def test_file_root_reached_through_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.jpg").write_bytes(PHOTO)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    limits = FetchLimits(file_root=str(tmp_path / "link"))
    assert fetch_image((tmp_path / "link" / "a.jpg").as_uri(), limits) == PHOTO


# --------------------------------------------------------------------------- the consumer's entry point


def test_resolve_value_passes_inline_messages_through_and_fetches_references(http_url):
    limits = loopback_limits(http_url)
    assert resolve_value(b"k", b"inline", [("source", b"a.jpg")], limits) == b"inline"
    assert resolve_value(b"k", b"", [(IMAGE_URI_HEADER, f"{http_url}/photo".encode())], limits) == PHOTO
    with pytest.raises(FetchFailed) as caught:
        resolve_value(b"k", b"inline", [(IMAGE_URI_HEADER, f"{http_url}/photo".encode())], limits)
    assert caught.value.reason == "fetch_refused" and caught.value.detail.startswith("uri:")


def test_limits_come_from_the_settings():
    from pipeline.config import Settings

    assert FetchLimits.from_settings(Settings.from_env({})) == FetchLimits()
    limits = FetchLimits.from_settings(Settings.from_env({
        "DEEPER_FETCH_MAX_BYTES": "1000", "DEEPER_FETCH_SCHEMES": "s3", "DEEPER_FETCH_FILE_ROOT": "/srv",
        "DEEPER_FETCH_HOSTS": "Photos.Example.com, .cdn.example:8443 [::1]:81", "DEEPER_FETCH_S3": "s3://a/b, c",
        "DEEPER_FETCH_ALLOW_NETS": "10.1.0.0/16 fd00::/8"}))
    assert (limits.max_bytes, limits.schemes, limits.file_root) == (1000, frozenset({"s3"}), "/srv")
    assert limits.hosts == ("photos.example.com", ".cdn.example:8443", "[::1]:81")
    assert limits.s3_allowed == ("a/b", "c")
    assert [str(n) for n in limits.allow_nets] == ["10.1.0.0/16", "fd00::/8"]
