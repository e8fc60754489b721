"""The stream's invariant, checked after stream tests: every offset ends in exactly one outcome.

For the images topic every record offset must end as a stored row *and* a feature record
(both carrying that offset as their origin), or as a dead letter naming that offset, never
both, never neither. Rows are read where the stream's sink put them (``DEEPER_SINK``): the
current snapshot of the feature table, or every Parquet part on disk. For the features topic every offset must end as a label record or a
dead letter. Each consumer group must have committed the end of each partition (nothing left
behind), and outputs are read ``read_committed`` (what downstream sees).

``exactly_once=True`` also requires that no outcome appears twice (no duplicate rows on disk,
no duplicate records); at-least-once allows repeats of the *same* outcome.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from kafka import TopicPartition

from pipeline import storage
from pipeline.config import Settings
from pipeline.kafka.kafka_io import make_consumer
from pipeline.kafka.topic_reader import open_topic_reader
from schemas.messages import decode_features, decode_label, record_header

Offset = tuple[str, int, int]


@dataclass
class Outcomes:
    """What each input offset of one stage became."""

    offsets: set[Offset] = field(default_factory=set)
    processed: Counter = field(default_factory=Counter)  # offset -> output records
    rows: Counter = field(default_factory=Counter)  # offset -> stored rows (featurizer only)
    dead: Counter = field(default_factory=Counter)  # offset -> dead letters
    reasons: dict[Offset, str] = field(default_factory=dict)

    def problems(self, exactly_once: bool, with_rows: bool) -> list[str]:
        out = []
        for o in sorted(self.offsets):
            done, rows, dead = self.processed[o], self.rows[o], self.dead[o]
            if done and dead:
                out.append(f"{o}: both processed and dead-lettered ({self.reasons.get(o)})")
            elif not done and not dead:
                out.append(f"{o}: no outcome" + (" (a row but no record)" if rows else ""))
            elif done and with_rows and not rows:
                out.append(f"{o}: a record but no stored row")
            elif exactly_once and (done > 1 or dead > 1 or rows > 1):
                out.append(f"{o}: repeated (records {done}, rows {rows}, dead letters {dead})")
        return out


def read_all(settings: Settings, topic: str) -> list[Any]:
    """Every committed record of ``topic`` (read_committed), up to its end offsets now."""
    consumer = open_topic_reader(settings, topic)
    if consumer is None:
        return []
    try:
        partitions = sorted(consumer.assignment())
        end = consumer.end_offsets(partitions)
        records: list[Any] = []
        idle = 0
        while idle < 20 and any(consumer.position(tp) < end[tp] for tp in partitions):
            try:
                batch = consumer.poll(timeout_ms=500)
            except Exception:  # noqa: BLE001 - a record this client can't parse: count it, step over it
                records.append(_step_over_unreadable(consumer, partitions))
                continue
            idle = 0 if batch else idle + 1
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        consumer.close()


def _step_over_unreadable(consumer: Any, partitions: list[TopicPartition]) -> Any:
    """The unreadable record's place (as an :class:`Unreadable`), stepped over like the worker does."""
    from consumers.outputs import Unreadable
    from pipeline.kafka.internals import unreadable_place

    place = unreadable_place(consumer)
    assert place is not None, "poll failed and kafka-python says nothing of where"
    tp, offset = place
    consumer.seek(tp, offset + 1)
    return Unreadable(tp.topic, tp.partition, offset)


def _dead_letters(settings: Settings, stage_topic: str) -> tuple[Counter, dict[Offset, str]]:
    dead: Counter = Counter()
    reasons = {}
    for d in read_all(settings, settings.dead_letter_topic):
        if record_header(d, "dlq-source-topic") != stage_topic:
            continue
        o = (stage_topic, int(record_header(d, "dlq-source-partition")), int(record_header(d, "dlq-source-offset")))
        dead[o] += 1
        reasons[o] = record_header(d, "dlq-reason") or ""
    return dead, reasons


def _origin(text: str) -> Offset:
    topic, partition, offset = text.rsplit("/", 2)
    return topic, int(partition), int(offset)


def featurizer_outcomes(settings: Settings) -> Outcomes:
    out = Outcomes()
    out.offsets = {(r.topic, r.partition, r.offset) for r in read_all(settings, settings.images_topic)}
    for r in read_all(settings, settings.features_topic):
        record = decode_features(r.key, r.value, r.headers)
        out.processed[_origin(record.extra["origin"])] += 1
    out.rows = stored_rows(settings)
    out.dead, out.reasons = _dead_letters(settings, settings.images_topic)
    return out


