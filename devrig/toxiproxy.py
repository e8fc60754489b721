"""Toxiproxy, the fault-injection TCP proxy: slow and broken links between chosen hosts.

``tc netem`` and iptables are not available on every machine this runs on; Toxiproxy is one Go
binary. It is built from the Go module proxy (``go install``, pinned :data:`VERSION`) into
``$DEEPER_CACHE_DIR/toxiproxy/<version>/`` by :func:`install` (``python -m
devrig.toxiproxy install``: what CI runs), and driven through its HTTP API with
the standard library (:class:`Toxiproxy`): a proxy per upstream, toxics added and removed while
traffic flows (``latency``, ``bandwidth``, ``timeout``, ``reset_peer``, ...).

Kafka clients learn every broker's address from metadata, so a proxy in front of a cluster
needs one proxy per broker and brokers that advertise those proxies: the rig's cluster gives
each broker a second client listener (``PROXIED``) advertised as its proxy's address
(:class:`pipeline.app.broker.apache_kafka.Node`); a client bootstrapped through the proxies talks to
every broker through its proxy, and every other client talks to the brokers directly.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

VERSION = "2.12.0"
MODULE = "github.com/Shopify/toxiproxy/v2/cmd/server"
BINARY = "toxiproxy-server"


class ToxiproxyError(RuntimeError):
    """Toxiproxy cannot be installed, started or told something; the message says why."""


def binary_path(cache_dir: Path | None = None) -> Path:
    if cache_dir is None:
        from pipeline.config import Settings

        cache_dir = Path(Settings.from_env().cache_dir)
    return Path(cache_dir) / "toxiproxy" / VERSION / BINARY


def unavailable_reason(cache_dir: Path | None = None) -> str | None:
    """None if Toxiproxy is installed or can be built here, else why not (for skips)."""
    if binary_path(cache_dir).is_file() or shutil.which("go"):
        return None
    return f"Toxiproxy {VERSION} is not installed and `go` is missing to build it"


def install(cache_dir: Path | None = None) -> Path:
    """Build Toxiproxy with ``go install`` once (a file lock; the binary is moved into place
    only when the build succeeded) and return its path."""
    target = binary_path(cache_dir)
    if target.is_file():
        return target
    go = shutil.which("go")
    if go is None:
        raise ToxiproxyError(f"building Toxiproxy {VERSION} needs Go (https://go.dev/dl/, or apt-get install golang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
            env = {**os.environ, "GOBIN": work, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
            result = subprocess.run([go, "install", f"{MODULE}@v{VERSION}"], capture_output=True, text=True,
                                    env=env, stdin=subprocess.DEVNULL, timeout=900)
            built = Path(work) / "server"
            if result.returncode != 0 or not built.is_file():
                tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
                raise ToxiproxyError(f"go install {MODULE}@v{VERSION} failed ({result.returncode}):\n{tail}")
            os.replace(built, target)
    return target


class Toxiproxy:
    """A Toxiproxy server this process started, and its HTTP API.

    ``api_host``/``api_port``: where the API listens (loopback by default). Proxies listen
    wherever :meth:`proxy` says (an address of the machine or namespace the server runs in).
    ``launcher`` runs the server elsewhere (e.g. on a test host).
    """

    def __init__(self, log_path: Path, api_port: int, api_host: str = "127.0.0.1",
                 launcher: Sequence[str] = (), cache_dir: Path | None = None):
        self.api = f"http://{api_host}:{api_port}"
        self.log_path = Path(log_path)
        binary = install(cache_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*launcher, str(binary), "-host", api_host, "-port", str(api_port)],
                                        stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/version")
                break
            except ToxiproxyError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise ToxiproxyError(f"toxiproxy did not start; log {self.log_path}")
                time.sleep(0.1)

    # -- proxies ------------------------------------------------------------------------------
    def proxy(self, name: str, listen: str, upstream: str) -> dict[str, Any]:
        """A proxy from ``listen`` (host:port) to ``upstream`` (host:port), enabled."""
        return self._call("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream,
                                                "enabled": True})

    def set_enabled(self, name: str, enabled: bool) -> None:
        """A disabled proxy closes every connection and refuses new ones (a dead link)."""
        self._call("POST", f"/proxies/{name}", {"enabled": enabled})

    def add_toxic(self, proxy: str, name: str, kind: str, stream: str = "downstream", toxicity: float = 1.0,
                  **attributes: Any) -> None:
        """Add toxic ``kind`` (``latency``, ``bandwidth``, ``timeout``, ``reset_peer``, ...) to
        ``proxy``; ``stream`` is ``downstream`` (upstream -> client) or ``upstream``."""
        self._call("POST", f"/proxies/{proxy}/toxics", {"name": name, "type": kind, "stream": stream,
                                                         "toxicity": toxicity, "attributes": attributes})

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")

    def proxies(self) -> dict[str, Any]:
        return self._call("GET", "/proxies")

    def reset(self) -> None:
        """Every proxy enabled again, every toxic removed."""
        self._call("POST", "/reset")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.api + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an HTTP proxy
        try:
            with opener.open(request, timeout=10) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            raise ToxiproxyError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ToxiproxyError(f"{method} {path}: {exc}") from exc
        return json.loads(text) if text.strip() else None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devrig.toxiproxy install``: build it into the cache (CI)."""
    parser = argparse.ArgumentParser(prog="python -m devrig.toxiproxy",
                                     description=f"Install Toxiproxy {VERSION} (go install from the Go module proxy).")
    parser.add_argument("command", choices=["install", "version"])
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "version":
        print(VERSION)
        return 0
    try:
        print(install(args.cache_dir))
    except ToxiproxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
