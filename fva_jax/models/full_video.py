"""The full-video model: every frame, clustered after the stem, in the fastest plan that fits.

``FullVideoModel(videos, mask, train=...)`` takes whole padded videos ``(B, T, H, W, 3)``
uint8 and a frame mask ``(B, T)`` (valid frames first, then padding) and returns
``(logits (B, num_classes) float32, segment_ids (B, T) int32)``. A row whose mask is all
False is an empty batch slot (the data pipeline fills a step's remaining slots so; no real
video has zero frames): in every sampling and plan it enters no BatchNorm statistics, and
its logits are 0.

sampling="cluster" (the method, docs/DESIGN.md §1-§2): the stem's activations of every frame
-> sign bits -> windowed Hamming distances -> ``clustering.segmenter(cluster_method)`` ->
segment ids; the per-segment means of the activations (``clustering.aggregate``'s
semantics: empty -> 0) go through the trunk, with the temporal shift along K; the logits are
averaged over the non-empty segments. Empty segments (videos shorter than K) are also left
out of the trunk's BatchNorm statistics.

How the activations are kept for the backward pass is a *plan* (``plans.py``):
``"unchunked"`` (all frames at once, everything kept: fastest, memory O(T)),
``"keep_stem"`` (pass 1 keeps the stem outputs in the compute dtype, the backward
recomputes one chunk at a time) and ``"recompute"`` (two passes over chunks of
``chunk_size`` frames, the backward recomputes each chunk: memory flat in T). All give the
same logits, gradients and segment ids up to float rounding. ``plan="auto"`` (the default)
picks, per batch shape at trace time, the fastest whose estimated activation memory per
device fits ``activation_budget_mb`` (-1: ``plans.DEVICE_MEMORY_FRACTION`` of the memory
the device reports, or ``plans.NO_REPORT_BUDGET_MB`` where it reports none, e.g. CPU); the
batch is taken to be split over all ``jax.device_count()`` devices (the trainer's data
mesh). The choice is logged once per shape; ``choose_plan(model, videos_shape)`` tells it
without running anything. The data path's ``data.frames_per_device`` bounds the frames per
device, so it bounds the plans' estimates too.

The stem's BatchNorm always uses its running statistics in this mode (so the result cannot
depend on the chunking; docs/DESIGN.md §2, TSN's "partial BN"), which makes it an affine map: the
clustered passes run the stem with its BatchNorms and the ImageNet normalisation folded
into the convolutions (``resnet.fold_stem_batchnorm``, uint8 frames in). The trunk's
BatchNorm trains normally. The videos are never padded or copied.

sampling="uniform" (TSN/TSM: K equal segments of each video's valid length, one frame from
each, a random offset in training from the "sampling" rng, the centre at test) and
sampling="dense" (K consecutive frames ``dense_stride`` apart, random start in training,
centred at test) run the whole network, stem BatchNorm included in training mode, on the K
selected frames; the BatchNorms of the stem and the trunk compute their batch statistics
over the frames of real videos only (``mask.any(-1)``).

Parameters: ``{"params", "batch_stats"}`` with top-level ``stem`` and ``trunk`` (names of
``resnet.py``, which map onto torchvision). RNG streams in training: "dropout", "sampling".

Two extra methods compute the same things the plain way, for tests and benchmarks (call them
with ``model.apply(variables, videos, mask, train=..., method="unchunked")``):
``unchunked`` (the plain stem, unfolded, on all frames at once, ``clustering.cluster`` +
``aggregate``: how the original release works) and ``all_frames`` (every frame through the
whole network, shift along T, logits averaged over valid frames).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fva_jax import clustering
from fva_jax.models import plans
from fva_jax.models.plans import PLANS
from fva_jax.models.resnet import (
    ResNetStem,
    ResNetTrunk,
    depth_of,
    fold_stem_batchnorm,
    normalize_images,
)

SAMPLINGS = ("cluster", "uniform", "dense")


def _check_inputs(videos, mask) -> None:
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be (B, T, H, W, 3) uint8 RGB, got shape {videos.shape}")
    if mask.shape != videos.shape[:2]:
        raise ValueError(
            f"mask must be (B, T) = {videos.shape[:2]} matching videos, got {mask.shape}"
        )


def _masked_mean(values, weights):
    """values (B, K, C), weights (B, K) -> (B, C); rows with no weight give 0, not NaN."""
    w = weights.astype(jnp.float32)
    return jnp.sum(values * w[..., None], axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None]


class FullVideoModel(nn.Module):
    """Whole-video action recognition; see the module docstring. Fields as in the contract."""

    num_classes: int
    backbone: str = "resnet50"
    width: int = 64
    num_clusters: int = 16
    sampling: str = "cluster"
    cluster_method: str = "cumulative"
    window: int = 1
    chunk_size: int = 32
    cluster_point: str = "stage1"
    temporal_shift: bool = True
    dense_stride: int = 2
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    plan: str = "auto"  # "auto" | "unchunked" | "keep_stem" | "recompute"; see plans.py
    activation_budget_mb: float = -1  # for plan="auto"; -1 = from the device's memory

    def setup(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling={self.sampling!r}; use one of {SAMPLINGS}")
        if self.cluster_method not in clustering.METHODS:
            raise ValueError(
                f"cluster_method={self.cluster_method!r}; use one of {clustering.METHODS}"
            )
        for name in ("num_clusters", "window", "chunk_size", "dense_stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.plan not in PLANS:
            raise ValueError(f"plan={self.plan!r}; use one of {PLANS}")
        if not (self.activation_budget_mb == -1 or self.activation_budget_mb > 0):
            raise ValueError(
                f"activation_budget_mb must be > 0, or -1 for the device's memory; "
                f"got {self.activation_budget_mb}"
            )
        self.stem = self._make_stem()
        self.trunk = ResNetTrunk(
            num_classes=self.num_classes,
            depth=depth_of(self.backbone),
            width=self.width,
            cluster_point=self.cluster_point,
            temporal_shift=self.temporal_shift,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )

    def _make_stem(self) -> nn.Module:
        """The per-frame ``ResNetStem``; tests override this (e.g. an affine stem) in a
        subclass."""
        return ResNetStem(
            depth=depth_of(self.backbone),
            width=self.width,
            cluster_point=self.cluster_point,
            dtype=self.dtype,
        )

    # ------------------------------------------------------------------ entry points

    def __call__(self, videos, mask, *, train: bool):
        """videos (B, T, H, W, 3) uint8, mask (B, T) bool -> (logits (B, C) f32,
        segment_ids (B, T) i32)."""
        _check_inputs(videos, mask)
        mask = mask.astype(bool)
        if self.sampling == "cluster":
            return self._cluster(videos, mask, train)
        return self._sampled(videos, mask, train)

    def unchunked(self, videos, mask, *, train: bool):
        """Same math as sampling="cluster" in one piece (reference; memory O(T))."""
        _check_inputs(videos, mask)
        mask = mask.astype(bool)
        b, t = mask.shape
        k = self.num_clusters
        feats = self.stem(
            normalize_images(videos.reshape((b * t,) + videos.shape[2:]), self.dtype),
            use_running_average=True,
        )
        feats = feats.reshape((b, t) + feats.shape[1:])
        seg = clustering.cluster(
            jax.lax.stop_gradient(feats).reshape(b, t, -1),
            k,
            self.cluster_method,
            self.window,
            mask,
        )
        means, counts = clustering.aggregate(feats, seg, k, mask)
        return self._head(means.astype(self.dtype), counts > 0, train), seg

    def all_frames(self, videos, mask, *, train: bool):
        """Every frame through the whole network (shift along T), logits averaged over valid frames.

        Stem BatchNorm uses running statistics (as in sampling="cluster"). Returns
        (logits, frame index per frame with padding = T). Memory O(T): short clips only.
        """
        _check_inputs(videos, mask)
        mask = mask.astype(bool)
        b, t = mask.shape
        feats = self.stem(
            normalize_images(videos.reshape((b * t,) + videos.shape[2:]), self.dtype),
            use_running_average=True,
        )
        logits = self._head(feats.reshape((b, t) + feats.shape[1:]), mask, train)
        return logits, jnp.where(mask, jnp.arange(t, dtype=jnp.int32), t)

    # ------------------------------------------------------------------ pieces

    def _head(self, x, step_mask, train):
        """Trunk on (B, K, h, w, c) + average of the per-step logits over step_mask (B, K)."""
        per_step = self.trunk(x, train=train, segment_mask=step_mask)
        return _masked_mean(per_step, step_mask)

    def _folded_stem(self):
        """(pure function (folded variables, uint8 frames (N, H, W, 3)) -> (N, h, w, c), the
        unbound folded stem module).

        Flax modules cannot be called inside jax.lax.scan directly, so the passes call an
        unbound copy of the stem with its variables passed explicitly: one set of parameters
        shared by all chunks, and gradients reach them through the function's argument.
        """
        module = self.stem.clone(parent=None, folded=True)

        def apply(variables, frames):
            return module.apply(variables, frames, use_running_average=True)

        return apply, module

    def _choose_plan(self, videos_shape) -> plans.PlanChoice:
        budget, source = plans.activation_budget_bytes(self.activation_budget_mb)
        estimates, per_device = plans.estimate(
            self._folded_stem()[1],
            self.trunk.clone(parent=None),
            tuple(videos_shape),
            num_clusters=self.num_clusters,
            chunk_size=self.chunk_size,
            device_count=jax.device_count(),
        )
        return plans.PlanChoice(
            plan=plans.choose(self.plan, estimates, budget),
            estimates=estimates,
            budget_bytes=budget,
            budget_source=source,
            videos_per_device=per_device,
        )

    def _cluster(self, videos, mask, train):
        if self.is_initializing():  # create the stem's variables once
            self.stem(jnp.zeros((1,) + videos.shape[2:], self.dtype), use_running_average=True)
        choice = self._choose_plan(videos.shape)
        plans.log_once(self.clone(parent=None), choice, videos.shape)
        stem_apply, _ = self._folded_stem()
        sums, counts, seg = plans.clustered_sums(
            choice.plan,
            stem_apply,
            fold_stem_batchnorm(self.stem.variables),
            videos,
            mask,
            num_clusters=self.num_clusters,
            method=self.cluster_method,
            window=self.window,
            chunk_size=self.chunk_size,
        )
        means = sums / jnp.maximum(counts, 1).astype(jnp.float32)[..., None, None, None]
        return self._head(means.astype(self.dtype), counts > 0, train), seg

    def _sampled(self, videos, mask, train):
        """sampling="uniform" / "dense": the whole network on K frames per video."""
        b, t = mask.shape
        k = self.num_clusters
        length = jnp.sum(mask, axis=1).astype(jnp.int32)  # valid frames (a prefix of each row)
        u = None
        if train:
            u = jax.random.uniform(
                self.make_rng("sampling"), (b, k if self.sampling == "uniform" else 1)
            )
        if self.sampling == "uniform":
            idx = uniform_indices(length, k, u)
            lo = jnp.arange(k)[None] * length[:, None] // k  # TSN segment starts
            seg = (
                jnp.sum((lo[:, None, :] <= jnp.arange(t)[None, :, None]).astype(jnp.int32), axis=-1)
                - 1
            )
        else:
            idx = dense_indices(length, k, self.dense_stride, u)
            hit = idx[:, None, :] == jnp.arange(t)[None, :, None]  # (B, T, K)
            seg = jnp.where(jnp.any(hit, -1), jnp.max(jnp.where(hit, jnp.arange(k), -1), -1), k)
        seg = jnp.where(mask, seg, k).astype(jnp.int32)
        frames = jnp.take_along_axis(videos, idx[:, :, None, None, None], axis=1)  # (B, K, H, W, 3)
        # An empty batch slot (no valid frame) stays out of every BatchNorm's statistics.
        step_mask = jnp.broadcast_to(jnp.any(mask, axis=1)[:, None], (b, k))
        x = self.stem(
            normalize_images(frames.reshape((b * k,) + videos.shape[2:]), self.dtype),
            use_running_average=not train,
            bn_mask=step_mask.reshape(b * k),
        )
        x = x.reshape((b, k) + x.shape[1:])
        return self._head(x, step_mask, train), seg


def uniform_indices(length, k: int, u=None):
    """TSN sampling: frame index per segment, (B, K) int32.

    length (B,) valid frames; segment j is [j*L//K, (j+1)*L//K). u (B, K) uniform [0, 1) picks a
    random frame of each segment (training); u=None takes the centre, floor((j + 1/2) * L / K)
    (TSN's test rule). Videos shorter than K repeat frames; L = 0 gives index 0.
    """
    length = length.astype(jnp.int32)[:, None]
    ks = jnp.arange(k, dtype=jnp.int32)[None]
    if u is None:
        idx = (2 * ks + 1) * length // (2 * k)
    else:
        lo, hi = ks * length // k, (ks + 1) * length // k
        idx = lo + jnp.floor(u * jnp.maximum(hi - lo, 1)).astype(jnp.int32)
    return jnp.clip(idx, 0, jnp.maximum(length - 1, 0))


def dense_indices(length, k: int, stride: int, u=None):
    """K consecutive frames ``stride`` apart, (B, K) int32.

    The clip spans (K-1)*stride+1 frames; its start is floor(u * (L - span + 1)) for u (B, 1)
    uniform [0, 1) (training) or the centre (L - span) // 2 when u is None. Videos shorter
    than the span start at 0 and repeat their last frame.
    """
    length = length.astype(jnp.int32)[:, None]
    max_start = jnp.maximum(length - ((k - 1) * stride + 1), 0)
    start = max_start // 2 if u is None else jnp.floor(u * (max_start + 1)).astype(jnp.int32)
    idx = start + stride * jnp.arange(k, dtype=jnp.int32)[None]
    return jnp.clip(idx, 0, jnp.maximum(length - 1, 0))


def choose_plan(model: FullVideoModel, videos_shape) -> plans.PlanChoice:
    """The plan ``model`` (sampling="cluster") takes for videos of ``videos_shape``
    (B, T, H, W, 3), with its estimates and budget; traces shapes only, runs nothing."""
    return model.apply({}, tuple(videos_shape), method=FullVideoModel._choose_plan)


__all__ = [
    "FullVideoModel",
    "PLANS",
    "SAMPLINGS",
    "choose_plan",
    "dense_indices",
    "uniform_indices",
]