def stored_rows(settings: Settings) -> Counter:
    """(topic, partition, offset) -> rows the sink stored: in the table's current snapshot, or raw
    in every Parquet part (no de-duplication either way)."""
    rows: Counter = Counter()
    if settings.sink_kind == "table":
        from devrig.readback import table_on_disk

        rows.update(tuple(p) for p in table_on_disk(settings)["positions"])
        return rows
    try:
        files = storage.list_parquet(settings.features_location())
    except storage.StorageError:
        files = []
    for location in files:
        table = pq.read_table(storage.open_input(location), columns=["kafka_topic", "kafka_partition", "kafka_offset"])
        rows.update(zip(*(table.column(c).to_pylist() for c in table.column_names)))
    return rows


def scorer_outcomes(settings: Settings) -> Outcomes:
    out = Outcomes()
    out.offsets = {(r.topic, r.partition, r.offset) for r in read_all(settings, settings.features_topic)}
    for r in read_all(settings, settings.labels_topic):
        label = decode_label(r.value)
        out.processed[_origin(label.origin)] += 1
    out.dead, out.reasons = _dead_letters(settings, settings.features_topic)
    return out


def uncommitted(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """Partition -> records of ``topic`` the group has not committed past (should be none)."""
    consumer = make_consumer(settings, group, [])  # asks the group's committed offsets; never joins it
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        end = consumer.end_offsets(partitions)
        committed = {tp: consumer.committed(tp) or 0 for tp in partitions}
        return {tp.partition: end[tp] - committed[tp] for tp in partitions
                if end[tp] > committed[tp] and _has_data_beyond(consumer, tp, committed[tp])}
    finally:
        consumer.close(autocommit=False)


def _has_data_beyond(consumer: Any, tp: TopicPartition, offset: int) -> bool:
    """Transaction markers sit after the last record: an end offset past the commit may hold none."""
    consumer.assign([tp])
    consumer.seek(tp, offset)
    for _ in range(4):
        if consumer.poll(timeout_ms=500).get(tp):
            return True
    return False


def assert_stream_invariant(settings: Settings, exactly_once: bool | None = None, scorer: bool = True) -> dict:
    """Fail with every broken offset listed; return counts for the test to report."""
    exactly_once = settings.exactly_once if exactly_once is None else exactly_once
    features = featurizer_outcomes(settings)
    problems = features.problems(exactly_once, with_rows=True)
    problems += [f"featurizer group left {n} records on {settings.images_topic}/{p}"
                 for p, n in uncommitted(settings, settings.featurizer_group, settings.images_topic).items()]
    summary = {"images": len(features.offsets), "rows": sum(features.rows.values()),
               "dead_letters": sum(features.dead.values()),
               "reasons": dict(Counter(features.reasons.values()))}
    if scorer:
        labels = scorer_outcomes(settings)
        problems += labels.problems(exactly_once, with_rows=False)
        problems += [f"scorer group left {n} records on {settings.features_topic}/{p}"
                     for p, n in uncommitted(settings, settings.scorer_group, settings.features_topic).items()]
        summary.update(features=len(labels.offsets), labels=sum(labels.processed.values()),
                       scorer_dead_letters=sum(labels.dead.values()))
    assert not problems, "stream invariant broken:\n" + "\n".join(problems[:50]) + \
        f"\n({len(problems)} problems; {json.dumps(summary)})"
    return summary


def _committed(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """Partition -> the group's committed offset (partitions it never committed are left out)."""
    consumer = make_consumer(settings, group, [])
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        return {tp.partition: c for tp in partitions if (c := consumer.committed(tp)) is not None}
    finally:
        consumer.close(autocommit=False)


def assert_committed_work_accounted(settings: Settings) -> None:
    """The invariant for any moment, even mid-test: below each committed offset, every record of
    the images and the features topic has exactly one outcome (at least one, and never both a
    row and a dead letter, at-least-once). Records past the commit may be anywhere."""
    exactly_once = settings.exactly_once
    problems = []
    for group, topic, outcomes, with_rows in (
            (settings.featurizer_group, settings.images_topic, featurizer_outcomes, True),
            (settings.scorer_group, settings.features_topic, scorer_outcomes, False)):
        committed = _committed(settings, group, topic)
        if not committed:
            continue
        found = outcomes(settings)
        found.offsets = {o for o in found.offsets if o[2] < committed.get(o[1], 0)}
        problems += found.problems(exactly_once, with_rows=with_rows)
    assert not problems, "committed work without exactly one outcome:\n" + "\n".join(problems[:30])


def by_reason(outcomes: Outcomes) -> dict[str, list[Offset]]:
    grouped: dict[str, list[Offset]] = defaultdict(list)
    for o, reason in outcomes.reasons.items():
        grouped[reason].append(o)
    return dict(grouped)
