"""Bad models through a running scorer: every broken deploy is refused, loudly, and v1 keeps serving.

A broken deploy is simulated the way one really happens: files are written into a version directory
(cut short, edited, or replaced by a crafted ``model.npz`` with every checksum recomputed to match) and
``current.json`` is pointed at it directly, without :meth:`Registry.set_current`'s check. The running
scorer must log ``new model refused; still serving the previous one`` (a structured JSON line), keep
labelling with v1, never unpickle anything, and switch as soon as a good version becomes current.

``tests/test_registry.py`` covers the same files against :class:`Registry` alone; this file is about the
stream: no crash, no gap in labels, no label from a broken model.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import pickletools
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from consumers.scorer import Scorer
from pipeline.learning.classifier import ClassifierSpec, fit
from pipeline.model.featurize import default_cache
from pipeline.kafka.kafka_io import make_producer
from pipeline.logs import JsonFormatter
from pipeline.learning.registry import Registry
from schemas.messages import FeatureRecord, decode_label, encode_features
from tests.stream_helpers import WorkerThread, read_topic, train_model, unique_settings

pytestmark = pytest.mark.stream

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
REFUSED = "new model refused; still serving the previous one"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unpickled(marker: str) -> str:
    """Runs only if something unpickles the crafted array: leaves ``marker`` behind."""
    Path(marker).write_text("unpickled")
    return "boom"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_unpickled, (self.marker,))


# --------------------------------------------------------------------------- broken deploys


def _forge(directory: Path, npz: bytes | None = None, edit: Callable[[dict], None] | None = None) -> bytes:
    """Rewrite a version's files and recompute every checksum, as a careful attacker (or a buggy
    deploy tool that checksums whatever it finds) would; return the new model.json bytes."""
    if npz is not None:
        (directory / "model.npz").write_bytes(npz)
    metadata = json.loads((directory / "model.json").read_text())
    metadata["model_npz_sha256"] = _sha((directory / "model.npz").read_bytes())
    if edit:
        edit(metadata)
    model_json = json.dumps(metadata, indent=2, sort_keys=True).encode()
    (directory / "model.json").write_bytes(model_json)
    (directory / "model.json.sha256").write_text(_sha(model_json))
    return model_json


def _point(reg: Registry, version: str, model_json: bytes | None = None) -> None:
    """Move ``current`` by writing current.json directly (no check), like a broken deploy."""
    if model_json is None:
        path = reg.versions_dir / version / "model.json"
        model_json = path.read_bytes() if path.exists() else b""
    (reg.root / "current.json").write_text(json.dumps({"version": version, "model_json_sha256": _sha(model_json)}))


def _pickled_npz(arrays: dict[str, np.ndarray], marker: Path) -> bytes:
    """A model.npz whose ``intercept`` is an object array: loading it with pickling on runs _unpickled."""
    evil = dict(arrays)
    evil["intercept"] = np.array([_Payload(marker)] + [0.0] * (len(arrays["intercept"]) - 1), dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **evil)  # np.save pickles object arrays
    data = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # prove the payload is live, without unpickling it
        npy = zf.read("intercept.npy")
    assert npy.startswith(b"\x93NUMPY") and b"'descr': '|O'" in npy[:200]
    body = npy[10 + int.from_bytes(npy[8:10], "little"):]
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(body)]
    assert ("SHORT_BINUNICODE", "_unpickled") in ops or ("GLOBAL", f"{__name__} _unpickled") in ops, ops
    assert any(arg == str(marker) for _, arg in ops) and any(name == "REDUCE" for name, _ in ops)
    return data


def _broken_deploys(reg: Registry, good_version: str, marker: Path) -> Iterator[tuple[str, str, str]]:
    """Make each broken version current in turn; yield (name, version named, expected error text)."""
    model = reg.load(good_version)

    def new_version() -> tuple[str, Path]:
        version = reg.save(model.classifier, model.feature_meta, {"deploy": "broken"}, make_current=False)
        return version, reg.versions_dir / version

    version, d = new_version()
    npz = (d / "model.npz").read_bytes()
    (d / "model.npz").write_bytes(npz[: len(npz) // 2])  # a copy cut short; checksums left as they were
    _point(reg, version)
    yield "truncated model.npz", version, "model.npz checksum mismatch"

    version, d = new_version()
    npz = (d / "model.npz").read_bytes()
    _point(reg, version, _forge(d, npz=npz[: len(npz) // 2]))  # cut short, then checksummed as found
    yield "truncated model.npz, checksums forged", version, "is unreadable"

    version, d = new_version()
    metadata = json.loads((d / "model.json").read_text())
    metadata["classes"] = list(reversed(metadata["classes"]))  # would invert every label
    (d / "model.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    _point(reg, version)  # the pointer even matches the edited file; model.json.sha256 does not
    yield "tampered model.json", version, "model.json checksum mismatch"

    version, d = new_version()
    _point(reg, version, _forge(d, npz=_pickled_npz(model.classifier.arrays, marker)))
    yield "pickled object array, checksums forged", version, "Object arrays cannot be loaded"

    version, d = new_version()
    rng = np.random.default_rng(0)
    other = fit(rng.normal(size=(12, 16)), ["a", "b", "c"] * 4, ClassifierSpec())  # 16-d arrays
    buffer = io.BytesIO()
    np.savez(buffer, **other.arrays)
    _point(reg, version, _forge(d, npz=buffer.getvalue()))
    yield "arrays for another dimension, checksums forged", version, "take 16-d vectors"

    version, d = new_version()
    _point(reg, version, _forge(d, edit=lambda m: m["classifier"].update(kind="quantum-svm")))
    yield "unknown classifier kind, checksums forged", version, "unknown classifier"

    (reg.root / "current.json").write_text('{"version": "v00')
    yield "current.json cut short", "current.json", "is unreadable"

    _point(reg, "v0099")
    yield "current names a version that isn't there", "v0099", "is incomplete"


# --------------------------------------------------------------------------- the stream


def _send_and_label(settings, meta, producer, name: str, n: int = 2, timeout: float = 60) -> dict[str, list]:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    records = [FeatureRecord(_sha(f"{name}/{i}".encode()), rng.normal(size=meta.dim).astype(np.float32),
                             meta.backbone, meta.weights_digest, meta.layer, f"{name}/{i}") for i in range(n)]
    for r in records:
        key, value, headers = encode_features(r)
        producer.send(settings.features_topic, key=key, value=value, headers=headers)
    producer.flush()
    ids = {r.image_id for r in records}
    found = read_topic(settings, settings.labels_topic, lambda rs: ids <= {r.key.decode() for r in rs}, timeout)
    out: dict[str, list] = {}
    for r in found:
        if r.key.decode() in ids:
            out.setdefault(r.key.decode(), []).append(decode_label(r.value))
    assert set(out) == ids, f"{name}: not every record was labelled"
    return out


def _refusals(caplog, since: int) -> list[dict]:
    """The scorer's refusal lines after record ``since``, as the JSON its log shipper would see."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records[since:]
            if r.name == "consumers.scorer" and r.getMessage() == REFUSED]


