"""The torch reference files in tests/data: what they hold and how their weights are made.

NumPy only (no torch, no fva_jax): ``tests/make_torch_references.py`` uses it with torch
installed to write the files, and ``tests/test_import_weights.py`` uses it without torch to
regenerate the same weights and compare fva_jax's outputs with torchvision's.

A torchvision state dict of ResNet-18/50 is 47-102 MB, so none is committed: the weights are
drawn from ``SEED`` with NumPy, key by key in torchvision's order, and only the key names and
shapes, a fingerprint of the weights, the input and torchvision's logits are stored (a few
hundred KB). Every draw is ``Generator.uniform`` (``low + (high - low) * next_double``), which
gives the same bits on every platform; the fingerprint says so when it does not.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
from typing import Mapping, Sequence

import numpy as np

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
SEED = 0
NUM_CLASSES = 10
ARCHS = ("resnet18", "resnet50")
# torchvision's ImageNet normalisation (fva_jax.models.resnet has the same numbers; tested)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SHAPE = (2, 48, 48, 3)  # small images keep ResNet-50 cheap; layer4 still sees 2x2

# torch.save of TENSORS_SPEC (made by the script) and the values torch.load gives back
TENSORS_ZIP = DATA_DIR / "torch_tensors.pth"
TENSORS_LEGACY = DATA_DIR / "torch_tensors_legacy.pth"
TENSORS_WANT = DATA_DIR / "torch_tensors_want.npz"


def logits_file(arch: str) -> pathlib.Path:
    """Per arch: keys, shapes, fingerprint, frames, x, logits (see make_torch_references.py)."""
    return DATA_DIR / f"torchvision_{arch}.npz"


def state_dict_from_seed(
    key_shapes: Sequence[tuple[str, Sequence[int]]], seed: int = SEED
) -> dict[str, np.ndarray]:
    """A torchvision-ResNet-style state dict with random values, in ``key_shapes``' order.

    Scales follow torchvision's initialisation (convs: variance 2 / fan_out; fc: bound
    1/sqrt(fan_in)); BatchNorm gets non-trivial affine parameters and running statistics so
    that a wrong mapping of any of them changes the logits.
    """
    shapes = {k: tuple(int(n) for n in s) for k, s in key_shapes}
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = np.zeros(shape, np.int64)
            continue
        if key.startswith("fc."):
            bound = 1 / math.sqrt(shapes["fc.weight"][1])
            low, high = -bound, bound
        elif leaf == "weight" and len(shape) == 4:
            out_channels, _, kh, kw = shape
            bound = math.sqrt(3 * 2 / (out_channels * kh * kw))  # uniform with He's variance
            low, high = -bound, bound
        elif leaf in ("weight", "running_var"):  # BatchNorm scale and variance
            low, high = 0.5, 1.5
        elif leaf in ("bias", "running_mean"):  # BatchNorm shift and mean
            low, high = -0.35, 0.35
        else:
            raise ValueError(f"{key}: no rule for drawing this tensor")
        out[key] = rng.uniform(low, high, shape).astype(np.float32)
    return out


def fingerprint(state_dict: Mapping[str, np.ndarray]) -> str:
    """sha256 over the keys, dtypes, shapes and bytes, in the dict's order."""
    digest = hashlib.sha256()
    for key, value in state_dict.items():
        value = np.ascontiguousarray(value)
        digest.update(json.dumps([key, str(value.dtype), list(value.shape)]).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def input_frames(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 frames (2, 48, 48, 3), float32 images normalised as torchvision expects, NHWC)."""
    frames = np.random.default_rng(seed).integers(0, 256, INPUT_SHAPE, dtype=np.uint8)
    x = (frames / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return frames, x.astype(np.float32)
