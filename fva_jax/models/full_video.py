"""The full-video model: every frame, clustered after the stem, in the fastest plan that fits.

Two modules share one implementation: ``FullVideo(stem, trunk, ...)`` wraps any per-frame
Flax stem and any trunk over the K cluster means (the generic module: your own backbone), and
``FullVideoModel`` is its ResNet specialisation (TSM-ResNet-18/50 from ``backbone``, ``width``,
``cluster_point``; the model the trainer builds as ``FullVideoModel(num_classes=N,
**config.model)``). Both take whole padded videos ``(B, T, H, W, 3)`` uint8 and a frame mask
``(B, T)`` (valid frames first, then padding) and return ``(logits (B, num_classes) float32,
segment_ids (B, T) int32)``. A row whose mask is all False is an empty batch slot (the data
pipeline fills a step's remaining slots so; no real video has zero frames): its logits are 0,
and in ``FullVideoModel`` (in ``FullVideo``: where the stem and trunk honour their masks) it
enters no batch statistics in any sampling and plan.

The contract of ``FullVideo``'s two modules (features may have any shape):

* ``stem(x, *, train, mask=None) -> (N, *features)``, applied per frame to ``x =
  preprocess(frames)`` (frames ``(N, H, W, 3)`` uint8; without ``preprocess`` the stem gets
  them as they are). The clustered passes call it with ``train=False`` and no mask, chunk by
  chunk, so there it must not mix frames (no batch statistics: the ResNet's stem BatchNorm
  uses its running statistics there) and must not draw random numbers. The sampled baselines
  call it with their ``train`` flag and ``mask`` ``(N,)`` bool, the rows of real videos (for
  batch statistics; a stem may ignore it).
* ``trunk(x, *, train, mask) -> logits``: ``x`` ``(B, K, *features)`` (the K cluster means in
  the stem outputs' dtype, in time order; or K sampled frames), ``mask`` ``(B, K)`` bool, the
  non-empty segments (empty ones are zeros, and should enter no batch statistics). It returns
  ``(B, num_classes)``, or per-step logits ``(B, K, num_classes)`` that the module averages
  over the non-empty steps. In training it may draw from the "dropout" RNG stream (no other:
  the memory estimate traces it with that one) and update a "batch_stats" collection.
* optional hooks: ``preprocess`` (uint8 frames -> the stem's input, e.g. ImageNet
  normalisation), and ``fold_stem(stem) -> (folded stem, fold)``: a cheaper module for the
  clustered passes that takes the **uint8** frames directly, with ``folded.apply(
  fold(variables), frames, train=False)`` equal to ``stem.apply(variables,
  preprocess(frames), train=False)``; ``fold`` must be differentiable (gradients reach the
  stem's parameters through it). The hook runs inside the model's methods, so a folded
  module it builds must be unbound: ``Folded(..., parent=None)`` or ``stem.clone(parent=None,
  ...)``. The ResNet folds its frozen BatchNorms and the ImageNet normalisation into the
  convolutions (``fold_resnet_stem``).

sampling="cluster" (the method, docs/DESIGN.md §1-§2): the stem's activations of every frame
-> sign bits -> windowed Hamming distances -> ``clustering.segmenter(cluster_method)`` ->
segment ids; the per-segment means of the activations (``clustering.aggregate``'s
semantics: empty -> 0) go through the trunk (for the ResNet, with the temporal shift along
K); the logits are averaged over the non-empty segments. Empty segments (videos shorter than
K) are masked out of the trunk.

How the activations are kept for the backward pass is a *plan* (``plans.py``):
``"unchunked"`` (all frames at once, everything kept: fastest, memory O(T)),
``"keep_stem"`` (pass 1 keeps the stem outputs in their dtype, the backward recomputes one
chunk at a time) and ``"recompute"`` (two passes over chunks of ``chunk_size`` frames, the
backward recomputes each chunk: memory flat in T). All give the same logits, gradients and
segment ids up to float rounding. ``plan="auto"`` (the default) picks, per batch shape at
trace time, the fastest whose estimated activation memory per device fits
``activation_budget_mb`` (-1: ``plans.DEVICE_MEMORY_FRACTION`` of the memory the device
reports, or ``plans.NO_REPORT_BUDGET_MB`` where it reports none, e.g. CPU); the batch is
taken to be split over all ``jax.device_count()`` devices (the trainer's data mesh). The
estimates come from the abstract shapes of the stem's (folded) forward and of its and the
trunk's VJP residuals (``jax.eval_shape``), for any backbone. Applied with ``train=False``
(evaluation, prediction: no gradient), the model chooses from forward-only estimates instead
(the live values of the stem's and the trunk's forward passes, ``plans.py``), which let
longer videos keep a faster plan. The choice is logged once per shape and ``train``;
``choose_plan(model, videos_shape, train=True)`` tells it without running anything. The data
path's ``data.frames_per_device`` bounds the frames per device, so it bounds the plans'
estimates too.

The ResNet's stem BatchNorm always uses its running statistics in this mode (so the result
cannot depend on the chunking; docs/DESIGN.md §2, TSN's "partial BN"), which makes it an
affine map: the clustered passes run the stem with its BatchNorms and the ImageNet
normalisation folded into the convolutions (``resnet.fold_stem_batchnorm``, uint8 frames in).
The trunk's BatchNorm trains normally. The videos are never padded or copied.

sampling="uniform" (TSN/TSM: K equal segments of each video's valid length, one frame from
each, a random offset in training from the "sampling" rng, the centre at test) and
sampling="dense" (K consecutive frames ``dense_stride`` apart, random start in training,
centred at test) run the whole network, stem in training mode, on the K selected frames;
the ResNet's BatchNorms of the stem and the trunk compute their batch statistics over the
frames of real videos only (``mask.any(-1)``).

Parameters: top-level ``stem`` and ``trunk`` (the ResNet's ``{"params", "batch_stats"}`` with
the names of ``resnet.py``, which map onto torchvision). RNG streams in training: "dropout",
"sampling".

Two extra methods compute the same things the plain way, for tests and benchmarks (call them
with ``model.apply(variables, videos, mask, train=..., method="unchunked")``):
``unchunked`` (the plain stem, unfolded, on all frames at once, ``clustering.cluster`` +
``aggregate``: how the original release works) and ``all_frames`` (every frame through the
whole network, logits averaged over valid frames; the ResNet shifts along T).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
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
# Fields that choose how the model runs, not what its stem and trunk are: the plans' per-frame
# estimates do not depend on them (see _per_item_bytes).
_RUN_FIELDS = (
    "sampling",
    "cluster_method",
    "window",
    "chunk_size",
    "dense_stride",
    "plan",
    "activation_budget_mb",
)


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


def _per_step(counts, ndim):
    """counts (B, K) -> (B, K, 1, ...) broadcasting against (B, K, *features) of ``ndim``."""
    return counts.reshape(counts.shape + (1,) * (ndim - 2))


class _FullVideoMethods(nn.Module):
    """The full-video model for any stem and trunk; see the module docstring.

    Subclasses provide ``self.stem`` and ``self.trunk`` (fields or built in ``setup``), the
    fields named in ``_check_fields``, and may override the ``nn.nowrap`` hooks below (how the
    stem and trunk are called, ``preprocess`` and ``fold_stem``).
    """

    # ------------------------------------------------------------------ hooks

    @nn.nowrap
    def _stem_kwargs(self, train: bool, mask) -> dict:
        """Keyword arguments of the stem: ``train``, and ``mask`` (N,) where there is one."""
        return {"train": train} if mask is None else {"train": train, "mask": mask}

    @nn.nowrap
    def _trunk_kwargs(self, train: bool, mask) -> dict:
        """Keyword arguments of the trunk: ``train`` and ``mask`` (B, K)."""
        return {"train": train, "mask": mask}

    @nn.nowrap
    def _estimated_trunk_kwargs(self, mask) -> dict:
        """Keyword arguments of the trunk in training as the plans' estimate traces it."""
        return self._trunk_kwargs(True, mask)

    @nn.nowrap
    def _preprocess_fn(self) -> Callable:
        """uint8 frames (N, H, W, 3) -> the stem's input."""
        return self.preprocess or (lambda frames: frames)

    @nn.nowrap
    def _fold_fn(self) -> Callable | None:
        """stem (unbound) -> (folded stem taking uint8 frames, variables -> its variables)."""
        return self.fold_stem

    # ------------------------------------------------------------------ entry points

    def _check_fields(self) -> None:
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
        feats = self._frames_through_stem(videos.reshape((b * t,) + videos.shape[2:]))
        feats = feats.reshape((b, t) + feats.shape[1:])
        seg = clustering.cluster(
            jax.lax.stop_gradient(feats).reshape(b, t, -1),
            k,
            self.cluster_method,
            self.window,
            mask,
        )
        means, counts = clustering.aggregate(feats, seg, k, mask)
        return self._head(means.astype(feats.dtype), counts > 0, train), seg

    def all_frames(self, videos, mask, *, train: bool):
        """Every frame through the whole network, logits averaged over valid frames.

        The stem runs with train=False (as in sampling="cluster"). Returns (logits, frame
        index per frame with padding = T). Memory O(T): short clips only.
        """
        _check_inputs(videos, mask)
        mask = mask.astype(bool)
        b, t = mask.shape
        feats = self._frames_through_stem(videos.reshape((b * t,) + videos.shape[2:]))
        logits = self._head(feats.reshape((b, t) + feats.shape[1:]), mask, train)
        return logits, jnp.where(mask, jnp.arange(t, dtype=jnp.int32), t)

    # ------------------------------------------------------------------ pieces

    def _frames_through_stem(self, frames, train: bool = False, mask=None):
        """uint8 frames (N, H, W, 3) -> the (plain, unfolded) stem's outputs (N, *features)."""
        return self.stem(self._preprocess_fn()(frames), **self._stem_kwargs(train, mask))

    def _head(self, x, step_mask, train):
        """Trunk on (B, K, *features) -> logits (B, C): per-step logits are averaged over
        step_mask (B, K); rows without any step (empty batch slots) get 0."""
        out = self.trunk(x, **self._trunk_kwargs(train, step_mask))
        if out.ndim == 3:
            return _masked_mean(out, step_mask)
        return jnp.where(jnp.any(step_mask, axis=1)[:, None], out, 0).astype(jnp.float32)

    @nn.nowrap
    def _clustered_stem(self, stem: nn.Module) -> tuple[Callable, Callable]:
        """(apply(variables, uint8 frames (N, H, W, 3)) -> (N, *features), fold(stem
        variables) -> the variables apply takes) for the unbound ``stem``.

        Flax modules cannot be called inside jax.lax.scan directly, so the passes call an
        unbound copy of the stem with its variables passed explicitly: one set of parameters
        shared by all chunks, and gradients reach them through the function's argument.
        """
        kwargs = self._stem_kwargs(False, None)
        fold_stem = self._fold_fn()
        if fold_stem is not None:
            try:
                folded, fold = fold_stem(stem)
            except flax.errors.AssignSubModuleError as error:
                raise TypeError(
                    "FullVideo's fold_stem hook built its folded module bound to the model; "
                    "build it unbound: Folded(..., parent=None) or stem.clone(parent=None, ...)"
                ) from error

            def apply(variables, frames):
                return folded.apply(variables, frames, **kwargs)

            return apply, fold
        preprocess = self._preprocess_fn()

        def apply_plain(variables, frames):
            return stem.apply(variables, preprocess(frames), **kwargs)

        return apply_plain, lambda variables: variables

    @nn.nowrap
    def _cache_key(self, **updates):
        """An unbound copy (submodules included) of this model with ``updates``, or None
        where a field cannot be hashed (e.g. a list in a user's stem)."""
        model = self.clone(parent=None, _deep_clone=True, **updates)
        try:
            hash(model)
        except TypeError:
            return None
        return model

    def _item_bytes(self, frame_shape, train: bool = True) -> tuple[int, jax.ShapeDtypeStruct, int]:
        """``plans.per_item_bytes`` of this model's stem (as the clustered passes run it) and
        trunk (in training; with ``train=False`` both forward-only), from shapes only."""
        stem = self.stem.clone(parent=None, _deep_clone=True)
        trunk = self.trunk.clone(parent=None, _deep_clone=True)
        preprocess = self._preprocess_fn()
        stem_kwargs = self._stem_kwargs(False, None)
        stem_apply, fold = self._clustered_stem(stem)
        trunk_kwargs, estimated_trunk_kwargs = self._trunk_kwargs, self._estimated_trunk_kwargs

        def init_stem(frames):
            return fold(stem.init(jax.random.key(0), preprocess(frames), **stem_kwargs))

        def init_trunk(x, mask):
            return trunk.init(jax.random.key(0), x, **trunk_kwargs(False, mask))

        def trunk_apply(variables, x, mask):
            if not train:
                return trunk.apply(variables, x, **trunk_kwargs(False, mask))
            key = jax.random.key(0)
            logits, _ = trunk.apply(
                variables,
                x,
                **estimated_trunk_kwargs(mask),
                rngs={"dropout": key, "sampling": key},
                mutable=True,
            )
            return logits

        try:
            return plans.per_item_bytes(
                stem_apply,
                init_stem,
                trunk_apply,
                init_trunk,
                frame_shape,
                num_clusters=self.num_clusters,
                forward_only=not train,
            )
        except flax.errors.InvalidRngError as error:
            raise ValueError(
                f"{type(self).__name__}'s memory estimate traces the trunk in training with the "
                f'"dropout" RNG stream only, and it asked for another ({error}); draw only from '
                '"dropout" in the trunk'
            ) from error

    def _choose_plan(self, videos_shape, train: bool = True) -> plans.PlanChoice:
        budget, source = plans.activation_budget_bytes(self.activation_budget_mb)
        # Per stem and trunk (the run fields set to their defaults), whatever plan is asked.
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in _RUN_FIELDS}
        key, frame_shape = self._cache_key(**defaults), tuple(videos_shape[2:])
        estimates, per_device = plans.estimate(
            self._item_bytes(frame_shape, train)
            if key is None
            else _per_item_bytes(key, frame_shape, train),
            tuple(videos_shape),
            num_clusters=self.num_clusters,
            chunk_size=self.chunk_size,
            device_count=jax.device_count(),
            forward_only=not train,
        )
        return plans.PlanChoice(
            plan=plans.choose(self.plan, estimates, budget),
            estimates=estimates,
            budget_bytes=budget,
            budget_source=source,
            videos_per_device=per_device,
            train=train,
        )

    def _cluster(self, videos, mask, train):
        if self.is_initializing():  # create the stem's variables once
            self._frames_through_stem(jnp.zeros((1,) + videos.shape[2:], jnp.uint8))
        # train=False runs without gradient (evaluation, prediction): forward-only estimates.
        choice = self._choose_plan(videos.shape, train)
        plans.log_once(self._cache_key(), choice, videos.shape, type(self).__name__)
        stem_apply, fold = self._clustered_stem(self.stem.clone(parent=None, _deep_clone=True))
        variables = fold(self.stem.variables)
        sums, counts, seg = plans.clustered_sums(
            choice.plan,
            stem_apply,
            variables,
            videos,
            mask,
            num_clusters=self.num_clusters,
            method=self.cluster_method,
            window=self.window,
            chunk_size=self.chunk_size,
        )
        frame = jax.ShapeDtypeStruct((1,) + videos.shape[2:], videos.dtype)
        dtype = jax.eval_shape(stem_apply, variables, frame).dtype  # the trunk gets this dtype
        means = sums / jnp.maximum(_per_step(counts, sums.ndim), 1).astype(jnp.float32)
        return self._head(means.astype(dtype), counts > 0, train), seg

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
        # An empty batch slot (no valid frame) stays out of every batch statistic.
        step_mask = jnp.broadcast_to(jnp.any(mask, axis=1)[:, None], (b, k))
        x = self._frames_through_stem(
            frames.reshape((b * k,) + videos.shape[2:]), train, step_mask.reshape(b * k)
        )
        x = x.reshape((b, k) + x.shape[1:])
        return self._head(x, step_mask, train), seg


