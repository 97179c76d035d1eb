"""ResNet-18/50 (torchvision layout) split into a stem and a trunk, with TSM temporal shift.

The network is cut at the *cluster point* into

* ``ResNetStem``: conv1 + bn1 + relu + maxpool [+ layer1] [+ layer2], run per frame
  (frames are independent before the cluster point), and
* ``ResNetTrunk``: the remaining stages, global average pool, dropout and ``fc``, run on
  ``(B, K, h, w, c)`` (K cluster means or K sampled frames), with the TSM temporal shift
  acting along K at the start of every residual branch ("blockres").

``cluster_point``: ``"maxpool"`` (stem ends after the max-pool), ``"stage1"`` (after layer1,
the paper's choice), ``"stage2"`` (after layer2).

Parameter names and the torchvision state dict
----------------------------------------------
Every module is named after its torchvision attribute, with ``.`` inside a stage replaced by
``_``; only the top level ``stem`` / ``trunk`` (also in ``FullVideoModel``) is ours. Dropping
the first path component and replacing ``_`` by ``.`` gives the torchvision key (which
stages sit under ``stem`` depends on the cluster point; the names below it do not):

  flax path (params / batch_stats)         torchvision key                  conversion
  stem/conv1/kernel                        conv1.weight                     OIHW -> HWIO
  stem/bn1/scale, stem/bn1/bias            bn1.weight, bn1.bias             as is
  batch_stats: stem/bn1/mean, .../var      bn1.running_mean, .running_var   as is
  {stem|trunk}/layerS_B/convN/kernel       layerS.B.convN.weight            OIHW -> HWIO
  {stem|trunk}/layerS_B/bnN/...            layerS.B.bnN.*                   as bn1 above
  .../layerS_B/downsample_0/kernel         layerS.B.downsample.0.weight     OIHW -> HWIO (1x1 conv)
  .../layerS_B/downsample_1/...            layerS.B.downsample.1.*          as bn1 above
  trunk/fc/kernel, trunk/fc/bias           fc.weight, fc.bias               kernel = fc.weight.T

``bnN.num_batches_tracked`` has no counterpart (dropped). Convolutions have no bias, as in
torchvision. Padding is explicit (3 for conv1, 1 for 3x3 convs and the max-pool) so outputs
match torchvision exactly, not "SAME" (which pads asymmetrically for stride 2). BatchNorm:
epsilon 1e-5, momentum 0.9 (= torchvision momentum 0.1). Bottlenecks stride in the 3x3
conv (torchvision "ResNet v1.5"). With ``width=64`` shapes equal torchvision's.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CLUSTER_POINTS = ("maxpool", "stage1", "stage2")
# depth -> (block kind, blocks per stage)
_ARCHS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
BACKBONES = tuple(f"resnet{depth}" for depth in _ARCHS)  # the names `depth_of` accepts
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BN_EPSILON = 1e-5

# torchvision initialises convs with kaiming_normal(fan_out, relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def depth_of(backbone: str) -> int:
    """ "resnet18" -> 18, "resnet50" -> 50; clear error otherwise."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not supported; use one of {BACKBONES}")
    return int(backbone.removeprefix("resnet"))


def normalize_images(images: jnp.ndarray, dtype: Any = jnp.float32) -> jnp.ndarray:
    """uint8 RGB (..., H, W, 3) -> ImageNet-normalised ``dtype`` (torchvision convention)."""
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x.astype(dtype)


def temporal_shift(
    x: jnp.ndarray, num_segments: int | None = None, fold_div: int = 8
) -> jnp.ndarray:
    """TSM shift along time: x (B, K, h, w, c), or (B*K, h, w, c) with ``num_segments=K``.

    As in TSM's ``TemporalShift.shift``: channels [0, c/8) of step t take the values of step
    t+1 (shifted back in time), channels [c/8, 2c/8) take those of step t-1 (shifted forward),
    the rest stay; the vacated ends are zero. Returns the input's shape.
    """
    flat = x.ndim == 4
    if flat:
        if num_segments is None:
            raise ValueError("temporal_shift on (B*K, h, w, c) input needs num_segments=K")
        if x.shape[0] % num_segments:
            raise ValueError(
                f"leading dim {x.shape[0]} is not a multiple of num_segments={num_segments}"
            )
        x = x.reshape((-1, num_segments) + x.shape[1:])
    if x.ndim != 5:
        raise ValueError(
            f"temporal_shift expects (B, K, h, w, c) or (B*K, h, w, c), got shape {x.shape}"
        )
    fold = x.shape[-1] // fold_div
    zeros = jnp.zeros_like(x[:, :1, ..., :fold])
    back = jnp.concatenate([x[:, 1:, ..., :fold], zeros], axis=1)
    fwd = jnp.concatenate([zeros, x[:, :-1, ..., fold : 2 * fold]], axis=1)
    out = jnp.concatenate([back, fwd, x[..., 2 * fold :]], axis=-1)
    return out.reshape((-1,) + out.shape[2:]) if flat else out


class MaskedBatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` whose ``mask`` may select nothing.

    Flax averages the batch statistics over the elements ``mask`` selects (``mask`` must
    broadcast to the input: (N, 1, 1, 1) selects whole rows). Where it selects none, Flax would
    divide 0 by 0 and make the running statistics and every output NaN; here the statistics
    of that call are taken over all elements instead (finite outputs) and the running
    statistics stay as they were, so rows that are masked out never move them. Variables and
    names are those of ``nn.BatchNorm``.
    """

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if mask is None or nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        ):
            return super().__call__(x, use_running_average, mask=mask)
        selects_any = jnp.any(mask)
        # Flax does not update the running statistics while initialising.
        before = None
        if not self.is_initializing():
            before = {n: self.get_variable("batch_stats", n) for n in ("mean", "var")}
        y = super().__call__(x, use_running_average, mask=jnp.logical_or(mask, ~selects_any))
        if before is not None:
            for n, old in before.items():
                new = self.get_variable("batch_stats", n)
                self.put_variable("batch_stats", n, jnp.where(selects_any, new, old))
        return y


class _Block(nn.Module):
    """A torchvision BasicBlock / Bottleneck; optional TSM shift of the residual branch input."""

    planes: int
    stride: int
    downsample: bool
    bottleneck: bool
    shift_segments: int | None = None  # K; None = no temporal shift
    folded: bool = False  # BatchNorm folded into the convolutions (see fold_stem_batchnorm)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, use_running_average: bool, bn_mask=None):
        conv = functools.partial(
            nn.Conv,
            use_bias=self.folded,
            kernel_init=_conv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.folded:  # the convolution's bias already holds the frozen BatchNorm

            def bn(name):
                del name
                return lambda y, mask=None: y

        else:
            bn = functools.partial(
                MaskedBatchNorm,
                use_running_average=use_running_average,
                momentum=0.9,
                epsilon=_BN_EPSILON,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        y = temporal_shift(x, self.shift_segments) if self.shift_segments else x
        if self.bottleneck:
            y = nn.relu(bn(name="bn1")(conv(self.planes, (1, 1), name="conv1")(y), mask=bn_mask))
            y = conv(
                self.planes, (3, 3), (self.stride,) * 2, padding=((1, 1), (1, 1)), name="conv2"
            )(y)
            y = nn.relu(bn(name="bn2")(y, mask=bn_mask))
            y = bn(name="bn3")(conv(self.planes * 4, (1, 1), name="conv3")(y), mask=bn_mask)
        else:
            y = conv(
                self.planes, (3, 3), (self.stride,) * 2, padding=((1, 1), (1, 1)), name="conv1"
            )(y)
            y = nn.relu(bn(name="bn1")(y, mask=bn_mask))
            y = bn(name="bn2")(
                conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y), mask=bn_mask
            )
        if self.downsample:
            out_ch = self.planes * (4 if self.bottleneck else 1)
            x = conv(out_ch, (1, 1), (self.stride,) * 2, name="downsample_0")(x)
            x = bn(name="downsample_1")(x, mask=bn_mask)
        return nn.relu(x + y)


def _stage_blocks(depth: int, width: int, stage: int, in_channels: int):
    """Yield (name, planes, stride, downsample) for the blocks of stage 1..4 (torchvision rules)."""
    kind, counts = _ARCHS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    planes = width * 2 ** (stage - 1)
    for b in range(counts[stage - 1]):
        stride = 2 if (b == 0 and stage > 1) else 1
        downsample = b == 0 and (stride != 1 or in_channels != planes * expansion)
        yield f"layer{stage}_{b}", planes, stride, downsample
        in_channels = planes * expansion


def _stages_in_stem(cluster_point: str) -> int:
    if cluster_point not in CLUSTER_POINTS:
        raise ValueError(f"cluster_point={cluster_point!r}; use one of {CLUSTER_POINTS}")
    return CLUSTER_POINTS.index(cluster_point)


def stem_channels(depth: int, width: int, cluster_point: str) -> int:
    """Channels of the stem output (e.g. 256 for R-50 at stage1, width 64)."""
    n = _stages_in_stem(cluster_point)
    if n == 0:
        return width
    return width * 2 ** (n - 1) * (4 if _ARCHS[depth][0] == "bottleneck" else 1)


class ResNetStem(nn.Module):
    """Per-frame part up to the cluster point: (N, H, W, 3) normalised images -> (N, h, w, c).

    Spatial stride 4 ("maxpool", "stage1") or 8 ("stage2"). ``linear=True`` is a test-only
    variant: no BatchNorm, no ReLU, average- instead of max-pool, so the stem is an affine map
    of its input and the mean of stem outputs equals the stem of the mean input (used to check
    the averaging premise of the method); it is never used for training.

    ``folded=True`` is the inference form that the full-video model's clustered passes run
    (its stem BatchNorm uses running statistics there): it takes **uint8** frames, every
    BatchNorm is folded into the convolution before it (kernel x scale, plus a bias) and the
    ImageNet normalisation into conv1, so the only per-pixel work before conv1 is one
    subtraction, in float32 rounded once to ``dtype``. Its parameters come from
    ``fold_stem_batchnorm(variables)`` of the plain stem (gradients flow through the fold);
    ``use_running_average`` is ignored.

    ``bn_mask`` (N,) bool, optional: frames that are False (the empty batch slots of the
    sampling baselines) are left out of the BatchNorm batch statistics in training mode.
    """

    depth: int = 50
    width: int = 64
    cluster_point: str = "stage1"
    linear: bool = False
    folded: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, use_running_average: bool, bn_mask=None):
        n_stages = _stages_in_stem(self.cluster_point)
        if bn_mask is not None:
            bn_mask = bn_mask.reshape(-1, 1, 1, 1)
        if self.folded:
            # (u/255 - mean)/std = (u - 255 mean) / (255 std): the division sits in conv1's
            # kernel; the subtraction stays here so that conv1's zero padding is still the
            # normalised image's zero.
            x = (x.astype(jnp.float32) - 255.0 * jnp.asarray(IMAGENET_MEAN)).astype(self.dtype)
        x = x.astype(self.dtype)
        x = nn.Conv(
            self.width,
            (7, 7),
            (2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=self.folded,
            kernel_init=_conv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )(x)
        if self.linear:
            return nn.avg_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
        if not self.folded:
            x = MaskedBatchNorm(
                use_running_average=use_running_average,
                momentum=0.9,
                epsilon=_BN_EPSILON,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="bn1",
            )(x, mask=bn_mask)
        x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        in_ch = self.width
        bottleneck = _ARCHS[self.depth][0] == "bottleneck"
        for stage in range(1, n_stages + 1):
            for name, planes, stride, down in _stage_blocks(self.depth, self.width, stage, in_ch):
                x = _Block(
                    planes=planes,
                    stride=stride,
                    downsample=down,
                    bottleneck=bottleneck,
                    folded=self.folded,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=name,
                )(x, use_running_average=use_running_average, bn_mask=bn_mask)
                in_ch = planes * (4 if bottleneck else 1)
        return x


# (convolution, the BatchNorm after it) inside a block, torchvision names.
_CONV_BN_PAIRS = (
    ("conv1", "bn1"),
    ("conv2", "bn2"),
    ("conv3", "bn3"),
    ("downsample_0", "downsample_1"),
)


def fold_stem_batchnorm(variables: dict) -> dict:
    """Variables of ``ResNetStem(folded=True)`` from those of the plain ``ResNetStem``.

    With running statistics, BatchNorm is affine per channel: bn(y) = y * s + (bias - mean * s),
    s = scale / sqrt(var + eps). For y = conv(x, K) (no bias) that is conv(x, K * s) plus that
    bias, exact up to float rounding. conv1 also takes the ImageNet normalisation
    (u / 255 - mean) / std of its uint8 input: its kernel is divided by 255 * std per input
    channel, and the folded stem subtracts 255 * mean before it. A differentiable function
    of the parameters: gradients with respect to the plain stem's kernels and BatchNorm
    scales and biases flow through it (the statistics are constants of the step).
    """
    params = variables["params"]
    stats = variables.get("batch_stats", {})

    def fold(conv, bn_params, bn_stats):
        if bn_params is None:  # the linear test stem: no BatchNorm
            kernel = conv["kernel"]
            return {"kernel": kernel, "bias": jnp.zeros(kernel.shape[-1], kernel.dtype)}
        s = bn_params["scale"] * jax.lax.rsqrt(bn_stats["var"] + _BN_EPSILON)
        return {"kernel": conv["kernel"] * s, "bias": bn_params["bias"] - bn_stats["mean"] * s}

    folded = {"conv1": fold(params["conv1"], params.get("bn1"), stats.get("bn1"))}
    per_input_channel = 255.0 * jnp.asarray(IMAGENET_STD, jnp.float32)[:, None]
    folded["conv1"]["kernel"] = folded["conv1"]["kernel"] / per_input_channel
    for name, block in params.items():
        if name.startswith("layer"):
            folded[name] = {
                conv: fold(block[conv], block[bn], stats[name][bn])
                for conv, bn in _CONV_BN_PAIRS
                if conv in block
            }
    return {"params": folded}


class ResNetTrunk(nn.Module):
    """Stages after the cluster point + global average pool + dropout + fc.

    Input (B, K, h, w, c) (K cluster means or sampled frames, in time order) -> per-step
    logits (B, K, num_classes) float32. ``temporal_shift`` shifts 1/8 + 1/8 channels along K
    at the start of every residual branch. ``segment_mask`` (B, K) bool, optional: steps that
    are False (empty clusters, empty batch slots) are left out of the BatchNorm batch
    statistics.
    """

    num_classes: int
    depth: int = 50
    width: int = 64
    cluster_point: str = "stage1"
    temporal_shift: bool = True
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, segment_mask=None):
        if x.ndim != 5:
            raise ValueError(f"ResNetTrunk expects (B, K, h, w, c), got shape {x.shape}")
        b, k = x.shape[:2]
        x = x.reshape((b * k,) + x.shape[2:]).astype(self.dtype)
        bn_mask = None if segment_mask is None else segment_mask.reshape(b * k, 1, 1, 1)
        bottleneck = _ARCHS[self.depth][0] == "bottleneck"
        first = _stages_in_stem(self.cluster_point) + 1
        in_ch = stem_channels(self.depth, self.width, self.cluster_point)
        for stage in range(first, 5):
            for name, planes, stride, down in _stage_blocks(self.depth, self.width, stage, in_ch):
                x = _Block(
                    planes=planes,
                    stride=stride,
                    downsample=down,
                    bottleneck=bottleneck,
                    shift_segments=k if self.temporal_shift else None,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=name,
                )(x, use_running_average=not train, bn_mask=bn_mask)
                in_ch = planes * (4 if bottleneck else 1)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="fc")(
            x
        )
        return x.reshape(b, k, self.num_classes)


class ResNet(nn.Module):
    """Plain per-image ResNet (stem + trunk, no shift): (N, H, W, 3) normalised -> (N, classes)."""

    num_classes: int
    depth: int = 50
    width: int = 64
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = ResNetStem(
            depth=self.depth,
            width=self.width,
            cluster_point="stage1",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="stem",
        )(x, use_running_average=not train)
        x = ResNetTrunk(
            num_classes=self.num_classes,
            depth=self.depth,
            width=self.width,
            cluster_point="stage1",
            temporal_shift=False,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="trunk",
        )(x[:, None], train=train)
        return x[:, 0]


__all__: Sequence[str] = (
    "BACKBONES",
    "CLUSTER_POINTS",
    "MaskedBatchNorm",
    "ResNet",
    "ResNetStem",
    "ResNetTrunk",
    "depth_of",
    "fold_stem_batchnorm",
    "normalize_images",
    "stem_channels",
    "temporal_shift",
)
