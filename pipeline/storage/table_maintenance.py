"""Keeping a feature table healthy: compaction, snapshot expiry, unreferenced files (``deeper compact``).

The stream commits every checkpoint (every ``--roll-seconds`` under load), so it makes many
small data files and many snapshots. Three jobs undo that, each safe while the stream runs:

* :func:`compact` rewrites each day's small files into files of about ``target_bytes``, as one
  new snapshot (``deeper.writer=compact``) that removes the old files and adds the new: rows,
  identity and the stored offsets (carried, validated like the stream's) are unchanged, and a
  reader sees either snapshot. A stream commit landing meanwhile makes the compaction's commit
  retry on top of it (the files it replaces are still there: appends remove nothing).
* :func:`expire_snapshots` forgets snapshots older than the table's
  ``history.expire.max-snapshot-age-ms`` (we set one hour) or beyond its newest
  ``deeper.history.max-snapshots`` (100), keeping the newest
  ``history.expire.min-snapshots-to-keep``, every tagged snapshot (``model-vNNNN``: what a
  registry version was trained on) and the snapshot holding the stored offsets.
* :func:`remove_unreferenced_files` deletes data and metadata files that no kept snapshot
  names (replaced by compaction and expired since, or left by a writer killed before its
  commit), only if older than ``older_than_s`` (3 days by default): a commit in flight is never
  touched.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.logs import event
from pipeline.storage import table as tables

if TYPE_CHECKING:
    from pyiceberg.table import Table

log = logging.getLogger(__name__)

#: A data file under this share of the target size is small.
SMALL_SHARE = 0.5
DEFAULT_TARGET_BYTES = 128 * 1024 * 1024
#: Files nothing names are deleted only when older than this: Iceberg's own default for orphan
#: removal (3 days), far beyond any commit in flight, including a featurizer that wrote a
#: checkpoint's files and waits for its catalog to come back.
DEFAULT_ORPHAN_AGE_S = 3 * 24 * 3600.0
_DAY_MS = 24 * 3600 * 1000


@dataclass
class Compaction:
    """What :func:`compact` did to one table."""

    table: str
    files_before: int = 0
    files_after: int = 0
    rewritten: int = 0
    written: int = 0
    rows: int = 0
    snapshot_id: int | None = None
    skipped: list[str] = field(default_factory=list)


def _live_tasks(table: Table) -> list[Any]:
    snapshot = table.current_snapshot()
    return list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files()) if snapshot else []


def _small_groups(tasks: list[Any], target_bytes: int) -> list[list[Any]]:
    """Per partition, the small files (two or more; one small file alone stays as it is)."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for task in tasks:
        if task.file.file_size_in_bytes < target_bytes * SMALL_SHARE and not task.delete_files:
            groups[(task.file.spec_id, tuple(task.file.partition))].append(task)
    return [g for _, g in sorted(groups.items(), key=lambda item: str(item[0])) if len(g) > 1]


def _read(table: Table, tasks: list[Any]) -> pa.Table:
    """The rows of these files, in stream order (Kafka position, then time): locality for readers."""
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan

    data = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue()).to_table(tasks)
    order = [(c, "ascending") for c in ("kafka_topic", "kafka_partition", "kafka_offset", "created_at", "image_id")]
    return data.sort_by(order).cast(tables.arrow_schema())


def _rewrite(table: Table, tasks: list[Any], target_bytes: int) -> list[Any]:
    data = _read(table, tasks)
    size = sum(t.file.file_size_in_bytes for t in tasks)
    per_file = max(1, int(len(data) * target_bytes / max(size, 1)))
    return [tables.write_data_file(table, data.slice(i, per_file), tables.file_name("compact"))
            for i in range(0, len(data), per_file)]


def compact(table: Table, target_bytes: int = DEFAULT_TARGET_BYTES) -> Compaction:
    """Rewrite small files into files of about ``target_bytes`` in one snapshot (module doc)."""
    from pyiceberg.exceptions import ValidationException

    tasks = _live_tasks(table)
    result = Compaction(".".join(table.name()), files_before=len(tasks), files_after=len(tasks))
    groups = _small_groups(tasks, target_bytes)
    if not groups:
        return result
    removed = [t.file for g in groups for t in g]
    added = [f for g in groups for f in _rewrite(table, g, target_bytes)]
    try:
        table, snapshot = tables.commit(table, "compact", add=added, remove=removed)
    except ValidationException as exc:  # another compaction replaced some of these files first
        _delete([f.file_path for f in added])
        result.skipped.append(str(exc))
        return result
    result.rewritten, result.written, result.snapshot_id = len(removed), len(added), snapshot.snapshot_id
    result.files_after = len(tasks) - len(removed) + len(added)
    result.rows = sum(f.record_count for f in added)
    event(log, "table compacted", table=result.table, files_before=result.files_before,
          files_after=result.files_after, rows_rewritten=result.rows, snapshot_id=snapshot.snapshot_id)
    return result


