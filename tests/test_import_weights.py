"""Tests for fva_jax.import_weights: safe loading, the torchvision <-> flax mapping, merging.

The torch-free tests build torchvision-style state dicts from fva_jax's own ResNet with a
plain inverse mapping written out here. The comparison with real torchvision networks runs
when torch and torchvision are installed (requirements-torch.txt) and skips, saying so,
otherwise.
"""

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fva_jax import import_weights as iw
from fva_jax.models import full_video, resnet

# ----------------------------------------------------------------------------- helpers


def _shapes(model, shape=(1, 32, 32, 3)):
    """Abstract variables (no compilation: values come from _randomize)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


def _randomize(variables, seed=1):
    """Random values everywhere (BN statistics included; variances positive)."""
    flat = traverse_util.flatten_dict(variables)
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flat.items():
        v = rng.normal(size=leaf.shape).astype(np.float32)
        out[path] = np.abs(v) + 0.5 if path[-1] == "var" else v
    return traverse_util.unflatten_dict(out)


def _to_torch_names(variables):
    """Reference inverse of the importer: flax ResNet variables -> torchvision state dict."""
    sd = {}
    for path, v in traverse_util.flatten_dict(variables).items():
        collection, _wrapper, *modules, leaf = path
        name = ".".join(m.replace("_", ".") for m in modules)
        v = np.asarray(v)
        if leaf == "kernel" and v.ndim == 4:
            sd[f"{name}.weight"] = v.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif leaf == "kernel":
            sd[f"{name}.weight"] = v.T
        elif leaf == "scale":
            sd[f"{name}.weight"] = v
        elif leaf == "bias":
            sd[f"{name}.bias"] = v
        elif leaf == "mean":
            sd[f"{name}.running_mean"] = v
            sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)
        elif leaf == "var":
            sd[f"{name}.running_var"] = v
    return sd


def _stripped(variables):
    """{(collection, path below stem/trunk): leaf}."""
    out = {}
    for path, v in traverse_util.flatten_dict(variables).items():
        i = max(i for i, p in enumerate(path) if p in ("stem", "trunk"))
        out[(path[0],) + path[i + 1 :]] = np.asarray(v)
    return out


def _write_safetensors(path, sd):
    header, blobs, offset = {}, [], 0
    for k, v in sd.items():
        v = np.ascontiguousarray(v)
        dtype = {"float32": "F32", "int64": "I64"}[str(v.dtype)]
        header[k] = {
            "dtype": dtype,
            "shape": list(v.shape),
            "data_offsets": [offset, offset + v.nbytes],
        }
        blobs.append(v.tobytes())
        offset += v.nbytes
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture(scope="module")
def r18():
    """A width-8 ResNet-18 with random variables and its torchvision-style state dict."""
    model = resnet.ResNet(num_classes=5, depth=18, width=8)
    variables = _randomize(_shapes(model))
    return model, variables, _to_torch_names(variables)


# ----------------------------------------------------------------------------- safety


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("evil_cls", [_Evil, _EvilEval])
@pytest.mark.parametrize("container", ["zip", "plain", "legacy"])
def test_malicious_pickle_is_rejected_without_running(tmp_path, evil_cls, container):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"conv1.weight": evil_cls(marker)}, protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":  # torch's zip layout
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("evil/data.pkl", payload)
            zf.writestr("evil/byteorder", "little")
    elif container == "plain":
        path.write_bytes(payload)
    else:  # legacy stream: magic, protocol, sys info, then the payload
        path.write_bytes(
            pickle.dumps(iw._LEGACY_MAGIC, protocol=2)
            + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"little_endian": True}, protocol=2)
            + payload
        )
    expected = r"posix\.system" if evil_cls is _Evil else r"(__builtin__|builtins)\.eval"
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load global {expected}"):
        iw.read_state_dict(path)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        iw.load_pretrained(path)
    with pytest.raises(SystemExit, match="refusing"):
        iw.main([str(path), "--out", str(tmp_path / "out")])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "target", [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n"]
)
def test_pickle_cannot_modify_allowed_globals(tmp_path, target):
    """BUILD on an allowed global (setting its attributes) is refused, and nothing changes."""
    defaults = iw._rebuild_tensor.__defaults__
    state = b"}X\x0c\x00\x00\x00__defaults__)s"  # {"__defaults__": ()}
    path = tmp_path / "build.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "x/data.pkl", b"\x80\x02" + target + b"(N" + state + b"tb."
        )  # BUILD (None, slotstate)
    with pytest.raises(pickle.UnpicklingError, match="refusing to modify"):
        iw.read_state_dict(path)
    assert iw._rebuild_tensor.__defaults__ == defaults


def test_not_a_state_dict_and_corrupt_files(tmp_path):
    path = tmp_path / "list.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/data.pkl", pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(iw.WeightsError, match="not a state dict"):
        iw.read_state_dict(path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(iw.WeightsError, match="junk.pth"):
        iw.read_state_dict(junk)
    with pytest.raises(iw.WeightsError, match="no such file"):
        iw.read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(iw.WeightsError, match="without pretrained.npz"):
        iw.load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- mapping


def test_expected_keys_follow_torchvision_naming():
    keys18 = set(iw.expected_torch_keys("resnet18"))
    keys50 = set(iw.expected_torch_keys("resnet50"))
    # counts of torchvision's resnet18/50 state dicts
    assert len(keys18) == 122 and len(keys50) == 320
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
        "layer4.1.conv2.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert k in keys18
    assert "layer1.0.downsample.0.weight" not in keys18
    assert {
        "layer1.0.downsample.0.weight",
        "layer3.5.conv3.weight",
        "layer4.2.bn3.weight",
    } <= keys50


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_import_roundtrip_into_full_video_model(tmp_path, r18, fmt):
    """torch-named weights -> our files -> FullVideoModel at two cluster points: every leaf equals
    the source ResNet's leaf of the same torchvision name."""
    _, variables, sd = r18
    src = tmp_path / f"weights.{fmt}"
    if fmt == "npz":
        np.savez(src, **sd)
    else:
        _write_safetensors(src, sd)
    target = iw.main([str(src), "--out", str(tmp_path / "out")])
    assert target == tmp_path / "out" / iw.PRETRAINED_FILENAME
    for pretrained in (
        iw.load_pretrained(tmp_path / "out"),
        iw.load_pretrained(src, arch="resnet18"),
    ):
        assert iw.pretrained_arch(pretrained) == "resnet18"
        for point in ("maxpool", "stage1", "stage2"):
            model = full_video.FullVideoModel(
                num_classes=5,
                backbone="resnet18",
                width=8,
                num_clusters=2,
                cluster_point=point,
                chunk_size=2,
            )
            abstract = jax.eval_shape(
                lambda m=model: m.init(
                    jax.random.PRNGKey(0),
                    jnp.zeros((1, 2, 32, 32, 3), jnp.uint8),
                    jnp.ones((1, 2), bool),
                    train=False,
                )
            )
            merged = iw.merge_pretrained(abstract, pretrained)
            assert jax.tree.structure(merged) == jax.tree.structure(abstract)
            got, want = _stripped(merged), _stripped(variables)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
            if point == "maxpool":
                assert "layer1_0" in merged["params"]["trunk"]


