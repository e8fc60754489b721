"""The fault scenarios: SIGKILL the featurizer, SIGKILL the scorer, kill and restart the broker
(the table's own scenarios: :mod:`tests.faults.table_scenarios`).

Each runs one :class:`devrig.StreamRun` (fresh topics, groups, data dir, registry)
on a shared :class:`devrig.RigBroker` while a :class:`devrig.Feeder`
streams distinct synthetic photos, then reads everything back (:func:`devrig.count_outcomes`).
Photos are released in shares, one share before each fault, so every fault lands mid-stream.

What must hold (a scenario is "clean" only if all do): nothing missing, no dead letters, every
label keyed by its image id, the final worker runs exit 0; with the table sink (``Plan.sink``,
the default) no duplicate row in the table's current snapshot, whatever the broker; with the
Parquet sink one row per id through the reader, no temp file read, no broken part file; and,
where exactly-once is expected (Apache Kafka with ``DEEPER_GUARANTEE=exactly-once``), no
duplicate row on disk, no duplicate feature or label record read with ``read_committed``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from devrig import Feeder, RigBroker, StreamRun, WorkerProcess, synthetic_photos
from tests.faults.recovery import kill_recoveries, restart_recoveries, workers_report

Log = Callable[[str], None]


@dataclass
class Plan:
    """Where and how: the broker, the guarantee, and the size of the run."""

    broker: RigBroker
    workdir: Path
    cache_dir: Path
    guarantee: str = "exactly-once"
    n_images: int = 150
    seed: int = 7
    rate: float = 40.0
    n_train: int = 16
    log: Log = print
    hosts: dict[str, Any] = field(default_factory=dict)  # test hosts for workers (cluster scenarios)
    sink: str = "table"

    @property
    def exactly_once_expected(self) -> bool:
        """Only Apache Kafka honours transactions fully (Tansu 0.6 shows aborted records)."""
        return self.guarantee == "exactly-once" and self.broker.kind == "kafka"


@dataclass
class ScenarioResult:
    name: str
    guarantee: str
    faults: dict[str, int]
    counts: dict[str, Any]
    recovery: list[dict[str, Any]]
    producer: dict[str, Any]
    workers: dict[str, Any]
    wall_s: float
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "clean": self.clean, "problems": self.problems, "guarantee": self.guarantee,
                "faults": self.faults, "wall_s": round(self.wall_s, 1), **self.counts, "producer": self.producer,
                "workers": self.workers, "recovery": self.recovery}


def rows_key(counts: dict[str, Any]) -> str:
    """The duplicate-rows count of the run's sink."""
    return "duplicate_rows_in_table" if "duplicate_rows_in_table" in counts else "duplicate_rows_on_disk"


def _problems(plan: Plan, counts: dict[str, Any], workers: list[WorkerProcess], labels: bool) -> list[str]:
    on_table = "duplicate_rows_in_table" in counts
    checks = [
        (counts["missing"], f"{counts['missing']} image ids have no stored row"),
        (not counts.get("reader_one_row_per_id", True), "the reader returned more than one row for an image id"),
        (counts["unexpected_rows"], f"{counts['unexpected_rows']} rows for ids that were never produced"),
        (counts.get("temp_files_read") or not counts["planted_half_written_file_ignored"],
         "a half-written file was read"),
        (counts.get("broken_part_files"), f"half-written or unreadable part files: {counts.get('broken_part_files')}"),
        (on_table and (counts.get("duplicate_offsets_in_table")
                       or counts.get("duplicate_rows_in_table", 0) > counts["images_topic_duplicates"]),
         f"the table holds rows twice (exactly-once on any broker): {counts.get('duplicate_rows_in_table')} by "
         f"image id, {counts.get('duplicate_offsets_in_table')} by offset (producer re-sends: "
         f"{counts['images_topic_duplicates']})"),
        (counts.get("stale_temp_file_removed_at_start") is False, "an hour-old .tmp- file was not removed at start"),
        (counts["dead_letters"], f"{counts['dead_letters']} dead letters for valid photos"),
        (counts["stall_restarts"], f"workers stalled (alive, work left, no progress for 60 s) and were restarted: "
                                   f"{counts['stall_restarts']}"),
    ]
    if labels:
        checks += [(counts["labels_missing"], f"{counts['labels_missing']} image ids have no label"),
                   (not counts["label_keys_match_image_id"], "a label record's key is not its image id")]
    if plan.exactly_once_expected:
        for key in (rows_key(counts), "duplicate_features_read_committed", "duplicate_labels_read_committed"):
            if counts.get(key):
                checks.append((True, f"exactly-once broken: {key}={counts[key]} "
                                     f"(images topic duplicates from producer re-sends: {counts['images_topic_duplicates']})"))
    problems = [text for failed, text in checks if failed]
    for w in workers:
        if w.current.returncode != 0:
            problems.append(f"the final {w.role} run exited with {w.current.returncode}:\n{w.current.tail()}")
    return problems


