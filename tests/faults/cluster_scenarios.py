"""Fault scenarios on a three-node Apache Kafka cluster whose brokers and workers are test hosts.

The rig (:class:`ClusterRig`): a private network of test hosts (:mod:`devrig.hosts`),
Toxiproxy on the rig's own address (:mod:`devrig.toxiproxy`) and a
:class:`~devrig.cluster.RigCluster`: three KRaft nodes, each on its own host,
replication factor 3, ``min.insync.replicas=2``. Featurizers and the scorer run on hosts of
their own. Every scenario streams distinct photos through both stages (exactly-once) while the
fault happens, drains, and reads everything back like :mod:`tests.faults.scenarios`:
``missing``, ``duplicate_rows_on_disk``, ``duplicate_labels_read_committed`` (and duplicate
feature records) must all be 0. Recovery is measured from each fault (or its end: heal,
thaw) to each worker's first batch and to the first label downstream of a photo sent after it.

* **leader_kills**: right after a featurizer batch (its records sent in the open transaction),
  the leader of an images partition, then of a features partition, ... is SIGKILLed; it comes
  back on its data a few seconds later.
* **controller_kill**: the active KRaft controller is SIGKILLed, then started again.
* **featurizer_cut**: two featurizers on two hosts; one host is cut off for 30 s, then healed.
  The other must own every images partition within the session timeout plus
  :data:`TAKEOVER_BOUND_S`, and they share them again after healing (scale-out across hosts).
* **zombie**: two featurizers; one is frozen (SIGSTOP) past its session timeout, its
  partitions are taken over, then it runs on (SIGCONT). One freeze ends inside its transaction
  timeout (its transaction still open: the commit must be refused by its group generation),
  one after it (the coordinator aborted it: the producer is fenced). Nothing it wrote may
  survive: no duplicate row, no part file under a final name, no record read_committed.
* **scorer_links**: the scorer reaches the brokers only through Toxiproxy; for a minute every
  link gets 200 ms of latency each way and, every few seconds, its connections reset.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from devrig import Feeder, LabelCollector, StreamRun, WorkerProcess, synthetic_photos
from devrig.cluster import RigCluster
from devrig.hosts import RigHost, RigNetwork
from devrig.stream import FEATURIZER_ARGS
from devrig.toxiproxy import Toxiproxy
from pipeline.app.broker import local as broker
from pipeline.kafka.kafka_io import CONSUMER_DEFAULTS
from tests.faults.scenarios import Plan, ScenarioResult, _finish

#: Beyond the session timeout, how long a surviving featurizer may take to own a lost member's
#: partitions: its next heartbeat (2 s) learns of the rebalance, its loop joins at its next poll
#: (after the batch in hand: a few seconds on a busy 2-core machine), join and sync take ~1 s.
TAKEOVER_BOUND_S = 12.0
SESSION_S = CONSUMER_DEFAULTS["session_timeout_ms"] / 1000


def rig_unavailable() -> str | None:
    """None if the cluster rig can run here (root for test hosts, Java for Kafka, Go or an
    installed Toxiproxy), else why not."""
    from devrig import hosts, toxiproxy

    return hosts.unavailable_reason() or broker.unavailable_reason("kafka") or toxiproxy.unavailable_reason()


class ClusterRig:
    """The network, Toxiproxy and the cluster; worker hosts ``feat0``, ``feat1``, ``scorer``."""

    def __init__(self, workdir: Path):
        self.network = RigNetwork()
        self.proxy: Toxiproxy | None = None
        self.cluster: RigCluster | None = None
        try:
            self.proxy = Toxiproxy(Path(workdir) / "toxiproxy.log", broker.free_port())
            self.cluster = RigCluster(Path(workdir) / "cluster", self.network, proxy=self.proxy).start()
            self.hosts = {name: self.network.add_host(name) for name in ("feat0", "feat1", "scorer")}
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the cluster and the proxy, then remove every host (also after a failure)."""
        try:
            if self.cluster is not None:
                self.cluster.stop()
        finally:
            if self.proxy is not None:
                self.proxy.close()
            self.network.close()


