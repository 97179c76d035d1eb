"""FLOPs of the full-video model, counted per layer from shapes.

Why not XLA's ``compiled.cost_analysis()``: on a GPU it does not count the convolutions
that cuDNN runs (it reported 10.5 GFLOPs for a 256-frame ResNet-50 stem forward that does
about 400), and on every backend it counts the body of a while loop (``jax.lax.scan``, the
chunked plans' passes) once, not once per iteration. Benchmarks therefore count FLOPs here,
and tests check the count against ``cost_analysis()`` on CPU for loop-free programs, where
XLA counts convolutions correctly.

Conventions:

* A multiply-add is 2 FLOPs. Only convolutions and dense layers are counted: BatchNorm, ReLU,
  pooling, residual additions, the temporal shift and the clustering itself are a few per
  cent of a ResNet's total and are left out (as in the usual "4.1 GMACs for ResNet-50").
* ``count_padding=True`` (the default) counts every tap of every kernel, the zeros of the
  padding included: what GPU convolution kernels compute, and the usual convention.
  ``count_padding=False`` counts only taps that land inside the input, which is how XLA's
  cost analysis counts (ResNet-18's 7x7 conv1 at 32 px: 10 % fewer; at 224 px about 1 %).
* Backward pass: each layer's weight gradient costs its forward once more, and the gradient
  with respect to its input once more again, except for the first convolution, whose input
  (the frames) needs no gradient.

How many times a training step runs the stem on every frame depends on the memory plan
(``plans.py``): ``STEM_FORWARDS``. "Model FLOPs" (for MFU) are those of the math without
recomputation: one stem forward per frame, i.e. the "unchunked" plan's count.
"""

from __future__ import annotations

import dataclasses

from fva_jax.models.resnet import (
    _ARCHS,
    _stage_blocks,
    _stages_in_stem,
    depth_of,
    stem_channels,
)

