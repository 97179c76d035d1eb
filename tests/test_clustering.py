"""fva_jax.clustering against plain NumPy references, property tests, transforms.

The references below are written from the documented rules with Python loops
and float64, independently of the vectorized JAX code.
"""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fva_jax import clustering as C
from fva_jax.tools import clustering_tools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HYP = settings(max_examples=25, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------
# NumPy references (one sequence at a time; `_batched` maps them over batch axes)


def _valid_positions(t_len, mask):
    mask = np.ones(t_len, bool) if mask is None else np.asarray(mask, bool)
    return mask, np.flatnonzero(mask)


def _scatter(values, pos, t_len, fill):
    """Puts the compressed video's values back at the valid positions; fill elsewhere."""
    out = np.full(t_len, fill, np.asarray(values).dtype)
    out[pos] = values
    return out


# Every reference compresses first: the documented rule is that masked-out frames do not
# exist, so each one keeps the valid frames in order, works on that shorter video with no
# mask at all, and scatters the result back (padding: distance 0, id K).


def ref_distances(x, window, mask):
    """x (T, F) float; normalized Hamming distances of the signs, float64."""
    signs = np.asarray(x) > 0
    mask, pos = _valid_positions(signs.shape[0], mask)
    video = signs[pos]
    n = len(video)
    d = np.zeros(n)
    for i in range(n):
        dists = [np.mean(video[i] != video[i + s]) for s in range(1, window + 1) if i + s < n]
        d[i] = np.mean(dists) if dists else 0.0
    return _scatter(d, pos, signs.shape[0], 0.0)


def ref_cumulative(d, k, mask):
    """Returns (ids, ambiguous); ambiguous when a cut is within rounding of a frame."""
    d = np.asarray(d, np.float64)
    mask, pos = _valid_positions(d.shape[0], mask)
    video = d[pos]
    n = len(video)
    if n == 0:
        return np.full(d.shape[0], k, np.int64), False
    m = min(k, n)
    dd = [max(v, 0.0) for v in video[:-1]]
    c = np.concatenate([[0.0], np.cumsum(dd)])  # c[i] for the i-th frame
    total = c[-1]
    ambiguous = False
    if total > 0:
        raw_ids = [min(math.floor(k * ci / total), k - 1) for ci in c]
        raw = [sum(1 for r in raw_ids if r < j) for j in range(k)]
        for ci in c:
            for j in range(1, k):
                gap = abs(k * ci - j * total)
                ambiguous |= 0 < gap <= 1e-7 * k * n * total  # float32 rounding
    else:
        raw = [(j * n) // m for j in range(k)]
    starts = [0]
    for j in range(1, m):
        starts.append(max(min(max(raw[j], j), n - m + j), starts[-1] + 1))
    ids = [sum(1 for s in starts[1:] if s <= i) for i in range(n)]
    return _scatter(np.array(ids, np.int64), pos, d.shape[0], k), ambiguous


def ref_slope(d, k, mask):
    d = np.asarray(d, np.float64)
    mask, pos = _valid_positions(d.shape[0], mask)
    video = d[pos]
    n = len(video)
    candidates = sorted(range(n - 1), key=lambda i: (-video[i], i))  # earlier frame wins ties
    boundaries = set(candidates[: k - 1])
    ids, current = [], 0
    for i in range(n):
        ids.append(current)
        current += i in boundaries
    return _scatter(np.array(ids, np.int64), pos, d.shape[0], k)


def ref_aggregate(x, seg, k, mask):
    x = np.asarray(x, np.float64)
    mask, _ = _valid_positions(x.shape[0], mask)
    mean = np.zeros((k,) + x.shape[1:])
    counts = np.zeros(k, np.int64)
    for j in range(k):
        members = mask & (np.asarray(seg) == j)
        counts[j] = members.sum()
        if counts[j]:
            mean[j] = x[members].mean(axis=0)
    return mean, counts


def _batched(fn, *arrays, batch_ndim):
    """Applies a per-sequence reference over the leading batch axes."""
    if batch_ndim == 0:
        return fn(*arrays)
    outs = [
        _batched(fn, *[None if a is None else a[i] for a in arrays], batch_ndim=batch_ndim - 1)
        for i in range(arrays[0].shape[0])
    ]
    if isinstance(outs[0], tuple):
        return tuple(np.stack(o) for o in zip(*outs))
    return np.stack(outs)


def trailing_mask(batch_shape, t_len, rng):
    """Valid frames then padding; lengths 0..T (0 = a fully padded row)."""
    lengths = rng.integers(0, t_len + 1, size=batch_shape)
    return np.arange(t_len) < lengths[..., None]


def check_segments(ids, k, mask):
    """Asserts the promised structure on one sequence; returns n (valid frames)."""
    ids = np.asarray(ids)
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
    assert np.all(ids[~mask] == k), "padding must get id K"
    v = ids[mask]
    n = v.size
    if n:
        assert v[0] == 0
        steps = np.diff(v)
        assert np.all((steps == 0) | (steps == 1)), f"not contiguous/non-decreasing: {v}"
        assert v[-1] == min(k, n) - 1, f"expected {min(k, n)} segments, got ids {v}"
        assert np.array_equal(np.unique(v), np.arange(min(k, n)))
    return n


# ---------------------------------------------------------------------------
# sign bits and distances


@pytest.mark.parametrize("shape", [(5, 1), (4, 7), (3, 8), (2, 6, 13), (2, 3, 4, 37)])
def test_sign_bits_matches_numpy(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    x[..., 0] = 0.0  # zero is not positive
    bits = C.sign_bits(x)
    assert bits.dtype == jnp.uint8
    assert bits.shape == shape[:-1] + (math.ceil(shape[-1] / 8),)
    np.testing.assert_array_equal(bits, np.packbits(x > 0, axis=-1))


@pytest.mark.parametrize(
    "batch_shape,t_len,features,window,masked",
    [
        ((), 9, 13, 1, False),
        ((3,), 7, 33, 1, True),
        ((2, 2), 6, 67, 2, True),
        ((4,), 5, 100, 3, True),
        ((2,), 4, 9, 7, False),
        ((3,), 1, 5, 1, True),
        ((2,), 8, 256, 2, False),
    ],
)
def test_hamming_distances_match_reference(batch_shape, t_len, features, window, masked):
    rng = np.random.default_rng(features)
    x = rng.normal(size=batch_shape + (t_len, features)).astype(np.float32)
    mask = trailing_mask(batch_shape, t_len, rng) if masked else None
    d = C.hamming_distances(C.sign_bits(x), window=window, mask=mask, num_features=features)
    assert d.shape == batch_shape + (t_len,) and d.dtype == jnp.float32
    ref = _batched(
        lambda a, m: ref_distances(a, window, m),
        x,
        mask if mask is not None else None,
        batch_ndim=len(batch_shape),
    )
    np.testing.assert_allclose(d, ref, rtol=1e-6, atol=1e-7)
    assert np.all((np.asarray(d) >= 0) & (np.asarray(d) <= 1))


def test_hamming_extremes_and_default_normalization():
    x = np.ones((4, 24), np.float32)
    x[1] = -1  # frame 1 differs from 0 and 2 in every bit
    d = C.hamming_distances(C.sign_bits(x))  # F = 24 = 8 * 3 bytes: default is exact
    np.testing.assert_allclose(d, [1.0, 1.0, 0.0, 0.0])
    # F = 13 packs into 2 bytes: by default normalized by 16, with num_features by 13.
    y = np.ones((2, 13), np.float32)
    y[1] = -1
    bits = C.sign_bits(y)
    np.testing.assert_allclose(C.hamming_distances(bits), [13 / 16, 0.0])
    np.testing.assert_allclose(C.hamming_distances(bits, num_features=13), [1.0, 0.0])
    with pytest.raises(ValueError, match="num_features"):
        C.hamming_distances(bits, num_features=17)
    with pytest.raises(TypeError, match="uint8"):
        C.hamming_distances(jnp.zeros((3, 4), bool))


def test_hamming_all_equal_frames_and_padding_are_zero():
    x = np.tile(np.random.default_rng(1).normal(size=(1, 45)), (6, 1))
    np.testing.assert_array_equal(C.hamming_distances(C.sign_bits(x), window=3), np.zeros(6))
    x = np.random.default_rng(2).normal(size=(6, 45))
    mask = np.array([1, 1, 1, 1, 0, 0], bool)
    d = np.asarray(C.hamming_distances(C.sign_bits(x), window=2, mask=mask))
    assert np.all(d[3:] == 0) and np.all(d[:3] > 0)


# ---------------------------------------------------------------------------
# segmentations


SEGMENT_CASES = [
    ((), 10, 1),
    ((), 10, 2),
    ((3,), 12, 4),
    ((2, 3), 9, 5),
    ((4,), 3, 8),
    ((2,), 1, 3),
    ((5,), 20, 16),
]


@pytest.mark.parametrize("batch_shape,t_len,k", SEGMENT_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_cumulative_segments_match_reference(batch_shape, t_len, k, masked):
    rng = np.random.default_rng(t_len * 31 + k)
    d = rng.random(batch_shape + (t_len,)).astype(np.float32)
    mask = trailing_mask(batch_shape, t_len, rng) if masked else None
    ids = C.cumulative_segments(d, k, mask)
    assert ids.shape == d.shape and ids.dtype == jnp.int32
    ref, amb = _batched(lambda a, m: ref_cumulative(a, k, m), d, mask, batch_ndim=len(batch_shape))
    assert not np.any(amb)
    np.testing.assert_array_equal(ids, ref)
    flat_mask = None if mask is None else mask.reshape(-1, t_len)
    for i, row in enumerate(np.asarray(ids).reshape(-1, t_len)):
        check_segments(row, k, None if flat_mask is None else flat_mask[i])


@pytest.mark.parametrize("batch_shape,t_len,k", SEGMENT_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_slope_segments_match_reference(batch_shape, t_len, k, masked):
    rng = np.random.default_rng(t_len * 17 + k)
    # Quantized distances so that ties occur and the tie-breaking is tested.
    d = (rng.integers(0, 4, batch_shape + (t_len,)) / 4).astype(np.float32)
    mask = trailing_mask(batch_shape, t_len, rng) if masked else None
    ids = C.slope_segments(d, k, mask)
    assert ids.shape == d.shape and ids.dtype == jnp.int32
    ref = _batched(lambda a, m: ref_slope(a, k, m), d, mask, batch_ndim=len(batch_shape))
    np.testing.assert_array_equal(ids, ref)


def test_masks_with_holes_treat_valid_frames_as_the_video():
    """Random holes: distances and both segmentations equal the compressed video's."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(4, 15, 29)).astype(np.float32)
    mask = rng.random((4, 15)) < 0.6
    d = np.asarray(C.hamming_distances(C.sign_bits(x), 2, mask, num_features=29))
    np.testing.assert_allclose(
        d, _batched(lambda a, m: ref_distances(a, 2, m), x, mask, batch_ndim=1), rtol=1e-6
    )
    for k in (1, 3, 6):
        ids = np.asarray(C.cumulative_segments(d, k, mask))
        ref, amb = _batched(lambda a, m: ref_cumulative(a, k, m), d, mask, batch_ndim=1)
        assert not np.any(amb)
        np.testing.assert_array_equal(ids, ref)
        np.testing.assert_array_equal(
            C.slope_segments(d, k, mask),
            _batched(lambda a, m: ref_slope(a, k, m), d, mask, batch_ndim=1),
        )
        for row, m in zip(ids, mask):
            check_segments(row, k, m)


def test_a_hole_is_skipped_not_a_zero_distance():
    """Frames A, A', [hole], B, B with K=2: the cut is at the change A' -> B across the hole,
    whatever the hole frame holds (the issue's example; a positional rule cut A | A'BB)."""
    a = np.ones(16, np.float32)
    a_prime = a.copy()
    a_prime[0] = -1  # 1 bit of 16 differs from A
    b = -a  # every bit differs from A
    mask = np.array([1, 1, 0, 1, 1], bool)
    for hole in (a_prime, b, np.random.default_rng(0).normal(size=16)):
        x = np.stack([a, a_prime, hole, b, b])
        d = np.asarray(C.hamming_distances(C.sign_bits(x), 1, mask))
        np.testing.assert_allclose(d, [1 / 16, 15 / 16, 0, 0, 0])
        for method in C.METHODS:
            np.testing.assert_array_equal(C.cluster(x, 2, method, 1, mask), [0, 0, 2, 1, 1])
        # Window 2 reaches the two frames after A' across the hole as well.
        d2 = np.asarray(C.hamming_distances(C.sign_bits(x), 2, mask))
        np.testing.assert_allclose(d2, [(1 / 16 + 1) / 2, 15 / 16, 0, 0, 0])


# Rows of T=9 frames: no holes, all valid, one valid frame, none, holes at the start, at the
# end and inside, every other frame.
HOLE_PATTERNS = np.array(
    [
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 1, 0, 0, 1, 1, 1],
        [1, 0, 1, 0, 1, 0, 1, 0, 1],
    ],
    bool,
)


@pytest.mark.parametrize("method", ["cumulative", "slope"])
@pytest.mark.parametrize("window", [1, 3])
def test_holed_masks_equal_the_compressed_video_under_jit_and_vmap(method, window):
    """Every hole pattern of a batch gives the compressed video's distances, segments and
    means, scattered back to the valid frames (padding: 0, id K), jitted and vmapped."""
    k, features = 3, 24
    rng = np.random.default_rng(window)
    # Three scenes with noise, so that distances vary and a few frames share signs.
    scene = np.arange(9) // 3
    bases = rng.normal(size=(len(HOLE_PATTERNS), 3, features))
    x = np.take_along_axis(bases, scene[None, :, None], axis=1)
    x = (x + 0.6 * rng.normal(size=x.shape)).astype(np.float32)
    mask = HOLE_PATTERNS

    distances = jax.jit(C.hamming_distances, static_argnums=(1, 3))
    d_jit = np.asarray(distances(C.sign_bits(x), window, mask, features))
    d_vmap = np.asarray(
        jax.vmap(lambda a, m: C.hamming_distances(C.sign_bits(a), window, m))(x, mask)
    )
    d_ref = _batched(lambda a, m: ref_distances(a, window, m), x, mask, batch_ndim=1)
    np.testing.assert_allclose(d_jit, d_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(d_vmap, d_jit)

    ids_jit = np.asarray(jax.jit(C.cluster, static_argnums=(1, 2, 3))(x, k, method, window, mask))
    ids_vmap = np.asarray(jax.vmap(lambda a, m: C.cluster(a, k, method, window, m))(x, mask))
    if method == "slope":  # ties compare float32 values: feed the reference the same ones
        ref = _batched(lambda a, m: ref_slope(a, k, m), d_jit, mask, batch_ndim=1)
    else:
        ref, amb = _batched(lambda a, m: ref_cumulative(a, k, m), d_ref, mask, batch_ndim=1)
        assert not np.any(amb)
    np.testing.assert_array_equal(ids_jit, ref)
    np.testing.assert_array_equal(ids_vmap, ref)

    means, counts = jax.jit(C.aggregate, static_argnums=2)(x, ids_jit, k, mask)
    for row in range(len(mask)):
        pos = np.flatnonzero(mask[row])
        check_segments(ids_jit[row], k, mask[row])
        ref_mean, ref_counts = ref_aggregate(x[row, pos], ids_jit[row, pos], k, None)
        np.testing.assert_allclose(means[row], ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(counts[row], ref_counts)


def test_prefix_hamming_distances_equal_public_ones_without_holes():
    """The model's variant skips the compression: the same distances wherever the valid
    frames form one run (valid then padding, or a run inside), the positional rule else."""
    rng = np.random.default_rng(7)
    bits = C.sign_bits(rng.normal(size=(5, 8, 20)).astype(np.float32))
    masks = np.array(
        [[1] * 8, [1] * 5 + [0] * 3, [0, 0, 1, 1, 1, 1, 0, 0], [0] * 8, [1, 1, 0, 1, 1, 1, 1, 1]],
        bool,
    )
    for window in (1, 3):
        prefix = np.asarray(C.prefix_hamming_distances(bits, window, masks, 20))
        public = np.asarray(C.hamming_distances(bits, window, masks, 20))
        np.testing.assert_array_equal(prefix[:4], public[:4])
        # The hole after frame 1: positional counts only frames 3.. within reach (none with
        # window 1), the public one reaches `window` valid frames across it.
        assert prefix[4, 1] != public[4, 1] and (window > 1 or prefix[4, 1] == 0)
    assert "prefix_hamming_distances" not in C.__all__


def test_cumulative_equal_lengths_when_no_change():
    for t_len, k in [(10, 4), (16, 4), (7, 7), (3, 5), (11, 1), (11, 2)]:
        ids = np.asarray(C.cumulative_segments(np.zeros(t_len), k))
        sizes = np.bincount(ids)
        assert len(sizes) == min(k, t_len)
        assert sizes.max() - sizes.min() <= 1, (t_len, k, ids)
    # All-equal frames through the whole pipeline, with trailing padding.
    x = np.ones((2, 9, 21), np.float32)
    mask = np.arange(9) < np.array([[9], [5]])
    ids = np.asarray(C.cluster(x, 3, mask=mask))
    np.testing.assert_array_equal(ids, [[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 1, 2, 2, 3, 3, 3, 3]])


def test_cumulative_concentrated_change_keeps_every_segment():
    d = np.zeros(10, np.float32)
    d[4] = 1.0  # all change between frames 4 and 5
    ids = np.asarray(C.cumulative_segments(d, 4))
    np.testing.assert_array_equal(ids, [0, 0, 0, 0, 0, 1, 2, 3, 3, 3])
    d = np.zeros(6, np.float32)
    d[0] = 1.0  # change at the very start: later segments pushed to the end
    np.testing.assert_array_equal(C.cumulative_segments(d, 6), np.arange(6))
    np.testing.assert_array_equal(C.cumulative_segments(d, 3), [0, 1, 2, 2, 2, 2])


def test_cumulative_equal_shares_of_change():
    # Constant distance: equal shares of change are equal numbers of steps.
    ids = np.asarray(C.cumulative_segments(np.full(13, 0.5, np.float32), 4))
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    # Two equal bursts of change: three segments, split exactly at the bursts.
    d = np.array([0, 0, 1, 0, 0, 0, 1, 0, 0, 0], np.float32)
    np.testing.assert_array_equal(C.cumulative_segments(d, 3), [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    # With K=2 the cut at half the change falls on the first burst.
    np.testing.assert_array_equal(C.cumulative_segments(d, 2), [0, 0, 0, 1, 1, 1, 1, 1, 1, 1])


def test_edge_cases_where_the_reference_release_differs():
    """The rows of docs/DESIGN.md §1's table of differences from the reference release."""
    # Slope, equal distances competing for the one boundary: the earlier frame (0) wins.
    d = np.array([0.5, 0.1, 0.5, 0.1, 0.0], np.float32)
    np.testing.assert_array_equal(C.slope_segments(d, 2), [0, 1, 1, 1, 1])
    # Cumulative, frame 2 exactly on the threshold D/2 (c = 0, 1, 2, 3, 4; D = 4): it opens
    # segment 1 (the reference's strict > keeps it in segment 0: [0, 0, 0, 1, 1]).
    d = np.array([1, 1, 1, 1, 0], np.float32)
    np.testing.assert_array_equal(C.cumulative_segments(d, 2), [0, 0, 1, 1, 1])
    # No change at all: equal-length segments over every frame, not the first K frames alone.
    np.testing.assert_array_equal(C.cumulative_segments(np.zeros(7), 3), [0, 0, 1, 1, 2, 2, 2])
    # All change after the last frame but one: both thresholds fall on frame 6, the last;
    # segment 1's start moves back so that each of the K segments keeps a frame.
    d = np.array([0, 0, 0, 0, 0, 1, 0], np.float32)
    np.testing.assert_array_equal(C.cumulative_segments(d, 3), [0, 0, 0, 0, 0, 1, 2])


@pytest.mark.parametrize("k", [2, 4, 8])
def test_slope_splits_planted_change_points(k):
    rng = np.random.default_rng(k)
    t_len, features = 40, 203
    cuts = np.sort(rng.choice(np.arange(1, t_len), size=k - 1, replace=False))
    scene = np.cumsum(np.isin(np.arange(t_len), cuts))  # scene index per frame
    bases = rng.normal(size=(k, features))
    x = bases[scene] + 0.05 * rng.normal(size=(t_len, features))  # small noise flips few signs
    expected = scene
    np.testing.assert_array_equal(C.cluster(x, k, method="slope"), expected)
    d = C.hamming_distances(C.sign_bits(x), num_features=features)
    np.testing.assert_array_equal(C.slope_segments(d, k), expected)
    # Padding after the video changes nothing for the real frames.
    xp = np.concatenate([x, rng.normal(size=(5, features))])
    mask = np.arange(t_len + 5) < t_len
    np.testing.assert_array_equal(
        C.cluster(xp, k, method="slope", mask=mask), np.concatenate([expected, np.full(5, k)])
    )


@pytest.mark.parametrize("method", ["cumulative", "slope"])
@pytest.mark.parametrize("window", [1, 3])
def test_cluster_matches_reference_pipeline(method, window):
    rng = np.random.default_rng(window)
    batch_shape, t_len, features, k = (3, 2), 11, 51, 4
    x = rng.normal(size=batch_shape + (t_len, features)).astype(np.float32)
    mask = trailing_mask(batch_shape, t_len, rng)
    ids = C.cluster(x, k, method=method, window=window, mask=mask)
    d_ref = _batched(lambda a, m: ref_distances(a, window, m), x, mask, batch_ndim=2)
    d_jax = np.asarray(C.hamming_distances(C.sign_bits(x), window, mask, num_features=features))
    np.testing.assert_allclose(d_jax, d_ref, rtol=1e-6)
    if method == "slope":
        # Tie-breaking compares float32 values: feed the reference the same ones.
        ref = _batched(lambda a, m: ref_slope(a, k, m), d_jax, mask, batch_ndim=2)
    else:
        ref, amb = _batched(lambda a, m: ref_cumulative(a, k, m), d_ref, mask, batch_ndim=2)
        assert not np.any(amb)
    np.testing.assert_array_equal(ids, ref)


def test_segmenter_table_is_the_one_choice_by_name():
    """METHODS lists the table's names; segmenter() and cluster() use the table's functions."""
    assert C.METHODS == tuple(C.SEGMENTERS) == ("cumulative", "slope")
    assert C.SEGMENTERS["cumulative"] is C.cumulative_segments
    assert C.SEGMENTERS["slope"] is C.slope_segments
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 9, 20)).astype(np.float32)
    mask = trailing_mask((2,), 9, rng)
    d = C.hamming_distances(C.sign_bits(x), 2, mask, num_features=20)
    for method in C.METHODS:
        assert C.segmenter(method) is C.SEGMENTERS[method]
        np.testing.assert_array_equal(
            C.cluster(x, 3, method, 2, mask), C.segmenter(method)(d, 3, mask)
        )
    with pytest.raises(ValueError, match=r"Unknown clustering method 'kmeans'.*'cumulative'"):
        C.segmenter("kmeans")


@pytest.mark.parametrize("t_len,chunk", [(10, 3), (4, 32), (8, 4)])
def test_chunked_sign_bits_equal_sign_bits_of_all_frames(t_len, chunk):
    """The tools' chunked helper: same bits as one call on every frame (chunks that do not
    divide T, one chunk larger than T), and F read off the feature function."""
    frames = np.random.default_rng(t_len).integers(0, 256, (t_len, 6, 5, 3), dtype=np.uint8)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(90, 13)), jnp.float32)

    def features(chunk_frames):  # (n, 6, 5, 3) -> (n, 13), signs of both kinds
        return (chunk_frames.reshape(chunk_frames.shape[0], -1) / 255.0 - 0.5) @ weights

    bits, num_features = clustering_tools.chunked_sign_bits(features, frames, chunk)
    assert num_features == 13 and bits.shape == (t_len, 2) and bits.dtype == np.uint8
    np.testing.assert_array_equal(bits, np.asarray(C.sign_bits(features(jnp.asarray(frames)))))
    with pytest.raises(ValueError, match="chunk_size"):
        clustering_tools.chunked_sign_bits(features, frames, 0)


def test_segments_of_lists_first_last_and_size():
    ids = np.array([0, 0, 1, 2, 2, 2])
    assert clustering_tools.segments_of(ids) == [(0, 1, 2), (2, 2, 1), (3, 5, 3)]


# ---------------------------------------------------------------------------
# aggregate


@pytest.mark.parametrize(
    "batch_shape,t_len,feat,k",
    [((), 7, (3,), 2), ((3,), 9, (2, 5), 4), ((2, 2), 4, (), 6), ((2,), 6, (4,), 1)],
)
def test_aggregate_matches_numpy(batch_shape, t_len, feat, k):
    rng = np.random.default_rng(t_len)
    x = rng.normal(size=batch_shape + (t_len,) + feat).astype(np.float32)
    mask = trailing_mask(batch_shape, t_len, rng)
    seg = C.cumulative_segments(rng.random(batch_shape + (t_len,)), k, mask)
    mean, counts = C.aggregate(x, seg, k, mask)
    assert mean.shape == batch_shape + (k,) + feat and mean.dtype == jnp.float32
    assert counts.shape == batch_shape + (k,) and counts.dtype == jnp.int32
    ref_mean, ref_counts = _batched(
        lambda a, s, m: ref_aggregate(a, s, k, m),
        x,
        np.asarray(seg),
        mask,
        batch_ndim=len(batch_shape),
    )
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, ref_counts)