def test_scorer_refuses_broken_models_keeps_serving_v1_then_switches(kafka_settings, tmp_path, effnet, cache_dir,
                                                                       caplog):
    caplog.set_level(logging.INFO)
    settings = unique_settings(kafka_settings, tmp_path)
    v1 = train_model(settings, effnet, EXAMPLES / "train", default_cache(cache_dir))
    reg = Registry(settings.registry_dir)
    meta = reg.load(v1).feature_meta
    marker = tmp_path / "unpickled-marker"
    scorer = WorkerThread(Scorer(settings, reload_seconds=0))  # a refused version is tried again every batch
    producer = make_producer(settings)
    seen: dict[str, str] = {}
    try:
        _send_and_label(settings, meta, producer, "warm-up")
        for name, version, expected in _broken_deploys(reg, v1, marker):
            since = len(caplog.records)
            labels = _send_and_label(settings, meta, producer, name)
            versions = {label.classifier_version for ls in labels.values() for label in ls}
            assert versions == {v1}, f"{name}: labelled by {versions}, not by {v1}"
            refusals = _refusals(caplog, since)
            assert refusals, f"{name}: the scorer did not log a refusal"
            line = refusals[0]
            assert line["level"] == "error" and line["event"] == REFUSED and line["serving"] == v1
            assert version in line["error"] and expected in line["error"], (name, line["error"])
            seen[name] = line["error"]
            assert not marker.exists(), f"{name}: something unpickled the model file"
            assert scorer.error is None and scorer.thread.is_alive(), f"{name}: the scorer died: {scorer.error!r}"

        since = len(caplog.records)
        good = reg.save(reg.load(v1).classifier, meta, {"deploy": "good"})  # checked, then made current
        deadline = time.monotonic() + 30
        while True:  # the switch happens before the next batch; labels of that batch carry it
            labels = _send_and_label(settings, meta, producer, f"after-{good}-{int(time.monotonic() * 1000)}")
            versions = {label.classifier_version for ls in labels.values() for label in ls}
            if versions == {good} or time.monotonic() > deadline:
                break
        assert versions == {good}
        switched = [r for r in caplog.records[since:] if r.getMessage() == "switched model"]
        assert switched and switched[0].fields["version"] == good and switched[0].fields["previous"] == v1
        assert scorer.error is None and scorer.thread.is_alive()
    finally:
        producer.close()
        scorer.stop()
    assert len(seen) == 8
    assert not marker.exists(), "something unpickled the model file"
    assert int(good[1:]) > int(v1[1:])


# --------------------------------------------------------------------------- no code unpickles


