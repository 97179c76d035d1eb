r"""Classify video files with a trained run: top-5 classes and the segments the model used.

  python -m fva_jax.tools.predict --workdir=/tmp/fva_demo video1.mp4 video2.avi frames_folder/

Loads the latest checkpoint of WORKDIR (or --step), the config and class names the trainer
saved there (the latest config: config.json, or config.resumed-<step>.json of a resumed run;
dataset_info.json), decodes each video with the run's evaluation
crop (TSN centre crop: the shorter side scaled to data.resize_short and the centre crop_size
square) and runs FullVideoModel in eval mode on all its frames.

Every frame of the video is used, whatever data.frame_stride or data.max_frames the run was
trained with; only --stride / --max-frames drop frames. For each video it prints how many
frames it used out of how many the video has ("250 of 250 frames"; with a flag, which flag
dropped how many), the top-5 classes with their probabilities and the segments (clusters, or
the sampled frames for sampling="uniform"/"dense"): first and last source frame and the
number of frames.

Each video is padded to a multiple of model.chunk_size frames (the padding masked out), so
videos of similar length share one compiled program.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

# Builders store frames with the shorter side reduced to at most this (builder_base.VideoConfig's
# default); decoding at the same size makes predictions see what evaluation saw.
STORED_SHORT_SIDE = 256


def eval_preprocess(frames: np.ndarray, data_config) -> np.ndarray:
    """The evaluation crop of the data pipeline (fva_jax.data.pipeline, evaluation), so that
    a prediction sees its frames as evaluation saw the stored ones.

    Args:
      frames: uint8 (T, H, W, 3), the frames to classify.
      data_config: config.data (resize_short, crop_size).

    Returns:
      uint8 (T, crop_size, crop_size, 3): the centre square of side
      round(min(H, W) * crop_size / resize_short) (frames.centre_crop_window), resized to
      crop_size with the pipeline's own filter (frames.crop_resize: OpenCV area averaging
      when shrinking, bilinear when enlarging), one frame at a time.
    """
    from fva_jax.data import frames as frame_ops  # pylint: disable=g-import-not-at-top

    frames = np.asarray(frames)
    t, h, w, _ = frames.shape
    size = int(data_config.crop_size)
    window = frame_ops.centre_crop_window(h, w, size, data_config.resize_short)
    out = np.empty((t, size, size, 3), np.uint8)
    for frame, crop in zip(frames, out):
        frame_ops.crop_resize(frame, window, size, False, crop)
    return out


def load_video(path, data_config, *, stride: int = 1, max_frames: int | None = None):
    """UserVideo (fva_jax.tools.user_video) whose frames are the uint8 (used, crop, crop, 3)
    evaluation frames of a video file or frame folder: every frame unless `stride` /
    `max_frames` (the user's flags, not the run's config) say otherwise. Raises
    fva_jax.data.video.VideoDecodeError naming the file."""
    from fva_jax.tools import user_video

    video = user_video.read(
        path,
        stride=stride,
        max_frames=max_frames,
        resize=max(STORED_SHORT_SIDE, data_config.resize_short),
        shrink_only=True,
    )
    return dataclasses.replace(video, frames=eval_preprocess(video.frames, data_config))


def padded_length(num_frames: int, chunk_size: int) -> int:
    """num_frames rounded up to a multiple of chunk_size: few distinct compiled shapes, and
    less than one chunk of padding."""
    return -(-num_frames // chunk_size) * chunk_size


def segments(segment_ids: np.ndarray, stride: int = 1) -> list[tuple[int, int, int, int]]:
    """(segment id, first source frame, last source frame, number of frames) of every
    non-empty segment, in id order; segment_ids (T,) of the valid frames."""
    from fva_jax.tools.clustering_tools import segments_of

    ids = np.asarray(segment_ids)
    return [
        (int(ids[first]), first * stride, last * stride, size)
        for first, last, size in segments_of(ids)
    ]


class Predictor:
    """A trained run, ready to classify videos: Predictor(workdir)(path) -> dict."""

    def __init__(self, workdir, step: int | None = None):
        import jax  # pylint: disable=g-import-not-at-top

        from fva_jax.models.full_video import FullVideoModel  # pylint: disable=g-import-not-at-top
        from fva_jax.training import checkpoints, steps  # pylint: disable=g-import-not-at-top

        self.config, info = checkpoints.load_run_config(workdir)
        self.class_names = list(info["class_names"])
        self.num_classes = int(info["num_classes"])
        self.variables, self.step = checkpoints.restore_variables(workdir, step)
        self.model = FullVideoModel(num_classes=self.num_classes, **steps.model_kwargs(self.config))
        self._apply = jax.jit(functools.partial(self.model.apply, train=False))

    def __call__(self, path, *, stride: int = 1, max_frames: int | None = None) -> dict[str, Any]:
        """Classifies every frame of a video (or every `stride`-th, at most `max_frames`).

        Returns dict(path, frames=T used, total_frames=frames in the video, stride,
        description="T of M frames ...", probabilities float32 (num_classes,),
        top=[(class, prob)] (5), segment_ids int32 (T,), segments=[(id, first, last, size)]
        in source frame numbers).
        """
        video = load_video(path, self.config.data, stride=stride, max_frames=max_frames)
        frames, n = video.frames, video.used
        length = padded_length(n, self.config.model.chunk_size)
        padded = np.zeros((1, length) + frames.shape[1:], np.uint8)
        padded[0, :n] = frames
        mask = np.arange(length)[None] < n
        logits, segment_ids = self._apply(self.variables, padded, mask)
        logits = np.asarray(logits[0], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:5]
        ids = np.asarray(segment_ids[0, :n])
        return {
            "path": str(path),
            "frames": n,
            "total_frames": video.total,
            "stride": video.stride,
            "description": video.describe(),
            "logits": logits.astype(np.float32),
            "probabilities": probs.astype(np.float32),
            "top": [(self.class_name(i), float(probs[i])) for i in order],
            "segment_ids": ids,
            "segments": segments(ids, video.stride),
        }

    def class_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)


def format_result(result: dict[str, Any], config) -> str:
    m = config.model
    how = f"{m.cluster_method} clustering" if m.sampling == "cluster" else f"{m.sampling} sampling"
    lines = [f"{result['path']}: {result['description']}"]
    lines += [f"  {p:.4f}  {name}" for name, p in result["top"]]
    lines.append(f"  segments ({how}, K={m.num_clusters}; first-last source frame, size):")
    lines += [f"    #{k}: {first}-{last} ({size})" for k, first, last, size in result["segments"]]
    return "\n".join(lines)


def training_frames_note(data_config) -> str:
    """A note for runs trained on strided or capped clips: their stride and cap do not apply
    here (a model trained on every 2nd frame sees faster motion than predict gives it); empty
    for runs trained on every frame."""
    dropped = []
    if data_config.frame_stride > 1:
        dropped.append(f"data.frame_stride {data_config.frame_stride}")
    if data_config.max_frames > 0:
        dropped.append(f"data.max_frames {data_config.max_frames}")
    if not dropped:
        return ""
    return (
        f" (trained with {', '.join(dropped)}; predict uses every frame unless --stride / "
        "--max-frames)"
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m fva_jax.tools.predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("videos", nargs="+", help="video files or folders of frames")
    parser.add_argument("--workdir", required=True, help="a training run (fva_jax.main --workdir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--stride",
        type=int,
        default=1,
        help="use every n-th frame (default 1: every frame, whatever the run trained on)",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="use at most N frames (after --stride; default: no cap)",
    )
    args = parser.parse_args(argv)
    if args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error(f"--max-frames must be >= 1, got {args.max_frames}")

    from fva_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top

    try:
        predictor = Predictor(args.workdir, args.step)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"predict: {err}") from None
    print(
        f"{args.workdir}: checkpoint step {predictor.step}, {predictor.num_classes} classes"
        f"{training_frames_note(predictor.config.data)}",
        flush=True,
    )
    results = []
    for path in args.videos:
        try:
            result = predictor(pathlib.Path(path), stride=args.stride, max_frames=args.max_frames)
        except video_lib.VideoDecodeError as err:
            raise SystemExit(f"predict: {err}") from None
        print(format_result(result, predictor.config), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