@functools.lru_cache(maxsize=64)
def _per_item_bytes(model: _FullVideoMethods, frame_shape: tuple, train: bool) -> tuple:
    """``model._item_bytes(frame_shape, train)`` for an unbound model, cached: tracing the
    stem's VJP takes a while, and the estimate is asked for at every trace (init, grad, eval)."""
    return model.apply({}, frame_shape, train, method=type(model)._item_bytes)


class FullVideo(_FullVideoMethods):
    """Full-video training for any per-frame ``stem`` and ``trunk`` (the generic module).

    The contract of ``stem``, ``trunk``, ``preprocess`` and ``fold_stem`` and the meaning of
    the other fields are in the module docstring; parameters sit under ``stem`` and ``trunk``.
    """

    stem: nn.Module
    trunk: nn.Module
    num_clusters: int = 16
    sampling: str = "cluster"
    cluster_method: str = "cumulative"
    window: int = 1
    chunk_size: int = 32
    dense_stride: int = 2
    plan: str = "auto"  # "auto" | "unchunked" | "keep_stem" | "recompute"; see plans.py
    activation_budget_mb: float = -1  # for plan="auto"; -1 = from the device's memory
    preprocess: Callable | None = None  # uint8 frames -> the stem's input; None: as they are
    fold_stem: Callable | None = None  # stem -> (folded stem on uint8 frames, fold variables)

    def setup(self):
        for name in ("stem", "trunk"):
            if not isinstance(getattr(self, name), nn.Module):
                raise TypeError(
                    f"FullVideo's {name} must be a flax.linen Module (see the module docstring "
                    f"for its call contract), got {type(getattr(self, name)).__name__}"
                )
        self._check_fields()