#: Modules whose loaders run arbitrary code from the bytes they read (importing them to *write*
#: pickles is fine: tests/test_efficientnet_lite0.py builds malicious files that way).
_UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
#: The one place allowed to touch pickle: a restricted Unpickler that resolves only allow-listed globals.
_ALLOWED = {"pipeline/model/nets/torch_state.py"}
_SKIP_DIRS = {"__pycache__", "node_modules", "build", "dist", "deeper-data"}


def unpickling_calls(source: str, where: str = "<string>") -> list[str]:
    """Every place in ``source`` that could unpickle: ``load``/``loads`` of pickle-like modules (under
    any alias, or imported by name), ``shelve.open``, ``torch.load`` without ``weights_only=True``,
    ``allow_pickle`` other than a literal False, ``read_pickle`` and ``Unpickler``. Writing pickles
    (``dump``/``dumps``, e.g. to test the restricted reader) is not unpickling."""
    tree = ast.parse(source, where)
    aliases = {m: m for m in _UNPICKLING_MODULES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({(a.asname or a.name.split(".")[0]): a.name.split(".")[0] for a in node.names
                            if a.name.split(".")[0] in _UNPICKLING_MODULES})
    found = []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNPICKLING_MODULES:
            found += [f"{line}: from {node.module} import {a.name}" for a in node.names
                      if a.name in {"load", "loads", "_load", "_loads", "Unpickler", "_Unpickler", "open", "*"}]
        elif isinstance(node, ast.Attribute) and node.attr in {"read_pickle", "Unpickler", "_Unpickler"}:
            found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{line}: allow_pickle={ast.unparse(allow)}")
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                owner = aliases.get(func.value.id)
                if owner and (func.attr in {"load", "loads", "_load", "_loads"}
                              or (owner == "shelve" and func.attr == "open")):
                    found.append(f"{line}: {func.value.id}.{func.attr}")
                elif func.value.id == "torch" and func.attr == "load":
                    safe = keywords.get("weights_only")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        found.append(f"{line}: torch.load without weights_only=True")
    return found


def _python_files() -> Iterator[Path]:
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS]
        yield from (Path(root) / f for f in files if f.endswith(".py"))


def test_the_unpickling_check_catches_every_form():
    bad = {
        "from pickle import loads": 1, "import joblib\njoblib.load(p)": 1, "import pickle as p\np.loads(b)": 1,
        "pickle.loads(b)": 1, "np.load(p, allow_pickle=True)": 1, "np.load(p, allow_pickle=flag)": 1,
        "torch.load(p)": 1, "torch.load(p, weights_only=False)": 1, "pd.read_pickle(p)": 1,
        "class U(pickle.Unpickler): pass": 1, "import shelve\nshelve.open(p)": 1, "dill.load(f)": 1,
    }
    for source, n in bad.items():
        assert len(unpickling_calls(source)) == n, source
    for source in ("np.load(p)", "np.load(p, allow_pickle=False)", "torch.load(p, weights_only=True)",
                   "json.loads(s)", "'pickle.load in a string is not code'", "import pickle\npickle.dumps(x)"):
        assert unpickling_calls(source) == [], source


def test_no_python_code_in_the_repo_unpickles():
    """Only pipeline/model/nets/torch_state.py's restricted unpickler may touch pickle; everything else
    (pipeline, consumers, producers, bench, tests, scripts, new files) must not load pickles at all."""
    files = list(_python_files())
    assert len(files) > 40 and REPO / "pipeline" / "learning" / "registry.py" in files
    found = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        calls = unpickling_calls(path.read_text(encoding="utf-8"), rel)
        if rel in _ALLOWED:
            assert calls, f"{rel} no longer uses its restricted unpickler: update _ALLOWED"
            continue
        found += calls
    assert found == [], "code that can unpickle (runs arbitrary code from data):\n" + "\n".join(found)


def test_the_batch_after_a_version_becomes_current_is_labelled_by_it(kafka_settings, tmp_path, effnet, cache_dir):
    """The scorer reads the registry's pointer before every batch: with refused versions retried
    only every 60 s, a good new version still labels the very next batch."""
    settings = unique_settings(kafka_settings, tmp_path)
    v1 = train_model(settings, effnet, EXAMPLES / "train", default_cache(cache_dir))
    reg = Registry(settings.registry_dir)
    meta = reg.load(v1).feature_meta
    scorer = WorkerThread(Scorer(settings, reload_seconds=60))
    producer = make_producer(settings)
    try:
        before = _send_and_label(settings, meta, producer, "before")
        v2 = reg.save(reg.load(v1).classifier, meta, {"deploy": "next"})
        after = _send_and_label(settings, meta, producer, "after")
    finally:
        producer.close()
        scorer.stop()
    assert {label.classifier_version for ls in before.values() for label in ls} == {v1}
    assert {label.classifier_version for ls in after.values() for label in ls} == {v2}
