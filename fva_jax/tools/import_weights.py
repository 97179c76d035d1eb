"""Import torchvision ResNet-18/50 ImageNet weights, safely, without torch.

    python -m fva_jax.tools.import_weights resnet50-11ad3fa6.pth --out DIR \
        [--arch resnet50|resnet18]

writes ``DIR/pretrained.npz``: the backbone's ``params`` and ``batch_stats`` under fva_jax's
names, independent of the cluster point. Start training from it with
``--config.train.init_from=DIR``.

This file is the command line only. The work is done by

* ``fva_jax.models.weights_io``: reads ``.pth`` (torch's zip and legacy formats, with an unpickler
  that refuses everything but tensors), ``.safetensors`` and ``.npz`` without torch;
* ``fva_jax.models.resnet_weights``: torchvision's names -> fva_jax's, the
  ``pretrained.npz`` file, ``merge_pretrained`` into a model's variables.

Their public names are re-exported here (``load_pretrained``, ``merge_pretrained``, ...), the
names the trainer and older code use.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import sys
from typing import Sequence

import numpy as np
from flax import traverse_util

from fva_jax.models.resnet_weights import (
    ARCHS,
    PRETRAINED_FILENAME,
    convert_state_dict,
    expected_torch_keys,
    infer_arch,
    load_pretrained,
    merge_pretrained,
    pretrained_arch,
    save_pretrained,
)
from fva_jax.models.weights_io import WeightsError, read_state_dict

__all__ = [
    "ARCHS",
    "PRETRAINED_FILENAME",
    "WeightsError",
    "convert_state_dict",
    "expected_torch_keys",
    "infer_arch",
    "load_pretrained",
    "main",
    "merge_pretrained",
    "pretrained_arch",
    "read_state_dict",
    "save_pretrained",
]


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(
        prog="python -m fva_jax.tools.import_weights",
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
    n = sum(np.size(v) for v in traverse_util.flatten_dict(pretrained).values())
    num_classes = pretrained["params"]["fc"]["kernel"].shape[1]
    print(f"{args.weights}: {arch}, {n:,} values, fc with {num_classes} classes -> {target}")
    return target


if __name__ == "__main__":
    main(sys.argv[1:])