def _run(plan: Plan, name: str, featurizers: int = 1, proxied_scorer: bool = False) -> tuple[StreamRun, list[RigHost]]:
    cluster: RigCluster = plan.broker
    hosts = [plan.hosts[f"feat{i}"] for i in range(featurizers)]
    run = StreamRun(cluster.bootstrap_servers, plan.workdir / name, plan.cache_dir, name, plan.guarantee,
                    sink=plan.sink, featurizer_args=(*FEATURIZER_ARGS, "--model-threads", "1"), featurizer_hosts=[h.launcher for h in hosts], scorer_host=plan.hosts["scorer"].launcher,
                    scorer_bootstrap=cluster.proxied_bootstrap_servers if proxied_scorer else None)
    return run, hosts


def _start(plan: Plan, run: StreamRun, photos, feeder: Feeder) -> LabelCollector:
    """Featurizers up, a classifier trained on the first photos' rows, the scorer labelling."""
    for featurizer in run.featurizers:
        featurizer.start()
    for featurizer in run.featurizers:  # several TensorFlow starts on a busy machine: no stall watch yet
        featurizer.wait_for("featurizer started", timeout=300)
    feeder.start()
    feeder.release(plan.n_train)
    version = run.train_from_stream(photos[:plan.n_train])
    plan.log(f"  classifier {version} trained from the stream's Parquet")
    run.scorer.start()
    run.scorer.wait_for("batch", timeout=180)
    return LabelCollector(run.settings)


def _first_after(worker: WorkerProcess, event: str, at: float, timeout: float = 0.0) -> float | None:
    """Seconds from ``at`` to ``worker``'s first ``event`` after it (any incarnation), waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = [t for inc in worker.incarnations if (t := inc.first(event, after=at)) is not None]
        if found:
            return round(min(found) - at, 2)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _recovery(fault: str, at: float, run: StreamRun, feeder: Feeder, labels: LabelCollector,
              timeout: float = 90.0, **extra: Any) -> dict[str, Any]:
    """Each worker's first batch after ``at``, and the first label of a photo acknowledged after it."""
    row: dict[str, Any] = {"fault": fault, **extra}
    for worker in run.workers:
        row[f"{worker.name}_first_batch_s"] = _first_after(worker, "batch", at, timeout)
    deadline = time.monotonic() + timeout
    first = None
    while first is None and time.monotonic() < deadline:
        fresh = [labels.received[i] for i, acked in list(feeder.acked.items()) if acked >= at and i in labels.received]
        first = round(min(fresh) - at, 2) if fresh else None
        if first is None:
            time.sleep(0.25)
    row["first_label_of_a_later_photo_s"] = first
    return row


def _owners(run: StreamRun, since: float) -> dict[str, int]:
    """Images partitions each featurizer holds, from its last ``partitions assigned`` after ``since``."""
    out = {}
    for worker in run.featurizers:
        events = [e for inc in worker.incarnations for e in inc.log.named("partitions assigned", since)]
        out[worker.name] = len(events[-1].get("partitions") or []) if events else -1
    return out


