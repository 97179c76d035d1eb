"""Rehearsal of the GPU machine's Python on this one: hides every installed package that the
device tool's 'cuda' image lacks, except copies found in the carried-wheel folder.

`benchmarks/gpu_check.sh` with GPU_CHECK_SMOKE=1 puts a `sitecustomize.py` that calls
`install(site_dir)` on PYTHONPATH, so every Python process it starts (Grain workers
included) sees only what the GPU machine would: the image's packages and the wheels
installed into `site_dir`. A wheel missing from the carried list then fails here, at no
device time, with "hidden: not on the GPU image ...".

`GPU_IMAGE_PACKAGES`: the distributions the 'cuda' image holds, as the device tool's
KINDS.md listed them on 2026-11-17 (names normalised, PEP 503).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys

GPU_IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir
    onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
    sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
    xarray xxhash yarl zipp""".split()
)
# Packages of this repository's test venv that are only tools here (never imported by the
# trainer or the benchmarks) and so need no wheel.
_ALWAYS_VISIBLE = frozenset({"ruff", "pytest", "pip", "setuptools", "wheel"})


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def hidden_modules() -> set[str]:
    """Top-level module names (and 'google.x' for the google namespace) of installed
    distributions that the GPU image lacks."""
    hidden = set()
    for dist in importlib.metadata.distributions():
        name = _normalise(dist.metadata["Name"] or "")
        if name in GPU_IMAGE_PACKAGES or name in _ALWAYS_VISIBLE:
            continue
        for path in dist.files or ():
            parts = path.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] == "..":
                continue
            top = parts[0].removesuffix(".py")
            if "." in top or top in ("__pycache__", "bin"):
                continue
            if top == "google" and len(parts) > 2:  # a namespace shared with protobuf
                hidden.add(f"google.{parts[1]}")
            elif top != "google":
                hidden.add(top.split(".")[0])
    return hidden


class _HideOffImage(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, hidden, site_dir):
        self.hidden, self.site_dir = hidden, site_dir

    def find_spec(self, name, path=None, target=None):
        if name not in self.hidden:
            return None
        if "." in name:  # google.x: look inside the carried google namespace
            parent = [f"{self.site_dir}/{name.split('.')[0]}"]
            spec = importlib.machinery.PathFinder.find_spec(name, parent)
        else:
            spec = importlib.machinery.PathFinder.find_spec(name, [self.site_dir])
        return spec or importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        raise ImportError(
            f"{spec.name} is hidden: not on the GPU image and not among the carried wheels "
            f"in {self.site_dir} (benchmarks/gpu_image_sim.py)"
        )

    def exec_module(self, module):
        raise ImportError(f"{module.__name__} is hidden")


def install(site_dir: str) -> None:
    sys.meta_path.insert(0, _HideOffImage(hidden_modules(), site_dir))
