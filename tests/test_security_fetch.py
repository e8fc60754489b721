"""The claim-check fetch policy against what a stranger with write access to the images topic
would try (server-side request forgery), on real sockets.

Every refusal must happen **before any request** (the servers record every request they get),
be ``fetch_refused`` naming its rule, and never say what a server answered. With default
settings nothing is fetched at all. Names that resolve to forbidden addresses are tested with a
resolver hook (offline, no hosts file), and the address rule is checked on the address actually
connected to: the name is resolved once.
"""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import DeeperError
from pipeline.kafka import fetch_policy
from pipeline.kafka.claim_check import FetchFailed, FetchLimits, fetch_image
from pipeline.kafka.fetch_policy import blocked_range
from tests.claim_check_servers import PHOTO, Handler, serve, s3  # noqa: F401 (fixture)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture(scope="module")
def port():
    with serve("127.0.0.1") as p:
        yield p


def _refused(uri: str, limits: FetchLimits, rule: str) -> FetchFailed:
    """The claim check is refused by ``rule`` and no server got a request."""
    before = list(Handler.requests)
    with pytest.raises(FetchFailed) as caught:
        fetch_image(uri, limits)
    assert (caught.value.reason, caught.value.detail.split(":")[0]) == ("fetch_refused", rule), caught.value
    assert Handler.requests == before, f"{uri} reached a server: {Handler.requests[len(before):]}"
    return caught.value


def test_defaults_fetch_nothing(port, s3, tmp_path):
    """With no settings, no claim check of any scheme makes any request."""
    defaults = FetchLimits.from_settings(Settings.from_env({}))
    assert defaults == FetchLimits()
    for url in (f"http://127.0.0.1:{port}/photo", f"http://localhost:{port}/photo", "https://example.com/a.jpg",
                "http://169.254.169.254/latest/meta-data/"):
        _refused(url, defaults, "hosts")
    s3_log = s3["log"].read_text()
    _refused("s3://photos/cars/a.jpg", FetchLimits(s3_endpoint=s3["endpoint"], s3_region="us-east-1"), "s3")
    assert s3["log"].read_text() == s3_log, "the refused s3:// claim check reached the S3 server"
    (tmp_path / "a.jpg").write_bytes(PHOTO)
    _refused((tmp_path / "a.jpg").as_uri(), defaults, "scheme")
    for uri in ("ftp://example.com/a.jpg", "gopher://x/1", "/etc/passwd", "data:image/png;base64,AA"):
        _refused(uri, defaults, "scheme")


@pytest.mark.parametrize("host", [
    "127.0.0.1", "localhost", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "017700000001",
    "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "0.0.0.0", "[::]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]",
])
def test_loopback_in_every_spelling_is_refused(port, host):
    """Any host allowed (``*``): the address rule alone refuses, whatever form the address takes."""
    error = _refused(f"http://{host}:{port}/photo", FetchLimits(hosts=("*:*",)), "address")
    assert "DEEPER_FETCH_ALLOW_NETS" in error.detail


