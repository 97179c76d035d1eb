"""Temporal clustering of video frames by Hamming distances of sign bits.

The reusable library of fva_jax (docs/DESIGN.md §3). Pure functions over `jnp` arrays
with static shapes; they import only JAX and NumPy, take any number of leading
batch axes, and work under `jax.jit`, `jax.vmap`, `jax.pmap`, `jax.shard_map`
and (for `aggregate`) `jax.grad`. Over 400 lines on purpose: the whole library is this one
file, so that another project can import it (or copy it) without the training stack.

    bits = sign_bits(x)                                   # (..., T, F) -> (..., T, ceil(F/8)) uint8
    d    = hamming_distances(bits, window=1, mask=None)   # (..., T) float32 in [0, 1]
    seg  = cumulative_segments(d, num_clusters, mask)     # (..., T) int32
    seg  = slope_segments(d, num_clusters, mask)          # (..., T) int32
    seg  = SEGMENTERS[method](d, num_clusters, mask)      # either one, by name (METHODS)
    seg  = cluster(x, num_clusters, method, window, mask) # the three steps above in one call
    agg, counts = aggregate(x, seg, num_clusters, mask)   # (..., K, *feat), (..., K) int32

Conventions:
  * `mask` (..., T) bool marks the valid frames; None means all frames are valid.
    Videos padded at the end to a static length have valid frames followed by
    padding, but any mask is accepted: every function treats the masked-out
    frames as if they did not exist. Distances, windows and segments are
    computed on the valid frames in order (the "compressed" video), and the
    results are put back at the valid frames' positions; masked-out frames get
    distance 0 and segment id K. So with holes, "the next `window` frames" are
    the next `window` valid frames, across any hole.
  * Valid frames get segment ids 0..min(K, n)-1 (n = number of valid frames),
    non-decreasing in time; every one of those ids is used (no empty segment
    among them). Padded frames get id K (== num_clusters), which `aggregate`
    ignores, so padding never joins a segment that real frames use.
  * A boundary "after t" means the next valid frame after t opens a new segment.
  * Bad arguments (num_clusters < 1, window < 1, wrong mask shape, unknown
    method, non-static K) raise ValueError/TypeError at trace time.

`prefix_hamming_distances` (not in `__all__`) is `hamming_distances` without the
gather that holes need, for callers whose masks have none (fva_jax's model).
"""

from __future__ import annotations

import operator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "METHODS",
    "SEGMENTERS",
    "segmenter",
    "sign_bits",
    "hamming_distances",
    "cumulative_segments",
    "slope_segments",
    "cluster",
    "aggregate",
]


# ---------------------------------------------------------------------------
# argument checks (all at trace time: shapes and Python ints are static)


def _static_int(value: Any, name: str, minimum: int) -> int:
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a static Python int, got {type(value).__name__} {value!r}. "
            f"Under jax.jit pass it via static_argnums/static_argnames or functools.partial."
        ) from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}.")
    return out


def _check_frames(shape: tuple[int, ...], name: str, what: str) -> None:
    if len(shape) < 1:
        raise ValueError(f"{name} must have a time axis, shape {what}; got a scalar.")
    if shape[-1] < 1:
        raise ValueError(f"{name} must have at least one frame (T >= 1); got shape {shape}.")


def _check_mask(mask: Any, shape: tuple[int, ...], against: str) -> None:
    """Raises unless mask is None or has exactly `shape` (batch axes then T)."""
    if mask is not None and tuple(np.shape(mask)) != tuple(shape):
        raise ValueError(
            f"mask has shape {tuple(np.shape(mask))} but {against} implies frames of shape "
            f"{tuple(shape)} (leading batch axes then T); pass a bool mask of exactly that "
            f"shape, or mask=None."
        )


def _valid(mask: Any, shape: tuple[int, ...]) -> jax.Array:
    """mask as bool (all True when None); shapes were checked by `_check_mask`."""
    if mask is None:
        return jnp.ones(shape, bool)
    return jnp.asarray(mask).astype(bool)


# ---------------------------------------------------------------------------
# sign bits and distances


def sign_bits(x: jax.Array) -> jax.Array:
    """Packs the signs of each frame's features into bits.

    Args:
      x: (..., T, F) activations, a frame's features flattened on the last axis.

    Returns:
      (..., T, ceil(F / 8)) uint8; bit = x > 0, packed big-endian along the last
      axis with `jnp.packbits`. The unused low bits of the last byte are 0.
    """
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"sign_bits needs x of shape (..., T, F) with F >= 1, got {x.shape}.")
    return _sign_bits(x)


