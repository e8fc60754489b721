"""Minimal writers for torch's two file formats, so the safe reader (``pipeline.model.nets.torch_state``)
is tested on files with known content (odd strides, offsets, shared storages, malicious pickles)
without torch."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model.nets.torch_state import LEGACY_MAGIC, LEGACY_PROTOCOL


@dataclass
class Storage:
    key: str
    data: np.ndarray  # 1-D


@dataclass
class Tensor:
    """A tensor as torch pickles it: a window (offset, size, stride) onto a storage."""

    storage: Storage | str
    data: np.ndarray | None = None
    offset: int = 0
    size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.storage, str):  # contiguous tensor owning its storage
            self.storage = Storage(self.storage, self.data.ravel())
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
        if not isinstance(obj, Storage):
            return None
        kind = _Global("torch", _STORAGE_CLASS[obj.data.dtype])
        if self.zip_format:
            return ("storage", kind, obj.key, "cpu", obj.data.size)
        return ("storage", kind, obj.key, "cpu", obj.data.size, None)

    def reducer_override(self, obj: Any):
        if isinstance(obj, Tensor):
            args = (obj.storage, obj.offset, tuple(obj.size), tuple(obj.stride), False, collections.OrderedDict())
            return _Global("torch._utils", "_rebuild_tensor_v2"), args
        return NotImplemented

    def save(self, obj: Any, save_persistent_id: bool = True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def _storages(tensors: dict[str, Tensor]) -> dict[str, Storage]:
    return {t.storage.key: t.storage for t in tensors.values()}


def write_legacy(path: Path, tensors: dict[str, Any]) -> None:
    state = collections.OrderedDict(tensors)
    with path.open("wb") as f:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        _TorchPickler(f, zip_format=False).dump(state)
        storages = _storages({k: v for k, v in tensors.items() if isinstance(v, Tensor)})
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            data = storages[key].data
            f.write(struct.pack("<q", data.size) + data.astype(data.dtype.newbyteorder("<")).tobytes())


def write_zip(path: Path, tensors: dict[str, Any], data_pkl: bytes | None = None) -> None:
    buffer = io.BytesIO()
    _TorchPickler(buffer, zip_format=True).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl if data_pkl is not None else buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for key, storage in _storages({k: v for k, v in tensors.items() if isinstance(v, Tensor)}).items():
            archive.writestr(f"archive/data/{key}", storage.data.tobytes())


def strided_tensors() -> tuple[dict[str, Tensor], dict[str, np.ndarray]]:
    """Transposed, offset and shared-storage tensors plus what they must read back as."""
    shared = Storage("7", np.arange(24, dtype=np.float32))
    tensors = {
        "transposed": Tensor(shared, size=(3, 4), stride=(1, 3)),  # storage[:12].reshape(4, 3).T
        "offset": Tensor(shared, offset=20, size=(2, 2), stride=(2, 1)),
        "scalar": Tensor("3", np.array(5, np.int64)),
        "plain": Tensor("1", np.arange(6, dtype=np.float32).reshape(2, 3)),
    }
    expected = {
        "transposed": np.arange(12, dtype=np.float32).reshape(4, 3).T,
        "offset": np.array([[20, 21], [22, 23]], np.float32),
        "scalar": np.array(5, np.int64),
        "plain": np.arange(6, dtype=np.float32).reshape(2, 3),
    }
    return tensors, expected


class Evil:
    """Unpickling this runs a shell command, unless the unpickler refuses os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)

