"""The safe reader of PyTorch state dicts (``pipeline.model.nets.torch_state``): torch's two file
formats with known content, malicious pickles refused without running them, damaged files."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import WeightsUnavailable
from pipeline.model.nets import torch_state
from pipeline.model.nets.efficientnet_lite import LITE0, default_weights
from pipeline.model.nets.torch_state import load_state_dict
from tests.torch_files import Evil, Storage, Tensor, strided_tensors, write_legacy, write_zip


@pytest.fixture(scope="module")
def weights_path() -> Path:
    try:
        return default_weights(LITE0)
    except WeightsUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("writer", [write_legacy, write_zip], ids=["legacy", "zip"])
def test_reader_handles_strides_offsets_and_shared_storage(tmp_path, writer):
    tensors, expected = strided_tensors()
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
        path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    elif where == "object":
        write_legacy(path, {"x": Evil(marker)})
    else:
        write_zip(path, {}, data_pkl=pickle.dumps({"x": Evil(marker)}, protocol=2))
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
    storage = Storage("0", np.zeros(4, np.float32))
    write_legacy(tmp_path / "w.pth", {"x": Tensor(storage, size=(3, 3), stride=(3, 1))})
    with pytest.raises(WeightsUnavailable, match="overruns"):
        load_state_dict(tmp_path / "w.pth")


def test_forged_storage_size_is_refused_before_reading(tmp_path):
    path = tmp_path / "w.pth"
    write_legacy(path, {"x": Tensor("0", np.zeros(4, np.float32))})
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
