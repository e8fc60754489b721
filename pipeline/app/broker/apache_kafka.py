"""Apache Kafka for development and CI: install its jars with Maven, run one KRaft node.

Users run Apache Kafka, so the tests must pass on it too (Tansu, the default local broker of
:mod:`pipeline.app.broker.local`, differs in places: docs/broker.md). This module knows *what* to run:
which version (pinned here, and only here), how to install it, its configuration and its
command line. :mod:`pipeline.app.broker.local` runs it (spawn, wait, stop by PID, restart), exactly like
Tansu, through ``broker.start(state_dir, kind="kafka")`` or ``deeper broker start --kafka``.

Install: Apache Kafka's own jars from Maven Central (``mvn dependency:copy-dependencies`` of
``org.apache.kafka:kafka_2.13``) into ``$DEEPER_CACHE_DIR/kafka/<version>/libs``; no tarball,
no Docker. Needs ``java`` (17+) and ``mvn``; Maven keeps its own download cache in ``~/.m2``.

Run: ``java -cp 'libs/*' kafka.Kafka server.properties``, one node that is broker and KRaft
controller, both listeners on 127.0.0.1, data in ``STATE_DIR/kafka-data`` (formatted once by
``kafka.tools.StorageTool``), log4j2 writing to stdout, which the broker module sends to
``STATE_DIR/kafka.log``. A cluster (``deeper broker start --kafka --nodes 3``) is several such
nodes, each broker and controller, voting in one static KRaft quorum, with the replication a
platform's cluster has (:data:`CLUSTER_SETTINGS`: three replicas, two in sync for a write).
"""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.app import maven
from pipeline.errors import DeeperError

#: The one pin: Maven artifact version here, ``apache/kafka:<this>`` in docker-compose.yml.
KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
#: slf4j 1.7 binding for Kafka's own log4j2 (the jars bring log4j-api/core of this version).
LOG4J_VERSION = "2.24.3"
#: What Maven installs: the broker and an slf4j binding for its log4j2.
MAVEN_ARTIFACTS = (f"org.apache.kafka:kafka_{SCALA_VERSION}:{KAFKA_VERSION}",
                   f"org.apache.logging.log4j:log4j-slf4j-impl:{LOG4J_VERSION}")
#: The JVM's heap: a one-node development broker needs little; 16 MiB records fit easily.
HEAP = "512m"

#: Largest record the broker accepts: the stream carries camera photos (several MiB each).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: Settings of the node besides listeners and paths; docker-compose.yml sets the same ones as
#: ``KAFKA_<NAME>`` variables (tests/test_compose.py compares). One node: every internal topic
#: has one replica, or transactions and consumer groups cannot start.
BROKER_SETTINGS: dict[str, str] = {
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",  # no 3 s wait before a group's first assignment
    "num.partitions": "4",  # what auto-created topics get (as on Tansu)
    # After a crash the controller waits out the dead incarnation's session before the new one
    # may register: 9 s by default, 4 s here (heartbeats stay within one JVM on loopback).
    "broker.heartbeat.interval.ms": "1000",
    "broker.session.timeout.ms": "4000",
    "message.max.bytes": str(MAX_MESSAGE_BYTES),
    "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
}

#: What a cluster of three or more nodes adds to :data:`BROKER_SETTINGS`: the settings the
#: exactly-once guarantee needs from a platform's cluster (docs/cluster.md). Every topic and both
#: internal logs (consumer offsets, transaction state) keep three replicas, and a write
#: (``acks=all``: every producer of the pipeline) counts only once two of them have it, so one
#: broker may die at any moment without losing an acknowledged record or a committed
#: transaction, and the cluster keeps accepting writes while it is away. A replica that was not
#: in sync never becomes leader (no unclean election: that would drop acknowledged records).
CLUSTER_SETTINGS: dict[str, str] = {
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
    "unclean.leader.election.enable": "false",
    # 50 partitions each by default: 300 replicas of internal logs on a laptop's three JVMs.
    # 12 still spread group and transaction coordinators over every broker.
    "offsets.topic.num.partitions": "12",
    "transaction.state.log.num.partitions": "12",
    # Heartbeats now cross a network: a broker silent for 6 s is fenced and its partitions
    # get new leaders (the failover time of a killed broker).
    "broker.session.timeout.ms": "6000",
}

#: The smallest cluster that keeps writing with one node down (three replicas, two in sync).
MIN_CLUSTER_NODES = 3

_DATA_DIR = "kafka-data"
_PROPERTIES = "server.properties"
_LOG_CONFIG = "log4j2.properties"

#: INFO for start-up, shutdown and errors; the per-partition and config-dump chatter at WARN.
_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = out
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.state.name = state.change.logger
logger.state.level = warn
logger.partition.name = kafka.cluster.Partition
logger.partition.level = warn
logger.storage.name = org.apache.kafka.storage.internals.log
logger.storage.level = warn
logger.logmanager.name = kafka.log.LogManager
logger.logmanager.level = warn
"""


class KafkaInstallError(maven.MavenError):
    """Apache Kafka cannot be installed or prepared here; the message says what is missing."""


def default_cache_dir() -> Path:
    from pipeline.config import Settings

    return Path(Settings.from_env().cache_dir)


def libs_dir(cache_dir: Path | None = None) -> Path:
    """Where the jars of the pinned version live: ``CACHE/kafka/<version>/libs``."""
    return Path(cache_dir or default_cache_dir()) / "kafka" / KAFKA_VERSION / "libs"


def is_installed(cache_dir: Path | None = None) -> bool:
    return maven.is_installed(libs_dir(cache_dir))


def install(cache_dir: Path | None = None, announce=None) -> Path:
    """Install the pinned Apache Kafka's jars (once) and return the libs folder.

    Idempotent and safe to run concurrently (:func:`pipeline.app.maven.install`: a file lock, a
    temporary folder renamed into place only when Maven succeeded), so an interrupted install is
    never mistaken for a complete one.
    """
    return maven.install(libs_dir(cache_dir), MAVEN_ARTIFACTS, f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar",
                         f"Apache Kafka {KAFKA_VERSION}", announce, KafkaInstallError)


def java_binary() -> str:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH; Kafka 4 needs Java 17 or newer."""
    return maven.java_binary("Apache Kafka", KafkaInstallError)


