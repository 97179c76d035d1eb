"""The full-video model: every frame, clustered after the stem, in memory flat in T.

``FullVideoModel(videos, mask, train=...)`` takes whole padded videos ``(B, T, H, W, 3)``
uint8 and a frame mask ``(B, T)`` (valid frames first, then padding) and returns
``(logits (B, num_classes) float32, segment_ids (B, T) int32)``.

sampling="cluster" (the method, DESIGN.md §1-§2), in two passes over chunks of
``chunk_size`` frames:

* pass 1 (no gradient, ``jax.lax.scan``): stem activations of a chunk -> sign bits ->
  windowed Hamming distances. Only the distances leave a chunk; the packed bits of the last
  ``window`` frames are carried so that windows cross chunk boundaries. Then
  ``clustering.cumulative_segments`` / ``slope_segments`` give segment ids for all frames.
* pass 2 (with gradient): ``jax.lax.scan`` over chunks with a ``jax.checkpoint``-ed body:
  stem of the chunk -> ``jax.ops.segment_sum`` into (B, K, h, w, c) float32 accumulators.
  The backward pass recomputes each chunk's stem, so nothing of size T is stored.
  Means = sums / max(counts, 1), ``clustering.aggregate``'s semantics (empty -> 0).
* the trunk runs on the (B, K, ...) means with the temporal shift along K; the logits are
  averaged over the non-empty segments. Empty segments (videos shorter than K) are also left
  out of the trunk's BatchNorm statistics.

The stem's BatchNorm always uses its running statistics in this mode (so the result cannot
depend on the chunking; DESIGN.md §2, TSN's "partial BN"); the trunk's BatchNorm trains
normally. The videos are never padded or copied: the last chunk is read at ``T - chunk``
(overlapping the previous one) and frames already seen are masked out, so results do not
depend on ``chunk_size`` and T need not be a multiple of it.

sampling="uniform" (TSN/TSM: K equal segments of each video's valid length, one frame from
each, a random offset in training from the "sampling" rng, the centre at test) and
sampling="dense" (K consecutive frames ``dense_stride`` apart, random start in training,
centred at test) run the whole network, stem BatchNorm included in training mode, on the K
selected frames.

Parameters: ``{"params", "batch_stats"}`` with top-level ``stem`` and ``trunk`` (names of
``resnet.py``, which map onto torchvision). RNG streams in training: "dropout", "sampling".

Two extra methods compute the same things the plain way, for tests and benchmarks (call them
with ``model.apply(variables, videos, mask, train=..., method="unchunked")``):
``unchunked`` (all frames' stem activations at once, ``clustering.cluster`` + ``aggregate``,
no chunks, no rematerialisation: how the original release works) and ``all_frames`` (every
frame through the whole network, shift along T, logits averaged over valid frames).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fva_jax import clustering
from fva_jax.models.resnet import ResNetStem, ResNetTrunk, depth_of, normalize_images

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
        self.stem = self._make_stem()
        self.trunk = ResNetTrunk(
            self.num_classes,
            depth_of(self.backbone),
            self.width,
            self.cluster_point,
            self.temporal_shift,
            self.dropout_rate,
            self.dtype,
            jnp.float32,
        )

    def _make_stem(self) -> nn.Module:
        """The per-frame stem; tests override this (e.g. an affine stem) in a subclass."""
        return ResNetStem(depth_of(self.backbone), self.width, self.cluster_point, dtype=self.dtype)

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

    def _stem_function(self, frame_shape):
        """(pure function (variables, uint8 frames (N, H, W, 3)) -> (N, h, w, c), stem variables).

        Flax modules cannot be called inside jax.lax.scan directly, so the scans call an unbound
        copy of the stem with the stem's own variables passed explicitly: one set of parameters
        shared by all chunks, and gradients reach them through the closure's argument.
        """
        if self.is_initializing():  # create the stem's variables once
            self.stem(jnp.zeros((1,) + frame_shape, self.dtype), use_running_average=True)
        variables = self.stem.variables
        module = self.stem.clone(parent=None)
        dtype = self.dtype

        def apply(vs, frames):
            return module.apply(vs, normalize_images(frames, dtype), use_running_average=True)

        return apply, variables

    def _cluster(self, videos, mask, train):
        b, t = mask.shape
        k = self.num_clusters
        c = min(self.chunk_size, t)
        n_chunks = -(-t // c)
        stem_fn, variables = self._stem_function(videos.shape[2:])
        feat_shape = jax.eval_shape(
            stem_fn, variables, videos[:, :1].reshape((b,) + videos.shape[2:])
        ).shape[1:]
        num_features = int(feat_shape[0] * feat_shape[1] * feat_shape[2])

        def load(i, vs):
            """Stem of chunk i: frames [s, s+c) read at a = min(s, T-c) (no padding copies).

            Returns activations (B, c, h, w, ch) of frames a..a+c-1, a, s.
            """
            s = i * c
            a = jnp.minimum(s, t - c)
            frames = jax.lax.dynamic_slice_in_dim(videos, a, c, axis=1)
            acts = stem_fn(vs, frames.reshape((b * c,) + videos.shape[2:]))
            return acts.reshape((b, c) + acts.shape[1:]), a, s

        # ---- pass 1: distances only; bits of the last `window` frames are carried.
        w = self.window
        frozen = jax.lax.stop_gradient(variables)
        nbytes = -(-num_features // 8)

        def pass1(carry, i):
            prev_bits, prev_valid = carry  # (B, w, nbytes), (B, w): frames s-w .. s-1
            acts, a, s = load(i, frozen)
            bits = clustering.sign_bits(acts.reshape(b, c, -1))
            # Align to frames s..s+c-1 (the last chunk was read from a <= s); frames >= T invalid.
            frame = s + jnp.arange(c)
            bits = jnp.take(bits, jnp.clip(frame - a, 0, c - 1), axis=1)
            valid = (frame < t)[None] & jnp.take(mask, jnp.minimum(frame, t - 1), axis=1)
            buf_bits = jnp.concatenate([prev_bits, bits], axis=1)
            buf_valid = jnp.concatenate([prev_valid, valid], axis=1)
            d = clustering.hamming_distances(buf_bits, w, buf_valid, num_features=num_features)
            # d[:, :c] (frames s-w .. s+c-w-1) have all their `window` successors in the buffer.
            return (buf_bits[:, c:], buf_valid[:, c:]), d[:, :c]

        init = (jnp.zeros((b, w, nbytes), jnp.uint8), jnp.zeros((b, w), bool))
        (last_bits, last_valid), ds = jax.lax.scan(pass1, init, jnp.arange(n_chunks))
        d_tail = clustering.hamming_distances(last_bits, w, last_valid, num_features=num_features)
        # ds covers frames [-w, n*c - w), d_tail [n*c - w, n*c): drop the w leading dummies.
        d = jnp.concatenate([jnp.moveaxis(ds, 0, 1).reshape(b, n_chunks * c), d_tail], axis=1)[
            :, w : w + t
        ]
        seg = clustering.segmenter(self.cluster_method)(d, k, mask)  # (B, T); padding has id K

        # ---- pass 2: per-segment sums, one rematerialised chunk at a time.
        # segment_sum is vmapped over the batch (a scatter with a batch dimension) so that a
        # batch sharded over devices stays sharded.
        batched_segment_sum = jax.vmap(lambda x, ids: jax.ops.segment_sum(x, ids, k + 1)[:k])

        def chunk_sums(vs, i):
            acts, a, s = load(i, vs)
            seg_c = jax.lax.dynamic_slice_in_dim(seg, a, c, axis=1)
            fresh = (a + jnp.arange(c) >= s)[None]  # frames of the overlap were summed already
            ids = jnp.where(fresh, seg_c, k)  # id k (padding, overlap) is dropped
            return batched_segment_sum(acts.astype(jnp.float32), ids)

        chunk_sums = jax.checkpoint(chunk_sums, prevent_cse=False)

        def pass2(acc, i):
            # The add stays outside the checkpoint: the scan then saves no per-chunk carry.
            return acc + chunk_sums(variables, i), None

        acc0 = jnp.zeros((b, k) + feat_shape, jnp.float32)
        sums, _ = jax.lax.scan(pass2, acc0, jnp.arange(n_chunks))
        counts = jnp.sum((seg[:, :, None] == jnp.arange(k)).astype(jnp.int32), axis=1)  # (B, K)
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
        x = self.stem(
            normalize_images(frames.reshape((b * k,) + videos.shape[2:]), self.dtype),
            use_running_average=not train,
        )
        x = x.reshape((b, k) + x.shape[1:])
        return self._head(x, jnp.ones((b, k), bool), train), seg


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


__all__ = ["FullVideoModel", "SAMPLINGS", "dense_indices", "uniform_indices"]