def _wait_owners(run: StreamRun, since: float, wanted: Callable[[dict[str, int]], bool], timeout: float
                 ) -> float | None:
    """Seconds from ``since`` until the featurizers' latest assignments satisfy ``wanted`` (None: not in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wanted(_owners(run, since)):
            return round(time.time() - since, 2)
        time.sleep(0.2)
    return None


def _scenario(plan: Plan, name: str, body: Callable[[StreamRun, Feeder, LabelCollector, list], dict[str, int]],
              flow_s: float, featurizers: int = 1, proxied_scorer: bool = False, seed: int = 0) -> ScenarioResult:
    """Run ``body`` (the faults; returns what was injected) on a fresh stream while the photos
    trickle in over ``flow_s`` seconds, then drain and count."""
    started = time.monotonic()
    run, _ = _run(plan, name, featurizers, proxied_scorer)
    photos = synthetic_photos(plan.n_images, seed=plan.seed + seed, prefix=name)
    feeder = Feeder(run.settings, photos, rate=plan.rate)
    labels = trickle = None
    try:
        labels = _start(plan, run, photos, feeder)
        recovery: list[dict[str, Any]] = []
        trickle = _Trickle(plan, feeder, flow_s)
        faults = body(run, feeder, labels, recovery)
        trickle.stop()
        ids = {p.image_id for p in photos}
        result = _finish(plan, name, run, feeder, ids, run.workers, True, faults, recovery, started,
                         {"staged_files_left": _staged_files(run)})
        for w in run.workers:
            if w.unexpected_exits:
                result.problems.append(f"the {w.name} exited on its own {len(w.unexpected_exits)} time(s)")
        return result
    finally:
        for thread in (trickle, labels):
            if thread is not None:
                thread.stop()
        run.close()


def _staged_files(run: StreamRun) -> int:
    from pipeline.storage.parquet_sink import STAGED_PREFIX

    return sum(1 for _ in run.features_root.rglob(f"{STAGED_PREFIX}*")) if run.features_root.exists() else 0


class _Trickle(threading.Thread):
    """Lets the photos after the training ones out evenly over ``seconds`` (the fault phase), so
    photos keep arriving before, during and after every fault."""

    def __init__(self, plan: Plan, feeder: Feeder, seconds: float):
        super().__init__(daemon=True, name="trickle")
        self.plan, self.feeder, self.seconds = plan, feeder, seconds
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        began, rest = time.monotonic(), self.plan.n_images - self.plan.n_train
        while not self._halt.wait(0.25):
            share = min(1.0, (time.monotonic() - began) / self.seconds)
            self.feeder.release(self.plan.n_train + int(rest * share))
            if share >= 1.0:
                return

    def stop(self) -> None:
        self._halt.set()


# --------------------------------------------------------------------------- broker faults


def leader_kills(plan: Plan, kills: int = 3, down_s: float = 5.0) -> ScenarioResult:
    cluster: RigCluster = plan.broker

    def body(run: StreamRun, feeder: Feeder, labels: LabelCollector, recovery: list) -> dict[str, int]:
        for k in range(kills):
            topic = run.settings.images_topic if k % 2 == 0 else run.settings.features_topic
            partition = k % 4
            inc = run.featurizer.current
            inc.wait_count("batch", inc.count("batch") + 1, 60)  # its records are in the open transaction now
            victim = cluster.leader(topic, partition)
            if victim is None:
                plan.log(f"  no leader for {topic}/{partition}; skipping")
                continue
            at = cluster.kill(victim)
            plan.log(f"  kill {k + 1}/{kills}: node {victim}, leader of {topic.rsplit('.', 1)[-1]}/{partition}")
            time.sleep(down_s)
            back = cluster.start_node(victim, at, "leader_kill")
            recovery.append(_recovery("leader_kill", at, run, feeder, labels, node=victim, partition=partition,
                                      topic=topic.rsplit(".", 1)[-1], node_back_s=back["broker_back_s"]))
            plan.log(f"    {recovery[-1]}")
        return {"leader_kill": len(recovery)}

    return _scenario(plan, "leader_kills", body, flow_s=kills * 25.0, seed=11)


def controller_kill(plan: Plan, kills: int = 1, down_s: float = 5.0) -> ScenarioResult:
    cluster: RigCluster = plan.broker

    def body(run: StreamRun, feeder: Feeder, labels: LabelCollector, recovery: list) -> dict[str, int]:
        for k in range(kills):
            inc = run.featurizer.current
            inc.wait_count("batch", inc.count("batch") + 1, 60)
            victim = cluster.active_controller()
            at = cluster.kill(victim)
            plan.log(f"  active controller node {victim} killed")
            time.sleep(down_s)
            new = cluster.active_controller()
            back = cluster.start_node(victim, at, "controller_kill")
            recovery.append(_recovery("controller_kill", at, run, feeder, labels, node=victim, new_controller=new,
                                      node_back_s=back["broker_back_s"]))
            plan.log(f"    {recovery[-1]}")
        return {"controller_kill": len(recovery)}

    return _scenario(plan, "controller_kill", body, flow_s=kills * 25.0, seed=12)


# --------------------------------------------------------------------------- worker faults


def featurizer_cut(plan: Plan, cut_s: float = 30.0) -> ScenarioResult:
    """Two featurizers; the first one's host is cut off for ``cut_s``, then healed."""
    network: RigNetwork = plan.broker.network

    def body(run: StreamRun, feeder: Feeder, labels: LabelCollector, recovery: list) -> dict[str, int]:
        shared = _wait_owners(run, 0, lambda o: all(n > 0 for n in o.values()), 120) is not None
        plan.log(f"  both featurizers own partitions: {shared} ({_owners(run, 0)})")
        cut, other = run.featurizers
        inc = cut.current
        inc.wait_count("batch", inc.count("batch") + 1, 60)
        host = plan.hosts["feat0"]
        at = time.time()
        network.cut(host)
        takeover = _wait_owners(run, at, lambda o: o[other.name] == 4, cut_s)
        plan.log(f"  {host.name} cut off; {other.name} owns all 4 partitions after {takeover} s")
        time.sleep(max(0.0, at + cut_s - time.time()))
        healed = time.time()
        network.heal(host)
        again = _wait_owners(run, healed, lambda o: all(n > 0 for n in o.values()), 120)
        plan.log(f"  healed; shared again after {again} s: {_owners(run, healed)}")
        row = _recovery("host_cut", healed, run, feeder, labels, cut_seconds=cut_s, takeover_s=takeover,
                        takeover_bound=SESSION_S + TAKEOVER_BOUND_S, shared_again_s=again)
        recovery.append(row)
        if takeover is None or takeover > SESSION_S + TAKEOVER_BOUND_S:
            row["problem"] = f"takeover took {takeover} s (bound {SESSION_S + TAKEOVER_BOUND_S} s)"
        if again is None:
            row["problem"] = "the healed featurizer never got partitions back"
        return {"host_cut": 1}

    result = _scenario(plan, "featurizer_cut", body, flow_s=cut_s + 40.0, featurizers=2, seed=13)
    result.problems += [r["problem"] for r in result.recovery if r.get("problem")]
    return result


