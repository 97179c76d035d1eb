"""Tests for importing torchvision weights: the safe reader (fva_jax.models.weights_io), the
torchvision <-> flax mapping and merging (fva_jax.models.resnet_weights), the CLI
(fva_jax.tools.import_weights).

None of the default tests needs torch. The mapping tests build torchvision-style state dicts
from fva_jax's own ResNet with a plain inverse mapping written out here; the comparison with
torchvision uses the small reference files in tests/data (made by
tests/make_torch_references.py with torch installed): torch-saved tensors for the reader, and
torchvision's logits for ResNet-18/50 with weights regenerated here from a seed.

Opt-in: with FVA_TORCH_TESTS=1 and torch/torchvision installed (requirements-torch.txt), the
full comparison with real torchvision networks runs too, in a child process (FVA_TORCH_PYTHON
names another interpreter that has torch; it needs only torch, torchvision and numpy).
"""

import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch_references as refs
from flax import traverse_util

from fva_jax.models import full_video, resnet, weights_io
from fva_jax.models import resnet_weights as rw
from fva_jax.tools import import_weights

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
            pickle.dumps(weights_io.LEGACY_MAGIC, protocol=2)
            + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"little_endian": True}, protocol=2)
            + payload
        )
    expected = r"posix\.system" if evil_cls is _Evil else r"(__builtin__|builtins)\.eval"
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load global {expected}"):
        weights_io.read_state_dict(path)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        rw.load_pretrained(path)
    with pytest.raises(SystemExit, match="refusing"):
        import_weights.main([str(path), "--out", str(tmp_path / "out")])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "target", [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n"]
)
def test_pickle_cannot_modify_allowed_globals(tmp_path, target):
    """BUILD on an allowed global (setting its attributes) is refused, and nothing changes."""
    defaults = weights_io._rebuild_tensor.__defaults__
    state = b"}X\x0c\x00\x00\x00__defaults__)s"  # {"__defaults__": ()}
    path = tmp_path / "build.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "x/data.pkl", b"\x80\x02" + target + b"(N" + state + b"tb."
        )  # BUILD (None, slotstate)
    with pytest.raises(pickle.UnpicklingError, match="refusing to modify"):
        weights_io.read_state_dict(path)
    assert weights_io._rebuild_tensor.__defaults__ == defaults


def test_not_a_state_dict_and_corrupt_files(tmp_path):
    path = tmp_path / "list.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/data.pkl", pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(weights_io.WeightsError, match="not a state dict"):
        weights_io.read_state_dict(path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(weights_io.WeightsError, match="junk.pth"):
        weights_io.read_state_dict(junk)
    with pytest.raises(weights_io.WeightsError, match="no such file"):
        weights_io.read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(weights_io.WeightsError, match="without pretrained.npz"):
        rw.load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- mapping


def test_expected_keys_follow_torchvision_naming():
    keys18 = set(rw.expected_torch_keys("resnet18"))
    keys50 = set(rw.expected_torch_keys("resnet50"))
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
        # contiguous: safetensors 0.8 writes a transposed view's memory, not its values
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, src)
    target = import_weights.main([str(src), "--out", str(tmp_path / "out")])
    assert target == tmp_path / "out" / rw.PRETRAINED_FILENAME
    for pretrained in (
        rw.load_pretrained(tmp_path / "out"),
        rw.load_pretrained(src, arch="resnet18"),
    ):
        assert rw.pretrained_arch(pretrained) == "resnet18"
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
            merged = rw.merge_pretrained(abstract, pretrained)
            assert jax.tree.structure(merged) == jax.tree.structure(abstract)
            got, want = _stripped(merged), _stripped(variables)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
            if point == "maxpool":
                assert "layer1_0" in merged["params"]["trunk"]


def test_merge_skips_fc_for_other_class_count(r18):
    _, variables, sd = r18
    pretrained = rw.convert_state_dict(sd)
    model = resnet.ResNet(num_classes=3, depth=18, width=8)
    init = _randomize(_shapes(model), seed=3)
    lines = []
    merged = rw.merge_pretrained(init, pretrained, log_fn=lines.append)
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
    pretrained = rw.convert_state_dict(sd)
    wide = _shapes(resnet.ResNet(num_classes=5, depth=18, width=16))
    with pytest.raises(
        ValueError,
        match=r"pretrained (params|batch_stats)/(bn1|conv1)/\w+ has shape \(8,?.*the model's "
        r"(params|batch_stats)/stem/(bn1|conv1)/\w+ has \(16,?.*\(resnet18, width 8\)",
    ):
        rw.merge_pretrained(wide, pretrained)
    deep = _shapes(resnet.ResNet(num_classes=5, depth=50, width=8))
    with pytest.raises(ValueError, match=r"no pretrained value.*resnet18"):
        rw.merge_pretrained(deep, pretrained)


