"""Reading weight files safely, without torch: ``read_state_dict(path) -> {name: numpy array}``.

Formats: the files ``torch.save`` writes (``.pth``/``.pt``/``.bin``), ``.safetensors`` (read
with the ``safetensors`` package) and ``.npz`` (read with ``allow_pickle=False``).

Why a reader of our own for torch files
---------------------------------------
A ``.pth`` file is a pickle, and unpickling runs whatever the file asks for. This module
never calls ``torch.load`` and never imports torch. It reads torch's two formats itself:

* the zip archive ``torch.save`` writes since torch 1.6 (``<name>/data.pkl`` +
  ``<name>/data/<key>`` raw storages + ``<name>/byteorder``), and
* the older "legacy" stream (``_use_new_zipfile_serialization=False``: magic number,
  protocol, system info, the pickle, the storage keys, then each storage as int64 count +
  raw bytes),

with a ``pickle.Unpickler`` whose ``find_class`` resolves only the handful of names a state
dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and
``_rebuild_parameter``, the ``torch.*Storage`` types) to *our own* numpy implementations;
any other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``
naming it, before anything is called. Tensors are rebuilt with numpy from (storage dtype,
offset, shape, stride).

What the names mean is not this module's business: ``fva_jax.models.resnet_weights`` maps
torchvision's ResNet names to fva_jax's.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import re
import struct
import zipfile
from typing import Any, Callable, Mapping

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save stream
_LEGACY_PROTOCOL = 1001


class WeightsError(ValueError):
    """A weights file that cannot be imported; the message names the file and the reason."""

    def __init__(self, path: Any, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def _bfloat16():
    import ml_dtypes  # a jax dependency; numpy has no bfloat16 of its own

    return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype (little-endian; byte order fixed up on load)
_STORAGE_DTYPES: dict[str, Callable[[], np.dtype]] = {
    "FloatStorage": lambda: np.dtype("<f4"),
    "DoubleStorage": lambda: np.dtype("<f8"),
    "HalfStorage": lambda: np.dtype("<f2"),
    "BFloat16Storage": _bfloat16,
    "LongStorage": lambda: np.dtype("<i8"),
    "IntStorage": lambda: np.dtype("<i4"),
    "ShortStorage": lambda: np.dtype("<i2"),
    "CharStorage": lambda: np.dtype("i1"),
    "ByteStorage": lambda: np.dtype("u1"),
    "BoolStorage": lambda: np.dtype("?"),
    "UntypedStorage": lambda: np.dtype("u1"),
}


# ----------------------------------------------------------------------------- safe unpickler


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside the pickle: it only carries a dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]()

    def __call__(self, *args, **kwargs):  # a real torch storage class could be called; ours not
        raise pickle.UnpicklingError(f"torch.{self.name} may only appear as a storage type")

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refusing to modify torch.{self.name} (BUILD on a global)")


class _Global:
    """A fresh, immutable stand-in for an allowed global: calls ``fn``; a pickle cannot set its
    attributes (BUILD), so a file cannot tamper with this module's functions."""

    __slots__ = ("_name", "_fn")

    def __init__(self, name: str, fn: Callable):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, key, value):
        raise pickle.UnpicklingError(f"refusing to modify {self._name} (BUILD on a global)")

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refusing to modify {self._name} (BUILD on a global)")


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """numpy view of a 1-D storage array (strides in elements), copied to a C-contiguous array."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("a tensor's storage is not a storage reference")
    size, stride, offset = (
        tuple(int(s) for s in size),
        tuple(int(s) for s in stride),
        int(storage_offset),
    )
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError(f"negative size/stride/offset {size}/{stride}/{offset}")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise pickle.UnpicklingError(
                f"tensor (offset {offset}, size {size}, stride {stride}) reads past its storage "
                f"of {storage.size} elements"
            )
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:] if all(size) else storage[:0],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)  # own the memory, native layout


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state=None):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED_FUNCTIONS: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): tuple,
}
_ALLOWED_STORAGES = {("torch", name) for name in _STORAGE_DTYPES} | {
    ("torch.storage", "UntypedStorage")
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles torch state dicts only: every global outside
    ``_ALLOWED_FUNCTIONS`` / ``_ALLOWED_STORAGES`` is refused, and those resolve to fresh stand-ins
    that a pickle cannot modify.

    ``load_storage(storage_type, key, numel) -> 1-D numpy array`` resolves the persistent ids
    torch writes for storages.
    """

    def __init__(self, file, load_storage: Callable[[_StorageType, str, int], np.ndarray] | None):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _Global(f"{module}.{name}", _ALLOWED_FUNCTIONS[(module, name)])
        if (module, name) in _ALLOWED_STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a state dict of tensors never needs it "
            "(the file may be malicious, or it holds a whole pickled model rather than a "
            "state dict: re-save it with torch.save(model.state_dict(), path))"
        )

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(
                f"unsupported persistent id {pid!r} (only tensor storages)"
            )
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id {pid!r} names no storage type")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._load_storage(storage_type, key, int(numel))
        storage = self._storages[key]
        if len(pid) > 5 and pid[5] is not None:  # legacy storage view: (view_key, offset, size)
            _view_key, offset, size = pid[5]
            storage = storage[int(offset) : int(offset) + int(size)]
        return storage


