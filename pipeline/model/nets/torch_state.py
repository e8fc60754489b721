"""Read a PyTorch ``state_dict`` file into numpy arrays, safely and without torch.

Why this exists: some backbones only ship PyTorch checkpoints, but the pipeline runs on
TensorFlow and must not depend on torch at run time. ``torch.load`` is also a pickle
loader, so a checkpoint from the internet (or a tampered cache) could run arbitrary code.
This module understands just enough of torch's two serialization formats to rebuild
tensors, and its unpickler resolves only a short allow-list of globals, each mapped to a
harmless local function. Anything else (``os.system``, ``builtins.eval``, nn.Module
pickles, ...) is refused before it can be called.

Formats:

* **legacy** (torch < 1.6, ``_use_new_zipfile_serialization=False``): a sequence of pickles
  in one file: magic number, protocol version, sys info, the object pickle (tensors point
  to storages through persistent ids), the list of storage keys, then for each key an
  8-byte element count followed by the raw storage bytes.
* **zip** (torch >= 1.6): a zip archive holding ``<root>/data.pkl`` and one
  ``<root>/data/<key>`` member of raw bytes per storage.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

from pipeline.errors import WeightsUnavailable

#: torch's magic number for the legacy format (torch/serialization.py MAGIC_NUMBER).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: torch storage class name -> numpy dtype of one element (byte order fixed later).
#: BFloat16 has no numpy dtype; it is read as uint16 and widened to float32.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list (kept apart to word the error)."""


@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co: only its element type matters here."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _StorageRef:
    """A storage named in the object pickle; its bytes arrive later (legacy) or lazily (zip).

    ``base``/``offset`` describe legacy storage *views* (a slice of a root storage).
    """

    key: str
    dtype: np.dtype
    numel: int
    base: "_StorageRef | None" = None
    offset: int = 0
    data: np.ndarray | None = None
    #: bfloat16 storages are read as uint16 and widened to float32 after striding.
    bfloat16: bool = False

    def array(self) -> np.ndarray:
        """The storage's elements as a 1-D array (views resolve through their root)."""
        if self.base is not None:
            root = self.base.array()
            if self.offset < 0 or self.offset + self.numel > root.size:
                raise _malformed(f"storage view {self.key!r} lies outside its root storage")
            return root[self.offset : self.offset + self.numel]
        if self.data is None:
            raise _malformed(f"storage {self.key!r} is referenced but its data is missing")
        return self.data


