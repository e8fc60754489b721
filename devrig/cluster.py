"""A three-node Apache Kafka cluster for the rig: every broker on its own test host.

:class:`RigCluster` starts :func:`pipeline.app.broker.local.start_cluster` with one node per
:class:`~devrig.hosts.RigHost` (or on loopback without a network) and offers what the
cluster fault scenarios do to it: SIGKILL a node and start it again on its data, find the
leader of a partition and the active KRaft controller, cut a broker's host off. With
``proxied=True`` each broker also has a client listener reached through its own Toxiproxy
proxy (:mod:`devrig.toxiproxy`): :attr:`RigCluster.proxied_bootstrap_servers` is
what a worker whose links should be slow or broken bootstraps from.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from devrig.hosts import RigHost, RigNetwork
from devrig.toxiproxy import Toxiproxy
from pipeline.config import Settings
from pipeline.app.broker import apache_kafka, local as broker

#: Ports of a node on its own host (a namespace of its own: fixed ports cannot clash).
CLIENT_PORT, CONTROLLER_PORT, PROXIED_PORT = 9092, 9093, 9094


class RigCluster:
    """``nodes`` Apache Kafka nodes (KRaft, each broker and controller) on test hosts."""

    kind = "kafka"

    def __init__(self, state_dir: Path, network: RigNetwork | None = None, nodes: int = 3,
                 proxy: Toxiproxy | None = None):
        self.state_dir = Path(state_dir)
        self.network = network
        self.count = nodes
        self.proxy = proxy
        self.hosts: dict[int, RigHost] = {}
        self.info: broker.BrokerInfo | None = None
        self.restarts: list[dict[str, Any]] = []  # what RigBroker records: one entry per node back
        self.proxied_bootstrap_servers: str | None = None

    def start(self) -> "RigCluster":
        if self.network is None:
            nodes = broker.loopback_nodes(self.count, broker.free_port())
        else:
            nodes = [self._node_on_its_host(node_id) for node_id in range(1, self.count + 1)]
        self.info = broker.start_cluster(self.state_dir, nodes)
        if any(node.proxied_advertised for node in nodes):
            self.proxied_bootstrap_servers = ",".join(n.proxied_advertised for n in nodes if n.proxied_advertised)
        return self

    def _node_on_its_host(self, node_id: int) -> apache_kafka.Node:
        """A host of its own; with a proxy, a second listener reached through proxy ``kafkaN``."""
        assert self.network is not None
        host = self.hosts[node_id] = self.network.add_host(f"kafka{node_id}")
        if self.proxy is None:
            return apache_kafka.Node(node_id, host.address, CLIENT_PORT, CONTROLLER_PORT, host.launcher)
        listen = f"{self.network.rig_address}:{broker.free_port()}"
        self.proxy.proxy(f"kafka{node_id}", listen, f"{host.address}:{PROXIED_PORT}")
        return apache_kafka.Node(node_id, host.address, CLIENT_PORT, CONTROLLER_PORT, host.launcher,
                                 PROXIED_PORT, listen)

    # -- what RigBroker offers -------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        assert self.info is not None, "cluster not started"
        return self.info.bootstrap_servers

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env(bootstrap_servers=self.bootstrap_servers, **overrides)

    def stop(self) -> None:
        broker.stop(self.state_dir, grace_s=5.0)

    def findings(self) -> dict[str, Any]:
        return {"kind": "kafka-cluster", "durable": True, "nodes": self.count,
                "hosts": {n: h.address for n, h in self.hosts.items()},
                "proxied": self.proxied_bootstrap_servers is not None}

    # -- faults ------------------------------------------------------------------------------------
    def kill(self, node_id: int) -> float:
        """SIGKILL node ``node_id``; return when."""
        at = time.time()
        broker.kill_node(self.state_dir, node_id)
        return at

    def start_node(self, node_id: int, down_since: float, kind: str = "node_crash") -> dict[str, Any]:
        """Start a killed node again on its data and wait until it is an unfenced broker."""
        broker.start_node(self.state_dir, node_id)
        record = {"kind": kind, "node": node_id, "at": down_since, "broker_back_s": round(time.time() - down_since, 3)}
        self.restarts.append(record)
        return record

    def alive(self) -> list[int]:
        return [n for n in range(1, self.count + 1) if broker.node_alive(self.state_dir, n)]

    def leader(self, topic: str, partition: int) -> int | None:
        """The node leading ``topic``/``partition`` now (None while there is none)."""
        for described in self._ask(lambda admin: admin.describe_topics([topic])):
            for p in described.get("partitions") or []:
                if p["partition_index"] == partition:
                    leader = p.get("leader_id")
                    return None if leader is None or leader < 0 else int(leader)
        return None

    def active_controller(self) -> int:
        """The KRaft quorum's leader: the node whose controller is active."""
        quorum = self._ask(lambda admin: admin.describe_metadata_quorum())
        return int(quorum["topics"][0]["partitions"][0]["leader_id"])

    def _ask(self, question: Callable[[Any], Any], timeout: float = 60.0) -> Any:
        """An admin request to the nodes that run now, retried while the cluster settles (a
        node just killed can still be picked before its connection fails)."""
        from pipeline.kafka.client import kafka_errors

        from pipeline.kafka.kafka_io import make_admin

        assert self.info is not None, "cluster not started"
        deadline = time.monotonic() + timeout
        while True:
            alive = [n.address for n in self.info.nodes if n.node_id in self.alive()]
            try:
                admin = make_admin(Settings.from_env(bootstrap_servers=",".join(alive)), request_timeout_ms=10_000)
                try:
                    return question(admin)
                finally:
                    admin.close()
            except (kafka_errors.KafkaError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
