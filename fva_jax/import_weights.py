"""Import torchvision ResNet-18/50 ImageNet weights, safely, without torch.

    python -m fva_jax.import_weights resnet50-11ad3fa6.pth --out DIR [--arch resnet50|resnet18]

writes ``DIR/pretrained.npz``: the backbone's ``params`` and ``batch_stats`` under fva_jax's
names (``resnet.py``'s table), independent of the cluster point, readable with
``numpy.load(..., allow_pickle=False)``. Start training from it with
``merge_pretrained(variables, load_pretrained(DIR))``.

Safe loading
------------
A ``.pth`` file is a pickle, and unpickling runs whatever the file asks for. This module
never calls ``torch.load`` and never imports torch. It reads torch's formats itself:

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
offset, shape, stride). ``.safetensors`` (a JSON header + raw bytes) and ``.npz`` (torchvision
key names, or this module's own output) are read too.

Parameter mapping: see ``fva_jax/models/resnet.py``. ``num_batches_tracked`` is dropped;
conv kernels OIHW -> HWIO; the fc matrix is transposed.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import pathlib
import pickle
import re
import struct
import sys
import zipfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np

PRETRAINED_FILENAME = "pretrained.npz"
ARCHS = ("resnet18", "resnet50")
_ARCH_DEPTH = {"resnet18": 18, "resnet50": 50}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_META_KEY = "__meta__"

log = logging.getLogger("fva_jax.import_weights")


class WeightsError(ValueError):
    """A weights file that cannot be imported; the message names the file and the reason."""

    def __init__(self, path: Any, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


# ----------------------------------------------------------------------------- dtypes


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
# safetensors dtype names
_SAFETENSORS_DTYPES: dict[str, Callable[[], np.dtype]] = {
    "F32": lambda: np.dtype("<f4"),
    "F64": lambda: np.dtype("<f8"),
    "F16": lambda: np.dtype("<f2"),
    "BF16": _bfloat16,
    "I64": lambda: np.dtype("<i8"),
    "I32": lambda: np.dtype("<i4"),
    "I16": lambda: np.dtype("<i2"),
    "I8": lambda: np.dtype("i1"),
    "U8": lambda: np.dtype("u1"),
    "BOOL": lambda: np.dtype("?"),
}


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


# ----------------------------------------------------------------------------- safe unpickler


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


# ----------------------------------------------------------------------------- readers


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
        if magic != _LEGACY_MAGIC:
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


def _read_torch(path: pathlib.Path) -> Any:
    return _read_torch_zip(path) if zipfile.is_zipfile(path) else _read_torch_legacy(path)


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    if len(data) < 8:
        raise WeightsError(path, "too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as err:
        raise WeightsError(path, f"bad safetensors header ({err})") from None
    out = {}
    body = memoryview(data)[8 + n :]
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise WeightsError(path, f"tensor {key}: dtype {info['dtype']} is not supported")
        begin, end = info["data_offsets"]
        out[key] = (
            np.frombuffer(body[begin:end], _SAFETENSORS_DTYPES[info["dtype"]]())
            .reshape(info["shape"])
            .copy()
        )
    return out


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a torch state dict (``.pth``/``.pt``/``.bin``, zip or legacy), ``.safetensors`` or
    ``.npz`` with torch key names, safely. Returns {torch key: numpy array}.

    Checkpoints that wrap the state dict (``{"state_dict": ...}`` or ``{"model": ...}``) are
    unwrapped, and DataParallel's ``module.`` prefix is removed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(path, "no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj = _read_safetensors(path)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            obj = {k: z[k] for k in z.files}
    else:
        try:
            obj = _read_torch(path)
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


# ----------------------------------------------------------------------------- mapping


def _flax_module_path(torch_module: str) -> tuple[str, ...]:
    """ "layer1.0.downsample.0" -> ("layer1_0", "downsample_0"); "conv1" -> ("conv1",)."""
    out: list[str] = []
    for token in torch_module.split("."):
        if token.isdigit() and out:
            out[-1] = f"{out[-1]}_{token}"
        else:
            out.append(token)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def expected_torch_keys(arch: str) -> tuple[str, ...]:
    """The torchvision state-dict keys of ``arch``, derived from fva_jax's own ResNet (so the
    name mapping cannot drift from the model): every param/batch_stat leaf mapped back to its
    torch name, plus ``num_batches_tracked`` of each BatchNorm."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from fva_jax.models import resnet

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}; supported: {ARCHS}")
    model = resnet.ResNet(num_classes=2, depth=_ARCH_DEPTH[arch], width=8)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    keys = []
    leaf_names = {
        ("params", "kernel"): "weight",
        ("params", "scale"): "weight",
        ("params", "bias"): "bias",
        ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var",
    }
    for path in traverse_util.flatten_dict(shapes):
        collection, *modules, leaf = path
        modules = modules[1:]  # drop stem / trunk
        name = ".".join(m.replace("_", ".") for m in modules)
        keys.append(f"{name}.{leaf_names[(collection, leaf)]}")
        if collection == "batch_stats" and leaf == "mean":
            keys.append(f"{name}.num_batches_tracked")
    return tuple(sorted(set(keys)))


