"""Real servers for claim-check tests: an http.server with misbehaving routes and the project's
local S3 (tests/local_s3_server.py) with a bucket of photos.

``from tests.claim_check_servers import http_url, s3`` in a test module makes them fixtures.
"""

from __future__ import annotations

import http.server
import threading
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

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        route = getattr(self, "route_" + self.path.strip("/").replace("-", "_"), None)
        if route is None:
            self.send_error(404)
            return
        route()

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
        for _ in range(200):
            if self.release.wait(0.05):
                return
            self.wfile.write(b"x")
            self.wfile.flush()

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


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    Handler.release.set()
    server.shutdown()
    server.server_close()


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