def test_aggregate_ignores_padding_ids_and_empty_segments_are_zero():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    seg = np.array([0, 0, 2, 2, 4, 4])  # id 1 and 3 empty; 4 == K is padding
    mean, counts = C.aggregate(x, seg, 4)
    np.testing.assert_array_equal(counts, [2, 0, 2, 0])
    np.testing.assert_allclose(mean, [[1, 2], [0, 0], [5, 6], [0, 0]])
    assert not np.any(np.isnan(mean))
    # The mask drops frames too; a negative id is ignored like K.
    mean, counts = C.aggregate(x, np.array([0, 0, 0, -1, 1, 1]), 2, mask=np.arange(6) != 1)
    np.testing.assert_array_equal(counts, [2, 2])
    np.testing.assert_allclose(mean, [[2, 3], [9, 10]])
    # All frames padded: zeros, never NaN, and zero gradient.
    g = jax.grad(lambda v: C.aggregate(v, jnp.full(6, 4), 4)[0].sum())(jnp.asarray(x))
    np.testing.assert_array_equal(g, np.zeros_like(x))


def test_aggregate_dtypes():
    x = np.arange(8, dtype=np.uint8).reshape(4, 2)
    mean, _ = C.aggregate(x, np.array([0, 0, 0, 1]), 2)
    assert mean.dtype == jnp.float32
    np.testing.assert_allclose(mean, [[2, 3], [6, 7]])
    xb = jnp.asarray(np.random.default_rng(0).normal(size=(300, 3)), jnp.bfloat16)
    mean, _ = C.aggregate(xb, jnp.zeros(300, jnp.int32), 1)
    assert mean.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(mean, np.float32),
        np.asarray(xb, np.float32).mean(0, keepdims=True),
        rtol=1e-2,
        atol=1e-2,
    )