def infer_arch(keys: Sequence[str], path: Any = "state dict") -> str:
    """ "resnet18" / "resnet50" from the key names; clear error for other networks."""
    keys = set(keys)
    if "conv1.weight" not in keys or "layer1.0.conv1.weight" not in keys:
        raise WeightsError(
            path,
            f"does not look like a torchvision ResNet (no conv1.weight / "
            f"layer1.0.conv1.weight; first keys: {sorted(keys)[:5]})",
        )
    bottleneck = "layer1.0.conv3.weight" in keys
    blocks = tuple(
        len({k.split(".")[1] for k in keys if k.startswith(f"layer{s}.")}) for s in range(1, 5)
    )
    known = {(False, (2, 2, 2, 2)): "resnet18", (True, (3, 4, 6, 3)): "resnet50"}
    if (bottleneck, blocks) in known:
        return known[(bottleneck, blocks)]
    names = {
        (False, (3, 4, 6, 3)): "resnet34",
        (True, (3, 4, 23, 3)): "resnet101",
        (True, (3, 8, 36, 3)): "resnet152",
    }
    what = names.get(
        (bottleneck, blocks),
        f"a ResNet with {'bottleneck' if bottleneck else 'basic'} blocks {blocks}",
    )
    raise WeightsError(path, f"{what} is not supported; fva_jax has {', '.join(ARCHS)}")


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], arch: str | None = None, path: Any = "state dict"
) -> dict[str, dict]:
    """torchvision ResNet state dict -> {"params": {...}, "batch_stats": {...}} (numpy float32).

    The trees have no ``stem``/``trunk`` level (that split depends on the cluster point):
    ``params["layer1_0"]["conv1"]["kernel"]`` etc.; ``merge_pretrained`` places them.

    Raises:
      WeightsError: arch not inferable / not the one given, missing or unexpected keys.
    """
    found = infer_arch(state_dict.keys(), path)
    if arch is not None and arch != found:
        raise WeightsError(path, f"--arch {arch} given, but the weights are {found}")
    expected = set(expected_torch_keys(found))
    present = set(state_dict)
    missing = sorted(
        expected - present - {k for k in expected if k.endswith("num_batches_tracked")}
    )
    unexpected = sorted(present - expected)
    if missing:
        raise WeightsError(path, f"{len(missing)} {found} keys missing, e.g. {missing[:5]}")
    if unexpected:
        raise WeightsError(
            path,
            f"{len(unexpected)} keys unexpected in a torchvision {found}, e.g. {unexpected[:5]}",
        )
    params: dict = {}
    stats: dict = {}
    for key in sorted(present):
        module, leaf = key.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            continue
        value = np.asarray(state_dict[key], np.float32)
        mpath = _flax_module_path(module)
        if leaf == "weight" and value.ndim == 4:
            target, name, value = params, "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif leaf == "weight" and value.ndim == 2:
            target, name, value = params, "kernel", value.T  # (out, in) -> (in, out)
        elif leaf == "weight" and value.ndim == 1:
            target, name = params, "scale"
        elif leaf == "bias":
            target, name = params, "bias"
        elif leaf in ("running_mean", "running_var"):
            target, name = stats, leaf[len("running_") :]
        else:
            raise WeightsError(path, f"{key}: unexpected tensor of shape {value.shape}")
        node = target
        for m in mpath:
            node = node.setdefault(m, {})
        node[name] = np.ascontiguousarray(value)
    return {"params": params, "batch_stats": stats}


