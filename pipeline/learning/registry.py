"""The model registry: versioned classifiers on disk and an atomically moved ``current`` pointer.

Layout::

    REGISTRY/
      versions/v0001/model.npz    arrays only (classifier, calibration, novelty summary), allow_pickle=False
      versions/v0001/model.json   metadata + sha256 of model.npz
      versions/v0001/model.json.sha256   sha256 of model.json
      current.json                {"version": "v0001", "model_json_sha256": "..."}

Why this shape: a version directory is claimed with ``mkdir`` (atomic, so two trainers never
share one) and filled before the pointer moves; ``current.json`` is replaced with
``os.replace``, so a scorer polling it sees the old version or the new one, never a mix. Both
files carry checksums, so a truncated or edited model is refused instead of scored, and
nothing is ever unpickled. Every file is written with :func:`pipeline.storage.write_bytes_atomic`
(temporary name, fsync, rename, directory fsync). ``model.json``'s ``features`` is
:meth:`FeatureId.to_json`; versions saved before precision had its own key still load.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.learning import novelty as novelty_lib
from pipeline.learning.classifier import Classifier, ClassifierSpec
from pipeline.errors import RegistryError
from pipeline.identity import FeatureId
from pipeline.storage import write_bytes_atomic

CURRENT = "current.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")


@dataclass
class ModelVersion:
    version: str
    classifier: Classifier
    feature_meta: FeatureId
    metadata: dict[str, Any]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted((p.name for p in self.versions_dir.iterdir() if VERSION_RE.match(p.name)),
                      key=lambda v: int(VERSION_RE.match(v).group(1)))

    # -- saving ----------------------------------------------------------------------------
    def save(self, classifier: Classifier, meta: FeatureId, extra: dict[str, Any], make_current: bool = True) -> str:
        """Store a new version; move ``current`` to it when ``make_current``."""
        directory = self._claim_version_dir()
        buffer = io.BytesIO()
        np.savez(buffer, **classifier.arrays)
        model_bytes = buffer.getvalue()
        write_bytes_atomic(directory / "model.npz", model_bytes)
        metadata = {
            "version": directory.name,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "classes": classifier.classes,
            "classifier": classifier.spec.to_dict(),
            "features": meta.to_json(),
            "model_npz_sha256": _sha256(model_bytes),
            **extra,
        }
        model_json = json.dumps(metadata, indent=2, sort_keys=True).encode()
        write_bytes_atomic(directory / "model.json", model_json)
        write_bytes_atomic(directory / "model.json.sha256", _sha256(model_json).encode())
        if make_current:
            self.set_current(directory.name)
        return directory.name

    def _claim_version_dir(self) -> Path:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        existing = self.versions()
        number = int(VERSION_RE.match(existing[-1]).group(1)) + 1 if existing else 1
        while True:
            directory = self.versions_dir / f"v{number:04d}"
            try:
                directory.mkdir()
                return directory
            except FileExistsError:
                number += 1

    def set_current(self, version: str) -> None:
        """Atomically point ``current`` at ``version`` (which must load cleanly)."""
        model_json = (self.versions_dir / version / "model.json").read_bytes()
        self.load(version)  # refuse to point at a broken version
        pointer = {"version": version, "model_json_sha256": _sha256(model_json)}
        write_bytes_atomic(self.root / CURRENT, json.dumps(pointer).encode())

    # -- loading ---------------------------------------------------------------------------
    def _pointer(self) -> dict[str, str] | None:
        try:
            pointer = json.loads((self.root / CURRENT).read_text())
            if not VERSION_RE.match(pointer["version"]):
                raise ValueError(f"bad version {pointer['version']!r}")
            return pointer
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{self.root / CURRENT} is unreadable: {exc}") from None

    def current_version(self) -> str | None:
        """The version ``current`` points at (cheap: the scorer polls this)."""
        pointer = self._pointer()
        return pointer["version"] if pointer else None

    def load_current(self) -> ModelVersion:
        pointer = self._pointer()
        if pointer is None:
            raise RegistryError(f"no current model in {self.root}; train one with `deeper train`")
        return self.load(pointer["version"], expect_json_sha256=pointer.get("model_json_sha256"))

    def load(self, version: str, expect_json_sha256: str | None = None) -> ModelVersion:
        """Load and verify a version; raise :class:`RegistryError` if anything doesn't check out."""
        directory = self.versions_dir / version
        try:
            model_json = (directory / "model.json").read_bytes()
            actual = _sha256(model_json)
            recorded = (directory / "model.json.sha256").read_text().strip()
            if actual != recorded or (expect_json_sha256 and actual != expect_json_sha256):
                raise RegistryError(f"model {version}: model.json checksum mismatch (edited or truncated); refusing it")
            metadata = json.loads(model_json)
            model_bytes = (directory / "model.npz").read_bytes()
        except FileNotFoundError as exc:
            raise RegistryError(f"model {version} is incomplete: {exc.filename} is missing") from None
        except ValueError as exc:
            raise RegistryError(f"model {version}: model.json is not valid JSON ({exc})") from None
        if not isinstance(metadata, dict):
            raise RegistryError(f"model {version}: model.json is not a JSON object; refusing it")
        if _sha256(model_bytes) != metadata.get("model_npz_sha256"):
            raise RegistryError(f"model {version}: model.npz checksum mismatch (truncated or tampered); refusing it")
        try:
            with np.load(io.BytesIO(model_bytes), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            spec = ClassifierSpec(**metadata["classifier"])
            meta = FeatureId.from_json(metadata["features"])
            classifier = Classifier(spec, list(metadata["classes"]), arrays)
            _check_scores(classifier, meta)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong inside a model file (a zip cut short:
            # BadZipFile; an unknown classifier kind: DeeperError; arrays of the wrong shape) is a refusal,
            # never an exception that could take a scorer down while it hot-reloads
            raise RegistryError(f"model {version} is unreadable: {exc}") from None
        return ModelVersion(version, classifier, meta, metadata)


def _check_scores(classifier: Classifier, meta: FeatureId) -> None:
    """Score two zero vectors and check the novelty summary: arrays that don't fit the metadata fail
    here, not in a running scorer. A version without a novelty summary (saved before it existed)
    is fine: it is never novel."""
    if classifier.dim != meta.dim:
        raise ValueError(f"its arrays take {classifier.dim}-d vectors but model.json says {meta.dim}")
    scores = classifier.decision(np.zeros((2, meta.dim), np.float32))
    if scores.shape != (2, len(classifier.classes)) or not np.isfinite(scores).all():
        raise ValueError(f"it gives scores of shape {scores.shape} for {len(classifier.classes)} classes")
    novelty_lib.check(classifier.arrays, meta.dim, len(classifier.classes))
