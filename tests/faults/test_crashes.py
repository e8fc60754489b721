"""The fault suite's short form (run in CI): SIGKILLed consumers and broker kill-and-restarts.

Everything is real: a private broker of the session's kind (``DEEPER_TEST_BROKER``: Apache
Kafka, or a durable Tansu), ``deeper featurizer``/``deeper scorer`` subprocesses with
EfficientNet-Lite0, Parquet part files and kafka-python clients (:mod:`devrig`).
Each scenario streams ``N_IMAGES`` distinct synthetic photos and reads everything back.

What is expected depends on the broker: on Apache Kafka the stream runs exactly-once and must
show no missing id, no duplicate row and no duplicate label read ``read_committed``; on Tansu
(transactions only partly honoured) it runs at-least-once, where duplicate records are allowed
and counted but nothing may be missing, and the feature table still holds each row once. The
featurizer kills run with the Parquet sink (its ``duplicate_rows_on_disk``), the scorer and
broker scenarios with the feature table (the default). The table's own scenarios are in
``test_table_faults.py``; the long form is ``scripts/fault-suite.sh``.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from devrig import RigBroker, broker_unavailable, read_records
from tests.broker_fixture import session_broker_kind
from tests.faults.scenarios import Plan, ScenarioResult, broker_restarts, featurizer_crashes, rows_key, scorer_crashes
from tests.faults.summary import format_summary, summarize

pytestmark = pytest.mark.stream

N_IMAGES = 120


@pytest.fixture(scope="module")
def rig_broker(tmp_path_factory):
    kind = session_broker_kind()
    reason = broker_unavailable(kind)
    if reason:
        pytest.skip(f"fault tests need a restartable {kind} broker: {reason}")
    broker = RigBroker(tmp_path_factory.mktemp("fault-broker"), kind).start()
    yield broker
    broker.stop()


@pytest.fixture
def plan(rig_broker, tmp_path, cache_dir) -> Plan:
    guarantee = "exactly-once" if rig_broker.kind == "kafka" else "at-least-once"
    return Plan(rig_broker, tmp_path, cache_dir, guarantee, N_IMAGES)


def _report(result: ScenarioResult, plan: Plan) -> None:
    print()
    print(format_summary(summarize([result], result.wall_s, plan.broker.findings())))


def _assert_outcomes(result: ScenarioResult, plan: Plan, labels: bool) -> None:
    c = result.counts
    assert c["images_in"] == N_IMAGES
    assert c["missing"] == 0, result.problems
    assert c["rows_unique"] == N_IMAGES and c.get("reader_one_row_per_id", True)
    assert c["rows_raw"] == N_IMAGES + c[rows_key(c)]
    assert c["unexpected_rows"] == 0 and c["dead_letters"] == 0
    assert c.get("temp_files_read", 0) == 0 and c["planted_half_written_file_ignored"]
    assert not c.get("broken_part_files")
    if "duplicate_rows_in_table" in c:  # the table is exactly-once on any broker
        assert c["duplicate_offsets_in_table"] == 0, result.problems
        assert c["duplicate_rows_in_table"] <= c["images_topic_duplicates"], result.problems
    if labels:
        assert c["labels_missing"] == 0 and c["labels_unique"] == N_IMAGES
        assert c["label_keys_match_image_id"]
    if plan.exactly_once_expected:
        repeats = c["images_topic_duplicates"]  # a producer re-send flows through twice, legitimately
        assert c[rows_key(c)] <= repeats, result.problems
        assert c["duplicate_features_read_committed"] <= repeats, result.problems
        if labels:
            assert c["duplicate_labels_read_committed"] <= repeats, result.problems
    assert result.clean, result.problems


def test_featurizer_sigkills_lose_no_image(plan):
    plan.sink = "parquet"
    result = featurizer_crashes(plan, kills=3)
    _report(result, plan)
    assert result.faults == {"featurizer_kill": 3}
    _assert_outcomes(result, plan, labels=False)
    assert result.counts["stale_temp_file_removed_at_start"]
    assert all(r["first_batch_s"] is not None for r in result.recovery), result.recovery
    assert result.workers["featurizer"]["exit_codes"][-1] == 0  # the final run stopped cleanly


def test_scorer_sigkills_lose_no_label(plan):
    result = scorer_crashes(plan, kills=2)
    _report(result, plan)
    assert result.faults == {"scorer_kill": 2}
    _assert_outcomes(result, plan, labels=True)
    assert all(r["first_batch_s"] is not None for r in result.recovery), result.recovery


def test_broker_restarts_lose_nothing(plan):
    """One clean restart (SIGTERM) and one crash (SIGKILL) of Apache Kafka, mid-stream; two clean
    restarts of Tansu, which can lose a record acknowledged across its SIGKILL (docs/faults.md,
    finding 6): a broker that loses acknowledged data defeats any client-side guarantee."""
    crash = plan.broker.kind == "kafka"
    result = broker_restarts(plan, restarts=2, crash_every=2 if crash else 0)
    _report(result, plan)
    assert result.faults == ({"broker_restart": 1, "broker_crash": 1} if crash else {"broker_restart": 2})
    _assert_outcomes(result, plan, labels=True)
    assert result.producer["acknowledged"] == N_IMAGES
    for worker in ("featurizer", "scorer"):
        assert result.workers[worker]["incarnations"] == 1, f"the {worker} had to be restarted"
        assert not result.workers[worker]["unexpected_exits"]
    assert all(r["featurizer_first_batch_s"] is not None for r in result.recovery), result.recovery


def test_worker_replaces_a_fatally_failed_producer(kafka_settings, tmp_path):
    """A producer in kafka-python's fatal state is replaced, so the next checkpoint succeeds.

    Seen for real after broker restarts (Tansu answers the epoch bump with UnknownError); here
    the fatal state is set through kafka-python's own transition so the test is deterministic.
    """
    from kafka.errors import KafkaError

    from consumers.worker import StreamWorker
    from pipeline.kafka.kafka_io import close_producer, ensure_topics

    tag = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(kafka_settings, data_dir=str(tmp_path))
    source, target = f"fatal-{tag}.in", f"fatal-{tag}.out"
    ensure_topics(settings, {source: 1, target: 1})
    settings = dataclasses.replace(settings, guarantee="at-least-once")  # the idempotent producer's fatal state
    worker = StreamWorker(settings, source, f"fatal-{tag}")
    try:
        manager = getattr(worker.ckpt.producer, "_transaction_manager", None)
        if manager is None or not hasattr(manager, "transition_to_fatal_error"):
            pytest.skip("this kafka-python has no transaction manager to put into the fatal state")
        broken = worker.ckpt.producer
        manager.transition_to_fatal_error(KafkaError("injected fatal error"))
        worker.send(target, b"k1", b"v1", [])
        assert worker.checkpoint() is False  # the send failed: nothing committed, rewound
        assert worker.ckpt.producer is not broken, "the fatal producer was kept"
        worker.send(target, b"k2", b"v2", [])
        assert worker.checkpoint() is True
    finally:
        worker.consumer.close(autocommit=False)
        close_producer(worker.ckpt.producer)
    records = read_records(settings, target, lambda rs: any(r.key == b"k2" for r in rs), timeout=30)
    assert [r.key for r in records] == [b"k2"]