# ----------------------------------------------------------------------------- save / load


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *mods, leaf = key.split("/")
        node = out
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = v
    return out


def save_pretrained(
    pretrained: Mapping[str, Mapping], out_dir: str | pathlib.Path, arch: str, source: str = ""
) -> pathlib.Path:
    """Writes ``out_dir/pretrained.npz`` (keys "params/conv1/kernel", ..., plus "__meta__")."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = _flatten({c: pretrained[c] for c in ("params", "batch_stats")})
    meta = json.dumps({"arch": arch, "source": source, "format": "fva_jax.import_weights/1"})
    target = out_dir / PRETRAINED_FILENAME
    np.savez(target, **flat, **{_META_KEY: np.array(meta)})
    return target


def load_pretrained(path: str | pathlib.Path, arch: str | None = None) -> dict[str, dict]:
    """Backbone weights -> {"params": {...}, "batch_stats": {...}} of numpy float32 arrays.

    Args:
      path: a directory written by this tool (holds ``pretrained.npz``), that ``.npz`` itself,
        or a torchvision state dict (``.pth``/``.pt``/``.bin``, ``.safetensors``, or ``.npz``
        with torch key names) converted on the fly.
      arch: optional "resnet18"/"resnet50" the weights must be.

    Trees have no stem/trunk level; see ``convert_state_dict``. Use ``merge_pretrained``.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        if not (path / PRETRAINED_FILENAME).is_file():
            raise WeightsError(
                path,
                f"directory without {PRETRAINED_FILENAME}; create it with "
                f"python -m fva_jax.import_weights WEIGHTS.pth --out {path}",
            )
        path = path / PRETRAINED_FILENAME
    if path.suffix.lower() == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if _META_KEY in z.files:  # our own format
                meta = json.loads(str(z[_META_KEY]))
                if arch is not None and meta.get("arch") != arch:
                    raise WeightsError(path, f"weights are {meta.get('arch')}, expected {arch}")
                tree = _unflatten({k: z[k] for k in z.files if k != _META_KEY})
                return {
                    "params": tree.get("params", {}),
                    "batch_stats": tree.get("batch_stats", {}),
                }
    return convert_state_dict(read_state_dict(path), arch, path)


def pretrained_arch(pretrained: Mapping[str, Mapping]) -> str:
    """ "resnet18" / "resnet50" of a ``load_pretrained`` result."""
    params = pretrained["params"]
    bottleneck = "conv3" in params.get("layer1_0", {})
    return "resnet50" if bottleneck else "resnet18"


def _width(pretrained: Mapping[str, Mapping]) -> int:
    """Base channel width of the weights (64 for torchvision's)."""
    return int(pretrained["params"]["conv1"]["kernel"].shape[-1])


def _strip_wrapper(path: tuple[str, ...]) -> tuple[str, ...]:
    """Drops everything up to the last "stem"/"trunk" component (the cluster-point split)."""
    for i in range(len(path) - 1, -1, -1):
        if path[i] in ("stem", "trunk"):
            return path[i + 1 :]
    return path


