"""The feature table's fault scenarios: kills at the table's own moments, the catalog away, two
featurizers racing on one table (docs/faults.md). Each runs the whole stream (featurizer and
scorer processes, the table sink, a SQLite catalog) and is judged like the other scenarios
(:func:`tests.faults.scenarios._problems`): nothing missing, no row twice in the table's
current snapshot on any broker, and on Apache Kafka with exactly-once no feature or label read
twice with ``read_committed``. Each also has to show that its fault really happened (a replay
after a kill between the commits, a pause while the catalog was locked, races lost and
retried), or it is not clean.
"""

from __future__ import annotations

import random
import sqlite3
import time
from typing import Any, Callable

from devrig import Feeder, StreamRun, WorkerProcess, synthetic_photos
from devrig.stream import FEATURIZER_ARGS as STREAM_FEATURIZER_ARGS
from pipeline.storage import table as tables
from tests.faults.recovery import kill_recoveries
from tests.faults.scenarios import Plan, ScenarioResult, _bootstrap_model, _finish

HOOK = "tests.table_kill_hook"
KILL_POINTS = ("after-table-commit", "writing-data-file")


#: One batch at a time: no thread-plan measurement at each of the many start-ups.
FEATURIZER_ARGS = (*STREAM_FEATURIZER_ARGS, "--model-threads", "1")


def _run(plan: Plan, name: str, **kwargs: Any) -> StreamRun:
    return StreamRun(plan.broker.bootstrap_servers, plan.workdir / name, plan.cache_dir, name, plan.guarantee,
                     featurizer_args=FEATURIZER_ARGS, sink="table", **kwargs)


def _start(plan: Plan, run: StreamRun, photos, feeder: Feeder, labels: bool) -> list[WorkerProcess]:
    """Start the stream: with ``labels``, the scorer too (on a classifier trained from the stream's
    first photos); without, the featurizer alone (the short form: faster, no label counts)."""
    if labels:
        _bootstrap_model(plan, run, photos, feeder)
        return run.workers
    feeder.start()
    run.featurizer.start()
    return [run.featurizer]


def _hooked_incarnation(worker: WorkerProcess, where: str, after: int, more: Callable[[], None],
                        timeout: float = 180.0) -> str:
    """Start the featurizer with the kill hook armed; wait for it to kill itself ("killed") or not.
    Every 20 s without the kill, ``more()`` photos are released: the point needs work to reach."""
    worker.env.update(DEEPER_TEST_KILL_AT=where, DEEPER_TEST_KILL_AFTER=str(after))
    worker.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.wait_exit(20):
            return "killed" if worker.current.killed else f"exited {worker.current.returncode}"
        more()
    worker.kill()  # it never reached the point: no commit (or no write) in time
    return "not reached"


def table_kills(plan: Plan, kills: int, labels: bool = True) -> ScenarioResult:
    """The featurizer SIGKILLs itself (``tests/table_kill_hook.py``), alternating between right
    after a table commit (before its Kafka commit: the next incarnation must replay those offsets,
    producing their records again and storing no row) and half-way through a data file (left
    behind, named by no snapshot). A clean final run drains."""
    started, rng = time.monotonic(), random.Random(plan.seed + 3)
    run = _run(plan, "tb-kill", featurizer_module=HOOK)
    photos = synthetic_photos(plan.n_images, seed=plan.seed + 3, prefix="tk")
    feeder = Feeder(run.settings, photos, rate=plan.rate)
    try:
        workers, first = [run.featurizer], 0
        if labels:  # a classifier first, from an incarnation without the hook; then a clean stop
            workers, first = _start(plan, run, photos, feeder, labels), plan.n_train
            run.featurizer.stop()
        else:
            feeder.start()
        moments, faults = [], {f"kill_{p.replace('-', '_')}": 0 for p in KILL_POINTS}
        rest = plan.n_images - first
        for k in range(kills):
            share = first + rest * (k + 1) // (kills + 1)
            feeder.release(share)
            where = KILL_POINTS[k % 2]
            # at the 2nd or 3rd time: each incarnation gets a checkpoint through first
            outcome = _hooked_incarnation(run.featurizer, where, rng.randint(2, 3),
                                          lambda: feeder.release(min(plan.n_images, feeder.released + 8)))
            plan.log(f"  featurizer kill {k + 1}/{kills} ({where}): {outcome}")
            moments.append(where)
            faults[f"kill_{where.replace('-', '_')}"] += outcome == "killed"
        for key in ("DEEPER_TEST_KILL_AT", "DEEPER_TEST_KILL_AFTER"):
            run.featurizer.env.pop(key, None)
        run.featurizer.start()
        ids = {p.image_id for p in photos}
        result = _finish(plan, "table_kills", run, feeder, ids, workers, labels, faults, [], started)
        result.recovery = kill_recoveries(run.featurizer, moments)
        _require(result, faults["kill_after_table_commit"] and not result.workers["featurizer"]["table_ahead_replays"],
                 "no incarnation replayed offsets the table had ahead of Kafka: the kills missed the window")
        _require(result, faults["kill_writing_data_file"] and not result.counts["unreferenced_data_files"],
                 "no half-written data file was left: the kills missed the write")
        _require(result, sum(faults.values()) < kills, f"only {sum(faults.values())} of {kills} kills happened")
        return result
    finally:
        run.close()