@jax.jit
def _sign_bits(x: jax.Array) -> jax.Array:
    return jnp.packbits(x > 0, axis=-1)


def _as_words(bits: jax.Array) -> jax.Array:
    """(..., B) uint8 -> (..., ceil(B/4)) uint32, zero-padding the byte axis.

    Padding bytes are 0 in every frame, so they never add to a distance.
    """
    nbytes = bits.shape[-1]
    pad = (-nbytes) % 4
    if pad:
        bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    words = bits.reshape(bits.shape[:-1] + ((nbytes + pad) // 4, 4))
    return jax.lax.bitcast_convert_type(words, jnp.uint32)


def hamming_distances(
    bits: jax.Array,
    window: int = 1,
    mask: jax.Array | None = None,
    num_features: int | None = None,
) -> jax.Array:
    """Normalized Hamming distance from each valid frame to the next `window` valid frames.

    With v_0 < v_1 < ... < v_{n-1} the positions of the valid frames (all frames
    when mask is None), d[v_i] = mean over s in 1..window with i+s < n of
    popcount(bits[v_i] XOR bits[v_{i+s}]) / num_features: masked-out frames are
    skipped as if they did not exist, so a hole never hides a change. Frames
    with no such s (the last valid frame) and masked-out frames get 0. Bits are
    compared as uint32 words with `jax.lax.population_count`, never unpacked.
    With a mask the valid frames are first gathered to the front in order (one
    gather of the bits, O(T) indices), compared there, and the distances put
    back at their positions.

    Args:
      bits: (..., T, B) uint8 packed sign bits (from `sign_bits`).
      window: static int >= 1; 1 compares consecutive frames (the paper's rule).
      mask: optional (..., T) bool, True for valid frames (any pattern; see the
        module docstring).
      num_features: the number F of real bits per frame, used to normalize to
        [0, 1]. Defaults to 8 * B, exact when F is a multiple of 8; pass the true
        F otherwise (`cluster` does). Must satisfy 8 * (B - 1) < F <= 8 * B.

    Returns:
      (..., T) float32 in [0, 1].
    """
    bits, window, num_features = _check_hamming_args(bits, window, mask, num_features)
    if mask is None:
        return _hamming(bits, None, window, num_features)
    return _compressed_hamming(bits, mask, window, num_features)


def prefix_hamming_distances(
    bits: jax.Array,
    window: int = 1,
    mask: jax.Array | None = None,
    num_features: int | None = None,
) -> jax.Array:
    """`hamming_distances` for masks without holes, minus the gather that handles holes.

    Not part of the public API (not in `__all__`): for callers that know their
    valid frames form one run, e.g. valid frames then padding. fva_jax's model
    uses it (`fva_jax.models.plans`), also chunk by chunk, where a gather inside
    one chunk could not reach the valid frames of later chunks anyway. It
    compares positions: d[t] = mean over s in 1..window with t+s < T and frames
    t, t+s both valid. On a mask whose valid frames form one run this equals
    `hamming_distances`; on a mask with holes it does not (a hole then sets the
    distance across it to 0 with window 1).
    """
    bits, window, num_features = _check_hamming_args(bits, window, mask, num_features)
    return _hamming(bits, mask, window, num_features)


def _check_hamming_args(bits: Any, window: Any, mask: Any, num_features: Any):
    bits = jnp.asarray(bits)
    if bits.ndim < 2:
        raise ValueError(f"hamming_distances needs bits of shape (..., T, B), got {bits.shape}.")
    if bits.dtype != jnp.uint8:
        raise TypeError(
            f"hamming_distances needs packed uint8 bits (from sign_bits), got dtype {bits.dtype}."
        )
    _check_frames(bits.shape[:-1], "bits", "(..., T, B)")
    window = _static_int(window, "window", 1)
    nbytes = bits.shape[-1]
    if num_features is None:
        num_features = 8 * nbytes
    num_features = _static_int(num_features, "num_features", 1)
    if not 8 * (nbytes - 1) < num_features <= 8 * nbytes:
        raise ValueError(
            f"num_features={num_features} does not fit {nbytes} packed bytes per frame "
            f"(need {8 * (nbytes - 1) + 1}..{8 * nbytes})."
        )
    _check_mask(mask, bits.shape[:-1], f"bits of shape {bits.shape}")
    return bits, window, num_features


@partial(jax.jit, static_argnums=(2, 3))
def _hamming(bits: jax.Array, mask: Any, window: int, num_features: int) -> jax.Array:
    """The positional rule (see `prefix_hamming_distances`)."""
    valid = _valid(mask, bits.shape[:-1])
    num_frames = bits.shape[-2]

    words = _as_words(bits)
    total = jnp.zeros(bits.shape[:-1], jnp.float32)
    pairs = jnp.zeros(bits.shape[:-1], jnp.int32)
    pad_t = [(0, 0)] * (valid.ndim - 1)
    for s in range(1, min(window, num_frames - 1) + 1):
        diff = jax.lax.population_count(words[..., :-s, :] ^ words[..., s:, :])
        count = jnp.sum(diff.astype(jnp.int32), axis=-1)  # (..., T - s)
        both = valid[..., :-s] & valid[..., s:]
        dist = jnp.where(both, count.astype(jnp.float32) / num_features, 0.0)
        total = total + jnp.pad(dist, pad_t + [(0, s)])
        pairs = pairs + jnp.pad(both.astype(jnp.int32), pad_t + [(0, s)])
    return jnp.where(pairs > 0, total / jnp.maximum(pairs, 1).astype(jnp.float32), 0.0)


def _compression(valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The permutation that moves the valid frames to the front, in order.

    Returns (position, source, prefix): position[t] is where frame t goes (valid
    frames to their rank 0..n-1, masked-out frames after them in order),
    source[j] the frame that lands at j (its inverse), prefix = j < n, the mask
    of the compressed video. O(T): a cumsum and a scatter of T indices per row.
    """
    num_frames = valid.shape[-1]
    frame = jnp.arange(num_frames, dtype=jnp.int32)
    rank = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1  # valid frames before and at t, - 1
    n = rank[..., -1:] + 1
    # A masked-out frame t has t - (rank + 1) masked-out frames before it.
    position = jnp.where(valid, rank, n + frame - rank - 1)
    rows = position.reshape(-1, num_frames)
    row = jnp.arange(rows.shape[0])[:, None]
    source = (
        jnp.zeros_like(rows)
        .at[row, rows]
        .set(jnp.broadcast_to(frame, rows.shape), unique_indices=True)
        .reshape(position.shape)
    )
    return position, source, frame < n


@partial(jax.jit, static_argnums=(2, 3))
def _compressed_hamming(bits: jax.Array, mask: Any, window: int, num_features: int) -> jax.Array:
    position, source, prefix = _compression(_valid(mask, bits.shape[:-1]))
    packed = jnp.take_along_axis(bits, source[..., None], axis=-2)
    d = _hamming(packed, prefix, window, num_features)
    # Masked-out frames sit at positions >= n, where d is 0.
    return jnp.take_along_axis(d, position, axis=-1)


# ---------------------------------------------------------------------------
# segmentations


def _check_segments_args(d: Any, num_clusters: Any, mask: Any) -> tuple[jax.Array, int]:
    d = jnp.asarray(d)
    _check_frames(d.shape, "d", "(..., T)")
    num_clusters = _static_int(num_clusters, "num_clusters", 1)
    _check_mask(mask, d.shape, f"d of shape {d.shape}")
    return d, num_clusters


def _prepare_segments(d: jax.Array, mask: Any):
    valid = _valid(mask, d.shape)
    d = d.astype(jnp.float32)
    # The frames' rank among the valid ones: the segmentations work in this
    # "compressed" time so that any mask gives the promised segments.
    rank = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
    n = jnp.sum(valid.astype(jnp.int32), axis=-1, keepdims=True)  # (..., 1)
    # d[t] counts only between two valid frames: not on padding, not on the last one.
    has_next = valid & (rank < n - 1)
    return d, valid, rank, n, has_next


def _ids_from_starts(starts: jax.Array, rank: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """Segment id = number of segments 1..K-1 that start at or before the frame's rank."""
    opened = starts[..., None, 1:] <= rank[..., :, None]  # (..., T, K-1)
    ids = jnp.sum(opened.astype(jnp.int32), axis=-1)
    return jnp.where(valid, ids, k).astype(jnp.int32)


def cumulative_segments(
    d: jax.Array, num_clusters: int, mask: jax.Array | None = None
) -> jax.Array:
    """Contiguous segments that each hold an equal share of the cumulative distance.

    With c[t] = d[0] + ... + d[t-1] (over valid frames) and D = c[last valid
    frame], frame t goes to segment floor(K * c[t] / D), the paper's rule. Then
    a deterministic fix-up makes exactly m = min(K, n) segments non-empty
    (n = number of valid frames): with start[k] the first frame (rank among the
    valid frames) of segment k, start[k] is clipped to [k, n - m + k] and
    `start[k] - k` replaced by its running maximum, which yields strictly
    increasing starts with start[0] = 0 -- e.g. when all change sits in one
    frame, the empty segments after it become one frame each. When D = 0 (all
    frames alike) the segments have equal length (sizes differ by at most 1).

    Args:
      d: (..., T) distances >= 0 (negative values count as 0); d[t] compares
        frame t with later frames, so d on the last valid frame is unused.
      num_clusters: K, a static int >= 1.
      mask: optional (..., T) bool, True for valid frames.

    Returns:
      (..., T) int32 segment ids: 0..m-1 on valid frames, non-decreasing and
      contiguous, each used; K on padded frames.
    """
    d, k = _check_segments_args(d, num_clusters, mask)
    return _cumulative(d, mask, k)


@partial(jax.jit, static_argnums=2)
def _cumulative(d: jax.Array, mask: Any, k: int) -> jax.Array:
    d, valid, rank, n, has_next = _prepare_segments(d, mask)
    dd = jnp.where(has_next, jnp.maximum(d, 0.0), 0.0)
    cs = jnp.cumsum(dd, axis=-1)
    c = jnp.concatenate([jnp.zeros_like(cs[..., :1]), cs[..., :-1]], axis=-1)  # exclusive
    total = cs[..., -1:]  # (..., 1) == c on the last valid frame (only zeros added after it)

    ks = jnp.arange(k, dtype=jnp.int32)  # (K,)
    m = jnp.minimum(n, k)  # (..., 1)
    # First frame of segment j under the paper's rule: #valid frames with K*c < j*D.
    below = valid[..., None, :] & (c[..., None, :] * k < ks[:, None] * total[..., None])
    starts_cum = jnp.sum(below.astype(jnp.int32), axis=-1)  # (..., K)
    starts_equal = (ks * n) // jnp.maximum(m, 1)  # equal lengths when D == 0
    starts = jnp.where(total > 0, starts_cum, starts_equal)
    # Fix-up: strictly increasing starts, at least one frame per segment.
    gap = jnp.clip(starts - ks, 0, jnp.maximum(n - m, 0))
    gap = jnp.where(ks == 0, 0, gap)
    gap = jax.lax.cummax(gap, axis=gap.ndim - 1)
    starts = jnp.where(ks < m, gap + ks, n)  # segments >= m never open
    return _ids_from_starts(starts, rank, valid, k)


def slope_segments(d: jax.Array, num_clusters: int, mask: jax.Array | None = None) -> jax.Array:
    """Segments whose boundaries follow the K-1 largest distances.

    Boundaries go after the min(K, n) - 1 largest d[t] among the valid frames t
    that have a later valid frame (`jax.lax.top_k`); on ties the earlier frame
    wins. Exactly min(K, n) segments are non-empty (n = number of valid frames).

    Args:
      d: (..., T) distances (finite); d[t] compares frame t with later frames.
      num_clusters: K, a static int >= 1.
      mask: optional (..., T) bool, True for valid frames.

    Returns:
      (..., T) int32 segment ids: 0..min(K, n)-1 on valid frames, non-decreasing
      and contiguous; K on padded frames.
    """
    d, k = _check_segments_args(d, num_clusters, mask)
    return _slope(d, mask, k)


@partial(jax.jit, static_argnums=2)
def _slope(d: jax.Array, mask: Any, k: int) -> jax.Array:
    d, valid, rank, n, has_next = _prepare_segments(d, mask)
    num_frames = d.shape[-1]
    picks = min(k - 1, num_frames)
    if picks == 0:
        return jnp.where(valid, 0, k).astype(jnp.int32)
    # Frames without a later valid frame rank below every candidate; top_k puts
    # the lower index first among equal values, which is the tie-breaking rule.
    score = jnp.where(has_next, d, -jnp.inf)
    _, idx = jax.lax.top_k(score, picks)  # (..., picks)
    chosen = jnp.take_along_axis(has_next, idx, axis=-1)
    rows = idx.reshape(-1, picks)
    batch = jnp.arange(rows.shape[0])[:, None]
    boundary = (
        jnp.zeros((rows.shape[0], num_frames), bool)
        .at[batch, rows]
        .max(chosen.reshape(-1, picks))
        .reshape(d.shape)
    )
    # A boundary after t raises the id of every later frame by one.
    after = jnp.cumsum(boundary.astype(jnp.int32), axis=-1) - boundary.astype(jnp.int32)
    return jnp.where(valid, after, k).astype(jnp.int32)


# The one table from a method name to its segmentation; every caller that picks a
# segmentation by name (the model, the tools, the config's validation) goes through it.
SEGMENTERS = {"cumulative": cumulative_segments, "slope": slope_segments}
METHODS = tuple(SEGMENTERS)


def segmenter(method: str):
    """The segmentation function named `method` (a key of SEGMENTERS), or ValueError."""
    if method not in SEGMENTERS:
        raise ValueError(f"Unknown clustering method {method!r}; choose one of {METHODS}.")
    return SEGMENTERS[method]


def cluster(
    x: jax.Array,
    num_clusters: int,
    method: str = "cumulative",
    window: int = 1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Sign bits -> Hamming distances -> segments, in one call.

    Args:
      x: (..., T, F) activations, each frame's features flattened.
      num_clusters: K, a static int >= 1.
      method: "cumulative" (the paper's best) or "slope".
      window: static int >= 1, see `hamming_distances`.
      mask: optional (..., T) bool, True for valid frames (any pattern: the
        masked-out frames are skipped, see the module docstring).

    Returns:
      (..., T) int32 segment ids (see `cumulative_segments`, `slope_segments`).
    """
    segment = segmenter(method)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"cluster needs x of shape (..., T, F), got {x.shape}.")
    _static_int(num_clusters, "num_clusters", 1)
    _static_int(window, "window", 1)
    _check_mask(mask, x.shape[:-1], f"x of shape {x.shape}")
    d = hamming_distances(sign_bits(x), window, mask, num_features=x.shape[-1])
    return segment(d, num_clusters, mask)


# ---------------------------------------------------------------------------
# aggregation


def aggregate(
    x: jax.Array, seg: jax.Array, num_clusters: int, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-segment mean of the frames (`jax.ops.segment_sum`) and segment sizes.

    Frames whose id is outside 0..K-1 (padding has id K) or whose mask is False
    are ignored. Empty segments give a zero mean and size 0, never NaN. The
    gradient with respect to x hands each member frame 1/|segment| of its
    segment's cotangent (ignored frames get 0); `seg` gets no gradient.

    Args:
      x: (..., T, *features) per-frame values.
      seg: (..., T) int segment ids; its shape fixes the batch axes and T.
      num_clusters: K, a static int >= 1.
      mask: optional (..., T) bool, True for valid frames.

    Returns:
      mean: (..., K, *features), dtype of x if floating, else float32 (summed in
        at least float32).
      counts: (..., K) int32 segment sizes.
    """
    x = jnp.asarray(x)
    seg = jnp.asarray(seg)
    k = _static_int(num_clusters, "num_clusters", 1)
    _check_frames(seg.shape, "seg", "(..., T)")
    if not jnp.issubdtype(seg.dtype, jnp.integer):
        raise TypeError(f"seg must hold integer segment ids, got dtype {seg.dtype}.")
    if x.shape[: seg.ndim] != seg.shape:
        raise ValueError(
            f"x of shape {x.shape} does not start with the (..., T) shape {seg.shape} of seg; "
            f"x must be (..., T, *features) with the same leading axes and T as seg."
        )
    _check_mask(mask, seg.shape, f"seg of shape {seg.shape}")
    return _aggregate(x, seg, mask, k)


@partial(jax.jit, static_argnums=3)
def _aggregate(x: jax.Array, seg: jax.Array, mask: Any, k: int) -> tuple[jax.Array, jax.Array]:
    valid = _valid(mask, seg.shape)
    batch_shape, num_frames, features = seg.shape[:-1], seg.shape[-1], x.shape[seg.ndim :]
    batch = int(np.prod(batch_shape, dtype=np.int64))

    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    member = valid & (seg >= 0) & (seg < k)
    # Flatten batch*K segments; non-members go to one extra slot that is dropped.
    offset = (jnp.arange(batch, dtype=jnp.int32) * k).reshape(batch_shape + (1,))
    ids = jnp.where(member, seg.astype(jnp.int32) + offset, batch * k).reshape(-1)
    num_segments = batch * k + 1
    sums = jax.ops.segment_sum(
        x.astype(acc_dtype).reshape((batch * num_frames,) + features), ids, num_segments
    )[:-1]
    counts = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments)[:-1]
    denom = jnp.maximum(counts, 1).astype(acc_dtype).reshape((-1,) + (1,) * len(features))
    mean = (sums / denom).astype(out_dtype)
    return (
        mean.reshape(batch_shape + (k,) + features),
        counts.astype(jnp.int32).reshape(batch_shape + (k,)),
    )