# ----------------------------------------------------------------------------- torch files


def _read_torch_zip(path: pathlib.Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise WeightsError(
                path,
                f"zip archive without exactly one data.pkl (found {pkls[:3]}); "
                "not a file written by torch.save",
            )
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise WeightsError(path, f"unknown byteorder record {byteorder!r}")

        def load_storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
            record = f"{prefix}data/{key}"
            try:
                raw = zf.read(record)
            except KeyError:
                raise pickle.UnpicklingError(f"storage record {record} is missing") from None
            dtype = storage_type.dtype
            if storage_type.name == "UntypedStorage":  # numel counts bytes
                dtype = np.dtype("u1")
            if byteorder == "big" and dtype.itemsize > 1:
                dtype = dtype.newbyteorder(">")
            if len(raw) % dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"storage {record} has {len(raw)} bytes, not a multiple of {dtype.itemsize}"
                )
            return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="), copy=False)

        with zf.open(pkls[0]) as f:
            return SafeUnpickler(f, load_storage).load()


def _read_torch_legacy(path: pathlib.Path) -> Any:
    """The pre-1.6 stream. Its storage bytes follow the pickle, so the pickle is parsed twice:
    once (with empty placeholder storages) to reach the storage list, then again with the
    filled storages."""
    with open(path, "rb") as f:
        try:
            magic = SafeUnpickler(f, None).load()
        except pickle.UnpicklingError as err:
            if "refusing" in str(err):
                raise
            raise WeightsError(
                path, f"neither a torch zip archive nor a legacy torch file ({err})"
            ) from None
        except Exception as err:  # pylint: disable=broad-except
            raise WeightsError(
                path, f"neither a torch zip archive nor a legacy torch file ({err!r})"
            ) from None
        if magic != LEGACY_MAGIC:
            raise WeightsError(path, "a plain pickle, not a file written by torch.save")
        protocol = SafeUnpickler(f, None).load()
        if protocol != _LEGACY_PROTOCOL:
            raise WeightsError(path, f"legacy torch protocol {protocol!r} is not supported")
        sys_info = SafeUnpickler(f, None).load()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        start = f.tell()
        types: dict[str, _StorageType] = {}

        def placeholder(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
            types[key] = storage_type
            return np.zeros(numel, storage_type.dtype)

        SafeUnpickler(f, placeholder).load()
        keys = SafeUnpickler(f, None).load()
        arrays: dict[str, np.ndarray] = {}
        for key in keys:
            key = str(key)
            if key not in types:
                raise WeightsError(path, f"storage {key} is listed but never used")
            dtype = types[key].dtype if little else types[key].dtype.newbyteorder(">")
            (count,) = struct.unpack("<q" if little else ">q", f.read(8))
            raw = f.read(count * dtype.itemsize)
            if count < 0 or len(raw) != count * dtype.itemsize:
                raise WeightsError(path, f"truncated storage {key}")
            arrays[key] = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))
        f.seek(start)

        def filled(_storage_type: _StorageType, key: str, _numel: int) -> np.ndarray:
            if key not in arrays:
                raise pickle.UnpicklingError(f"storage {key} has no data")
            return arrays[key]

        return SafeUnpickler(f, filled).load()


def read_torch_file(path: str | pathlib.Path) -> Any:
    """The object a ``torch.save`` file holds (zip or legacy), tensors as numpy arrays, read
    without running code from the file.

    Raises:
      pickle.UnpicklingError: the pickle asks for a global a state dict never needs (the
        message names it), or is malformed.
      WeightsError: not a file torch.save writes.
    """
    path = pathlib.Path(path)
    return _read_torch_zip(path) if zipfile.is_zipfile(path) else _read_torch_legacy(path)


# ----------------------------------------------------------------------------- any format


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a state dict, safely: {name: numpy array}.

    Args:
      path: a torch file (``.pth``/``.pt``/``.bin``, zip or legacy), ``.safetensors``, or
        ``.npz``.

    Checkpoints that wrap the state dict (``{"state_dict": ...}`` or ``{"model": ...}``) are
    unwrapped, and DataParallel's ``module.`` prefix is removed.

    Raises:
      pickle.UnpicklingError: a torch file that asks for anything but tensors (the message
        names the file and the refused global).
      WeightsError: a missing, corrupt or unsupported file, or one that holds no state dict.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        import safetensors.numpy  # pylint: disable=g-import-not-at-top

        try:
            obj = safetensors.numpy.load_file(path)
        except Exception as err:  # SafetensorError, or a dtype numpy cannot hold
            raise WeightsError(path, f"not a readable safetensors file ({err})") from None
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            obj = {k: z[k] for k in z.files}
    else:
        try:
            obj = read_torch_file(path)
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path}: {err}") from None
        except (EOFError, zipfile.BadZipFile, struct.error) as err:
            raise WeightsError(path, f"truncated or corrupt torch file ({err!r})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            path,
            f"not a state dict (a {type(obj).__name__}, expected a non-empty "
            "mapping of parameter names to tensors)",
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise WeightsError(path, f"not a state dict: entries {bad[:3]} are not name -> tensor")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}