def _require(result: ScenarioResult, failed: Any, problem: str) -> None:
    if failed:
        result.problems.append(problem)


def catalog_unavailable(plan: Plan, seconds: float = 30.0, labels: bool = True) -> ScenarioResult:
    """Another process holds the SQLite catalog (an exclusive transaction) for ``seconds`` while
    photos stream in: the featurizer's checkpoints fail, it pauses (as on a full disk), and it
    resumes when the catalog is back. Longer than the transaction timeout (30 s), a checkpoint's
    Kafka transaction can be aborted after its table commit: the replay must not store twice."""
    started = time.monotonic()
    run = _run(plan, "tb-catalog")
    photos = synthetic_photos(plan.n_images, seed=plan.seed + 4, prefix="tc")
    feeder = Feeder(run.settings, photos, rate=plan.rate / 2)
    try:
        workers = _start(plan, run, photos, feeder, labels)
        first = plan.n_train if labels else 0
        feeder.release(first + (plan.n_images - first) // 3)
        run.featurizer.current.wait_for("table commit", timeout=120, after=time.time())
        lock = sqlite3.connect(tables.embedded_database(run.settings), timeout=30)
        lock.execute("BEGIN EXCLUSIVE")
        plan.log(f"  catalog locked for {seconds:.0f} s")
        try:
            feeder.release(first + 2 * (plan.n_images - first) // 3)
            time.sleep(seconds)
        finally:
            lock.rollback()
            lock.close()
        plan.log("  catalog unlocked")
        ids = {p.image_id for p in photos}
        result = _finish(plan, "catalog_unavailable", run, feeder, ids, workers, labels, {"catalog_lock": 1}, [],
                         started, {"catalog_locked_s": seconds})
        report = result.workers["featurizer"]
        _require(result, not report["sink_pauses"] or not report["sink_recoveries"],
                 f"the featurizer did not pause and resume on the locked catalog ({report})")
        return result
    finally:
        run.close()


def featurizers_racing(plan: Plan, kills: int, labels: bool = True) -> ScenarioResult:
    """Two featurizer processes in one group commit to one table at the same time; one of them is
    SIGKILLed ``kills`` times (its partitions move to the other and back). Commits that lose a
    race retry on the new snapshot; a featurizer that lost its partitions is superseded, never
    stores a row twice."""
    started, rng = time.monotonic(), random.Random(plan.seed + 5)
    run = _run(plan, "tb-race")
    other = WorkerProcess("featurizer", dict(run.featurizer.env), run.root / "logs", run.featurizer.args,
                          name="featurizer-b")
    photos = synthetic_photos(plan.n_images, seed=plan.seed + 5, prefix="tr")
    feeder = Feeder(run.settings, photos, rate=plan.rate * 2)
    try:
        workers = [*_start(plan, run, photos, feeder, labels), other]
        other.start()
        other.wait_for("partitions assigned", timeout=180)
        first = plan.n_train if labels else 0
        rest = plan.n_images - first
        for k in range(kills):
            feeder.release(first + rest * (k + 1) // (kills + 1))
            other.current.wait_for("table commit", timeout=120, after=other.current.started_at)
            time.sleep(rng.uniform(0.5, 3.0))
            other.kill()
            plan.log(f"  featurizer-b kill {k + 1}/{kills}; restarting")
            other.start()
        ids = {p.image_id for p in photos}
        result = _finish(plan, "featurizers_racing", run, feeder, ids, workers, labels,
                         {"featurizer_kill": kills}, [], started)
        commits = [result.workers[w]["table_commits"] for w in ("featurizer", "featurizer-b")]
        _require(result, not all(commits), f"both featurizers must commit to the table: {commits}")
        return result
    finally:
        other.close()
        run.close()


SCENARIOS = {"table_kills": table_kills, "catalog_unavailable": catalog_unavailable,
             "featurizers_racing": featurizers_racing}