def merge_pretrained(
    variables: Mapping[str, Any],
    pretrained: Mapping[str, Mapping],
    *,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Copies the pretrained backbone into a model's variables.

    Args:
      variables: {"params": ..., "batch_stats": ...} of a model built from ``resnet.py``
        modules (``FullVideoModel``, ``ResNet``, a bare ``ResNetStem``/``ResNetTrunk``), with any
        cluster point. Leaves may be arrays or ``jax.ShapeDtypeStruct`` (for ``jax.eval_shape``
        results: then every leaf must be covered).
      pretrained: ``load_pretrained``'s result.
      log_fn: where the summary lines go (default: this module's logger at INFO).

    Every leaf under ``stem``/``trunk`` is looked up by its path below that level. The
    classifier ``fc`` is skipped (kept as initialised, logged) when its shape differs (another
    number of classes). Leaves keep the model's dtype. Other collections pass through.

    Returns:
      a new dict with the same structure; leaves replaced by jax arrays (with the model leaf's
      sharding when it has one, e.g. replicated over the trainer's mesh).

    Raises:
      ValueError naming the key: a shape mismatch, or a model leaf the weights do not have
      (other backbone depth).
    """
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    log_fn = log_fn or log.info
    flat_pre = {
        c: traverse_util.flatten_dict(dict(pretrained.get(c, {})))
        for c in ("params", "batch_stats")
    }
    used: set[tuple[str, tuple[str, ...]]] = set()
    out = {}
    skipped_fc = 0  # the model's number of classes when its fc differs from the weights
    missing = []
    for collection, tree in variables.items():
        if collection not in flat_pre:
            out[collection] = tree
            continue
        flat = traverse_util.flatten_dict(dict(tree))
        missing += [
            "/".join((collection,) + p)
            for p in flat
            if _strip_wrapper(p) not in flat_pre[collection]
        ]
        if missing:
            continue
        new = {}
        for path, leaf in flat.items():
            key = _strip_wrapper(path)
            name = "/".join((collection,) + path)
            value = flat_pre[collection][key]
            used.add((collection, key))
            if tuple(value.shape) != tuple(leaf.shape):
                if key[0] == "fc":
                    skipped_fc = int(leaf.shape[-1])  # the model's number of classes
                    new[path] = leaf
                    continue
                raise ValueError(
                    f"pretrained {collection}/{'/'.join(key)} has shape {tuple(value.shape)}, "
                    "the model's "
                    f"{name} has {tuple(leaf.shape)}: the model's backbone and width must match "
                    "the "
                    f"weights ({pretrained_arch(pretrained)}, width {_width(pretrained)})"
                )
            value = np.asarray(value, dtype=leaf.dtype)
            sharding = getattr(leaf, "sharding", None)  # keep e.g. the trainer's replicated layout
            new[path] = jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)
        out[collection] = traverse_util.unflatten_dict(new)
    if missing:
        raise ValueError(
            f"{len(missing)} model variables have no pretrained value, e.g. {missing[:4]} "
            f"(weights: {pretrained_arch(pretrained)}; does the model's backbone match?)"
        )
    if skipped_fc:
        pre_fc = flat_pre["params"].get(("fc", "kernel"))
        log_fn(
            f"import_weights: skipping the classifier fc: the weights have {pre_fc.shape[1]} "
            f"classes, the model {skipped_fc}; fc keeps its initialisation"
        )
    unused = sorted("/".join((c,) + k) for c in flat_pre for k in flat_pre[c] if (c, k) not in used)
    unused_non_fc = [u for u in unused if not u.split("/")[1] == "fc"]
    log_fn(
        f"import_weights: copied {len(used) - (2 if skipped_fc else 0)} pretrained arrays"
        + (
            f"; {len(unused_non_fc)} not used by this model (e.g. {unused_non_fc[:3]})"
            if unused_non_fc
            else ""
        )
    )
    return out


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(
        prog="python -m fva_jax.import_weights",
        description="Convert a torchvision ResNet-18/50 state dict (.pth, .safetensors, .npz) into "
        f"fva_jax parameters: writes OUT/{PRETRAINED_FILENAME}. Never executes code "
        "from the file (restricted unpickler; torch is not needed).",
    )
    parser.add_argument("weights", help="torchvision state dict, e.g. resnet50-11ad3fa6.pth")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--arch", choices=ARCHS, default=None, help="default: inferred from the keys"
    )
    args = parser.parse_args(argv)
    try:
        state_dict = read_state_dict(args.weights)
        arch = args.arch or infer_arch(state_dict.keys(), args.weights)
        pretrained = convert_state_dict(state_dict, arch, args.weights)
    except (WeightsError, pickle.UnpicklingError) as err:
        raise SystemExit(f"import_weights: {err}") from None
    target = save_pretrained(pretrained, args.out, arch, source=str(args.weights))
    n = sum(v.size for v in _flatten(pretrained).values())
    num_classes = pretrained["params"]["fc"]["kernel"].shape[1]
    print(f"{args.weights}: {arch}, {n:,} values, fc with {num_classes} classes -> {target}")
    return target


if __name__ == "__main__":
    main(sys.argv[1:])
