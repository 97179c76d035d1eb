"""ResNet-18/50 stem/trunk split, torchvision naming, temporal shift."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fva_jax.models import resnet
from fva_jax.models.resnet import (
    ResNet,
    ResNetStem,
    ResNetTrunk,
    normalize_images,
    temporal_shift,
)


def numpy_shift(x, fold_div=8):
    """TSM's shift written with loops: x (B, K, h, w, c)."""
    b, k, _, _, c = x.shape
    fold = c // fold_div
    out = np.zeros_like(x)
    for t in range(k):
        for ch in range(c):
            if ch < fold:  # takes the next step's value
                out[:, t, ..., ch] = x[:, t + 1, ..., ch] if t + 1 < k else 0
            elif ch < 2 * fold:  # takes the previous step's value
                out[:, t, ..., ch] = x[:, t - 1, ..., ch] if t >= 1 else 0
            else:
                out[:, t, ..., ch] = x[:, t, ..., ch]
    return out


@pytest.mark.parametrize("shape", [(2, 5, 3, 2, 16), (1, 4, 2, 2, 12), (3, 1, 1, 1, 8)])
def test_temporal_shift_matches_numpy(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    want = numpy_shift(x)
    np.testing.assert_array_equal(np.asarray(temporal_shift(jnp.asarray(x))), want)
    flat = x.reshape((-1,) + shape[2:])  # (B*K, h, w, c) layout
    got = temporal_shift(jnp.asarray(flat), num_segments=shape[1])
    np.testing.assert_array_equal(np.asarray(got), want.reshape(flat.shape))


def test_temporal_shift_bad_input():
    with pytest.raises(ValueError, match="num_segments"):
        temporal_shift(jnp.zeros((6, 2, 2, 8)))
    with pytest.raises(ValueError, match="multiple"):
        temporal_shift(jnp.zeros((6, 2, 2, 8)), num_segments=4)


@pytest.mark.parametrize("depth,count", [(18, 11_689_512), (50, 25_557_032)])
def test_torchvision_layout(depth, count):
    """Width 64, 1000 classes: torchvision's parameter count, names and shapes (HWIO)."""
    variables = jax.eval_shape(
        lambda: ResNet(num_classes=1000, depth=depth).init(
            jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False
        )
    )
    params = variables["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == count
    paths = {
        "/".join(k.key for k in p): x.shape
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert paths["stem/conv1/kernel"] == (7, 7, 3, 64)
    assert paths["stem/bn1/scale"] == (64,)
    convs = [p for p in paths if p.endswith("kernel") and "fc" not in p]
    if depth == 18:
        assert len(convs) == 1 + 8 * 2 + 3
        assert paths["trunk/layer2_0/conv1/kernel"] == (3, 3, 64, 128)
        assert paths["trunk/layer2_0/downsample_0/kernel"] == (1, 1, 64, 128)
        assert paths["trunk/layer4_1/bn2/bias"] == (512,)
        assert paths["trunk/fc/kernel"] == (512, 1000)
        assert "stem/layer1_0/downsample_0/kernel" not in paths
    else:
        assert len(convs) == 1 + 16 * 3 + 4
        assert paths["stem/layer1_0/downsample_0/kernel"] == (1, 1, 64, 256)
        assert paths["trunk/layer3_5/conv2/kernel"] == (3, 3, 256, 256)
        assert paths["trunk/layer4_0/downsample_1/scale"] == (2048,)
        assert paths["trunk/fc/kernel"] == (2048, 1000)
    stats = {
        "/".join(k.key for k in p)
        for p, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
    }
    assert {"stem/bn1/mean", "stem/bn1/var", "trunk/layer4_1/bn2/var"} <= stats


def _stem_trunk_shapes(depth, dtype, width=8, b=2, k=3, train=True):
    """x -> (stem variables, trunk variables, stem output, logits) of a stem + trunk.

    test_shapes_and_dtypes traces it with jax.eval_shape (exact shapes and dtypes, no compute);
    test_runs_finite executes it.
    """
    stem = ResNetStem(depth=depth, width=width, cluster_point="stage1", dtype=dtype)
    trunk = ResNetTrunk(
        num_classes=7,
        depth=depth,
        width=width,
        cluster_point="stage1",
        temporal_shift=True,
        dropout_rate=0.5,
        dtype=dtype,
    )

    def run(x):
        sv = stem.init(jax.random.key(1), x, use_running_average=False)
        h = stem.apply(sv, x, use_running_average=True)
        h = h.reshape((b, k) + h.shape[1:])
        tv = trunk.init(jax.random.key(2), h, train=False)
        logits, _ = trunk.apply(
            tv, h, train=train, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"]
        )
        return sv, tv, h, logits

    return run


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(depth, dtype):
    width, b, k = 8, 2, 3
    x = jax.ShapeDtypeStruct((b * k, 32, 32, 3), jnp.float32)
    sv, tv, h, logits = jax.eval_shape(_stem_trunk_shapes(depth, dtype, width, b, k), x)
    expansion = 4 if depth == 50 else 1
    assert h.shape == (b, k, 8, 8, width * expansion) and h.dtype == dtype
    assert logits.shape == (b, k, 7) and logits.dtype == jnp.float32
    for leaf in jax.tree.leaves((sv, tv)):
        assert leaf.dtype == jnp.float32  # parameters and statistics stay float32


@pytest.mark.parametrize("depth,dtype", [(50, jnp.float32), (18, jnp.bfloat16)])
def test_runs_finite(depth, dtype):
    """Executed (not only traced): finite logits, bfloat16 activations for the bfloat16 model.

    Run eagerly: XLA:CPU compiles bfloat16 convolutions slowly, op-by-op is cheaper here.
    """
    x = jax.random.normal(jax.random.key(0), (6, 32, 32, 3))
    _, _, h, logits = _stem_trunk_shapes(depth, dtype)(x)
    assert h.dtype == dtype and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(h, np.float32)).all()


@pytest.mark.parametrize("point,stride,stage", [("maxpool", 4, 0), ("stage2", 8, 2)])
def test_cluster_points(point, stride, stage):
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    stem = ResNetStem(depth=18, width=8, cluster_point=point)
    h, sv = jax.eval_shape(
        lambda x: stem.init_with_output(jax.random.key(0), x, use_running_average=True), x
    )
    assert h.shape == (2, 32 // stride, 32 // stride, resnet.stem_channels(18, 8, point))
    names = set(sv["params"])
    assert ("layer2_0" in names) == (stage == 2) and ("layer1_0" in names) == (stage >= 1)
    trunk = ResNetTrunk(num_classes=5, depth=18, width=8, cluster_point=point)
    tv = jax.eval_shape(lambda h: trunk.init(jax.random.key(1), h[None], train=False), h)
    assert "layer1_0" in tv["params"] if stage == 0 else "layer1_0" not in tv["params"]
    assert "layer4_1" in tv["params"] and "fc" in tv["params"]


def test_temporal_shift_mixes_steps_only_when_on():
    """With the shift, changing step 0 changes step 1's logits; without it, it does not."""
    h = jax.random.normal(jax.random.key(0), (1, 3, 8, 8, 8))
    h2 = h.at[:, 0].add(1.0)
    for shift in (True, False):
        trunk = ResNetTrunk(num_classes=5, depth=18, width=8, temporal_shift=shift)
        v = trunk.init(jax.random.key(1), h, train=False)
        a, b = (np.asarray(trunk.apply(v, z, train=False)) for z in (h, h2))
        assert not np.allclose(a[:, 0], b[:, 0])
        assert np.allclose(a[:, 2], b[:, 2]) if not shift else True
        assert (not np.allclose(a[:, 1], b[:, 1])) == shift


def test_segment_mask_leaves_steps_out_of_batch_statistics():
    """Training-mode BatchNorm: a masked-out step's content does not affect the other steps."""
    h = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 8))
    h2 = h.at[:, 2].set(100.0)
    m = jnp.array([[True, True, False], [True, True, False]])
    trunk = ResNetTrunk(num_classes=5, depth=18, width=8, temporal_shift=False, dropout_rate=0.0)
    v = trunk.init(jax.random.key(1), h, train=False)
    out = [trunk.apply(v, z, train=True, segment_mask=m, mutable=["batch_stats"]) for z in (h, h2)]
    np.testing.assert_allclose(out[0][0][:, :2], out[1][0][:, :2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out[0][1]["batch_stats"]["layer2_0"]["bn1"]["mean"],
        out[1][1]["batch_stats"]["layer2_0"]["bn1"]["mean"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_masked_batchnorm_uses_the_selected_rows_and_survives_selecting_none():
    """Rows masked out do not enter the statistics (output rows and running statistics as
    nn.BatchNorm on the selected rows alone); a mask selecting nothing leaves the running
    statistics as they were and the output finite, where Flax alone would give NaN."""
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 2.0 + 5.0
    x = x.at[1].set(100.0)  # a masked-out row with far-off values
    select = jnp.array([True, False, True, False]).reshape(4, 1, 1, 1)
    bn = resnet.MaskedBatchNorm(use_running_average=False, momentum=0.9)
    variables = bn.init(jax.random.key(1), x, mask=select)
    y, upd = bn.apply(variables, x, mask=select, mutable=["batch_stats"])
    want, want_upd = nn.BatchNorm(use_running_average=False, momentum=0.9).apply(
        variables, x[jnp.array([0, 2])], mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y[jnp.array([0, 2])], want, rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            upd["batch_stats"][name], want_upd["batch_stats"][name], rtol=1e-6
        )
        assert not np.allclose(upd["batch_stats"][name], variables["batch_stats"][name])
    y, upd = bn.apply(variables, x, mask=jnp.zeros_like(select), mutable=["batch_stats"])
    assert np.isfinite(np.asarray(y)).all()
    for name in ("mean", "var"):
        np.testing.assert_array_equal(upd["batch_stats"][name], variables["batch_stats"][name])


def test_trunk_on_a_batch_of_empty_steps_is_finite_and_keeps_its_statistics():
    """A training step whose segment_mask is all False (nothing real) changes no running
    statistic and gives finite logits, instead of NaN everywhere."""
    h = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 8))
    trunk = ResNetTrunk(num_classes=5, depth=18, width=8, temporal_shift=False, dropout_rate=0.0)
    v = trunk.init(jax.random.key(1), h, train=False)
    logits, upd = trunk.apply(
        v, h, train=True, segment_mask=jnp.zeros((2, 3), bool), mutable=["batch_stats"]
    )
    assert np.isfinite(np.asarray(logits)).all()
    new_stats = jax.tree_util.tree_flatten_with_path(upd["batch_stats"])[0]
    old_stats = jax.tree.leaves(v["batch_stats"])
    assert len(new_stats) == len(old_stats) > 0
    for (path, new), old in zip(new_stats, old_stats):
        np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))