def test_merge_skips_fc_for_other_class_count(r18):
    _, variables, sd = r18
    pretrained = iw.convert_state_dict(sd)
    model = resnet.ResNet(num_classes=3, depth=18, width=8)
    init = _randomize(_shapes(model), seed=3)
    lines = []
    merged = iw.merge_pretrained(init, pretrained, log_fn=lines.append)
    assert any(
        "skipping the classifier fc: the weights have 5 classes, the model 3" in line
        for line in lines
    ), lines
    np.testing.assert_array_equal(
        merged["params"]["trunk"]["fc"]["kernel"], init["params"]["trunk"]["fc"]["kernel"]
    )
    np.testing.assert_array_equal(
        merged["params"]["trunk"]["fc"]["bias"], init["params"]["trunk"]["fc"]["bias"]
    )
    np.testing.assert_array_equal(
        merged["params"]["stem"]["conv1"]["kernel"], variables["params"]["stem"]["conv1"]["kernel"]
    )
    np.testing.assert_array_equal(
        merged["batch_stats"]["trunk"]["layer4_1"]["bn2"]["var"],
        variables["batch_stats"]["trunk"]["layer4_1"]["bn2"]["var"],
    )


def test_merge_errors_name_the_key(r18):
    _, _, sd = r18
    pretrained = iw.convert_state_dict(sd)
    wide = _shapes(resnet.ResNet(num_classes=5, depth=18, width=16))
    with pytest.raises(
        ValueError,
        match=r"pretrained (params|batch_stats)/(bn1|conv1)/\w+ has shape \(8,?.*the model's "
        r"(params|batch_stats)/stem/(bn1|conv1)/\w+ has \(16,?.*\(resnet18, width 8\)",
    ):
        iw.merge_pretrained(wide, pretrained)
    deep = _shapes(resnet.ResNet(num_classes=5, depth=50, width=8))
    with pytest.raises(ValueError, match=r"no pretrained value.*resnet18"):
        iw.merge_pretrained(deep, pretrained)