@dataclass
class _PendingTensor:
    """A tensor whose storage bytes may not be read yet; materialised after unpickling."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _malformed(detail: str) -> WeightsUnavailable:
    return WeightsUnavailable(f"malformed PyTorch weights file: {detail}")


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise _malformed(f"tensor {what} is not a tuple of ints: {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _PendingTensor:
    """Safe stand-in for ``torch._utils._rebuild_tensor(_v2)``: records, never executes.

    The extra positional arguments (requires_grad, backward_hooks, metadata) are ignored:
    they only matter for autograd.
    """
    if not isinstance(storage, _StorageRef):
        raise _malformed("a tensor's storage is not a storage reference")
    if type(storage_offset) is not int:
        raise _malformed(f"tensor storage offset is not an int: {storage_offset!r}")
    return _PendingTensor(storage, storage_offset, _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride"))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """Safe stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its data."""
    return data


#: (module, name) -> the local object that replaces it. Nothing else can be unpickled.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_ALLOWED` globals and delegates persistent ids."""

    def __init__(self, file: BinaryIO, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"refusing to unpickle global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise _Refused("unexpected persistent id in a plain pickle")
        return self._persistent(pid)


def _materialise(tensor: _PendingTensor) -> np.ndarray:
    """Apply size/stride/offset to the storage, bounds-checked, then copy to a dense array."""
    flat = tensor.storage.array()
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise _malformed(f"bad tensor geometry size={size} stride={stride}")
    if 0 in size:
        return _widen(np.zeros(size, dtype=flat.dtype.newbyteorder("=")), tensor.storage)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= flat.size:
        raise _malformed(f"tensor (size={size}, stride={stride}, offset={offset}) overruns its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return _widen(np.array(view, dtype=flat.dtype.newbyteorder("="), copy=True, order="C"), tensor.storage)


def _widen(array: np.ndarray, ref: _StorageRef) -> np.ndarray:
    """bfloat16 is the top half of a float32, so shifting the raw bits up is exact."""
    if not ref.bfloat16:
        return array
    return (array.astype(np.uint32) << 16).view(np.float32)


def _resolve(obj: Any) -> Any:
    """Replace every pending tensor in the unpickled tree with its numpy array."""
    if isinstance(obj, _PendingTensor):
        return _materialise(obj)
    if isinstance(obj, Mapping):
        return {key: _resolve(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(value) for value in obj)
    return obj


def _storage_ref(type_obj: Any, key: Any, numel: Any, big_endian: bool) -> _StorageRef:
    if not isinstance(type_obj, _StorageType):
        raise _malformed(f"unknown storage type {type_obj!r}")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise _malformed(f"bad storage key/size {key!r}/{numel!r}")
    dtype = type_obj.dtype.newbyteorder(">" if big_endian else "<")
    return _StorageRef(key, dtype, numel, bfloat16=type_obj.name == "BFloat16Storage")


# --------------------------------------------------------------------------- legacy format


class _LegacyStorages:
    """Persistent-id resolver for the legacy format: collects storages by key."""

    def __init__(self, big_endian: bool):
        self.big_endian = big_endian
        self.roots: dict[str, _StorageRef] = {}

    def __call__(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or not pid or _text(pid[0]) != "storage" or len(pid) != 6:
            raise _Refused(f"unsupported persistent id {pid!r:.80} (only tensor storages are allowed)")
        _, type_obj, root_key, _location, numel, view = pid
        root_key = _text(root_key)
        if root_key not in self.roots:
            self.roots[root_key] = _storage_ref(type_obj, root_key, numel, self.big_endian)
        root = self.roots[root_key]
        if view is None:
            return root
        if not isinstance(view, tuple) or len(view) != 3:
            raise _malformed(f"bad storage view {view!r:.80}")
        view_key, offset, view_size = view
        if type(offset) is not int or type(view_size) is not int:
            raise _malformed(f"bad storage view {view!r:.80}")
        return _StorageRef(_text(view_key), root.dtype, view_size, root, offset, bfloat16=root.bfloat16)


def _text(value: Any) -> Any:
    """Old pickles written by Python 2 carry bytes where Python 3 expects str."""
    return value.decode("ascii") if isinstance(value, bytes) else value


def _read_legacy(f: BinaryIO) -> dict[str, np.ndarray]:
    magic = _SafeUnpickler(f).load()
    if magic != LEGACY_MAGIC:
        raise _malformed("not a PyTorch file (bad magic number)")
    protocol = _SafeUnpickler(f).load()
    if protocol != LEGACY_PROTOCOL:
        raise _malformed(f"unsupported legacy protocol version {protocol!r}")
    sys_info = _SafeUnpickler(f).load()
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    storages = _LegacyStorages(big_endian)
    result = _SafeUnpickler(f, storages).load()
    keys = _SafeUnpickler(f).load()
    if not isinstance(keys, list):
        raise _malformed("storage key list is missing")
    for key in keys:
        _read_legacy_storage(f, storages.roots.get(_text(key)), _text(key), big_endian)
    return _state_dict(_resolve(result))


def _read_legacy_storage(f: BinaryIO, ref: _StorageRef | None, key: Any, big_endian: bool) -> None:
    """Read ``<int64 numel><raw bytes>`` for one storage; check it against the pickle."""
    if ref is None:
        raise _malformed(f"storage {key!r} is listed but never referenced")
    remaining = _remaining(f)
    header = f.read(8)
    if len(header) != 8:
        raise _malformed(f"file ends before storage {key!r} (truncated download?)")
    (numel,) = struct.unpack(">q" if big_endian else "<q", header)
    if numel != ref.numel:
        raise _malformed(f"storage {key!r} holds {numel} elements, the pickle says {ref.numel}")
    nbytes = numel * ref.dtype.itemsize
    if nbytes > remaining - 8:  # checked before reading so a forged size cannot exhaust memory
        raise _malformed(f"file ends inside storage {key!r} (truncated download?)")
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise _malformed(f"file ends inside storage {key!r} (truncated download?)")
    ref.data = np.frombuffer(raw, dtype=ref.dtype)


def _remaining(f: BinaryIO) -> int:
    """Bytes left in the file from the current position."""
    here = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(here)
    return end - here


# --------------------------------------------------------------------------- zip format


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise _malformed("zip archive has no single data.pkl")
        root = pickles[0][: -len("data.pkl")]
        storages = _ZipStorages(archive, root, _zip_big_endian(archive, root, names))
        result = _SafeUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
    return _state_dict(_resolve(result))


class _ZipStorages:
    """Persistent-id resolver for the zip format: reads ``<root>data/<key>`` once per key."""

    def __init__(self, archive: zipfile.ZipFile, root: str, big_endian: bool):
        self.archive, self.root, self.big_endian = archive, root, big_endian
        self.loaded: dict[str, _StorageRef] = {}

    def __call__(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or len(pid) != 5 or _text(pid[0]) != "storage":
            raise _Refused(f"unsupported persistent id {pid!r:.80} (only tensor storages are allowed)")
        _, type_obj, key, _location, numel = pid
        key = _text(key)
        if key not in self.loaded:
            self.loaded[key] = self._read(_storage_ref(type_obj, key, numel, self.big_endian))
        return self.loaded[key]

    def _read(self, ref: _StorageRef) -> _StorageRef:
        member = self.archive.getinfo(f"{self.root}data/{ref.key}")
        if member.file_size != ref.numel * ref.dtype.itemsize:  # checked before inflating
            raise _malformed(f"storage {ref.key!r} holds {member.file_size} bytes, expected {ref.numel} elements")
        ref.data = np.frombuffer(self.archive.read(member), dtype=ref.dtype)
        return ref


def _zip_big_endian(archive: zipfile.ZipFile, root: str, names: list[str]) -> bool:
    record = f"{root}byteorder"
    return record in names and archive.read(record).strip() == b"big"


# --------------------------------------------------------------------------- entry point


def _state_dict(obj: Any) -> dict[str, np.ndarray]:
    """Accept a plain state dict or the common ``{"state_dict": {...}}`` wrapper."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise _malformed("the file does not hold a state dict (a mapping of names to tensors)")
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not arrays:
        raise _malformed("the state dict holds no tensors")
    return arrays


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file (legacy or zip format) into ``{name: ndarray}``.

    Only tensors are returned (non-tensor entries such as metadata are dropped). Raises
    :class:`WeightsUnavailable` for a missing, truncated, tampered or unsupported file,
    and never executes code from the file.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        with path.open("rb") as f:
            return _read_legacy(f)
    except WeightsUnavailable:
        raise
    except _Refused as exc:
        raise WeightsUnavailable(f"unsafe or unsupported PyTorch weights file {path}: {exc}") from None
    except FileNotFoundError:
        raise WeightsUnavailable(f"PyTorch weights file not found: {path}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as exc:
        raise WeightsUnavailable(f"malformed PyTorch weights file {path} (truncated or corrupt?): {exc}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, struct.error, OSError) as exc:
        raise WeightsUnavailable(f"malformed PyTorch weights file {path}: {type(exc).__name__}: {exc}") from None
