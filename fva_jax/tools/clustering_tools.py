"""Host-side helpers that the command-line tools share around `fva_jax.clustering`.

`fva_jax.clustering` holds pure, jit-able functions over `jnp` arrays. The tools
(``clustering_demo``, ``visualize``, ``predict``, ``benchmarks/event_isolation.py``) also need
to turn a whole decoded video (a NumPy array of any length) into sign bits without holding
every frame's features at once, and to list the segments of an id array. Those two steps
live here, so that no tool is a helper library for another.

    bits, num_features = chunked_sign_bits(feature_fn, frames, chunk_size=32)
    d   = clustering.hamming_distances(bits, window, num_features=num_features)
    ids = clustering.segmenter(method)(d, num_clusters)
    for first, last, size in segments_of(np.asarray(ids)): ...
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fva_jax import clustering

__all__ = ["chunked_sign_bits", "segments_of"]


def chunked_sign_bits(
    feature_fn: Callable, frames: np.ndarray, chunk_size: int = 32
) -> tuple[np.ndarray, int]:
    """Sign bits of ``feature_fn`` over a whole video, chunk by chunk.

    Args:
      feature_fn: uint8 (n, H, W, 3) -> float (n, F) features per frame (jit-able).
      frames: uint8 (T, H, W, 3), T >= 1.
      chunk_size: frames per call. Every chunk has the same shape (the last one is
        zero-padded and its padding dropped), so ``feature_fn`` compiles once; memory is
        bounded by one chunk's features.

    Returns:
      (bits uint8 (T, ceil(F / 8)) as `clustering.sign_bits` packs them, F).
    """
    if frames.ndim != 4 or len(frames) < 1:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got shape {frames.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    fn = jax.jit(lambda chunk: clustering.sign_bits(feature_fn(chunk)))
    t = frames.shape[0]
    c = min(chunk_size, t)
    padded = np.concatenate([frames, np.zeros(((-t) % c,) + frames.shape[1:], frames.dtype)])
    bits = np.concatenate([np.asarray(fn(padded[i : i + c])) for i in range(0, len(padded), c)])[:t]
    num_features = jax.eval_shape(
        feature_fn, jax.ShapeDtypeStruct((1,) + frames.shape[1:], jnp.uint8)
    ).shape[-1]
    return bits, int(num_features)


def segments_of(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(first, last, size) per segment of non-decreasing contiguous ids (indices into ids).

    Ids outside the valid range (e.g. padding's id K) are listed too if present; pass only
    the valid frames' ids.
    """
    out = []
    for k in np.unique(ids):
        where = np.flatnonzero(ids == k)
        out.append((int(where[0]), int(where[-1]), int(where.size)))
    return out
