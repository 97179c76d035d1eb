"""Pretrained weights for ``resnet.py``: torchvision ResNet-18/50 names -> fva_jax's, the
``pretrained.npz`` file, and merging into a model's variables.

    variables = resnet_weights.load(variables, "/data/r50")   # what config.train.init_from does

The name table is in ``resnet.py``'s docstring; this module applies it (and derives the
torchvision key list from ``resnet.py`` itself, so the two cannot drift). ``num_batches_tracked``
is dropped; conv kernels OIHW -> HWIO; the fc matrix is transposed.

``pretrained.npz`` (written by ``python -m fva_jax.tools.import_weights``) holds the backbone's
``params`` and ``batch_stats`` under fva_jax's names without the ``stem``/``trunk`` level
(which stages are in the stem depends on the cluster point), keys like
``params/layer1_0/conv1/kernel``, plus ``__meta__`` (JSON: arch, source file). It is read with
``numpy.load(..., allow_pickle=False)``. Files are read by ``models.weights_io``, which never
runs code from them.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fva_jax.models import resnet, weights_io
from fva_jax.models.weights_io import WeightsError

PRETRAINED_FILENAME = "pretrained.npz"
ARCHS = ("resnet18", "resnet50")
_META_KEY = "__meta__"
_FORMAT = "fva_jax.import_weights/1"  # the name files written so far carry; keep it
# (collection, flax leaf) <-> torchvision's last key component
_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

log = logging.getLogger("fva_jax.models.resnet_weights")


# ----------------------------------------------------------------------------- names


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
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}; supported: {ARCHS}")
    model = resnet.ResNet(num_classes=2, depth=resnet.depth_of(arch), width=8)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    keys = []
    for path in traverse_util.flatten_dict(shapes):
        collection, _stem_or_trunk, *modules, leaf = path
        name = ".".join(m.replace("_", ".") for m in modules)
        keys.append(f"{name}.{_TORCH_LEAF[(collection, leaf)]}")
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
    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for key in sorted(present):
        module, leaf = key.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            continue
        value = np.asarray(state_dict[key], np.float32)
        if leaf == "weight" and value.ndim == 4:
            collection, name, value = "params", "kernel", value.transpose(2, 3, 1, 0)  # OIHW->HWIO
        elif leaf == "weight" and value.ndim == 2:
            collection, name, value = "params", "kernel", value.T  # (out, in) -> (in, out)
        elif leaf == "weight" and value.ndim == 1:
            collection, name = "params", "scale"
        elif leaf == "bias":
            collection, name = "params", "bias"
        elif leaf in ("running_mean", "running_var"):
            collection, name = "batch_stats", leaf[len("running_") :]
        else:
            raise WeightsError(path, f"{key}: unexpected tensor of shape {value.shape}")
        flat[collection][_flax_module_path(module) + (name,)] = np.ascontiguousarray(value)
    return {c: traverse_util.unflatten_dict(tree) for c, tree in flat.items()}


# ----------------------------------------------------------------------------- pretrained.npz


def save_pretrained(
    pretrained: Mapping[str, Mapping], out_dir: str | pathlib.Path, arch: str, source: str = ""
) -> pathlib.Path:
    """Writes ``out_dir/pretrained.npz`` (keys "params/conv1/kernel", ..., plus "__meta__")."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(
        {c: dict(pretrained[c]) for c in ("params", "batch_stats")}, sep="/"
    )
    meta = json.dumps({"arch": arch, "source": source, "format": _FORMAT})
    target = out_dir / PRETRAINED_FILENAME
    np.savez(target, **flat, **{_META_KEY: np.array(meta)})
    return target


def load_pretrained(path: str | pathlib.Path, arch: str | None = None) -> dict[str, dict]:
    """Backbone weights -> {"params": {...}, "batch_stats": {...}} of numpy float32 arrays.

    Args:
      path: a directory written by ``python -m fva_jax.tools.import_weights`` (holds
        ``pretrained.npz``), that ``.npz`` itself, or a torchvision state dict
        (``.pth``/``.pt``/``.bin``, ``.safetensors``, or ``.npz`` with torch key names)
        converted on the fly.
      arch: optional "resnet18"/"resnet50" the weights must be.

    Trees have no stem/trunk level; see ``convert_state_dict``. Use ``merge_pretrained``.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        if not (path / PRETRAINED_FILENAME).is_file():
            raise WeightsError(
                path,
                f"directory without {PRETRAINED_FILENAME}; create it with "
                f"python -m fva_jax.tools.import_weights WEIGHTS.pth --out {path}",
            )
        path = path / PRETRAINED_FILENAME
    if path.suffix.lower() == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if _META_KEY in z.files:  # our own format
                meta = json.loads(str(z[_META_KEY]))
                if arch is not None and meta.get("arch") != arch:
                    raise WeightsError(path, f"weights are {meta.get('arch')}, expected {arch}")
                tree = traverse_util.unflatten_dict(
                    {k: z[k] for k in z.files if k != _META_KEY}, sep="/"
                )
                return {
                    "params": tree.get("params", {}),
                    "batch_stats": tree.get("batch_stats", {}),
                }
    return convert_state_dict(weights_io.read_state_dict(path), arch, path)


def pretrained_arch(pretrained: Mapping[str, Mapping]) -> str:
    """ "resnet18" / "resnet50" of a ``load_pretrained`` result."""
    params = pretrained["params"]
    bottleneck = "conv3" in params.get("layer1_0", {})
    return "resnet50" if bottleneck else "resnet18"


def _width(pretrained: Mapping[str, Mapping]) -> int:
    """Base channel width of the weights (64 for torchvision's)."""
    return int(pretrained["params"]["conv1"]["kernel"].shape[-1])


# ----------------------------------------------------------------------------- merging


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
                    f"the model's {name} has {tuple(leaf.shape)}: the model's backbone and width "
                    f"must match the weights ({pretrained_arch(pretrained)}, width "
                    f"{_width(pretrained)})"
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
            f"pretrained weights: skipping the classifier fc: the weights have {pre_fc.shape[1]} "
            f"classes, the model {skipped_fc}; fc keeps its initialisation"
        )
    unused = sorted("/".join((c,) + k) for c in flat_pre for k in flat_pre[c] if (c, k) not in used)
    unused_non_fc = [u for u in unused if not u.split("/")[1] == "fc"]
    log_fn(
        f"pretrained weights: copied {len(used) - (2 if skipped_fc else 0)} arrays"
        + (
            f"; {len(unused_non_fc)} not used by this model (e.g. {unused_non_fc[:3]})"
            if unused_non_fc
            else ""
        )
    )
    return out


def load(
    variables: Mapping[str, Any],
    path: str | pathlib.Path,
    *,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``variables`` with the backbone from ``path`` copied in: ``merge_pretrained(variables,
    load_pretrained(path))``. ``path`` is anything ``load_pretrained`` reads."""
    return merge_pretrained(variables, load_pretrained(path), log_fn=log_fn)
