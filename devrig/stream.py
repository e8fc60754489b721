"""One run of the whole stream as production runs it: featurizer and scorer processes on a broker."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.config import Settings
from devrig.outcomes import count_outcomes
from devrig.photos import Photo
from devrig.readback import TempWatcher, read_records
from devrig.topics import fresh_settings, worker_env
from devrig.workers import WorkerProcess

MODEL = "efficientnet_lite0"
#: A part file every 2 s, so kills land between part files often.
FEATURIZER_ARGS = ("--model", MODEL, "--layer", "prelogits", "--roll-seconds", "2", "--batch-size", "16",
                   "--partitions", "4")
SCORER_ARGS = ("--wait-for-model", "300", "--partitions", "4")
#: Seconds without progress, with work left, after which a supervised worker counts as stalled.
STALL_S = 60.0


class StreamRun:
    """Fresh topics, groups, data dir and registry on a broker, and the two worker processes.

    Nothing is started here: ``featurizer.start()`` / ``scorer.start()`` when the run wants
    them. ``guarantee`` is ``DEEPER_GUARANTEE`` for both workers, ``sink`` their
    ``DEEPER_SINK`` (``table``: the feature table; ``parquet``: part files). ``featurizer_hosts``
    runs one featurizer per launcher (``featurizers``; ``featurizer`` is the first), e.g. one per
    test host; ``scorer_host`` places the scorer, ``scorer_bootstrap`` lets it reach the broker
    another way (through proxies). ``featurizer_module`` runs the featurizers as ``python -m
    MODULE`` instead (a test hook that injects a fault).
    """

    def __init__(self, bootstrap_servers: str, root: Path, cache_dir: Path, name: str,
                 guarantee: str = "exactly-once", featurizer_args: Sequence[str] = FEATURIZER_ARGS,
                 scorer_args: Sequence[str] = SCORER_ARGS, partitions: int = 4, sink: str = "table",
                 featurizer_hosts: Sequence[Sequence[str]] = ((),), scorer_host: Sequence[str] = (),
                 scorer_bootstrap: str | None = None, featurizer_module: str | None = None,
                 featurizer_env: dict[str, str] | None = None):
        self.name = name
        self.root = Path(root)
        base = Settings.from_env(bootstrap_servers=bootstrap_servers, cache_dir=str(cache_dir), model=MODEL,
                                 metrics_port="0", guarantee=guarantee, sink=sink)
        self.settings = fresh_settings(base, self.root, prefix=name, partitions=partitions)
        env = worker_env(self.settings)
        many = len(featurizer_hosts) > 1
        self.featurizers = [WorkerProcess("featurizer", {**env, **(featurizer_env or {})}, self.root / "logs",
                                          featurizer_args, name=f"featurizer{i}" if many else None, launcher=host,
                                          module=featurizer_module)
                            for i, host in enumerate(featurizer_hosts)]
        self.featurizer = self.featurizers[0]
        scorer_env = {**env, "KAFKA_BOOTSTRAP_SERVERS": scorer_bootstrap} if scorer_bootstrap else env
        self.scorer = WorkerProcess("scorer", scorer_env, self.root / "logs", scorer_args, launcher=scorer_host)
        self.temps = TempWatcher(self.features_root)
        self.temps.start()
        self.planted: set[str] = set()  # temp files the rig made itself
        #: Workers restarted because they made no progress for STALL_S (a stall is a defect: counted, reported)
        self.stall_restarts: list[dict[str, Any]] = []

    @property
    def features_root(self) -> Path:
        return Path(self.settings.features_location())

    @property
    def on_table(self) -> bool:
        return self.settings.sink_kind == "table"

    @property
    def workers(self) -> list[WorkerProcess]:
        return [*self.featurizers, self.scorer]

    def unique_ids(self) -> set[str]:
        """Image ids with a row in the table, or in a finished part file, read while the featurizer runs.

        A file listed a moment ago may be gone when it is read (before parts were staged and
        published, a restarted featurizer deleted its predecessor's uncommitted parts; a fault
        suite run stopped on ``no such file`` once), so the listing is taken again.
        """
        from pipeline.storage import StorageError
        from pipeline.storage.parquet_reader import feature_files, read_features

        if self.on_table:
            from devrig.readback import table_on_disk

            return set(table_on_disk(self.settings)["raw_ids"])
        for attempt in range(5):
            if not self.features_root.exists() or not feature_files([self.features_root]):
                return set()
            try:
                return set(read_features([self.features_root]).image_ids)
            except StorageError as exc:
                if "no such file" not in str(exc) or attempt == 4:
                    raise
        return set()

    def wait_rows(self, ids: set[str], timeout: float, supervise: Sequence[WorkerProcess] = ()) -> bool:
        """Until every id has a Parquet row; restarts supervised workers that died or stalled."""
        deadline = time.monotonic() + timeout
        watch = _Progress(self, supervise)
        while time.monotonic() < deadline:
            found = self.unique_ids()
            if ids <= found:
                return True
            watch.check(len(found))
            time.sleep(0.5)
        return False

    def wait_labels(self, ids: set[str], timeout: float, supervise: Sequence[WorkerProcess] = ()) -> bool:
        seen: set[str] = set()
        done = [0]  # records already looked at (the list only grows)
        watch = _Progress(self, supervise)
        last_check = [0.0]

        def until(records: list[Any]) -> bool:
            seen.update(r.key.decode() for r in records[done[0]:])
            done[0] = len(records)
            return ids <= seen

        def tick() -> None:
            if time.monotonic() - last_check[0] > 1.0:
                last_check[0] = time.monotonic()
                watch.check(len(seen))

        read_records(self.settings, self.settings.labels_topic, until, timeout=timeout, tick=tick)
        return ids <= seen

    def stored_features(self):
        """The stream's stored rows (the table's current snapshot, or the Parquet parts)."""
        from pipeline.storage.parquet_reader import read_features

        if self.on_table:
            from pipeline.storage import table as tables
            from pipeline.storage.table_reader import read_snapshot

            (name,) = tables.feature_tables(self.settings)
            table = tables.load_named(self.settings, name)
            return read_snapshot(table, table.current_snapshot()).features
        return read_features([self.features_root])

    def train_from_stream(self, photos: Sequence[Photo], timeout: float = 180.0) -> str:
        """Train the scorer's classifier on the stream's own stored rows of ``photos``."""
        from pipeline.learning.registry import Registry
        from pipeline.learning.training import DEFAULT_SPEC, train_and_register

        ids = {p.image_id for p in photos}
        if not self.wait_rows(ids, timeout, supervise=[self.featurizer]):
            raise AssertionError(f"training photos were never stored:\n{self.featurizer.current.tail()}")
        fs = self.stored_features()
        keep = [i for i, image_id in enumerate(fs.image_ids) if image_id in ids]
        outcome = train_and_register([fs.image_ids[i] for i in keep], [fs.labels[i] for i in keep],
                                     fs.vectors[keep], fs.meta, DEFAULT_SPEC, Registry(self.settings.registry_dir))
        return outcome.version

    def plant_stale_temp_file(self, age_s: float = 3600.0) -> Path:
        """An hour-old ``.tmp-`` file, as a featurizer killed mid-write long ago leaves it."""
        from pipeline.storage import TEMP_PREFIX

        directory = self.features_root / f"backbone={MODEL}" / "layer=prelogits"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}-stale.parquet"
        path.write_bytes(b"PAR1 half a file")
        old = time.time() - age_s
        os.utime(path, (old, old))
        self.planted.add(str(path))
        return path

    def _plant_half_written_file(self) -> Path | None:
        """What a kill during a write leaves: a truncated ``.tmp-`` copy of a real part (Parquet),
        or a truncated data file no snapshot names (table)."""
        from pipeline.storage.parquet_reader import feature_files
        from pipeline.storage import TEMP_PREFIX

        if self.on_table:
            return self._plant_unreferenced_data_file()
        parts = feature_files([self.features_root]) if self.features_root.exists() else []
        if not parts:
            return None
        first = Path(str(parts[0]))
        data = first.read_bytes()
        planted = first.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{first.name}"
        planted.write_bytes(data[: len(data) // 2])
        return planted

    def _plant_unreferenced_data_file(self) -> Path | None:
        data = sorted(Path(self.settings.data_dir, "warehouse").rglob("*.parquet"))
        if not data:
            return None
        planted = data[0].parent / f"{data[0].stem[:40]}+planted-half-written.parquet"
        planted.write_bytes(data[0].read_bytes()[: data[0].stat().st_size // 2])
        return planted

    def verify(self, produced: Iterable[str], labels: bool, timeout: float = 180.0) -> dict[str, Any]:
        """:func:`count_outcomes`, plus proof that a half-written temp file is never read."""
        planted = self._plant_half_written_file()
        self.temps.stop()
        try:
            out = count_outcomes(self.settings, produced, labels, timeout)
        finally:
            if planted is not None:
                planted.unlink()
        if self.on_table:  # the planted file is unreferenced: counted there, never read
            live = out.pop("live_files")
            out["unreferenced_data_files"] -= int(planted is not None)
            out["planted_half_written_file_ignored"] = planted is not None and not any(
                path.endswith(planted.name) for path in live)
            return out
        temps = set(out.pop("temp_files")) - {str(planted)} - self.planted
        out["temp_files_seen_during_run"] = len(self.temps.seen - self.planted - {str(planted)})
        out["stale_temp_files_left"] = len(temps)
        out["planted_half_written_file_ignored"] = planted is not None and out["temp_files_read"] == 0
        return out

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.temps.stop()


class _Progress:
    """Supervises workers while waiting: restarts the dead, and restarts (SIGTERM) the stalled.

    A stalled worker is up (it logged ``<role> started``), alive, has work, and made no progress
    for :data:`STALL_S` seconds (on a loaded machine a start-up alone can take longer); an
    operator would restart it, so the rig does too, and records it in ``run.stall_restarts``
    so the run is reported as not clean instead of timing out without saying why.
    """

    def __init__(self, run: StreamRun, workers: Sequence[WorkerProcess]):
        self.run = run
        self.workers = list(workers)
        self.count = -1
        self.since = time.monotonic()

    def check(self, count: int) -> None:
        for worker in self.workers:
            worker.ensure_running()
        starting = any(w.current.first(f"{w.role} started") is None for w in self.workers)
        if count != self.count or starting:  # start-up (TensorFlow, the model) is not a stall
            self.count, self.since = count, time.monotonic()
            return
        if not self.workers or time.monotonic() - self.since < STALL_S:
            return
        for worker in self.workers:
            self.run.stall_restarts.append({"role": worker.role, "incarnation": worker.current.index,
                                            "done_when_stalled": count, "log": str(worker.current.log_path)})
            worker.dump_stacks()  # where it was stuck, into its log
            worker.stop(timeout=30)  # a worker blocked inside a call ignores SIGTERM: killed after 30 s
            worker.start()
        self.since = time.monotonic()
