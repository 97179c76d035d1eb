r"""Classify video files with a trained run: top-5 classes and the segments the model used.

  python -m fva_jax.predict --workdir=/tmp/fva_demo video1.mp4 video2.avi frames_folder/

Loads the latest checkpoint of WORKDIR (or --step), the config and class names the trainer
saved there (config.json, dataset_info.json), decodes each video with the run's evaluation
preprocessing (frame stride, cap at max_frames, TSN centre crop: the shorter side scaled to
data.resize_short and the centre crop_size square) and runs FullVideoModel in eval mode on
all its frames. For each video it prints the top-5 classes with their probabilities and the
segments (clusters, or the sampled frames for sampling="uniform"/"dense"): first and last
source frame and the number of frames.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

# Builders store frames with the shorter side reduced to at most this (builders.VideoConfig's
# default); decoding at the same size makes predictions see what evaluation saw.
STORED_SHORT_SIDE = 256


def eval_preprocess(frames: np.ndarray, data_config) -> np.ndarray:
    """The evaluation crop of fva_jax.data.pipeline.preprocess(train=False), without TensorFlow.

    Args:
      frames: uint8 (T, H, W, 3), already strided and capped.
      data_config: config.data (resize_short, crop_size).

    Returns:
      uint8 (T, crop_size, crop_size, 3): the centre square of side
      round(min(H, W) * crop_size / resize_short), resized to crop_size with the same
      antialiased bilinear filter as tf.image.resize(antialias=True) (no resize when it already
      has that size).
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    frames = np.asarray(frames)
    _, h, w, _ = frames.shape
    size = int(data_config.crop_size)
    # Same rounding as pipeline._crop_window: tf.round is round-half-to-even, like np.round.
    c = int(np.round(min(h, w) * size / data_config.resize_short))
    c = min(max(c, 1), h, w)
    y, x = (h - c) // 2, (w - c) // 2
    crop = frames[:, y : y + c, x : x + c]
    if c == size:
        return np.ascontiguousarray(crop)
    resized = jax.image.resize(
        jnp.asarray(crop, jnp.float32), (len(crop), size, size, 3), method="linear", antialias=True
    )
    return np.asarray(jnp.clip(jnp.round(resized), 0, 255)).astype(np.uint8)


def load_video(path, data_config) -> np.ndarray:
    """uint8 (T, crop, crop, 3) evaluation frames of a video file or frame folder; raises
    fva_jax.data.video.VideoDecodeError naming the file."""
    from fva_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top

    frames = video_lib.decode_video(
        path,
        stride=data_config.frame_stride,
        max_frames=data_config.max_frames,
        resize=max(STORED_SHORT_SIDE, data_config.resize_short),
        shrink_only=True,
    )
    return eval_preprocess(frames, data_config)


def segments(segment_ids: np.ndarray, stride: int = 1) -> list[tuple[int, int, int, int]]:
    """(segment id, first source frame, last source frame, number of frames) of every
    non-empty segment, in id order; segment_ids (T,) of the valid frames."""
    from fva_jax.clustering_demo import segments_of  # pylint: disable=g-import-not-at-top

    ids = np.asarray(segment_ids)
    return [
        (int(ids[first]), first * stride, last * stride, size)
        for first, last, size in segments_of(ids)
    ]


class Predictor:
    """A trained run, ready to classify videos: Predictor(workdir)(path) -> dict."""

    def __init__(self, workdir, step: int | None = None):
        import jax  # pylint: disable=g-import-not-at-top

        from fva_jax import checkpoints, steps  # pylint: disable=g-import-not-at-top
        from fva_jax.models.full_video import FullVideoModel  # pylint: disable=g-import-not-at-top

        self.config, info = checkpoints.load_run_config(workdir)
        self.class_names = list(info["class_names"])
        self.num_classes = int(info["num_classes"])
        self.variables, self.step = checkpoints.restore_variables(workdir, step)
        self.model = FullVideoModel(num_classes=self.num_classes, **steps.model_kwargs(self.config))
        self._apply = jax.jit(functools.partial(self.model.apply, train=False))

    def __call__(self, path) -> dict[str, Any]:
        """dict(path, frames=T, probabilities float32 (num_classes,), top=[(class, prob)] (5),
        segment_ids int32 (T,), segments=[(id, first, last, size)] in source frame numbers)."""
        d = self.config.data
        frames = load_video(path, d)
        n = len(frames)
        # Padded to max_frames like evaluation batches: one compiled program for every video.
        video = np.zeros((1, d.max_frames) + frames.shape[1:], np.uint8)
        video[0, :n] = frames
        mask = np.arange(d.max_frames)[None] < n
        logits, segment_ids = self._apply(self.variables, video, mask)
        logits = np.asarray(logits[0], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:5]
        ids = np.asarray(segment_ids[0, :n])
        return {
            "path": str(path),
            "frames": n,
            "probabilities": probs.astype(np.float32),
            "top": [(self.class_name(i), float(probs[i])) for i in order],
            "segment_ids": ids,
            "segments": segments(ids, d.frame_stride),
        }

    def class_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)


def format_result(result: dict[str, Any], config) -> str:
    m = config.model
    how = f"{m.cluster_method} clustering" if m.sampling == "cluster" else f"{m.sampling} sampling"
    lines = [f"{result['path']}: {result['frames']} frames"]
    lines += [f"  {p:.4f}  {name}" for name, p in result["top"]]
    lines.append(f"  segments ({how}, K={m.num_clusters}; first-last source frame, size):")
    lines += [f"    #{k}: {first}-{last} ({size})" for k, first, last, size in result["segments"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m fva_jax.predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("videos", nargs="+", help="video files or folders of frames")
    parser.add_argument("--workdir", required=True, help="a training run (fva_jax.main --workdir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)

    from fva_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top

    try:
        predictor = Predictor(args.workdir, args.step)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"predict: {err}") from None
    print(
        f"{args.workdir}: checkpoint step {predictor.step}, {predictor.num_classes} classes",
        flush=True,
    )
    results = []
    for path in args.videos:
        try:
            result = predictor(pathlib.Path(path))
        except video_lib.VideoDecodeError as err:
            raise SystemExit(f"predict: {err}") from None
        print(format_result(result, predictor.config), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
