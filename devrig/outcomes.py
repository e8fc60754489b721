"""Counting what a stream run produced: one outcome per image id, or what went wrong.

The three numbers the fault suite is about:

* ``missing``: produced image ids with no row (in the table's current snapshot, or on disk);
* ``duplicate_rows_in_table`` (table sink): rows of the current snapshot of the feature table,
  read raw, beyond the first for their image id; ``duplicate_rows_on_disk`` (Parquet sink):
  raw Parquet rows, read from every finished part file BEFORE any de-duplication, beyond the
  first for their image id (``rows_raw - distinct ids on disk``);
* ``duplicate_labels_read_committed``: label records read with ``isolation_level=read_committed``
  beyond the first for their image id.

The images topic is counted too (``images_topic_duplicates``): a photo the producer re-sent
after a failed acknowledgement is there twice and legitimately flows through twice, which is
the producer's duplicate, not the stream's.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from pipeline.config import Settings
from devrig.readback import parquet_on_disk, read_records, table_on_disk


def _extras(counter: Counter) -> int:
    """How many items repeat an earlier one."""
    return sum(n - 1 for n in counter.values() if n > 1)


def _keys(records: list[Any]) -> list[str]:
    return [r.key.decode() for r in records if r.key is not None]


def count_topic(settings: Settings, topic: str, produced: set[str], timeout: float, prefix: str) -> dict[str, Any]:
    """Committed records of ``topic`` keyed by image id: raw, distinct, duplicates, missing."""
    records = read_records(settings, topic, lambda rs: produced <= set(_keys(rs)), timeout=timeout,
                           quiet_s=3.0, drain=True)
    keys = Counter(_keys(records))
    return {f"{prefix}_raw": len(records), f"{prefix}_unique": len(keys),
            f"duplicate_{prefix}_read_committed": _extras(keys), f"{prefix}_missing": len(produced - set(keys)),
            "_records": records}


def count_parquet(features_root: Path, produced: set[str]) -> dict[str, Any]:
    """Raw rows on disk and what the reader makes of them."""
    from pipeline.storage.parquet_reader import read_features

    disk = parquet_on_disk(features_root)
    fs = read_features([features_root]) if disk["parts"] else None
    unique = set(fs.image_ids) if fs else set()
    by_id = Counter(disk["raw_ids"])
    return {
        "part_files": len(disk["parts"]),
        "rows_raw": len(disk["raw_ids"]),
        "rows_unique": len(unique),
        "duplicate_rows_on_disk": _extras(by_id),
        "duplicate_offsets_on_disk": _extras(Counter(disk["positions"])),
        "reader_dropped": fs.duplicates_dropped if fs else 0,
        "reader_one_row_per_id": bool(fs) and len(fs.image_ids) == len(set(fs.image_ids)),
        "missing": len(produced - unique),
        "unexpected_rows": len(unique - produced),
        "temp_files": [str(t) for t in disk["temps"]],
        "temp_files_read": len(disk["temps_listed_by_reader"]),
        "broken_part_files": disk["broken"],
    }


def count_table(settings: Settings, produced: set[str]) -> dict[str, Any]:
    """Raw rows of the feature table's current snapshot (no de-duplication)."""
    found = table_on_disk(settings)
    unique = set(found["raw_ids"])
    return {
        "tables": found["tables"],
        "data_files": found["data_files"],
        "unreferenced_data_files": found["unreferenced_data_files"],
        "live_files": found["live_files"],
        "rows_raw": len(found["raw_ids"]),
        "rows_unique": len(unique),
        "duplicate_rows_in_table": _extras(Counter(found["raw_ids"])),
        "duplicate_offsets_in_table": _extras(Counter(found["positions"])),
        "missing": len(produced - unique),
        "unexpected_rows": len(unique - produced),
    }


def count_outcomes(settings: Settings, produced: Iterable[str], labels: bool, timeout: float = 180.0
                   ) -> dict[str, Any]:
    """Read everything a run produced back and count it (see the module's docstring)."""
    from schemas.messages import decode_label

    produced = set(produced)
    out: dict[str, Any] = {"images_in": len(produced)}
    images = count_topic(settings, settings.images_topic, produced, timeout, "images")
    images.pop("_records")
    out["images_topic_duplicates"] = images["duplicate_images_read_committed"]
    if settings.sink_kind == "table":
        out.update(count_table(settings, produced))
    else:
        out.update(count_parquet(Path(settings.features_location()), produced))
    features = count_topic(settings, settings.features_topic, produced, timeout, "features")
    features.pop("_records")
    out.update(features)
    out["dead_letters"] = len(read_records(settings, settings.dead_letter_topic, timeout=15, quiet_s=2))
    if labels:
        found = count_topic(settings, settings.labels_topic, produced, timeout, "labels")
        decoded = [(r.key.decode(), decode_label(r.value)) for r in found.pop("_records")]
        out.update(found)
        by_id: dict[str, set[str]] = {}
        for key, record in decoded:
            by_id.setdefault(key, set()).add(record.label)
        out["label_keys_match_image_id"] = all(key == record.image_id for key, record in decoded)
        out["duplicate_labels_disagreeing"] = sum(1 for labs in by_id.values() if len(labs) > 1)
    return out