def test_convert_errors(r18):
    _, _, sd = r18
    missing = dict(sd)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(
        iw.WeightsError, match=r"1 resnet18 keys missing.*layer3\.1\.bn2\.running_var"
    ):
        iw.convert_state_dict(missing)
    extra = dict(sd, **{"aux.weight": np.zeros(3, np.float32)})
    with pytest.raises(iw.WeightsError, match=r"unexpected.*aux\.weight"):
        iw.convert_state_dict(extra)
    with pytest.raises(
        iw.WeightsError, match="--arch resnet50 given, but the weights are resnet18"
    ):
        iw.convert_state_dict(sd, arch="resnet50")
    r34 = dict(sd)  # a third block in layer1 makes the (basic, 3-block) pattern of ResNet-34
    for k in [k for k in sd if k.startswith("layer1.1.")]:
        r34[k.replace("layer1.1.", "layer1.2.")] = sd[k]
    with pytest.raises(iw.WeightsError, match="not supported"):
        iw.convert_state_dict(r34)
    with pytest.raises(iw.WeightsError, match="does not look like a torchvision ResNet"):
        iw.convert_state_dict({"encoder.weight": np.zeros((2, 2), np.float32)})


# ----------------------------------------------------------------------------- torchvision


# torch runs in a child process: torch's CUDA wheels load triton, which crashes a process that
# already holds TensorFlow (imported by other test modules), and the tests need neither torch's
# nor our process's state from each other, only files.
_NO_TORCH = 77


def _run_torch(script: str, tmp_path, *args) -> None:
    """Runs `script` (Python, with `import torch, torchvision` done and sys.argv[1:] = args) in
    a child interpreter; skips, saying why, when torch or torchvision is missing."""
    prelude = (
        "import sys\n"
        "try:\n"
        "    import torch, torchvision\n"
        "except ImportError as e:\n"
        f"    print(e); sys.exit({_NO_TORCH})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    if proc.returncode == _NO_TORCH:
        pytest.skip(
            f"torch/torchvision are not installed ({proc.stdout.strip()}): the torchvision "
            "comparison needs `pip install -r requirements-torch.txt`"
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr


_TORCHVISION_NET = """
    import numpy as np
    arch, legacy, path, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=10)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial BN statistics and affine
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    net.eval()
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    x = np.load(out)["x"]
    with torch.no_grad():
        want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.savez(out, x=x, want=want)
"""


@pytest.mark.parametrize(
    "arch,legacy", [("resnet18", False), ("resnet18", True), ("resnet50", False)]
)
def test_logits_match_torchvision(tmp_path, arch, legacy):
    """A random-weight torchvision ResNet and the imported flax ResNet agree on the same images."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    x = (frames / 255.0 - np.array(resnet.IMAGENET_MEAN)) / np.array(resnet.IMAGENET_STD)
    x = x.astype(np.float32)
    path, io = tmp_path / f"{arch}.pth", tmp_path / "io.npz"
    np.savez(io, x=x)
    _run_torch(_TORCHVISION_NET, tmp_path, arch, int(legacy), path, io)
    want = np.load(io)["want"]

    pretrained = iw.load_pretrained(path)
    model = resnet.ResNet(num_classes=10, depth=int(arch[6:]))
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)), train=False)
    )
    got = np.asarray(
        model.apply(iw.merge_pretrained(abstract, pretrained), jnp.asarray(x), train=False)
    )
    scale = np.abs(want).max()
    assert scale > 1e-3  # the comparison is not between two near-zero outputs
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)

    if arch == "resnet18" and not legacy:
        # The training model itself: one frame, K=1, no shift -> the same logits per video.
        fvm = full_video.FullVideoModel(
            num_classes=10,
            backbone="resnet18",
            num_clusters=1,
            temporal_shift=False,
            dropout_rate=0.0,
            chunk_size=1,
        )
        videos, mask = jnp.asarray(frames[:, None]), jnp.ones((2, 1), bool)
        abstract = jax.eval_shape(
            lambda: fvm.init(jax.random.PRNGKey(0), videos, mask, train=False)
        )
        logits, _ = fvm.apply(iw.merge_pretrained(abstract, pretrained), videos, mask, train=False)
        np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4 * scale)


_TORCH_TENSORS = """
    import numpy as np
    legacy, path, out = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
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
    torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
    # numpy has no bfloat16: that one is compared as float32
    np.savez(out, **{k: (t.float() if t.dtype == torch.bfloat16 else t).numpy()
                     for k, t in tensors.items()})
"""


@pytest.mark.parametrize("legacy", [False, True])
def test_reader_matches_torch_load(tmp_path, legacy):
    """Dtypes, strides, storage offsets and shared storages come out as torch.load gives them."""
    path, out = tmp_path / "t.pth", tmp_path / "want.npz"
    _run_torch(_TORCH_TENSORS, tmp_path, int(legacy), path, out)
    with np.load(out) as f:
        wants = {k: f[k] for k in f.files}
    got = iw.read_state_dict(path)
    assert sorted(got) == sorted(wants)
    assert str(got["bfloat16"].dtype) == "bfloat16"
    for k, want in wants.items():
        value = got[k].astype(np.float32) if k == "bfloat16" else got[k]
        assert value.dtype == want.dtype and value.shape == want.shape, k
        np.testing.assert_array_equal(value, want, err_msg=k)
