"""Writes the torch reference files in tests/data, so that the default tests need no torch.

Run once, with torch and torchvision installed (fva_jax and JAX are not needed), from the
repository root:

    python3 -m venv /tmp/venv-torch && . /tmp/venv-torch/bin/activate
    pip install numpy -r requirements-torch.txt
    python tests/make_torch_references.py            # or --out DIR to write elsewhere

It writes (a few hundred KB in all; see tests/torch_references.py):

* ``torch_tensors.pth`` and ``torch_tensors_legacy.pth``: ``torch.save`` of a dict of tensors
  with the layouts a reader must get right (dtypes incl. half and bfloat16, a transposed
  tensor, a view with a storage offset that shares its base's storage, a scalar, an empty
  tensor), in the zip format and the legacy one, and ``torch_tensors_want.npz``: the values
  ``torch.load`` gives for them (bfloat16 as float32);
* ``torchvision_resnet18.npz`` and ``torchvision_resnet50.npz``: torchvision's key names and
  shapes (10 classes), the fingerprint of the weights drawn from the seed, the input frames,
  the normalised input and torchvision's logits with those weights in eval mode.

The opt-in test ``test_committed_references_are_current`` (FVA_TORCH_TESTS=1) reruns this
script and compares.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # torch_references beside it
import torch_references as refs  # noqa: E402


def write_tensor_files(out: pathlib.Path) -> None:
    torch.manual_seed(refs.SEED)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    tensors = {
        "contiguous": torch.randn(2, 3, 4),
        "transposed": base.t(),  # non-contiguous strides
        "offset_view": base[1:3, 2:5],  # storage offset, shares base's storage
        "base": base,
        "half": torch.randn(5).half(),
        "bfloat16": torch.randn(3, 2).bfloat16(),
        "int64": torch.tensor([1, -2, 3]),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    torch.save(tensors, out / refs.TENSORS_ZIP.name)
    torch.save(tensors, out / refs.TENSORS_LEGACY.name, _use_new_zipfile_serialization=False)
    want = {k: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for k, t in tensors.items()}
    np.savez(out / refs.TENSORS_WANT.name, **want)


def write_logits_file(arch: str, out: pathlib.Path) -> None:
    net = getattr(torchvision.models, arch)(num_classes=refs.NUM_CLASSES)
    key_shapes = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    state_dict = refs.state_dict_from_seed(key_shapes)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    net.eval()
    frames, x = refs.input_frames()
    with torch.no_grad():
        logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.savez(
        out / refs.logits_file(arch).name,
        keys=np.array([k for k, _ in key_shapes]),
        shapes=np.array(json.dumps([list(s) for _, s in key_shapes])),
        fingerprint=np.array(refs.fingerprint(state_dict)),
        frames=frames,
        x=x,
        logits=logits,
        made_with=np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}"),
    )
    print(
        f"{arch}: {len(key_shapes)} tensors, logits {logits.shape}, max |logit| "
        f"{np.abs(logits).max():.3g}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=refs.DATA_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_tensor_files(args.out)
    for arch in refs.ARCHS:
        write_logits_file(arch, args.out)
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}")


if __name__ == "__main__":
    main()