def test_convert_errors(r18):
    _, _, sd = r18
    missing = dict(sd)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(
        weights_io.WeightsError, match=r"1 resnet18 keys missing.*layer3\.1\.bn2\.running_var"
    ):
        rw.convert_state_dict(missing)
    extra = dict(sd, **{"aux.weight": np.zeros(3, np.float32)})
    with pytest.raises(weights_io.WeightsError, match=r"unexpected.*aux\.weight"):
        rw.convert_state_dict(extra)
    with pytest.raises(
        weights_io.WeightsError, match="--arch resnet50 given, but the weights are resnet18"
    ):
        rw.convert_state_dict(sd, arch="resnet50")
    r34 = dict(sd)  # a third block in layer1 makes the (basic, 3-block) pattern of ResNet-34
    for k in [k for k in sd if k.startswith("layer1.1.")]:
        r34[k.replace("layer1.1.", "layer1.2.")] = sd[k]
    with pytest.raises(weights_io.WeightsError, match="not supported"):
        rw.convert_state_dict(r34)
    with pytest.raises(weights_io.WeightsError, match="does not look like a torchvision ResNet"):
        rw.convert_state_dict({"encoder.weight": np.zeros((2, 2), np.float32)})


def test_corrupt_safetensors_is_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(
        weights_io.WeightsError, match="bad.safetensors: not a readable safetensors"
    ):
        weights_io.read_state_dict(path)


def test_cli_module_reexports_the_loaders(tmp_path, r18):
    """The trainer (fva_jax.training.experiment, config.train.init_from) calls resnet_weights'
    load_pretrained / merge_pretrained; the CLI module re-exports the same functions for
    scripts, and load() is the two in one."""
    for name in ("load_pretrained", "merge_pretrained", "save_pretrained", "WeightsError"):
        assert getattr(import_weights, name) is getattr(rw, name, getattr(weights_io, name, None))
    model, variables, sd = r18
    np.savez(tmp_path / "sd.npz", **sd)
    init = _randomize(_shapes(model), seed=5)
    merged = rw.load(init, tmp_path / "sd.npz", log_fn=lambda line: None)
    got, want = _stripped(merged), _stripped(variables)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


# ----------------------------------------------------------------------------- torch references


def test_reference_constants_are_the_models():
    assert refs.IMAGENET_MEAN == resnet.IMAGENET_MEAN and refs.IMAGENET_STD == resnet.IMAGENET_STD


@pytest.mark.parametrize("path", [refs.TENSORS_ZIP, refs.TENSORS_LEGACY], ids=["zip", "legacy"])
def test_reader_matches_torch_load_references(path):
    """Dtypes, strides, storage offsets and shared storages come out as torch.load gave them
    (files written by tests/make_torch_references.py)."""
    with np.load(refs.TENSORS_WANT) as f:
        wants = {k: f[k] for k in f.files}
    got = weights_io.read_state_dict(path)
    assert sorted(got) == sorted(wants)
    assert str(got["bfloat16"].dtype) == "bfloat16"
    for k, want in wants.items():
        value = got[k].astype(np.float32) if k == "bfloat16" else got[k]
        assert value.dtype == want.dtype and value.shape == want.shape, k
        np.testing.assert_array_equal(value, want, err_msg=k)


def _reference(arch):
    """(state dict regenerated from the seed, the stored reference) for `arch`."""
    with np.load(refs.logits_file(arch)) as f:
        ref = {k: f[k] for k in f.files}
    key_shapes = list(zip(ref["keys"].tolist(), json.loads(str(ref["shapes"]))))
    state_dict = refs.state_dict_from_seed(key_shapes)
    assert refs.fingerprint(state_dict) == str(ref["fingerprint"]), (
        "the weights drawn from the seed differ from those torchvision's logits were computed "
        "with (has NumPy's random stream changed?); rerun tests/make_torch_references.py"
    )
    return state_dict, ref