def fold_resnet_stem(stem: ResNetStem) -> tuple[ResNetStem, Callable]:
    """``fold_stem`` of a ``ResNetStem`` (with ImageNet ``normalize_images`` as ``preprocess``):
    its BatchNorms (running statistics) and the normalisation folded into the convolutions."""
    return stem.clone(folded=True), fold_stem_batchnorm


class FullVideoModel(_FullVideoMethods):
    """The ResNet specialisation of ``FullVideo`` that the trainer builds from
    ``config.model``: ``ResNetStem`` and ``ResNetTrunk`` (TSM shift along K) of ``backbone``
    and ``width``, cut at ``cluster_point``, computing in ``dtype``; ImageNet normalisation as
    ``preprocess`` and ``fold_resnet_stem`` as ``fold_stem``. Other fields as ``FullVideo``'s."""

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
        self._check_fields()
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

    # ResNetStem / ResNetTrunk name the generic train flag and masks their own way.
    @nn.nowrap
    def _stem_kwargs(self, train: bool, mask) -> dict:
        return {"use_running_average": not train, "bn_mask": mask}

    @nn.nowrap
    def _trunk_kwargs(self, train: bool, mask) -> dict:
        return {"train": train, "segment_mask": mask}

    @nn.nowrap
    def _estimated_trunk_kwargs(self, mask) -> dict:
        # Without segment_mask, as before issue 18: the masked BatchNorm's extra residuals
        # derive from the (B, K) mask and XLA does not keep them (R-50 width 16, 64 px, K=16,
        # plan recompute: XLA's temporaries of the whole step 34.5 MB; estimate 63.7 MB
        # without the mask, 82.9 MB with it).
        return {"train": True}

    @nn.nowrap
    def _preprocess_fn(self) -> Callable:
        return functools.partial(normalize_images, dtype=self.dtype)

    @nn.nowrap
    def _fold_fn(self) -> Callable:
        return fold_resnet_stem


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


def choose_plan(model: _FullVideoMethods, videos_shape, train: bool = True) -> plans.PlanChoice:
    """The plan ``model`` (a ``FullVideo`` or ``FullVideoModel``, sampling="cluster") takes for
    videos of ``videos_shape`` (B, T, H, W, 3), with its estimates and budget; traces shapes
    only, runs nothing. ``train``: as the model is applied; False (evaluation, prediction:
    no gradient) chooses from forward-only estimates, so a longer video keeps a faster plan."""
    return model.apply({}, tuple(videos_shape), train, method=type(model)._choose_plan)


__all__ = [
    "FullVideo",
    "FullVideoModel",
    "PLANS",
    "SAMPLINGS",
    "choose_plan",
    "dense_indices",
    "fold_resnet_stem",
    "uniform_indices",
]