def test_aggregate_gradient_is_mean_share():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 8, 3)).astype(np.float32)
    mask = np.arange(8) < np.array([[8], [6]])
    k = 3
    seg = C.cumulative_segments(rng.random((2, 8)), k, mask)
    w = rng.normal(size=(2, k, 3)).astype(np.float32)
    g = jax.grad(lambda v: jnp.sum(w * C.aggregate(v, seg, k, mask)[0]))(jnp.asarray(x))
    counts = np.asarray(C.aggregate(x, seg, k, mask)[1])
    seg = np.asarray(seg)
    expected = np.zeros_like(x)
    for b in range(2):
        for t in range(8):
            if mask[b, t]:
                expected[b, t] = w[b, seg[b, t]] / counts[b, seg[b, t]]
    np.testing.assert_allclose(g, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# property tests


@st.composite
def distance_rows(draw):
    t_len = draw(st.sampled_from([1, 2, 5, 12, 30]))
    k = draw(st.sampled_from([1, 2, 3, 7, 16]))
    n = draw(st.integers(0, t_len))
    # Few distinct values: zeros, ties and concentrated change are common.
    values = st.sampled_from([0.0, 0.0, 0.0, 0.125, 0.5, 1.0]) | st.floats(0, 1, width=32)
    d = np.array(draw(st.lists(values, min_size=t_len, max_size=t_len)), np.float32)
    # Valid frames then padding, or any pattern of holes.
    holes = np.array(draw(st.lists(st.booleans(), min_size=t_len, max_size=t_len)), bool)
    return d, k, draw(st.sampled_from([np.arange(t_len) < n, holes]))


@HYP
@given(distance_rows())
def test_property_segments_contiguous_with_promised_count(row):
    d, k, mask = row
    for fn in (C.cumulative_segments, C.slope_segments):
        check_segments(fn(d, k, mask), k, mask)
    np.testing.assert_array_equal(C.slope_segments(d, k, mask), ref_slope(d, k, mask))
    ref, amb = ref_cumulative(d, k, mask)
    if not amb:
        np.testing.assert_array_equal(C.cumulative_segments(d, k, mask), ref)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(distance_rows(), st.integers(0, 2**31 - 1))
def test_property_aggregate_means_and_gradients(row, seed):
    d, k, mask = row
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(d.shape[0], 3)).astype(np.float32)
    seg = C.slope_segments(d, k, mask)
    mean, counts = C.aggregate(x, seg, k, mask)
    ref_mean, ref_counts = ref_aggregate(x, np.asarray(seg), k, mask)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, ref_counts)
    w = rng.normal(size=(k, 3)).astype(np.float32)
    g = jax.grad(lambda v: jnp.sum(w * C.aggregate(v, seg, k, mask)[0]))(jnp.asarray(x))
    # Analytic: a member frame of segment j gets w[j] / |j|; padding gets 0.
    expected = np.zeros_like(x)
    for t, j in enumerate(np.asarray(seg)):
        if mask[t]:
            expected[t] = w[j] / ref_counts[j]
    np.testing.assert_allclose(g, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# errors


def test_clear_errors_at_trace_time():
    x = jnp.zeros((2, 5, 9))
    d = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match="num_clusters must be >= 1"):
        C.cluster(x, 0)
    with pytest.raises(ValueError, match="num_clusters must be >= 1"):
        C.cumulative_segments(d, 0)
    with pytest.raises(ValueError, match="num_clusters must be >= 1"):
        C.aggregate(x, jnp.zeros((2, 5), jnp.int32), 0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        C.cluster(x, 2, window=0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        C.hamming_distances(C.sign_bits(x), window=0)
    with pytest.raises(ValueError, match="mask has shape"):
        C.cluster(x, 2, mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="mask has shape"):
        C.slope_segments(d, 2, mask=jnp.ones((5,), bool))
    with pytest.raises(ValueError, match="mask has shape"):
        C.aggregate(x, jnp.zeros((2, 5), jnp.int32), 2, mask=jnp.ones((2, 5, 1), bool))
    with pytest.raises(ValueError, match="Unknown clustering method 'kmeans'"):
        C.cluster(x, 2, method="kmeans")
    with pytest.raises(ValueError, match="does not start with"):
        C.aggregate(x, jnp.zeros((2, 4), jnp.int32), 2)
    with pytest.raises(TypeError, match="static Python int"):
        jax.jit(lambda v, kk: C.cluster(v, kk))(x, 2)
    # Errors surface while tracing under jit as well.
    with pytest.raises(ValueError, match="window must be >= 1"):
        jax.jit(lambda v: C.cluster(v, 2, window=0))(x)


# ---------------------------------------------------------------------------
# transforms (single device here; pmap and shard_map in a 4-device subprocess)


def test_jit_and_vmap_give_the_same_results():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 10, 37)).astype(np.float32)
    mask = trailing_mask((3,), 10, rng)
    for method in C.METHODS:
        eager = C.cluster(x, 4, method, 2, mask)
        jitted = jax.jit(C.cluster, static_argnums=(1, 2, 3))(x, 4, method, 2, mask)
        vmapped = jax.vmap(lambda a, m: C.cluster(a, 4, method, 2, m))(x, mask)
        np.testing.assert_array_equal(jitted, eager)
        np.testing.assert_array_equal(vmapped, eager)
    seg = C.cluster(x, 4, mask=mask)
    eager = C.aggregate(x, seg, 4, mask)
    jitted = jax.jit(C.aggregate, static_argnums=2)(x, seg, 4, mask)
    vmapped = jax.vmap(lambda a, s, m: C.aggregate(a, s, 4, m))(x, seg, mask)
    for a, b, c in zip(eager, jitted, vmapped):
        np.testing.assert_allclose(b, a, rtol=1e-6)
        np.testing.assert_allclose(c, a, rtol=1e-6)