def test_normalize_images_and_bad_backbone():
    x = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    want = (1.0 - np.array(resnet.IMAGENET_MEAN)) / np.array(resnet.IMAGENET_STD)
    np.testing.assert_allclose(np.asarray(resnet.normalize_images(x))[0, 0, 0], want, rtol=1e-6)
    assert resnet.normalize_images(x, jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="resnet34"):
        resnet.depth_of("resnet34")
    with pytest.raises(ValueError, match="cluster_point"):
        ResNetStem(depth=18, width=8, cluster_point="stage3").init(
            jax.random.key(0), x, use_running_average=True
        )


def _random_statistics(variables, seed):
    """Non-trivial BatchNorm scales, biases, means and variances (fresh ones are 1, 0, 0, 1)."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if name in ("bias", "mean"):
            return jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
        return x

    return {
        "params": jax.tree_util.tree_map_with_path(perturb, variables["params"]),
        "batch_stats": jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"]),
    }


@pytest.mark.parametrize("depth,point", [(18, "stage1"), (50, "stage1"), (18, "stage2")])
def test_folded_stem_equals_the_plain_stem(depth, point):
    """BatchNorm (running statistics) and the ImageNet normalisation folded into the
    convolutions: the same outputs and the same parameter gradients as the plain stem on
    normalised frames, up to float32 rounding."""
    frames = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), np.uint8))
    plain = ResNetStem(depth=depth, width=8, cluster_point=point)
    folded = plain.clone(folded=True)
    variables = plain.init(jax.random.key(0), normalize_images(frames), use_running_average=True)
    variables = _random_statistics(variables, depth)
    folded_vars = resnet.fold_stem_batchnorm(variables)
    assert jax.tree.structure(folded_vars) == jax.tree.structure(
        jax.eval_shape(
            lambda f: folded.init(jax.random.key(0), f, use_running_average=True), frames
        )
    )
    assert "bn1" not in folded_vars["params"] and "bias" in folded_vars["params"]["conv1"]

    def plain_out(params):
        return plain.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            normalize_images(frames),
            use_running_average=True,
        )

    def folded_out(params):
        return folded.apply(
            resnet.fold_stem_batchnorm({"params": params, "batch_stats": variables["batch_stats"]}),
            frames,
            use_running_average=True,
        )

    want, got = jax.jit(plain_out)(variables["params"]), jax.jit(folded_out)(variables["params"])
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    probe = jax.random.normal(jax.random.key(1), want.shape)
    grads = [
        jax.jit(jax.grad(lambda p, f=f: jnp.sum(f(p) * probe)))(variables["params"])
        for f in (plain_out, folded_out)
    ]
    for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(g)[0] for g in grads)):
        np.testing.assert_allclose(
            b, a, rtol=1e-3, atol=1e-4 * float(jnp.abs(a).max()), err_msg=jax.tree_util.keystr(path)
        )


def test_folded_stem_in_bfloat16_stays_close():
    """bfloat16 compute: outputs within bfloat16 rounding of the float32 plain stem."""
    frames = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), np.uint8))
    plain = ResNetStem(depth=18, width=8)
    variables = _random_statistics(
        plain.init(jax.random.key(0), normalize_images(frames), use_running_average=True), 3
    )
    want = plain.apply(variables, normalize_images(frames), use_running_average=True)
    got = plain.clone(folded=True, dtype=jnp.bfloat16).apply(
        resnet.fold_stem_batchnorm(variables), frames, use_running_average=True
    )
    assert got.dtype == jnp.bfloat16
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got.astype(jnp.float32) - want).max()) < 0.05 * scale