# Stem forwards per frame in one training step, by plan: the forward (pass 1) and, for
# "keep_stem", the backward's recomputation of each chunk; for "recompute" also pass 2.
STEM_FORWARDS = {"unchunked": 1, "keep_stem": 2, "recompute": 3}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One convolution or dense layer: its forward FLOPs per item (frame or trunk step) and
    whether the backward pass computes the gradient with respect to its input."""

    name: str
    flops: int
    input_grad: bool = True


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _taps(size: int, kernel: int, stride: int, pad: int, count_padding: bool) -> int:
    """Kernel taps summed over the output positions of one spatial dimension."""
    out = _out_size(size, kernel, stride, pad)
    if count_padding:
        return out * kernel
    return sum(
        sum(1 for k in range(kernel) if 0 <= o * stride - pad + k < size) for o in range(out)
    )


def conv_layer(
    name: str,
    size: int,
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    pad: int = 0,
    *,
    count_padding: bool = True,
    input_grad: bool = True,
) -> tuple[Layer, int]:
    """A square convolution on a ``size`` x ``size`` input: (Layer, output size)."""
    taps = _taps(size, kernel, stride, pad, count_padding) ** 2
    return Layer(name, 2 * taps * cin * cout, input_grad), _out_size(size, kernel, stride, pad)


def _block_layers(prefix, size, cin, planes, stride, downsample, bottleneck, count_padding):
    """The convolutions of one torchvision BasicBlock / Bottleneck (as resnet._Block)."""
    conv = lambda name, *a: conv_layer(f"{prefix}/{name}", *a, count_padding=count_padding)  # noqa: E731
    layers = []
    if bottleneck:
        c1, s = conv("conv1", size, cin, planes, 1)
        c2, out = conv("conv2", s, planes, planes, 3, stride, 1)
        c3, _ = conv("conv3", out, planes, 4 * planes, 1)
        layers += [c1, c2, c3]
        cout = 4 * planes
    else:
        c1, out = conv("conv1", size, cin, planes, 3, stride, 1)
        c2, _ = conv("conv2", out, planes, planes, 3, 1, 1)
        layers += [c1, c2]
        cout = planes
    if downsample:
        layers.append(conv("downsample_0", size, cin, cout, 1, stride)[0])
    return layers, out, cout


def _stage_layers(depth, width, stages, size, cin, count_padding, prefix):
    bottleneck = _ARCHS[depth][0] == "bottleneck"
    layers = []
    for stage in stages:
        for name, planes, stride, down in _stage_blocks(depth, width, stage, cin):
            block, size, cin = _block_layers(
                f"{prefix}/{name}", size, cin, planes, stride, down, bottleneck, count_padding
            )
            layers += block
    return layers, size, cin


def stem_layers(
    backbone: str, width: int, cluster_point: str, resolution: int, *, count_padding: bool = True
) -> tuple[list[Layer], int]:
    """The stem's layers for one ``resolution`` x ``resolution`` frame, and its output size.

    conv1 (7x7, stride 2, pad 3) takes the frame, which needs no gradient; the max-pool
    (3x3, stride 2, pad 1) halves the size; then the stages up to the cluster point.
    """
    depth = depth_of(backbone)
    conv1, size = conv_layer(
        "stem/conv1", resolution, 3, width, 7, 2, 3, count_padding=count_padding, input_grad=False
    )
    size = _out_size(size, 3, 2, 1)  # max-pool
    stages = range(1, _stages_in_stem(cluster_point) + 1)
    layers, size, _ = _stage_layers(depth, width, stages, size, width, count_padding, "stem")
    return [conv1] + layers, size


def trunk_layers(
    backbone: str,
    width: int,
    cluster_point: str,
    stem_size: int,
    num_classes: int,
    *,
    count_padding: bool = True,
) -> list[Layer]:
    """The trunk's layers for one step (a cluster mean or sampled frame of the stem's output
    size): the stages after the cluster point and the classifier (global pooling first)."""
    depth = depth_of(backbone)
    stages = range(_stages_in_stem(cluster_point) + 1, 5)
    cin = stem_channels(depth, width, cluster_point)
    layers, _, cin = _stage_layers(depth, width, stages, stem_size, cin, count_padding, "trunk")
    return layers + [Layer("trunk/fc", 2 * cin * num_classes)]


def forward_flops(layers) -> int:
    return sum(layer.flops for layer in layers)


def backward_flops(layers) -> int:
    """Weight gradients of every layer + input gradients where the input needs one."""
    return sum(layer.flops * (2 if layer.input_grad else 1) for layer in layers)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step, by part. ``frames``: frames through the stem;
    ``steps``: items through the trunk (B*K); ``stem_forwards``: stem forwards per frame."""

    frames: int
    steps: int
    stem_forwards: int
    stem_forward: int  # per frame
    stem_backward: int  # per frame
    trunk_forward: int  # per step
    trunk_backward: int  # per step

    @property
    def trunk(self) -> int:
        return self.steps * (self.trunk_forward + self.trunk_backward)

    @property
    def total(self) -> int:
        """FLOPs the step executes, the plan's recomputation included."""
        return self.frames * (self.stem_forwards * self.stem_forward + self.stem_backward) + (
            self.trunk
        )

    @property
    def model(self) -> int:
        """FLOPs of the math without recomputation (one stem forward per frame): for MFU."""
        return self.frames * (self.stem_forward + self.stem_backward) + self.trunk


def train_step_flops(
    model, videos_shape, plan: str | None = None, *, count_padding: bool = True
) -> StepFlops:
    """FLOPs of one training step (forward + backward; the optimizer's elementwise update is
    not counted) of ``model`` (a ``FullVideoModel``) on videos of ``videos_shape``
    (B, T, H, W, 3), H = W.

    sampling="cluster": every one of the B*T frames through the stem, ``STEM_FORWARDS[plan]``
    forwards and one backward, and B*K cluster means through the trunk (``plan``: the plan
    the step runs, e.g. ``full_video.choose_plan(model, shape).plan``; padding frames count,
    as the unchunked plan computes them). sampling="uniform"/"dense": B*K frames through
    the whole network once.
    """
    b, t, h, w = videos_shape[:4]
    if h != w:
        raise ValueError(f"square frames only, got {h}x{w} in videos_shape {videos_shape}")
    stem, size = stem_layers(
        model.backbone, model.width, model.cluster_point, h, count_padding=count_padding
    )
    trunk = trunk_layers(
        model.backbone,
        model.width,
        model.cluster_point,
        size,
        model.num_classes,
        count_padding=count_padding,
    )
    k = model.num_clusters
    if model.sampling == "cluster":
        if plan not in STEM_FORWARDS:
            raise ValueError(f"plan={plan!r}: name the plan the step runs, one of {STEM_FORWARDS}")
        frames, forwards = b * t, STEM_FORWARDS[plan]
    else:
        frames, forwards = b * k, 1
    return StepFlops(
        frames=frames,
        steps=b * k,
        stem_forwards=forwards,
        stem_forward=forward_flops(stem),
        stem_backward=backward_flops(stem),
        trunk_forward=forward_flops(trunk),
        trunk_backward=backward_flops(trunk),
    )