@pytest.mark.parametrize("address,expected", [
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("10.0.0.1", "private"),
    ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"), ("fd12::1", "private"),
    ("100.64.0.1", "shared (CGNAT)"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"), ("240.0.0.1", "reserved"), ("0.0.0.0", "unspecified"),
    ("::ffff:169.254.169.254", "link-local"), ("::ffff:10.0.0.1", "private"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("2002:a00:1::", "private"), ("fec0::1", "site-local"), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_address_ranges(address, expected):
    assert blocked_range(ipaddress.ip_address(address)) == expected


def test_metadata_and_private_addresses_are_refused_without_connecting():
    for host in ("169.254.169.254", "10.0.0.1", "192.168.0.1", "100.64.0.1", "[fd00::1]", "[::ffff:169.254.169.254]"):
        _refused(f"http://{host}/latest/meta-data/", FetchLimits(hosts=("*",)), "address")


def test_a_name_resolving_to_loopback_is_refused_and_the_detail_says_no_address(port):
    limits = FetchLimits(hosts=(f"photos.example:{port}",), resolver=lambda host, p: ["127.0.0.1"])
    error = _refused(f"http://photos.example:{port}/photo", limits, "address")
    assert "127.0.0.1" not in error.detail and "loopback" in error.detail  # names the rule, not the answer
    assert "127.0.0.1" in error.cause  # the featurizer's log says


def test_allowed_range_connects_to_the_checked_address_with_the_name_in_host(port):
    calls = []

    def resolver(host, p):
        calls.append(host)
        return ["127.0.0.1"]

    limits = FetchLimits(hosts=(f"photos.example:{port}",), allow_nets=LOOPBACK, resolver=resolver)
    before = len(Handler.requests)
    assert fetch_image(f"http://photos.example:{port}/photo", limits) == PHOTO
    assert calls == ["photos.example"]  # resolved once
    assert Handler.requests[before:] == [("127.0.0.1", "/photo", f"photos.example:{port}")]


def test_dns_rebinding_cannot_switch_the_address_after_the_check():
    """The name answers a harmless address first and loopback after: the fetch goes to the
    first (the one checked), the loopback server never hears of it."""
    with serve("127.0.0.2") as port, serve("127.0.0.1", port):
        answers = iter([["127.0.0.2"], ["127.0.0.1"], ["127.0.0.1"]])
        limits = FetchLimits(hosts=(f"rebind.example:{port}",), allow_nets=(ipaddress.ip_network("127.0.0.2/32"),),
                             resolver=lambda host, p: next(answers))
        before = len(Handler.requests)
        assert fetch_image(f"http://rebind.example:{port}/photo", limits) == PHOTO
        assert [r[0] for r in Handler.requests[before:]] == ["127.0.0.2"]


def test_redirects_to_forbidden_places_are_refused():
    """Every hop is checked again: to loopback, to the metadata address, to a host not
    allowed, to another scheme, and more than three hops."""
    with serve("127.0.0.2") as port:
        base = f"http://127.0.0.2:{port}"
        limits = FetchLimits(hosts=("*:*",), allow_nets=(ipaddress.ip_network("127.0.0.2/32"),))
        for target, rule in [(f"http://127.0.0.1:{port}/photo", "address"), ("http://169.254.169.254/", "address"),
                             (f"http://[::ffff:127.0.0.1]:{port}/photo", "address"), ("file:///etc/passwd", "scheme"),
                             ("ftp://127.0.0.2/photo.jpg", "scheme")]:
            before = len(Handler.requests)
            with pytest.raises(FetchFailed) as caught:
                fetch_image(f"{base}/redirect?to={target}", limits)
            assert (caught.value.reason, caught.value.detail.split(":")[0]) == ("fetch_refused", rule), target
            assert [r[0] for r in Handler.requests[before:]] == ["127.0.0.2"], target  # only the first hop
        only_this_port = FetchLimits(hosts=(f"127.0.0.2:{port}",), allow_nets=limits.allow_nets)
        with pytest.raises(FetchFailed, match="hosts"):
            fetch_image(f"{base}/redirect?to=http://127.0.0.2:{port + 1}/photo", only_this_port)
        before = len(Handler.requests)
        with pytest.raises(FetchFailed, match="more than 3 redirects"):
            fetch_image(f"{base}/loop", limits)
        assert len(Handler.requests) - before == 4  # the first request and three redirects, then no more


def test_https_to_http_downgrade_is_refused():
    target = fetch_policy.HttpTarget("https", "a.example", 443, "/", "a.example")
    with pytest.raises(FetchFailed, match="redirect: a redirect from https to http"):
        fetch_policy.check_redirect(target, "http://a.example/x", 1)


@pytest.mark.parametrize("uri,rule", [
    ("http://user:pw@127.0.0.1/photo", "uri"), ("http://photos.example@127.0.0.1/photo", "uri"),
    ("http://127.0.0.1/pho to", "uri"), ("http://127.0.0.1/photo\r\nX-Injected: 1", "uri"), ("http:///photo", "uri"),
    ("http://127.0.0.1:99999/photo", "uri"),
])
def test_malformed_or_smuggling_uris_are_refused(uri, rule):
    _refused(uri, FetchLimits(hosts=("*:*",), allow_nets=LOOPBACK), rule)


def test_host_allowlist_exact_suffix_and_port():
    limits = FetchLimits(hosts=("photos.example.com", ".cdn.example:8443"))
    check = fetch_policy.check_host
    check("https", "photos.example.com", 443, limits)
    check("http", "photos.example.com", 80, limits)
    check("https", "a.b.cdn.example", 8443, limits)
    check("https", "cdn.example", 8443, limits)  # .suffix: the domain itself and its sub-domains
    for scheme, host, port in [("https", "photos.example.com", 8443), ("https", "evilphotos.example.com", 443),
                               ("https", "cdn.example.evil", 8443), ("https", "a.cdn.example", 443),
                               ("http", "photos.example.com.evil", 80)]:
        with pytest.raises(FetchFailed, match="hosts"):
            check(scheme, host, port, limits)


def test_bad_settings_are_errors_at_start():
    for env in ({"DEEPER_FETCH_HOSTS": "a.example:http"}, {"DEEPER_FETCH_ALLOW_NETS": "10.0.0.0/33"},
                {"DEEPER_FETCH_S3": "bucket/../other"}):
        with pytest.raises(DeeperError):
            FetchLimits.from_settings(Settings.from_env(env))


# --------------------------------------------------------------------------- s3


def test_s3_only_inside_the_allowed_buckets_and_prefixes(s3):
    limits = FetchLimits(s3_endpoint=s3["endpoint"], s3_region="us-east-1", s3_allowed=("photos/cars",))
    assert fetch_image("s3://photos/cars/a.jpg", limits) == PHOTO
    log = s3["log"].read_text()
    for uri in ("s3://photos/big.bin", "s3://photos/cars-private/a.jpg", "s3://other/cars/a.jpg",
                "s3://photosx/cars/a.jpg"):
        _refused(uri, limits, "s3")
    assert s3["log"].read_text() == log, "a refused s3:// claim check reached the S3 server"


# --------------------------------------------------------------------------- file


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_file_missing_and_forbidden_paths_read_the_same(tmp_path):
    """Outside the root, escaping by symlink or .., missing, a FIFO, a directory, the root
    itself: one reason, one detail; and no descriptor is left open by any of them."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(PHOTO)
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "dirlink").symlink_to(root)
    os.mkfifo(root / "pipe.jpg")
    (root / "big.jpg").write_bytes(b"\0" * 2048)
    limits = FetchLimits(file_root=str(root), max_bytes=1024)
    paths = [tmp_path / "secret.jpg", root / "link.jpg", Path(f"{root}/../secret.jpg"), root / "missing.jpg",
             root / "pipe.jpg", root / "sub", root, Path(f"{root}/"), root / "dirlink", root / "big.jpg",
             Path("/etc/passwd"), Path("/proc/self/environ")]
    before = _open_fds()
    details = set()
    for _ in range(20):
        for path in paths:
            with pytest.raises(FetchFailed) as caught:
                fetch_image(Path(path).as_uri() if path.is_absolute() else str(path), limits)
            details.add((caught.value.reason, caught.value.detail))
    assert details == {("fetch_refused", fetch_policy.file_refused().detail)}
    assert _open_fds() <= before + 1, "file:// claim checks leak file descriptors"


def test_file_uri_naming_another_machine_is_refused(tmp_path):
    _refused("file://server/share/a.jpg", FetchLimits(file_root=str(tmp_path)), "uri")


def test_dripping_claim_checks_keep_to_the_deadline_in_parallel():
    """Ten fetches from a server that drips its headers, started together: all end by the one deadline."""
    import concurrent.futures

    with serve("127.0.0.1") as port:
        limits = FetchLimits(hosts=(f"127.0.0.1:{port}",), allow_nets=LOOPBACK, timeout_s=1.0)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(fetch_image, f"http://127.0.0.1:{port}/drip-headers", limits) for _ in range(10)]
            errors = [f.exception() for f in futures]
        assert all(isinstance(e, FetchFailed) and e.reason == "fetch_failed" for e in errors), errors
        assert time.monotonic() - started < 2.5


# --------------------------------------------------------------------------- https


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """:class:`Handler` over TLS on 127.0.0.1 with a self-signed certificate for photos.test."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=photos.test",
                    "-addext", "subjectAltName=DNS:photos.test"], check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


def test_https_checks_the_certificate_for_the_name_on_the_pinned_address(tls_server, monkeypatch):
    """TLS's SNI and certificate check use the URL's name, while the socket goes to the
    address the policy checked: the name must be what the certificate says."""
    port, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate (the system's CAs otherwise)
    limits = FetchLimits(hosts=(f"photos.test:{port}", f"127.0.0.1:{port}"), allow_nets=LOOPBACK,
                         resolver=lambda host, p: ["127.0.0.1"] if host == "photos.test" else [host])
    before = len(Handler.requests)
    assert fetch_image(f"https://photos.test:{port}/photo", limits) == PHOTO
    assert Handler.requests[before:] == [("127.0.0.1", "/photo", f"photos.test:{port}")]
    with pytest.raises(FetchFailed) as caught:  # the same server by its address: not the certificate's name
        fetch_image(f"https://127.0.0.1:{port}/photo", limits)
    assert caught.value.reason == "fetch_failed" and "certificate" in caught.value.cause.lower()


def test_a_silent_tls_server_costs_one_deadline():
    """Connected, then nothing: the handshake waits only for the time left."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        port = server.getsockname()[1]
        limits = FetchLimits(hosts=(f"127.0.0.1:{port}",), allow_nets=LOOPBACK, timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(FetchFailed) as caught:
            fetch_image(f"https://127.0.0.1:{port}/photo", limits)
        assert "deadline passed while the TLS handshake" in caught.value.cause
        assert time.monotonic() - started < 1.8
    finally:
        server.close()
