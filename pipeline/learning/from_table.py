"""Training from the feature table, recorded so that it can be done again (``--reproduce``).

A version trained from the table records, in model.json's ``data``: the catalog, the table, the
snapshot id and the row count, plus the labels that differed from the table's (a corrections
CSV) and the training options. The snapshot is tagged ``model-vNNNN`` in the table, so snapshot
expiry keeps it and its files. :func:`reproduce` reads that snapshot again (rows in a fixed
order, :mod:`pipeline.storage.table_reader`), applies the same labels and options, and trains:
the same rows give the same model.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pipeline.config import Settings
from pipeline.errors import DeeperError
from pipeline.learning.classifier import ClassifierSpec
from pipeline.learning.registry import Registry
from pipeline.learning.training import DEFAULT_SPEC, TrainingOutcome, apply_labels, train_and_register
from pipeline.storage import table as tables
from pipeline.storage.table_reader import TableRead, read_snapshot


@dataclass
class Reproduction:
    """A version trained again from its recorded snapshot, and how far its arrays are from the original."""

    original: str
    outcome: TrainingOutcome
    max_difference: float
    same_training_set: bool


def read_table(settings: Settings, name: str, snapshot_id: int | None = None,
               as_of: dt.datetime | None = None) -> tuple[Any, TableRead]:
    """(table, its snapshot's rows): by snapshot id, as of a moment, or the current one."""
    table = tables.load_named(settings, name)
    return table, read_snapshot(table, tables.resolve_snapshot(table, snapshot_id, as_of))


def train_from_table(settings: Settings, registry: Registry, name: str, snapshot_id: int | None = None,
                     as_of: dt.datetime | None = None, labels: Mapping[str, str] | None = None,
                     spec: ClassifierSpec = DEFAULT_SPEC, unknown_threshold: float | None = None,
                     novelty_threshold: float | None = None) -> tuple[TrainingOutcome, TableRead]:
    """Train on a table snapshot, register the version with its provenance, tag the snapshot,
    then make the version current (a version whose snapshot could not be tagged is not)."""
    table, read = read_table(settings, name, snapshot_id, as_of)
    fs = read.features
    applied = apply_labels(fs.image_ids, fs.sources, fs.labels, dict(labels)) if labels else list(fs.labels)
    provenance = {**read.provenance(settings.catalog),
                  "label_overrides": {i: new for i, new, old in zip(fs.image_ids, applied, fs.labels) if new != old},
                  "options": {"unknown_threshold": unknown_threshold, "novelty_threshold": novelty_threshold}}
    outcome = train_and_register(fs.image_ids, applied, fs.vectors, fs.meta, spec, registry, make_current=False,
                                 unknown_threshold=unknown_threshold, novelty_threshold=novelty_threshold,
                                 unknown_label=settings.unknown_label, provenance=provenance)
    _tag(table, read.snapshot_id, outcome.version)
    registry.set_current(outcome.version)
    return outcome, read


def _tag(table: Any, snapshot_id: int, version: str) -> None:
    try:
        tables.tag(table.refresh(), snapshot_id, tables.MODEL_TAG.format(version=version))
    except Exception as exc:  # noqa: BLE001 - a catalog away: say what was kept and how to finish
        raise DeeperError(f"model {version} is saved but not current: tagging snapshot {snapshot_id} of "
                          f"{'.'.join(table.name())} failed ({exc}); without the tag, expiry could drop "
                          "the snapshot it was trained on. Retry the training.") from exc


def _recorded(registry: Registry, version: str) -> tuple[Any, dict[str, Any]]:
    original = registry.load(version)
    data = original.metadata.get("data") or {}
    if data.get("source") != "table":
        where = data.get("source") or "not recorded"
        raise DeeperError(f"model {version} was not trained from a table snapshot (its data: {where}); "
                          "only those can be reproduced")
    return original, data


def reproduce(settings: Settings, registry: Registry, version: str) -> Reproduction:
    """Train ``version`` again from exactly its rows; registered as a new version, not made current."""
    original, data = _recorded(registry, version)
    table, read = read_table(settings, data["table"], int(data["snapshot_id"]))
    fs = read.features
    overrides = data.get("label_overrides") or {}
    labels = [overrides.get(i, label) for i, label in zip(fs.image_ids, fs.labels)]
    if len(fs) != int(data["rows"]):
        raise DeeperError(f"snapshot {data['snapshot_id']} of {data['table']} now reads {len(fs)} rows, "
                          f"model {version} was trained on {data['rows']}")
    spec = ClassifierSpec(**original.metadata["classifier"])
    options = data.get("options") or {}
    outcome = train_and_register(fs.image_ids, labels, fs.vectors, fs.meta, spec, registry, make_current=False,
                                 unknown_threshold=options.get("unknown_threshold"),
                                 novelty_threshold=options.get("novelty_threshold"),
                                 unknown_label=settings.unknown_label, provenance={**data, "reproduces": version})
    again = registry.load(outcome.version).classifier.arrays
    difference = max((_largest_difference(again.get(k), v) for k, v in original.classifier.arrays.items()),
                     default=0.0)
    same = outcome.training_set_sha256 == original.metadata.get("training_set_sha256")
    return Reproduction(version, outcome, difference, same)


def _largest_difference(new: Any, old: Any) -> float:
    """Largest absolute difference of two arrays; infinite when they don't even have one shape."""
    new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
    if new.shape != old.shape:
        return float("inf")
    return float(np.max(np.abs(new - old))) if old.size else 0.0


def describe(data: Mapping[str, Any] | None) -> str:
    """One line for ``deeper models``: where a version's rows came from."""
    if not data:
        return "data: not recorded"
    if data.get("source") == "table":
        extra = f", reproduces {data['reproduces']}" if data.get("reproduces") else ""
        return (f"data: table {data['table']} snapshot {data['snapshot_id']} ({data['snapshot_at']}), "
                f"{data['rows']} rows{extra}")
    if data.get("source") == "parquet":
        return f"data: Parquet {', '.join(map(str, data.get('paths', [])))}, {data.get('rows')} rows"
    return f"data: {data.get('source')} {data.get('path', '')}".rstrip()
