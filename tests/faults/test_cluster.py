"""The cluster fault suite's short form (CI): exactly-once on three brokers while they and the workers fail.

A three-node Apache Kafka cluster (replication factor 3, ``min.insync.replicas=2``), every broker
and worker on a test host of its own (network namespaces), Toxiproxy in front of the brokers for
the scorer; real ``deeper featurizer``/``deeper scorer`` processes, the Iceberg feature table
(tests/faults/cluster_scenarios.py says what each scenario does). Every scenario must end with
nothing missing, no duplicate row on disk, no duplicate feature or label read ``read_committed``,
and says how long recovery took. The long form: ``scripts/fault-suite.sh --broker kafka-cluster``.

Needs root (test hosts), Java and Go or an installed Toxiproxy; elsewhere the tests skip with the
reason, except where ``DEEPER_REQUIRE_TEST_HOSTS=1`` (CI) makes that a failure. Marked ``cluster``:
``.ci/run`` runs them once, in a phase of their own.
"""

from __future__ import annotations

import os

import pytest

from tests.faults.cluster_scenarios import (SESSION_S, TAKEOVER_BOUND_S, ClusterRig, cluster_plan, controller_kill,
                                            durable_point, featurizer_cut, leader_kills, rig_unavailable,
                                            scorer_links, zombie)
from tests.faults.scenarios import Plan, ScenarioResult, rows_key
from tests.faults.summary import format_summary, summarize

pytestmark = pytest.mark.cluster

N_IMAGES = 48
REQUIRE = "DEEPER_REQUIRE_TEST_HOSTS"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    reason = rig_unavailable()
    if reason:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but the cluster rig cannot run here: {reason}")
        pytest.skip(f"the cluster rig cannot run here: {reason}")
    rig = ClusterRig(tmp_path_factory.mktemp("cluster-rig"))
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def plan(rig, tmp_path, cache_dir) -> Plan:
    return cluster_plan(rig, tmp_path, cache_dir, N_IMAGES)


def _check(result: ScenarioResult, plan: Plan, faults: dict[str, int]) -> None:
    print()
    print(format_summary(summarize([result], result.wall_s, plan.broker.findings())))
    c = result.counts
    assert result.faults == faults
    assert c["images_in"] == N_IMAGES and c["missing"] == 0, result.problems
    assert c[rows_key(c)] == 0 and c["duplicate_features_read_committed"] == 0, result.problems
    assert c["duplicate_labels_read_committed"] == 0 and c["labels_missing"] == 0, result.problems
    assert result.clean, result.problems
    assert result.recovery and all(r.get("first_label_of_a_later_photo_s") is not None
                                   for r in result.recovery if "first_label_of_a_later_photo_s" in r), result.recovery


def test_partition_leaders_killed_mid_transaction(plan):
    """The leader of an images partition, then of a features partition, SIGKILLed right after a
    featurizer batch (its records in the open transaction), each back on its data seconds later."""
    _check(leader_kills(plan, kills=2), plan, {"leader_kill": 2})


def test_active_controller_killed(plan):
    _check(controller_kill(plan, kills=1), plan, {"controller_kill": 1})


def test_featurizer_host_cut_off_and_scale_out(plan):
    """Two featurizers on two hosts share the images topic; one host is cut off for 30 s: the
    other owns all four partitions within the session timeout + TAKEOVER_BOUND_S, and once the
    host is back they share them again."""
    result = featurizer_cut(plan, cut_s=30.0)
    _check(result, plan, {"host_cut": 1})
    (row,) = result.recovery
    assert row["takeover_s"] is not None and row["takeover_s"] <= SESSION_S + TAKEOVER_BOUND_S, row
    assert row["shared_again_s"] is not None, row


def test_zombie_featurizer_is_fenced(plan):
    """Frozen past its session timeout (once inside its transaction timeout, once past it), its
    partitions taken over, then thawed: nothing it wrote survives as a duplicate, on disk or in
    the topics, and it drops its work and rejoins."""
    result = zombie(plan, freezes=((12.0, "batch"), (35.0, durable_point(plan))))
    _check(result, plan, {"zombie_freeze": 2})
    assert all(r["takeover_s"] is not None and r["zombie_dropped_its_work_s"] is not None
               for r in result.recovery), result.recovery


def test_scorer_links_slow_and_reset(plan):
    """200 ms each way on every link of the scorer, connections reset every 10 s, for 30 s (a
    minute in the long form)."""
    result = scorer_links(plan, seconds=30.0, reset_every_s=10.0)
    _check(result, plan, {"links_degraded": 1, "links_reset": 2})
    degraded = result.recovery[-1]
    assert degraded["scorer_batches_during"] > 0 and degraded["labels_during"] > 0, degraded
