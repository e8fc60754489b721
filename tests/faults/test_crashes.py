"""Prove nothing is lost, part 1 (short form, run in CI): SIGKILLed consumers and broker restarts.

Everything is real: a durable local Tansu broker, ``deeper featurizer``/``deeper scorer`` as
subprocesses with EfficientNet-Lite0 in TensorFlow, Parquet part files, and kafka-python
clients. Each scenario produces 150 distinct synthetic photos and checks that every image id has
exactly one row through ``pipeline.parquet_reader.read_features`` (and a label, where the
scorer runs). Duplicates are allowed and counted: the stream is at-least-once and duplicates are
removed at read (docs/faults.md). The long form is ``python -m tests.faults.long_suite``.

The durable broker's S3 is served by localbucket with the If-Match shim of
:mod:`tests.faults.harness` (localbucket ignores If-Match, which makes Tansu hand out an offset
twice after a restart; see docs/faults.md).
"""

from __future__ import annotations

import pytest

from tests.faults import harness as h

N_IMAGES = 150


@pytest.fixture
def durable():
    reason = h.durable_broker_available()
    if reason:
        pytest.skip(f"fault tests need a durable local broker: {reason}")


def _report(result: h.ScenarioResult) -> None:
    print()
    print(h.format_summary(h.summarize([result], result.wall_s)))


def _assert_nothing_lost(result: h.ScenarioResult, labels: bool) -> None:
    c = result.counts
    assert c["images_in"] == N_IMAGES
    assert c["missing"] == 0, result.problems
    assert c["rows_unique"] == N_IMAGES and c["reader_one_row_per_id"]
    assert c["rows_raw"] == N_IMAGES + c["row_duplicates"]
    assert c["unexpected_rows"] == 0
    assert c["temp_files_read"] == 0 and c["planted_half_written_file_ignored"]
    assert not c["broken_part_files"]
    assert c["dead_letters"] == 0
    if labels:
        assert c["labels_missing"] == 0 and c["labels_unique"] == N_IMAGES
        assert c["label_keys_match_image_id"]
    assert result.clean, result.problems


def test_featurizer_sigkills_lose_no_image(durable, tmp_path, cache_dir):
    result = h.run_scenario("featurizer_crashes", tmp_path, cache_dir, n_images=N_IMAGES, kills=3)
    _report(result)
    assert result.faults == {"featurizer_kill": 3}
    _assert_nothing_lost(result, labels=False)
    assert result.counts["stale_temp_file_removed_at_start"]
    assert all(r["first_batch_s"] is not None for r in result.recovery), result.recovery
    assert result.workers["featurizer"]["exit_codes"][-1] == 0  # the final run stopped cleanly


def test_scorer_sigkills_lose_no_label(durable, tmp_path, cache_dir):
    result = h.run_scenario("scorer_crashes", tmp_path, cache_dir, n_images=N_IMAGES, kills=2)
    _report(result)
    assert result.faults == {"scorer_kill": 2}
    _assert_nothing_lost(result, labels=True)
    assert all(r["first_batch_s"] is not None for r in result.recovery), result.recovery


def test_broker_restarts_lose_nothing(durable, tmp_path, cache_dir):
    """One clean restart (SIGTERM) and one crash (SIGKILL) of the broker, mid-stream."""
    result = h.run_scenario("broker_restarts", tmp_path, cache_dir, n_images=N_IMAGES, restarts=2, crash_every=2)
    _report(result)
    assert result.faults == {"broker_restart": 1, "broker_crash": 1}
    _assert_nothing_lost(result, labels=True)
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
    import dataclasses
    import uuid

    from kafka.errors import KafkaError

    from consumers.worker import StreamWorker
    from pipeline.kafka_io import ensure_topics

    tag = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(kafka_settings, data_dir=str(tmp_path))
    source, target = f"fatal-{tag}.in", f"fatal-{tag}.out"
    ensure_topics(settings, {source: 1, target: 1})
    worker = StreamWorker(settings, source, f"fatal-{tag}")
    try:
        manager = getattr(worker.producer, "_transaction_manager", None)
        if manager is None or not hasattr(manager, "transition_to_fatal_error"):
            pytest.skip("this kafka-python has no transaction manager to put into the fatal state")
        broken = worker.producer
        manager.transition_to_fatal_error(KafkaError("injected fatal error"))
        worker.send(target, b"k1", b"v1", [])
        assert worker.checkpoint() is False  # the send failed: nothing committed, rewound
        assert worker.producer is not broken, "the fatal producer was kept"
        worker.send(target, b"k2", b"v2", [])
        assert worker.checkpoint() is True
    finally:
        worker.consumer.close(autocommit=False)
        from pipeline.kafka_io import close_producer

        close_producer(worker.producer)
    records = h.read_records(settings, target, lambda rs: any(r.key == b"k2" for r in rs), timeout=30)
    assert [r.key for r in records] == [b"k2"]