@pytest.mark.parametrize("arch", refs.ARCHS)
def test_logits_match_torchvision_references(arch):
    """torchvision's ResNet and the imported flax ResNet agree on the same images: the stored
    logits of torchvision with weights drawn from the seed, against fva_jax's ResNet with the
    same weights imported."""
    state_dict, ref = _reference(arch)
    assert set(state_dict) == set(rw.expected_torch_keys(arch))  # torchvision's own key list
    pretrained = rw.convert_state_dict(state_dict, arch)
    model = resnet.ResNet(num_classes=refs.NUM_CLASSES, depth=resnet.depth_of(arch))
    x, want = ref["x"], ref["logits"]
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + x.shape[1:]), train=False)
    )
    got = np.asarray(
        model.apply(rw.merge_pretrained(abstract, pretrained), jnp.asarray(x), train=False)
    )
    scale = np.abs(want).max()
    assert scale > 1e-3  # the comparison is not between two near-zero outputs
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(x, resnet.normalize_images(ref["frames"]), rtol=1e-6, atol=1e-6)

    if arch == "resnet18":
        # The training model itself: one frame, K=1, no shift -> the same logits per video.
        fvm = full_video.FullVideoModel(
            num_classes=refs.NUM_CLASSES,
            backbone="resnet18",
            num_clusters=1,
            temporal_shift=False,
            dropout_rate=0.0,
            chunk_size=1,
        )
        videos = jnp.asarray(ref["frames"][:, None])
        mask = jnp.ones(videos.shape[:2], bool)
        abstract = jax.eval_shape(
            lambda: fvm.init(jax.random.PRNGKey(0), videos, mask, train=False)
        )
        logits, _ = fvm.apply(rw.merge_pretrained(abstract, pretrained), videos, mask, train=False)
        np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4 * scale)


# ----------------------------------------------------------------------------- torch (opt-in)


# torch runs in a child process: torch's CUDA wheels load triton, which crashes a process that
# already holds TensorFlow (imported by other test modules), and the tests need neither torch's
# nor our process's state from each other, only files.
_NO_TORCH = 77
_OPT_IN = "FVA_TORCH_TESTS"


def _run_torch(script: str, tmp_path, *args) -> None:
    """Runs `script` (Python, with `import torch, torchvision` done and sys.argv[1:] = args) in
    a child interpreter; skips, saying why, unless FVA_TORCH_TESTS=1 and torch is installed."""
    if os.environ.get(_OPT_IN) != "1":
        pytest.skip(
            f"opt-in: the comparison with real torchvision networks runs with {_OPT_IN}=1 and "
            "torch installed (pip install -r requirements-torch.txt); the default tests compare "
            "with the reference files in tests/data instead"
        )
    python = os.environ.get("FVA_TORCH_PYTHON", sys.executable)
    prelude = (
        "import sys\n"
        "try:\n"
        "    import torch, torchvision\n"
        "except ImportError as e:\n"
        f"    print(e); sys.exit({_NO_TORCH})\n"
    )
    proc = subprocess.run(
        [python, "-c", prelude + textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    if proc.returncode == _NO_TORCH:
        pytest.skip(
            f"{_OPT_IN}=1, but torch/torchvision are not installed for {python} "
            f"({proc.stdout.strip()}): pip install -r requirements-torch.txt, or point "
            "FVA_TORCH_PYTHON at an interpreter that has them"
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
    """Opt-in. A torchvision ResNet with torch's own random initialisation, saved as a full
    .pth (zip or legacy), imported through the file and run by fva_jax: the same logits."""
    _, x = refs.input_frames()
    path, io = tmp_path / f"{arch}.pth", tmp_path / "io.npz"
    np.savez(io, x=x)
    _run_torch(_TORCHVISION_NET, tmp_path, arch, int(legacy), path, io)
    want = np.load(io)["want"]

    pretrained = rw.load_pretrained(path)
    model = resnet.ResNet(num_classes=10, depth=resnet.depth_of(arch))
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + x.shape[1:]), train=False)
    )
    got = np.asarray(
        model.apply(rw.merge_pretrained(abstract, pretrained), jnp.asarray(x), train=False)
    )
    scale = np.abs(want).max()
    assert scale > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


_MAKE_REFERENCES = """
    import runpy
    script, out = sys.argv[1], sys.argv[2]
    sys.argv = [script, "--out", out]
    runpy.run_path(script, run_name="__main__")
"""


def test_committed_references_are_current(tmp_path):
    """Opt-in. tests/make_torch_references.py, rerun with the installed torch, gives the
    committed files' tensors and (within float tolerance) logits."""
    script = pathlib.Path(__file__).resolve().parent / "make_torch_references.py"
    _run_torch(_MAKE_REFERENCES, tmp_path, script, tmp_path / "refs")
    fresh = tmp_path / "refs"
    for committed in (refs.TENSORS_ZIP, refs.TENSORS_LEGACY):
        new = weights_io.read_state_dict(fresh / committed.name)
        old = weights_io.read_state_dict(committed)
        assert sorted(new) == sorted(old)
        for k in old:
            np.testing.assert_array_equal(new[k], old[k], err_msg=k)
    for arch in refs.ARCHS:
        with (
            np.load(fresh / refs.logits_file(arch).name) as new,
            np.load(refs.logits_file(arch)) as old,
        ):
            for k in ("keys", "shapes", "fingerprint", "frames", "x"):
                np.testing.assert_array_equal(new[k], old[k], err_msg=f"{arch} {k}")
            scale = np.abs(old["logits"]).max()
            np.testing.assert_allclose(new["logits"], old["logits"], rtol=1e-5, atol=1e-5 * scale)
