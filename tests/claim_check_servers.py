"""Real servers for claim-check tests: an http.server with misbehaving routes and the project's
local S3 (tests/local_s3_server.py) with a bucket of photos.

``from tests.claim_check_servers import http_url, s3`` in a test module makes them fixtures.
:func:`serve` starts one more on a given loopback address (127.0.0.2, ...). Every request a
server gets is recorded (:attr:`Handler.requests`: address, path, Host), so a test can show
that a refused claim check never reached it.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.local_s3_server import local_s3

REPO = Path(__file__).resolve().parent.parent
PHOTO = next((REPO / "examples" / "test").glob("*.jpg")).read_bytes()
BIG = 64 * 1024 * 1024  # what the "huge" routes would send if nobody stopped reading




class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sent: dict[str, int] = {}
    finished = {"huge": threading.Event(), "huge-nolength": threading.Event()}
    release = threading.Event()
    #: (server address, path, Host header) of every request any server of this module got
    requests: list[tuple[str, str, str]] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.requests.append((self.server.server_address[0], self.path, self.headers.get("Host", "")))
        parts = urllib.parse.urlsplit(self.path)
        self.query = dict(urllib.parse.parse_qsl(parts.query))
        route = getattr(self, "route_" + parts.path.strip("/").replace("-", "_"), None)
        if route is None:
            self.send_error(404, "Not Found: secret-server-banner")
            return
        route()

    def route_redirect(self) -> None:  # /redirect?to=URL
        self.send_response(int(self.query.get("code", "302")))
        self.send_header("Location", self.query["to"])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_loop(self) -> None:  # redirects to itself, forever
        self.send_response(302)
        self.send_header("Location", "/loop")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_drip_headers(self) -> None:  # a header byte at a time: each read is quick, the whole never ends
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(600):
                if self.release.wait(0.05):
                    return
                self.wfile.write(b"a")
                self.wfile.flush()
        except OSError:  # the client hung up at its deadline: what we want
            self.close_connection = True

    def route_teapot(self) -> None:  # an error whose text a dead letter must not carry
        self.send_error(418, "secret-server-banner")

    def route_photo(self) -> None:
        self._head(200, len(PHOTO))
        self.wfile.write(PHOTO)

    def route_huge(self) -> None:  # honest Content-Length, over the limit
        self._head(200, BIG)
        self._stream("huge")

    def route_huge_nolength(self) -> None:  # no length: only the streaming cap can stop it
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self._stream("huge-nolength")

    def route_stall(self) -> None:  # accepts, reads the request, never answers
        self.release.wait(30)

    def route_drip(self) -> None:  # a byte at a time: no single read ever times out
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(200):
                if self.release.wait(0.05):
                    return
                self.wfile.write(b"x")
                self.wfile.flush()
        except OSError:  # the client hung up at its deadline
            self.close_connection = True

    def route_to_ftp(self) -> None:
        self.send_response(302)
        self.send_header("Location", "ftp://127.0.0.1/photo.jpg")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_forbidden(self) -> None:
        self.send_error(403)

    def _head(self, code: int, length: int) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _stream(self, name: str) -> None:
        chunk = b"\0" * 65536
        self.sent[name] = 0
        try:
            while self.sent[name] < BIG:
                self.wfile.write(chunk)
                self.sent[name] += len(chunk)
        except OSError:  # the client hung up: what we want
            pass
        self.finished[name].set()


@contextmanager
def serve(address: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """:class:`Handler` on ``address`` (any loopback address works on Linux); yields its port."""
    server = http.server.ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        Handler.release.set()
        server.shutdown()
        server.server_close()
        Handler.release.clear()


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    with serve() as port:
        yield f"http://127.0.0.1:{port}"


@contextmanager
def full_backlog(address: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A listening port whose accept queue is full: a new connection's SYN is dropped, so
    connecting hangs (what an address that never answers looks like)."""
    server = socket.socket()
    server.bind((address, port))
    server.listen(0)
    fillers = []
    for _ in range(3):  # backlog 0 still queues one or two; then SYNs are dropped
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(server.getsockname())
        fillers.append(client)
    time.sleep(0.2)
    try:
        yield server.getsockname()[1]
    finally:
        for client in fillers:
            client.close()
        server.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict]:
    """The project's local S3 server with a ``photos`` bucket (a photo and a 2 MiB blob)."""
    pytest.importorskip("localbucket")
    root = tmp_path_factory.mktemp("s3")
    (root / "photos").mkdir()
    (root / "photos" / "cars").mkdir()
    (root / "photos" / "cars" / "a.jpg").write_bytes(PHOTO)
    (root / "photos" / "big.bin").write_bytes(b"\0" * (2 * 1024 * 1024))
    log = root.parent / f"{root.name}.log"
    with local_s3(root, log) as endpoint, pytest.MonkeyPatch.context() as env:
        # the SDK reads these itself; localbucket ignores them
        env.setenv("AWS_ACCESS_KEY_ID", "deeper")
        env.setenv("AWS_SECRET_ACCESS_KEY", "deeper-local")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield {"endpoint": endpoint, "log": log, "root": root}
