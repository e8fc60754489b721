"""``deeper broker start --kafka --nodes 3``: a local Apache Kafka cluster, and a transaction that
outlives the death of its coordinator's node.

One real three-node cluster (three JVMs, KRaft, loopback, free ports) per module. What a platform's
cluster guarantees and the pipeline relies on: every topic and both internal logs replicated
three times with two in sync for a write; no unclean election; and, since kafka-python 3.0.12
would otherwise wait for ever, a transactional producer that finds the new coordinator when the
node of the old one dies (pipeline/kafka/client_fixes.py, ``retry_unready_coordinator``).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from kafka import OffsetAndMetadata
from kafka.admin import ConfigResource, ConfigResourceType

from pipeline.app.broker import apache_kafka, local as broker
from pipeline.kafka import kafka_io
from tests.test_broker import listening_addresses, pid_alive

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(apache_kafka.unavailable_reason() is not None,
                       reason=f"Apache Kafka cannot run here: {apache_kafka.unavailable_reason()}"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[broker.BrokerInfo]:
    state_dir = tmp_path_factory.mktemp("cluster")
    assert broker.main(["--state-dir", str(state_dir), "start", "--kafka", "--nodes", "3",
                        "--port", str(broker.free_port())]) == 0
    info = broker.status(state_dir)
    assert info is not None
    try:
        yield info
    finally:
        broker.stop(state_dir, grace_s=10)


def test_three_nodes_on_loopback_and_status(cluster: broker.BrokerInfo, capsys) -> None:
    assert len(cluster.nodes) == 3 and len(cluster.bootstrap_servers.split(",")) == 3
    state_dir = Path(cluster.state_dir)
    for node in cluster.nodes:
        assert broker.node_alive(state_dir, node.node_id)
        for port in (node.port, node.controller_port):
            assert {a.removeprefix("::ffff:") for a in listening_addresses(port)} == {"127.0.0.1"}
    assert kafka_io.unfenced_brokers(cluster.settings()) == {1, 2, 3}
    capsys.readouterr()
    assert broker.main(["--state-dir", str(state_dir), "status"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == f"KAFKA_BOOTSTRAP_SERVERS={cluster.bootstrap_servers}"
    assert out.err.count("pid ") == 3


def test_topics_and_internal_logs_are_replicated_three_times_two_in_sync(cluster: broker.BrokerInfo) -> None:
    settings, topic = cluster.settings(), f"replicated.{uuid.uuid4().hex[:8]}"
    kafka_io.ensure_topics(settings, {topic: 4})  # replication factor -1: the cluster's default
    producer = kafka_io.make_transactional_producer(settings, f"{topic}.tx")  # creates the transaction log
    producer.begin_transaction()
    producer.send(topic, b"x")
    producer.commit_transaction()
    kafka_io.close_producer(producer)
    admin = kafka_io.make_admin(settings)
    try:
        for described in admin.describe_topics([topic, "__transaction_state"]):
            assert {len(p["replica_nodes"]) for p in described["partitions"]} == {3}, described["name"]
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                         ["min.insync.replicas", "unclean.leader.election.enable"])],
                                         config_filter="all")["topic"][topic]
        assert configs["min.insync.replicas"]["value"] == "2"
        assert configs["unclean.leader.election.enable"]["value"] == "false"
    finally:
        admin.close()
    properties = (broker.node_dir(Path(cluster.state_dir), 1) / "server.properties").read_text()
    for line in ("offsets.topic.replication.factor=3", "transaction.state.log.replication.factor=3",
                 "transaction.state.log.min.isr=2", "default.replication.factor=3"):
        assert line in properties.splitlines()


def test_a_transaction_survives_its_group_coordinator_node(cluster: broker.BrokerInfo) -> None:
    """Checkpoints as the workers make them (records + offsets, one transaction each); the node
    coordinating the consumer group is SIGKILLed inside the third: adding its offsets and
    committing complete once the coordinator has moved (the node's session, 6 s, plus an
    election). kafka-python 3.0.12 alone dropped the request and waited for ever."""
    settings, tag = cluster.settings(), uuid.uuid4().hex[:8]
    source, target, group = f"src.{tag}", f"dst.{tag}", f"group.{tag}"
    kafka_io.ensure_topics(settings, {source: 2, target: 2})
    producer = kafka_io.make_producer(settings)
    for i in range(60):
        producer.send(source, f"v{i}".encode(), key=f"k{i}".encode())
    assert kafka_io.close_producer(producer)
    consumer = kafka_io.make_consumer(settings, group, [source], max_poll_records=10)
    transactional = kafka_io.make_transactional_producer(settings, f"tx.{tag}")
    state_dir = Path(cluster.state_dir)
    victim = killed = None
    try:
        for round_ in range(3):
            records: dict = {}
            deadline = time.monotonic() + 60
            while not records and time.monotonic() < deadline:
                records = consumer.poll(timeout_ms=500, max_records=10)
            assert records, "nothing consumed"
            transactional.begin_transaction()
            for part in records.values():
                for r in part:
                    transactional.send(target, r.value, key=r.key)
            if round_ == 2:
                admin = kafka_io.make_admin(settings)
                try:
                    victim = admin._manager.run(admin._find_coordinator_id, group)  # no public call for it
                finally:
                    admin.close()
                broker.kill_node(state_dir, victim)
                killed = time.monotonic()
            offsets = {tp: OffsetAndMetadata(part[-1].offset + 1, "", -1) for tp, part in records.items()}
            manager = transactional._transaction_manager  # what consumers/checkpoint.py calls, with a timeout
            added = manager.send_offsets_to_transaction(offsets, consumer.group_metadata())
            transactional._sender.wakeup()
            assert added.wait(timeout_ms=45_000), f"round {round_}: adding the offsets never completed"
            committed = manager.begin_commit()
            transactional._sender.wakeup()
            assert committed.wait(timeout_ms=45_000) and committed.succeeded, f"round {round_}: no commit"
        print(f"transaction committed {time.monotonic() - killed:.1f} s after node {victim} was killed")
        tp, last = next(iter(offsets.items()))
        assert consumer.committed(tp) == last.offset
    finally:
        kafka_io.close_producer(transactional, timeout=5)
        consumer.close(autocommit=False)
        if victim is not None:
            broker.start_node(state_dir, victim)
    assert pid_alive(broker.node_pid(state_dir, victim) or -1)


def test_nodes_need_kafka_and_three_or_more(tmp_path: Path, capsys) -> None:
    assert broker.main(["--state-dir", str(tmp_path / "a"), "start", "--nodes", "3"]) == 1
    assert "--kafka" in capsys.readouterr().err
    assert broker.main(["--state-dir", str(tmp_path / "b"), "start", "--kafka", "--nodes", "2"]) == 1
    assert "at least 3 nodes" in capsys.readouterr().err


def test_stop_ends_every_node(tmp_path: Path) -> None:
    """Its own cluster (the module's must stay up): start, kill one node, stop ends the rest."""
    state_dir = tmp_path / "cluster"
    info = broker.start(state_dir, port=broker.free_port(), kind="kafka", nodes=3)
    pids = [broker.node_pid(state_dir, n.node_id) for n in info.nodes]
    assert all(pids)
    assert broker.kill_node(state_dir, 2) and not broker.node_alive(state_dir, 2)
    assert broker.status(state_dir) is not None  # degraded, still running
    started = time.monotonic()
    assert broker.stop(state_dir, grace_s=15) is True
    assert time.monotonic() - started < 30
    assert not any(pid_alive(pid) for pid in pids)
    assert broker.status(state_dir) is None
    assert not kafka_io.broker_answers(info.settings(), timeout_s=0.5)