def _run_python(code, **env):
    full_env = dict(
        os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_import_does_not_pull_in_training_stack():
    out = _run_python("""
        import sys
        import fva_jax.clustering
        heavy = [m for m in ("flax", "tensorflow", "tensorflow_datasets", "optax", "orbax")
                 if m in sys.modules]
        print("HEAVY", heavy)
    """)
    assert "HEAVY []" in out, out


MULTI_DEVICE = """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from fva_jax import clustering as C
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 2, 12, 29)).astype(np.float32)   # (devices, batch, T, F)
    mask = np.arange(12) < rng.integers(1, 13, size=(4, 2, 1))
    k = 4

    def pipeline(a, m):
        seg_c = C.cluster(a, k, "cumulative", 2, m)
        seg_s = C.cluster(a, k, "slope", 1, m)
        mean, counts = C.aggregate(a, seg_c, k, m)
        grad = jax.grad(lambda v: jnp.sum(jnp.sin(C.aggregate(v, seg_s, k, m)[0])))(a)
        return seg_c, seg_s, mean, counts, grad

    eager = pipeline(x, mask)
    pmapped = jax.pmap(pipeline)(x, mask)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.jit(jax.shard_map(pipeline, mesh=mesh, in_specs=(P("data"), P("data")),
                                    out_specs=P("data")))(x, mask)
    # shard_map over the batch axis of a flat (B, T, F) batch as well.
    flat = jax.jit(jax.shard_map(pipeline, mesh=mesh, in_specs=(P("data"), P("data")),
                                 out_specs=P("data")))(x.reshape(8, 12, 29), mask.reshape(8, 12))
    for name, got in (("pmap", pmapped), ("shard_map", sharded)):
        for a, b in zip(eager, got):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, err_msg=name)
    for a, b in zip(eager, flat):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a).reshape(b.shape), rtol=1e-6)
    print("MULTI_DEVICE_OK", len(jax.devices()))
"""


def test_pmap_and_shard_map_on_four_devices():
    out = _run_python(
        MULTI_DEVICE, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    assert "MULTI_DEVICE_OK 4" in out, out