# --------------------------------------------------------------------------- expiry


def _kept_ids(table: Table, keep_last: int) -> set[int]:
    metadata = table.metadata
    kept = {ref.snapshot_id for ref in metadata.refs.values()}
    kept |= {s.snapshot_id for _, s in zip(range(max(keep_last, 1)), tables.ancestors(metadata))}
    holder = tables.offsets_snapshot(metadata)
    if holder is not None:
        kept.add(holder.snapshot_id)
    return kept


def expirable(table: Table, max_age_ms: int | None = None, keep_last: int | None = None) -> list[int]:
    """Snapshot ids :func:`expire_snapshots` would remove now: older than ``max_age_ms``, or
    beyond the newest ``deeper.history.max-snapshots``, but never tagged, the newest
    ``keep_last`` or the one holding the offsets."""
    props = table.properties
    max_age_ms = max_age_ms if max_age_ms is not None else int(props.get("history.expire.max-snapshot-age-ms",
                                                                          5 * _DAY_MS))
    keep_last = keep_last if keep_last is not None else int(props.get("history.expire.min-snapshots-to-keep", 1))
    cap = int(props.get(tables.MAX_SNAPSHOTS, 0)) or None
    cutoff = int(time.time() * 1000) - max_age_ms
    kept = _kept_ids(table, keep_last)
    newest_first = sorted(table.metadata.snapshots, key=lambda s: s.timestamp_ms, reverse=True)
    doomed = {s.snapshot_id for s in newest_first if s.timestamp_ms < cutoff}
    if cap is not None:
        doomed |= {s.snapshot_id for s in newest_first[cap:]}
    return [s.snapshot_id for s in table.metadata.snapshots if s.snapshot_id in doomed - kept]


def expire_snapshots(table: Table, max_age_ms: int | None = None, keep_last: int | None = None,
                     attempts: int = 3) -> Table:
    """Forget old snapshots (module doc); return the refreshed table."""
    from pyiceberg.exceptions import CommitFailedException

    for attempt in range(attempts):
        doomed = expirable(table, max_age_ms, keep_last)
        if not doomed:
            return table
        try:
            table.maintenance.expire_snapshots().by_ids(doomed).commit()
            event(log, "snapshots expired", table=".".join(table.name()), expired=len(doomed))
            return table.refresh()
        except CommitFailedException:
            time.sleep(0.2 * (attempt + 1))
            table = table.refresh()
    return table


# --------------------------------------------------------------------------- unreferenced files


def referenced_files(table: Table) -> set[str]:
    """Every file a kept snapshot or the metadata log names: metadata, manifest lists,
    manifests, and the data and delete files live in a kept snapshot."""
    metadata = table.metadata
    found = {table.metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    for snapshot in metadata.snapshots:
        found.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            found.add(manifest.manifest_path)
            # entries marked deleted name files only the (expired) parent snapshot needed
            found.update(e.data_file.file_path for e in manifest.fetch_manifest_entry(table.io, discard_deleted=True))
    found.update(s.statistics_path for s in metadata.statistics)
    return {_normalise(f) for f in found}


def _normalise(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def list_files(location: str) -> list[tuple[str, dt.datetime | None]] | None:
    """(location, modified) of every file under a table location on local disk or S3, named as
    :func:`referenced_files` names them (None: a scheme we can't list)."""
    location = _normalise(location)
    if "://" in location and not storage.is_uri(location):
        return None
    fs, path = storage.resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    prefix = storage.S3_SCHEME if storage.is_uri(location) else ""
    return [(prefix + f.path, _aware(f.mtime) if f.mtime else None)
            for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]


def remove_unreferenced_files(table: Table, older_than_s: float = DEFAULT_ORPHAN_AGE_S) -> list[str] | None:
    """Delete files under the table's location that nothing kept names (module doc); None if the
    location's scheme can't be listed here."""
    listing = list_files(table.location())
    if listing is None:
        return None
    referenced = referenced_files(table)
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
    doomed = [path for path, modified in listing if path not in referenced and modified and modified < cutoff]
    _delete(doomed)
    if doomed:
        event(log, "unreferenced table files removed", table=".".join(table.name()), files=len(doomed))
    return doomed


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _delete(locations: list[str]) -> None:
    storage.delete([_normalise(loc) for loc in locations])
