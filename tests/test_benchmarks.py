"""The per-layer FLOP counter (fva_jax/models/flops.py) against XLA's cost analysis on CPU,
and benchmarks/step_time.py's JSON at tiny sizes."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from fva_jax.models import flops
from fva_jax.models.full_video import FullVideoModel
from fva_jax.models.resnet import ResNetStem
from fva_jax.training import steps

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _xla_flops(fn, *args) -> float:
    """XLA's FLOP count of fn's lowered (loop-free) program: no compilation needed."""
    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


@pytest.mark.parametrize(
    "size, kernel, stride, pad",
    [(32, 7, 2, 3), (9, 3, 1, 1), (8, 3, 2, 1), (7, 1, 2, 0), (5, 3, 1, 0)],
)
def test_conv_layer_counts_what_xla_counts(size, kernel, stride, pad):
    """count_padding=False: only taps inside the input, exactly as XLA counts them."""
    cin, cout, batch = 3, 5, 2
    x = jax.ShapeDtypeStruct((batch, size, size, cin), jnp.float32)
    k = jax.ShapeDtypeStruct((kernel, kernel, cin, cout), jnp.float32)

    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (stride,) * 2, ((pad, pad),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    layer, out = flops.conv_layer("c", size, cin, cout, kernel, stride, pad, count_padding=False)
    assert out == jax.eval_shape(conv, x, k).shape[1]
    assert batch * layer.flops == _xla_flops(conv, x, k)
    padded, _ = flops.conv_layer("c", size, cin, cout, kernel, stride, pad)
    assert padded.flops == 2 * (out * kernel) ** 2 * cin * cout >= layer.flops


def test_resnet50_at_224px_is_the_usual_4_1_gmacs():
    stem, size = flops.stem_layers("resnet50", 64, "stage1", 224)
    trunk = flops.trunk_layers("resnet50", 64, "stage1", size, 1000)
    total = flops.forward_flops(stem) + flops.forward_flops(trunk)
    assert size == 56 and 8.1e9 < total < 8.25e9


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_stem_forward_matches_xla(backbone):
    """The folded stem (no BatchNorm left) at width 16, 64 px: XLA counts the convolutions
    plus a few % of elementwise work (biases, ReLU, max-pool, residual additions)."""
    stem = ResNetStem(depth=int(backbone[6:]), width=16, folded=True)
    frames = jax.ShapeDtypeStruct((3, 64, 64, 3), jnp.uint8)
    variables = jax.eval_shape(
        lambda f: stem.init(jax.random.key(0), f, use_running_average=True), frames
    )
    xla = _xla_flops(lambda v, f: stem.apply(v, f, use_running_average=True), variables, frames)
    layers, _ = flops.stem_layers(backbone, 16, "stage1", 64, count_padding=False)
    assert 1.0 <= xla / (3 * flops.forward_flops(layers)) < 1.05


@pytest.mark.parametrize("sampling, plan", [("uniform", None), ("cluster", "unchunked")])
def test_train_step_matches_xla(sampling, plan):
    """A whole training step (forward, backward, update), loop-free: the uniform step and
    the unchunked plan. Counting input gradients wrongly (all or none) would be off by
    far more than the elementwise work XLA adds."""
    model = FullVideoModel(
        num_classes=10,
        backbone="resnet18",
        width=16,
        num_clusters=4,
        sampling=sampling,
        plan=plan or "auto",
    )
    shape = (2, 4 if sampling == "uniform" else 16, 64, 64, 3)
    videos = jax.ShapeDtypeStruct(shape, jnp.uint8)
    mask = jax.ShapeDtypeStruct(shape[:2], jnp.bool_)
    variables = jax.eval_shape(
        lambda v, m: model.init({"params": jax.random.key(0)}, v, m, train=False), videos, mask
    )
    tx = optax.sgd(0.1)
    state = jax.eval_shape(
        lambda v: steps.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=v["params"],
            batch_stats=v["batch_stats"],
            opt_state=tx.init(v["params"]),
            rng=jax.random.PRNGKey(0),
        ),
        variables,
    )
    batch = {
        "video": videos,
        "mask": mask,
        "label": jax.ShapeDtypeStruct((2,), jnp.int32),
        "batch_mask": jax.ShapeDtypeStruct((2,), jnp.bool_),
    }
    step = functools.partial(
        steps.train_step, model=model, tx=tx, schedule=optax.constant_schedule(0.1)
    )
    xla = _xla_flops(step, state, batch)
    counted = flops.train_step_flops(model, shape, plan, count_padding=False)
    assert 1.0 <= xla / counted.total < 1.06
    assert counted.model == counted.total  # the unchunked plan recomputes nothing
    if plan:
        recompute = flops.train_step_flops(model, shape, "recompute", count_padding=False)
        assert recompute.total - counted.total == 2 * counted.frames * counted.stem_forward


def test_step_time_json_has_its_keys(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    import step_time  # pylint: disable=g-import-not-at-top

    out = step_time.main(
        [
            "--model=resnet18",
            "--width=4",
            "--resolution=32",
            "--frames=16",
            "--num-clusters=2",
            "--chunk-size=8",
            "--batch-size=1",
            "--steps=1",
            "--plans=",
            "--fast-compile",
        ]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("{") and '"time_ratio_to_uniform"' in printed[-1]
    assert out["sampling"] == ["cluster", "uniform"]
    assert out["plan"] == [out["chosen_plan"], None] and out["chosen_plan"] == "unchunked"
    assert len(out["time_ratio_to_uniform"]) == len(out["flops"]) == 2
    assert out["time_ratio_to_uniform"][1] == 1.0 and out["flops"][0] > out["flops"][1] > 0
