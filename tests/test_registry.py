"""The model registry on a real directory: round trips, versions, the atomic ``current`` pointer,
and refusal of anything truncated, edited or containing a pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pipeline.storage as storage_module
from pipeline.learning.classifier import ClassifierSpec, fit
from pipeline.errors import RegistryError
from pipeline.identity import FeatureId
from pipeline.learning.registry import Registry

META = FeatureId("efficientnet_lite0", "ab" * 32, "prelogits", 16, "central_crop(0.875)")
PICKLE_MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"deeper-pickle-ran-{os.getpid()}"


def _data(n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = ["cat", "dog", "eel", "fox"][:n_classes]
    x = np.concatenate([rng.normal(i, 1.0, (8, META.dim)) for i in range(n_classes)]).astype(np.float32)
    return x, [lab for lab in labels for _ in range(8)]


@pytest.fixture(params=[("linear-svm", "none"), ("rbf-svm", "standard"), ("logreg", "l2")], ids=lambda p: p[0])
def classifier(request):
    x, y = _data()
    return fit(x, y, ClassifierSpec(request.param[0], request.param[1], 0.5))


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip_gives_identical_decisions(reg, classifier):
    version = reg.save(classifier, META, {"cv": {"accuracy": 0.9}, "n_train": 24})
    loaded = reg.load_current()
    assert loaded.version == version == "v0001"
    assert loaded.classifier.classes == classifier.classes
    assert loaded.classifier.spec == classifier.spec
    assert loaded.feature_meta == META
    assert loaded.metadata["n_train"] == 24 and loaded.metadata["cv"] == {"accuracy": 0.9}
    assert set(loaded.classifier.arrays) == set(classifier.arrays)
    x, _ = _data(seed=1)
    np.testing.assert_array_equal(loaded.classifier.decision(x), classifier.decision(x))
    assert loaded.classifier.predict(x) == classifier.predict(x)


def test_versions_increment_and_current_moves(reg, classifier):
    assert reg.versions() == [] and reg.current_version() is None
    with pytest.raises(RegistryError, match="no current model"):
        reg.load_current()
    assert reg.save(classifier, META, {}) == "v0001"
    assert reg.save(classifier, META, {}, make_current=False) == "v0002"
    assert reg.current_version() == "v0001"
    assert reg.save(classifier, META, {}) == "v0003"
    assert reg.versions() == ["v0001", "v0002", "v0003"] and reg.current_version() == "v0003"
    reg.set_current("v0002")
    assert reg.load_current().version == "v0002"
    # a directory someone else claimed (e.g. a concurrent trainer) is skipped, never shared
    (reg.versions_dir / "v0004").mkdir()
    assert reg.save(classifier, META, {}) == "v0005"
    pointer = json.loads((reg.root / "current.json").read_text())
    assert pointer == {"version": "v0005",
                       "model_json_sha256": _sha((reg.versions_dir / "v0005" / "model.json").read_bytes())}


def test_versions_sort_numerically(reg, classifier):
    for _ in range(11):
        reg.save(classifier, META, {}, make_current=False)
    (reg.versions_dir / "v10000").mkdir()
    (reg.versions_dir / "notes").mkdir()
    assert reg.versions()[-3:] == ["v0010", "v0011", "v10000"]
    assert reg.save(classifier, META, {}, make_current=False) == "v10001"


def test_current_is_replaced_atomically(reg, classifier, monkeypatch):
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src).name, Path(dst).name, Path(src).parent == Path(dst).parent))
        return real_replace(src, dst)

    monkeypatch.setattr(storage_module.os, "replace", spy)  # the registry writes through storage
    reg.save(classifier, META, {})
    reg.save(classifier, META, {})
    targets = [dst for _, dst, _ in replaced]
    assert targets.count("current.json") == 2 and targets.count("model.npz") == 2
    assert all(storage_module.is_temp_name(src) and same_dir for src, _, same_dir in replaced)
    leftovers = [p for p in reg.root.rglob("*") if storage_module.is_temp_name(p.name)]
    assert leftovers == []


def test_concurrent_reader_never_sees_a_partial_pointer(reg, classifier):
    reg.save(classifier, META, {})
    x, _ = _data(seed=2)
    expected = classifier.decision(x)
    stop = threading.Event()
    seen: list[list[int]] = [[], []]
    errors: list[str] = []

    def reader(mine: list[int], ready: threading.Event):
        reads = 0
        while True:
            done = stop.is_set()  # checked before the read, so the last read sees the final pointer
            try:
                pointer = json.loads((reg.root / "current.json").read_bytes())  # raw: must always parse
                model = reg.load_current()
                np.testing.assert_array_equal(model.classifier.decision(x), expected)
                mine.append(int(model.version[1:]))
                assert int(pointer["version"][1:]) <= int(model.version[1:])
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))
            reads += 1
            ready.set()
            if done and reads >= 50:
                return

    ready = [threading.Event() for _ in seen]
    threads = [threading.Thread(target=reader, args=(mine, r)) for mine, r in zip(seen, ready)]
    for t in threads:
        t.start()
    try:
        for r in ready:
            assert r.wait(30)
        for _ in range(20):
            reg.save(classifier, META, {"note": "x" * 5000})  # bigger files: wider windows for a torn read
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    for mine in seen:
        assert len(mine) >= 50
        assert mine == sorted(mine), "a reader saw current move backwards"
        assert mine[0] == 1 and mine[-1] == 21  # each reader watched the pointer move during the saves
    assert reg.current_version() == "v0021"


def test_truncated_npz_is_refused(reg, classifier):
    version = reg.save(classifier, META, {})
    npz = reg.versions_dir / version / "model.npz"
    npz.write_bytes(npz.read_bytes()[:-40])
    for load in (reg.load_current, lambda: reg.load(version)):
        with pytest.raises(RegistryError, match="checksum"):
            load()


def test_missing_file_is_refused(reg, classifier):
    version = reg.save(classifier, META, {})
    (reg.versions_dir / version / "model.npz").unlink()
    with pytest.raises(RegistryError, match="incomplete"):
        reg.load_current()


def test_edited_model_json_is_refused(reg, classifier):
    version = reg.save(classifier, META, {})
    path = reg.versions_dir / version / "model.json"
    metadata = json.loads(path.read_text())
    metadata["classes"] = ["cat", "dog", "wolf"]  # a swapped class name keeps every array valid
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    with pytest.raises(RegistryError, match="checksum"):
        reg.load_current()


def test_garbled_pointer_is_a_registry_error(reg, classifier):
    reg.save(classifier, META, {})
    (reg.root / "current.json").write_text('{"version": "v00')
    with pytest.raises(RegistryError, match="unreadable"):
        reg.load_current()
    (reg.root / "current.json").write_text('{"version": "../../etc"}')
    with pytest.raises(RegistryError, match="bad version"):
        reg.load_current()


def _pickle_payload():
    """Runs only if something unpickles the array: leaves a marker file behind."""
    PICKLE_MARKER.write_text("unpickled")
    return "boom"


class Payload:
    def __reduce__(self):
        return (_pickle_payload, ())


def test_npz_with_an_object_array_is_refused_even_with_matching_checksums(reg, classifier):
    PICKLE_MARKER.unlink(missing_ok=True)
    version = reg.save(classifier, META, {})
    directory = reg.versions_dir / version
    buffer = io.BytesIO()
    arrays = dict(classifier.arrays)
    arrays["intercept"] = np.array([Payload(), 1.0, 2.0], dtype=object)
    np.savez(buffer, **arrays)  # np.save pickles object arrays
    evil = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(evil)) as zf:
        header = zf.read("intercept.npy")[:200]
        assert header.startswith(b"\x93NUMPY") and b"'descr': '|O'" in header  # really an object array
    (directory / "model.npz").write_bytes(evil)
    # a careful attacker fixes every checksum
    metadata = json.loads((directory / "model.json").read_text())
    metadata["model_npz_sha256"] = _sha(evil)
    model_json = json.dumps(metadata, indent=2, sort_keys=True).encode()
    (directory / "model.json").write_bytes(model_json)
    (directory / "model.json.sha256").write_text(_sha(model_json))
    (reg.root / "current.json").write_text(json.dumps({"version": version, "model_json_sha256": _sha(model_json)}))

    with pytest.raises(RegistryError, match="unreadable"):
        reg.load_current()
    with pytest.raises(RegistryError):
        reg.set_current(version)
    assert not PICKLE_MARKER.exists(), "the registry unpickled a model file"


def test_edited_model_json_is_refused_by_version_too(reg, classifier):
    """Not only through ``current``: ``load(version)``/``predict --version`` check model.json as well."""
    version = reg.save(classifier, META, {}, make_current=False)
    path = reg.versions_dir / version / "model.json"
    metadata = json.loads(path.read_text())
    metadata["classes"] = list(reversed(metadata["classes"]))  # would invert every prediction
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    with pytest.raises(RegistryError, match="checksum"):
        reg.load(version)
    with pytest.raises(RegistryError, match="checksum"):
        reg.set_current(version)


def test_set_current_refuses_a_broken_version(reg, classifier):
    reg.save(classifier, META, {})
    broken = reg.save(classifier, META, {}, make_current=False)
    npz = reg.versions_dir / broken / "model.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    before = (reg.root / "current.json").read_bytes()
    with pytest.raises(RegistryError, match="checksum"):
        reg.set_current(broken)
    assert (reg.root / "current.json").read_bytes() == before
    assert reg.load_current().version == "v0001"


def test_registry_holds_no_pickles(reg):
    for spec in (ClassifierSpec("linear-svm", "none"), ClassifierSpec("rbf-svm", "standard"),
                 ClassifierSpec("logreg", "l2")):
        x, y = _data(n_classes=4)
        reg.save(fit(x, y, spec), META, {"cv": {"accuracy": 1.0}})
    files = sorted(p.relative_to(reg.root).as_posix() for p in reg.root.rglob("*") if p.is_file())
    assert files == ["current.json"] + [f"versions/v000{i}/{name}" for i in (1, 2, 3)
                                        for name in ("model.json", "model.json.sha256", "model.npz")]
    for path in reg.root.rglob("model.npz"):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                assert name.endswith(".npy")
                header = zf.read(name)[:200]
                assert b"'descr': '|O'" not in header and b"'descr': 'O'" not in header
        with np.load(path, allow_pickle=False) as npz:  # every array loads without pickle
            assert all(npz[k].dtype != object for k in npz.files)
    for path in reg.root.rglob("*.json"):
        json.loads(path.read_text())
