"""``deeper ui``'s request handling, on raw sockets: every malformed request gets an answer.

The server runs for real (no browser, no broker: nothing here needs the stream's records).
Requests are written byte for byte, so lengths, hosts and bodies can be as wrong as an
attacker's: a negative, missing, non-numeric or huge ``Content-Length``, chunked bodies, JSON
nested past any parser's patience, ids with a trailing newline, Host headers of a DNS-rebinding
page. Each must be answered (400/403/411/413) promptly, never with a dropped connection, never by
reading a huge body, and never by writing a correction. Every answer carries the security
headers (a Content-Security-Policy with no inline script, no framing, no sniffing).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.app.ui import MAX_BODY_BYTES, UiApp, UiServer
from pipeline.config import Settings
from pipeline.errors import DeeperError
from pipeline.app.broker.local import free_port
from pipeline.learning.training import labels_from_csv

IMAGE_ID = "ab" * 32


@pytest.fixture
def app(tmp_path) -> Iterator[UiApp]:
    """The app without its Kafka watchers (nothing here reads the stream)."""
    settings = Settings.from_env({}, bootstrap_servers=f"127.0.0.1:{free_port()}", data_dir=str(tmp_path),
                                 registry_dir=str(tmp_path / "registry"))
    yield UiApp(settings)


def _serve(app: UiApp, host: str = "127.0.0.1", allow_hosts=()) -> UiServer:
    server = UiServer(app, host, 0, allow_hosts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def server(app) -> Iterator[UiServer]:
    server = _serve(app)
    yield server
    server.shutdown()
    server.server_close()


def raw(server: UiServer, request: bytes, host: str | None = None, timeout: float = 10) -> tuple[int, dict, bytes, float]:
    """Send ``request`` (``{host}`` filled in), read until the server closes or the answer is
    whole: (status, headers, body, seconds). The connection stays open for writing, like a
    client that still has a body to send would."""
    port = server.server_address[1]
    request = request.replace(b"{host}", (f"127.0.0.1:{port}" if host is None else host).encode())
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data, "the connection was dropped without an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, time.monotonic() - started


def _expected(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    return len(head) + 4 + (int(match.group(1)) if match else 0)


def post(path: str, body: bytes, extra: str = "", length: str | None = None) -> bytes:
    length_line = "" if length == "" else f"Content-Length: {len(body) if length is None else length}\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: {{host}}\r\nContent-Type: application/json\r\n{length_line}{extra}\r\n"
            ).encode() + body


def _csv(app: UiApp) -> Path:
    return Path(app.settings.data_dir) / "corrections.csv"


CORRECTION = json.dumps({"image_id": IMAGE_ID, "label": "red"}).encode()


@pytest.mark.parametrize("length,status", [
    ("-1", 400), ("abc", 400), ("1e3", 400), ("+5", 400), (" ", 400), ("0x10", 400), ("", 411),
    (str(200 * 1024 * 1024), 413), (str(MAX_BODY_BYTES + 1), 413),
])
def test_bad_content_lengths_are_answered_without_reading_the_body(server, app, length, status):
    """A -1 length was read to the end of the connection (200 MB in the report); malformed ones
    dropped the connection."""
    code, headers, body, seconds = raw(server, post("/api/corrections", CORRECTION, length=length))
    assert code == status, body
    assert seconds < 5 and "error" in json.loads(body)
    assert headers.get("connection") == "close"
    assert not _csv(app).exists()


def test_chunked_bodies_and_two_lengths_are_refused(server, app):
    chunked = post("/api/corrections", b"4\r\n{}  \r\n0\r\n\r\n", "Transfer-Encoding: chunked\r\n", length="")
    assert raw(server, chunked)[0] == 411
    two = post("/api/corrections", CORRECTION, f"Content-Length: {len(CORRECTION)}\r\n")
    assert raw(server, two)[0] == 400
    assert not _csv(app).exists()


def test_deeply_nested_json_is_a_400(server):
    for body in (b"[" * 60000, b'{"a":' * 10000 + b"1" + b"}" * 10000, b"[" * 17 + b"]" * 17):
        code, _, answer, _ = raw(server, post("/api/corrections", body))
        assert code == 400 and b"nested deeper" in answer


def test_corrections_need_an_exact_id_and_a_class_name(server, app):
    for image_id in (IMAGE_ID + "\n", IMAGE_ID.upper(), IMAGE_ID[:-1], " " + IMAGE_ID, IMAGE_ID + "0", 7):
        body = json.dumps({"image_id": image_id, "label": "red"}).encode()
        assert raw(server, post("/api/corrections", body))[0] == 400, repr(image_id)
    for label in ("red\nblue", "=HYPERLINK(\"http://x\")", "+1", "-1", "@SUM(A1)", "", "x" * 200, None):
        body = json.dumps({"image_id": IMAGE_ID, "label": label}).encode()
        assert raw(server, post("/api/corrections", body))[0] == 400, repr(label)
    assert not _csv(app).exists()
    fine = 'Porsche 911, "1965" <b>'
    body = json.dumps({"image_id": IMAGE_ID, "label": fine}).encode()
    assert raw(server, post("/api/corrections", body))[0] == 200
    assert labels_from_csv(_csv(app)) == {IMAGE_ID: fine}
    assert len(_csv(app).read_text().splitlines()) == 2  # the header and one row


def test_host_is_checked_on_every_request_wherever_it_listens(server, app):
    """Loopback names on loopback; beyond it (refused without ``--allow-host``) the allowed
    names too, and never any other Host: the check used to be off with ``--host 0.0.0.0``."""
    import argparse

    from pipeline.app.ui import add_parser

    port = server.server_address[1]
    get = b"GET /api/state HTTP/1.1\r\nHost: {host}\r\n\r\n"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert raw(server, get, host)[0] == 200, host
    for host in ("attacker.example", f"127.0.0.1.attacker.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}", ""):
        assert raw(server, get, host)[0] == 403, host
    assert raw(server, b"GET / HTTP/1.0\r\n\r\n")[0] == 403  # no Host at all

    with pytest.raises(DeeperError, match="--allow-host"):
        UiServer(app, "0.0.0.0", 0)
    wide = _serve(app, "0.0.0.0", ["photos.lan"])
    try:
        port = wide.server_address[1]
        assert raw(wide, get, f"photos.lan:{port}")[0] == 200
        assert raw(wide, get, f"127.0.0.1:{port}")[0] == 200
        for host in (f"evil.example:{port}", f"photos.lan.evil.example:{port}", f"10.1.2.3:{port}"):
            assert raw(wide, get, host)[0] == 403, host
        assert raw(wide, post("/api/corrections", CORRECTION), f"evil.example:{port}")[0] == 403
    finally:
        wide.shutdown()
        wide.server_close()
    assert not _csv(app).exists()
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["ui", "--host", "0.0.0.0", "--allow-host", "a.lan", "--allow-host", "b.lan"])
    assert args.allow_host == ["a.lan", "b.lan"]


def test_every_answer_carries_the_security_headers(server, app, monkeypatch):
    monkeypatch.setattr(app, "state", lambda: 1 / 0)  # a bug: answered 500, not a dropped connection
    requests = [(b"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n", 200), (b"GET /ui.js HTTP/1.1\r\nHost: {host}\r\n\r\n", 200),
                (b"GET /ui.css HTTP/1.1\r\nHost: {host}\r\n\r\n", 200), (b"GET /nope HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
                (b"GET /api/state HTTP/1.1\r\nHost: {host}\r\n\r\n", 500),
                (b"GET /api/thumb/..%2F..%2Fetc.jpg HTTP/1.1\r\nHost: {host}\r\n\r\n", 400),
                (b"GET / HTTP/1.1\r\nHost: evil\r\n\r\n", 403), (post("/api/retrain", b"{}", length="-1"), 400),
                (b"NOPE / HTTP/1.1\r\nHost: {host}\r\n\r\n", 501), (b"GET / HTTP/1.1\r\nHost: {host}\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431)]
    for request, status in requests:
        code, headers, _, _ = raw(server, request)
        assert code == status, request
        csp = headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp, request
        assert "default-src 'none'" in csp and headers.get("x-content-type-options") == "nosniff", request


def test_the_page_has_no_inline_script_and_builds_no_markup(server):
    _, _, page, _ = raw(server, b"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")
    _, headers, script, _ = raw(server, b"GET /ui.js HTTP/1.1\r\nHost: {host}\r\n\r\n")
    page_text, script_text = page.decode(), script.decode()
    assert re.findall(r"<script\b[^>]*>", page_text) == ['<script src="/ui.js" defer>']
    assert not re.search(r"\son\w+\s*=", page_text) and "style=" not in page_text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script_text, sink
    assert headers["content-type"].startswith("text/javascript")
