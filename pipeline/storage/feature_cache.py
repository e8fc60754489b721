"""A cache of computed vectors keyed by image sha256 and feature id (:meth:`FeatureId.cache_key`).

Re-running ``deeper featurize``/``train``/``predict`` over the same photos must not run the
network again. SQLite gives us transactions for free: a crash mid-write leaves the previous
state, never a half-written cache that breaks every later run (the failure TF's retrain.py
users hit with its bottleneck files).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.identity import FeatureId

SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    image_id TEXT NOT NULL,
    meta_key TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (image_id, meta_key)
)
"""


class FeatureCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError:
            # An unreadable cache is only a cache: move it aside and start again.
            self.path.replace(self.path.with_suffix(".corrupt"))
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(SCHEMA)
        return db

    def get_many(self, image_ids: Sequence[str], meta: FeatureId) -> dict[str, tuple[np.ndarray, int, int]]:
        """Cached ``image_id -> (vector, width, height)`` for the ids that are present."""
        key = meta.cache_key()
        found: dict[str, tuple[np.ndarray, int, int]] = {}
        for start in range(0, len(image_ids), 500):
            chunk = list(image_ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT image_id, width, height, vector FROM vectors WHERE meta_key=? AND image_id IN ({marks})",
                [key, *chunk])
            for image_id, width, height, blob in rows:
                vector = np.frombuffer(blob, dtype=np.float32)
                if vector.shape[0] == meta.dim:
                    found[image_id] = (vector.copy(), width, height)
        return found

    def put_many(self, items: Iterable[tuple[str, np.ndarray, int, int]], meta: FeatureId) -> None:
        key = meta.cache_key()
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?)",
                [(i, key, w, h, np.asarray(v, np.float32).tobytes()) for i, v, w, h in items])

    def close(self) -> None:
        self._db.close()