def _kill_loop(plan: Plan, worker: WorkerProcess, feeder: Feeder, kills: int, first: int, aim_at: str,
               rng: random.Random, kill_span: tuple[float, float]) -> list[str]:
    """SIGKILL ``worker`` ``kills`` times, restarting it at once each time; return each kill's moment.

    Before kill k the producer may send ``first + (total - first) * (k + 1) / (kills + 1)``
    photos, so every incarnation has work. Each kill waits until the incarnation has done a
    batch, then alternates: a random delay within ``kill_span`` ("random"), or right after the
    next ``aim_at`` log line: for the featurizer a part file's rename, the window before the
    checkpoint commits that used to make duplicates; for the scorer a batch (labels sent,
    offsets not yet committed).
    """
    moments, total = [], plan.n_images
    for k in range(kills):
        feeder.release(first + (total - first) * (k + 1) // (kills + 1))
        inc = worker.current
        if inc.wait_for("batch", timeout=120, after=inc.started_at) is None and not inc.alive():
            worker.ensure_running()
            continue
        moment = "random"
        if k % 2 == 1 and inc.wait_count(aim_at, inc.count(aim_at) + 1, 30):
            moment = "after_" + aim_at.replace(" ", "_")
        else:
            time.sleep(rng.uniform(*kill_span))
        worker.kill()
        moments.append(moment)
        plan.log(f"  {worker.role} kill {k + 1}/{kills} ({moment}, after {inc.count('batch')} batches); restarting")
        worker.start()
    return moments


def _bootstrap_model(plan: Plan, run: StreamRun, photos, feeder: Feeder) -> None:
    """Stream the first ``n_train`` photos, train on their Parquet rows, start the scorer."""
    feeder.start()
    run.featurizer.start()
    feeder.release(plan.n_train)
    version = run.train_from_stream(photos[:plan.n_train])
    plan.log(f"  classifier {version} trained from the stream's stored rows")
    run.scorer.start()


def _finish(plan: Plan, name: str, run: StreamRun, feeder: Feeder, ids: set[str], workers: list[WorkerProcess],
            labels: bool, faults: dict[str, int], recovery: list[dict[str, Any]], started: float,
            extra: dict[str, Any] | None = None) -> ScenarioResult:
    """Drain, stop the final runs with SIGTERM, read everything back, judge."""
    feeder.finish()
    drained = run.wait_rows(ids, 300, workers) and (not labels or run.wait_labels(ids, 300, workers))
    rcs = [w.stop() for w in workers]
    plan.log(f"  final runs drained={drained} exit={rcs}")
    counts = {**(extra or {}), **run.verify(ids, labels=labels), "stall_restarts": run.stall_restarts}
    problems = _problems(plan, counts, workers, labels)
    return ScenarioResult(name, plan.guarantee, faults, counts, recovery, feeder.report(), workers_report(workers),
                          time.monotonic() - started, problems)


def featurizer_crashes(plan: Plan, kills: int, kill_span: tuple[float, float] = (0.2, 4.0)) -> ScenarioResult:
    """SIGKILL the featurizer ``kills`` times while images stream in; a clean final run drains the rest."""
    started, rng = time.monotonic(), random.Random(plan.seed)
    run = StreamRun(plan.broker.bootstrap_servers, plan.workdir / "fz-crash", plan.cache_dir, "fz-crash", plan.guarantee,
                    sink=plan.sink)
    photos = synthetic_photos(plan.n_images, seed=plan.seed, prefix="fz")
    feeder = Feeder(run.settings, photos, rate=plan.rate)
    stale = None if run.on_table else run.plant_stale_temp_file()
    try:
        run.featurizer.start()
        feeder.start()
        # even kills right after the sink's durable point: the window before the Kafka commit
        aim = "table commit" if run.on_table else "parquet part written"
        moments = _kill_loop(plan, run.featurizer, feeder, kills, 0, aim, rng, kill_span)
        faults = {"featurizer_kill": sum(inc.killed for inc in run.featurizer.incarnations)}
        ids = {p.image_id for p in photos}
        extra = {} if stale is None else {"stale_temp_file_removed_at_start": not stale.exists()}
        result = _finish(plan, "featurizer_crashes", run, feeder, ids, [run.featurizer], False, faults, [],
                         started, extra)
        result.recovery = kill_recoveries(run.featurizer, moments)  # with the final run's events
        return result
    finally:
        run.close()


def scorer_crashes(plan: Plan, kills: int, kill_span: tuple[float, float] = (0.2, 3.0)) -> ScenarioResult:
    """The featurizer runs steadily; the scorer is SIGKILLed ``kills`` times mid-stream."""
    started, rng = time.monotonic(), random.Random(plan.seed + 1)
    run = StreamRun(plan.broker.bootstrap_servers, plan.workdir / "sc-crash", plan.cache_dir, "sc-crash", plan.guarantee,
                    sink=plan.sink)
    photos = synthetic_photos(plan.n_images, seed=plan.seed + 1, prefix="sc")
    feeder = Feeder(run.settings, photos, rate=plan.rate)
    try:
        _bootstrap_model(plan, run, photos, feeder)
        moments = _kill_loop(plan, run.scorer, feeder, kills, plan.n_train, "batch", rng, kill_span)
        faults = {"scorer_kill": sum(inc.killed for inc in run.scorer.incarnations)}
        ids = {p.image_id for p in photos}
        result = _finish(plan, "scorer_crashes", run, feeder, ids, run.workers, True, faults, [], started)
        result.recovery = kill_recoveries(run.scorer, moments)
        return result
    finally:
        run.close()


def broker_restarts(plan: Plan, restarts: int, crash_every: int = 1,
                    restart_span: tuple[float, float] = (0.5, 3.0)) -> ScenarioResult:
    """Producer, featurizer and scorer run; the broker restarts ``restarts`` times mid-stream.

    Every ``crash_every``-th restart is a crash (SIGKILL of the broker, and of localbucket for
    Tansu) instead of a clean stop; the data survives either way. The next restart waits until
    both stages have done a batch again (they recovered): a restart before the scorer's first
    batch would count the next outage in this one's scorer recovery (a run on a loaded machine
    reported 18 s that way). Workers are never restarted by the scenario: they must reconnect on
    their own (an exit counts as a problem).
    """
    started, rng = time.monotonic(), random.Random(plan.seed + 2)
    since = time.time()
    run = StreamRun(plan.broker.bootstrap_servers, plan.workdir / "br-restart", plan.cache_dir, "br-restart",
                    plan.guarantee, sink=plan.sink)
    photos = synthetic_photos(plan.n_images, seed=plan.seed + 2, prefix="br")
    feeder = Feeder(run.settings, photos, rate=plan.rate / 2)
    try:
        _bootstrap_model(plan, run, photos, feeder)
        run.scorer.current.wait_for("batch", timeout=120)
        last, rest = time.time(), plan.n_images - plan.n_train
        for k in range(restarts):
            feeder.release(plan.n_train + rest * (k + 1) // (restarts + 1))
            for worker in run.workers:
                if worker.current.wait_for("batch", timeout=120, after=last) is None:
                    plan.log(f"  (no {worker.role} batch since the last restart within 120 s)")
            time.sleep(rng.uniform(*restart_span))
            crash = crash_every > 0 and (k + 1) % crash_every == 0
            record = plan.broker.restart(crash=crash)
            last = time.time()
            plan.log(f"  broker {'crash' if crash else 'restart'} {k + 1}/{restarts}: back in {record['broker_back_s']} s")
            for worker in run.workers:
                if worker.ensure_running():
                    plan.log(f"  the {worker.role} died with the broker; restarted it")
        faults: dict[str, int] = {}
        for r in plan.broker.restarts:
            if r["at"] >= since:
                faults[r["kind"]] = faults.get(r["kind"], 0) + 1
        ids = {p.image_id for p in photos}
        result = _finish(plan, "broker_restarts", run, feeder, ids, run.workers, True, faults, [], started)
        result.recovery = restart_recoveries(plan.broker, run.workers, feeder, since)
        for w in run.workers:
            if w.unexpected_exits:
                result.problems.append(f"the {w.role} exited on its own {len(w.unexpected_exits)} time(s)")
        return result
    finally:
        run.close()


SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "featurizer_crashes": featurizer_crashes,
    "scorer_crashes": scorer_crashes,
    "broker_restarts": broker_restarts,
}