def unavailable_reason(cache_dir: Path | None = None) -> str | None:
    """None if Apache Kafka is installed or installable here, else why not (for skips)."""
    try:
        java_binary()
    except KafkaInstallError as exc:
        return str(exc)
    if not is_installed(cache_dir) and shutil.which("mvn") is None:
        return f"Apache Kafka {KAFKA_VERSION} is not installed and `mvn` is missing to install it"
    return None


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class Node:
    """One KRaft node (broker and controller): where it listens and how it is launched.

    ``launcher`` is put before the JVM's command line (e.g. ``ip netns exec HOST``: the node
    runs on a test host of its own). ``proxied_port``/``proxied_advertised``: a second client
    listener on ``host:proxied_port`` whose advertised address is ``proxied_advertised``
    (``host:port`` of a proxy in front of it), so clients that bootstrap through proxies reach
    every broker through its proxy too (Kafka answers metadata with the addresses of the
    listener the request came in on).
    """

    node_id: int
    host: str
    port: int
    controller_port: int
    launcher: tuple[str, ...] = ()
    proxied_port: int | None = None
    proxied_advertised: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_json(cls, data: dict) -> "Node":
        return cls(**{**data, "launcher": tuple(data.get("launcher") or ())})


def server_properties(state_dir: Path, node: Node, voters: Sequence[Node]) -> str:
    """A node's configuration: broker + controller, its listeners, data in STATE_DIR.

    One node gets :data:`BROKER_SETTINGS` (one replica of everything); three or more also
    :data:`CLUSTER_SETTINGS`.
    """
    listeners = [f"PLAINTEXT://{node.host}:{node.port}", f"CONTROLLER://{node.host}:{node.controller_port}"]
    advertised = [f"PLAINTEXT://{node.host}:{node.port}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    if node.proxied_port is not None:
        listeners.append(f"PROXIED://{node.host}:{node.proxied_port}")
        advertised.append(f"PROXIED://{node.proxied_advertised}")
        protocols.append("PROXIED:PLAINTEXT")
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(f"{v.node_id}@{v.host}:{v.controller_port}" for v in voters),
        "listeners": ",".join(listeners),
        "advertised.listeners": ",".join(advertised),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": ",".join(protocols),
        "log.dirs": str(Path(state_dir) / _DATA_DIR),
        **BROKER_SETTINGS,
        **(CLUSTER_SETTINGS if len(voters) >= MIN_CLUSTER_NODES else {}),
    }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


def prepare(state_dir: Path, libs: Path, node: Node, voters: Sequence[Node], cluster_id: str | None = None
            ) -> list[str]:
    """Write the node's configuration, format its storage if it is new, return its command.

    Formatting runs once per state dir (the nodes of one cluster share ``cluster_id``); a
    restart on the same data (same ports) skips it.
    """
    state_dir = Path(state_dir)
    properties = state_dir / _PROPERTIES
    properties.write_text(server_properties(state_dir, node, voters))
    (state_dir / _LOG_CONFIG).write_text(_LOG4J2)
    if not (state_dir / _DATA_DIR / "meta.properties").is_file():
        _format_storage(state_dir, libs, properties, cluster_id or random_cluster_id())
    return [*node.launcher, *_java(state_dir, libs), "kafka.Kafka", str(properties)]


def _java(state_dir: Path, libs: Path) -> list[str]:
    """The JVM options of a small development broker.

    C1-only JIT and the serial GC halve the CPU a start costs (measured 3.3-3.7 s instead of
    5.2-6.2 s of CPU to the first answer on a 2-core machine), which is what restarts in tests
    pay for; a development broker's throughput does not need C2's peak or G1's threads.
    """
    return [java_binary(), f"-Xmx{HEAP}", "-Xms64m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={state_dir / _LOG_CONFIG}",
            "-cp", f"{libs}/*"]


def _format_storage(state_dir: Path, libs: Path, properties: Path, cluster_id: str) -> None:
    """``kafka-storage format`` with static voters (so no ``--standalone``)."""
    command = [*_java(state_dir, libs), "kafka.tools.StorageTool", "format",
               "-t", cluster_id, "-c", str(properties)]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            cwd=state_dir, timeout=120)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        raise KafkaInstallError(f"formatting Kafka storage in {state_dir / _DATA_DIR} failed:\n{tail}")


def random_cluster_id() -> str:
    """What ``kafka-storage random-uuid`` prints (22 chars of url-safe base64), without a JVM."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka refuses ids that look like a command-line flag
            return text


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.app.broker.apache_kafka install|version``: what CI and scripts call."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.app.broker.apache_kafka",
                                     description=f"Install Apache Kafka {KAFKA_VERSION} (jars from Maven Central).")
    parser.add_argument("command", choices=["install", "version"])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="default: $DEEPER_CACHE_DIR (the jars go to CACHE/kafka/VERSION/libs)")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(KAFKA_VERSION)
        return 0
    try:
        print(install(args.cache_dir, announce=lambda m: print(m, file=sys.stderr, flush=True)))
    except DeeperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