def zombie(plan: Plan, freezes: tuple[tuple[float, str], ...] | None = None) -> ScenarioResult:
    """Two featurizers; one at a time is frozen past its session timeout, taken over, thawed.

    Each freeze lands right after ``aim`` in the victim's log: ``batch`` (feature records sent
    in its open transaction), then the sink's durable point before the Kafka commit: ``table
    commit`` (its rows in the table, ahead of Kafka) or ``parquet part written`` (a part file
    staged, not committed). Default: 15 s after a batch, then 40 s after the durable point.
    """
    if freezes is None:
        freezes = ((15.0, "batch"), (40.0, durable_point(plan)))

    def body(run: StreamRun, feeder: Feeder, labels: LabelCollector, recovery: list) -> dict[str, int]:
        for k, (freeze_s, aim) in enumerate(freezes):
            _wait_owners(run, 0, lambda o: all(n > 0 for n in o.values()), 120)
            victim, other = run.featurizers[k % 2], run.featurizers[(k + 1) % 2]
            inc = victim.current
            if not inc.wait_count(aim, inc.count(aim) + 1, 60):
                plan.log(f"  no {aim!r} from {victim.name} within 60 s; freezing anyway")
            at = victim.freeze()
            takeover = _wait_owners(run, at, lambda o: o[other.name] == 4, freeze_s)
            plan.log(f"  {victim.name} frozen after {aim!r}; {other.name} owns all 4 after {takeover} s")
            time.sleep(max(0.0, at + freeze_s - time.time()))
            thawed = victim.thaw()
            again = _wait_owners(run, thawed, lambda o: all(n > 0 for n in o.values()), 120)
            dropped = _first_after(victim, "partitions lost; their uncommitted work is redone by their next owner",
                                   thawed, 30)
            recovery.append(_recovery("zombie", thawed, run, feeder, labels, frozen_seconds=freeze_s, aimed_after=aim,
                                      takeover_s=takeover, zombie_dropped_its_work_s=dropped, shared_again_s=again))
            plan.log(f"    thawed; {recovery[-1]}")
        return {"zombie_freeze": len(recovery)}

    return _scenario(plan, "zombie", body, flow_s=sum(f for f, _ in freezes) + 30.0 * len(freezes),
                     featurizers=2, seed=14)


