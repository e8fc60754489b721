"""Test helpers: a stand-in for the official Inception v1 archive and a local web server.

The real ``inception_v1_2016_08_28.tar.gz`` can't be downloaded in tests, so we make one with
the same layout: a checkpoint with the official variable names and seeded values
(``devrig/checkpoints.py``, shared with the bench) as ``inception_v1.ckpt`` (the official file
is a single V1 checkpoint), packed as ``inception_v1_2016_08_28.tar.gz``. Building it takes a
few seconds, so it is made once per test session.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pytest

from devrig.checkpoints import make_checkpoint, save_v1

ARCHIVE_NAME = "inception_v1_2016_08_28.tar.gz"
CHECKPOINT_NAME = "inception_v1.ckpt"

def _bypass_proxies_for_localhost() -> None:
    """The local test server must be reached directly even where http_proxy is set."""
    for var in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in os.environ.get(var, "").split(",") if h]
        os.environ[var] = ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])


_bypass_proxies_for_localhost()

#: tmp dir -> built archive, shared by every test module that imports the fixture (a
#: session fixture imported into two modules would otherwise be built twice).
_BUILT: dict[str, "OfficialLike"] = {}


@dataclass(frozen=True)
class OfficialLike:
    """The fake official files: the archive, the checkpoint inside it and its variables."""

    archive: Path
    checkpoint: Path
    variable_names: tuple[str, ...]


def copy_checkpoint(source: Path, dest: Path, drop: Iterable[str] = ()) -> None:
    """Copy a checkpoint leaving out the variables named in ``drop`` (for "missing" tests)."""
    import tensorflow as tf

    reader = tf.compat.v1.train.NewCheckpointReader(str(source))
    drop = set(drop)
    graph = tf.Graph()
    with graph.as_default():
        for name in sorted(set(reader.get_variable_to_shape_map()) - drop):
            tf.compat.v1.Variable(reader.get_tensor(name), name=name)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            save_v1(session, graph, dest)


def pack(archive: Path, files: dict[str, Path]) -> Path:
    """A ``.tar.gz`` holding ``files`` (member name -> file); fast compression is plenty."""
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for member, path in files.items():
            tar.add(path, arcname=member)
    return archive


def evil_archive(archive: Path, kind: str) -> Path:
    """An archive with one unsafe member: ``dotdot``, ``absolute``, ``symlink`` or ``hardlink``."""
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo({"dotdot": "../evil", "absolute": "/tmp/deeper-evil"}.get(kind, CHECKPOINT_NAME))
        if kind in ("symlink", "hardlink"):
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            payload = b"pwned"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


@pytest.fixture(scope="session")
def official_like(tmp_path_factory: pytest.TempPathFactory) -> OfficialLike:
    """The fake official archive, built once per session (see the module doc)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        directory = tmp_path_factory.mktemp("official")
        checkpoint = directory / CHECKPOINT_NAME
        names = make_checkpoint(checkpoint)
        archive = pack(directory / ARCHIVE_NAME, {CHECKPOINT_NAME: checkpoint})
        _BUILT[key] = OfficialLike(archive=archive, checkpoint=checkpoint, variable_names=names)
    return _BUILT[key]


# --------------------------------------------------------------------------- web server


@dataclass
class FileServer:
    """What the local server serves and what it saw."""

    files: dict[str, bytes]
    #: path -> number of body bytes to send before hanging up (Content-Length stays honest
    #: about the full file, so the client sees a short read).
    cut_after: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"


def _handler(state: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            state.requests.append(self.path)
            body = state.files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: state.cut_after.get(self.path.lstrip("/"), len(body))])
            self.close_connection = True

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    return Handler


@contextlib.contextmanager
def serve(files: dict[str, bytes], cut_after: dict[str, int] | None = None) -> Iterator[FileServer]:
    """Serve ``files`` on 127.0.0.1 (random port) from a thread until the block ends."""
    state = FileServer(files=files, cut_after=cut_after or {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