def scorer_links(plan: Plan, seconds: float = 60.0, latency_ms: int = 200, reset_every_s: float = 10.0
                 ) -> ScenarioResult:
    """The scorer's links to every broker: ``latency_ms`` each way, and resets every ``reset_every_s``."""
    proxy: Toxiproxy = plan.broker.proxy
    names = [f"kafka{n}" for n in range(1, plan.broker.count + 1)]

    def body(run: StreamRun, feeder: Feeder, labels: LabelCollector, recovery: list) -> dict[str, int]:
        resets = 0
        at = time.time()
        for name in names:
            for stream in ("upstream", "downstream"):
                proxy.add_toxic(name, f"latency-{stream}", "latency", stream, latency=latency_ms,
                                jitter=latency_ms // 10)
        try:
            while time.time() - at + reset_every_s < seconds:
                time.sleep(reset_every_s)
                reset = time.time()
                for name in names:
                    proxy.add_toxic(name, "reset", "reset_peer", "downstream", timeout=0)
                time.sleep(1.0)
                for name in names:
                    proxy.remove_toxic(name, "reset")
                resets += 1
                recovery.append({"fault": "links_reset", "scorer_first_batch_s":
                                 _first_after(run.scorer, "batch", reset, reset_every_s)})
            time.sleep(max(0.0, at + seconds - time.time()))
        finally:
            for name in names:
                for stream in ("upstream", "downstream"):
                    proxy.remove_toxic(name, f"latency-{stream}")
        healed = time.time()
        during = [e for inc in run.scorer.incarnations for e in inc.log.named("batch", at) if e["_t"] < healed]
        recovery.append({"fault": "links_degraded", "seconds": seconds, "latency_ms": latency_ms, "resets": resets,
                         "scorer_batches_during": len(during),
                         "labels_during": sum(1 for t in list(labels.received.values()) if at <= t < healed)})
        return {"links_degraded": 1, "links_reset": resets}

    return _scenario(plan, "scorer_links", body, flow_s=seconds + 10.0, proxied_scorer=True, seed=15)


CLUSTER_SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "leader_kills": leader_kills,
    "controller_kill": controller_kill,
    "featurizer_cut": featurizer_cut,
    "zombie": zombie,
    "scorer_links": scorer_links,
}


def durable_point(plan: Plan) -> str:
    """The log line a featurizer writes when its checkpoint's rows are durable, before the Kafka commit."""
    return "table commit" if plan.sink == "table" else "parquet part written"


def cluster_plan(rig: ClusterRig, workdir: Path, cache_dir: Path, n_images: int, seed: int = 7,
                 log: Callable[[str], None] = print) -> Plan:
    """A :class:`Plan` whose broker is the rig's cluster (exactly-once expected) and whose hosts
    are the rig's worker hosts."""
    return Plan(rig.cluster, workdir, cache_dir, "exactly-once", n_images, seed, rate=5.0, log=log, hosts=rig.hosts)

