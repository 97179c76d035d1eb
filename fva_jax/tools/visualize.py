"""Picture of a video's clustering: thumbnails, Hamming distance curve, segments by colour.

    python -m fva_jax.tools.visualize VIDEO --out clusters.png [--num-clusters 8]
        [--method cumulative|slope] [--window 1] [--max-frames N] [--stride 1] [--resize 112]
        [--workdir DIR [--step N]]

Top to bottom, on one time axis (frame 0 at the left): a strip of thumbnails (each framed
in the colour of its frame's cluster and centred on its frame), the windowed Hamming
distance d[t] between the sign bits of frame t and the next frames with the segments as
coloured bands and the boundaries as vertical lines, and a band of one colour per segment.

Every frame of the video is used unless ``--stride`` / ``--max-frames`` say otherwise (with
``--workdir`` too: the run's training stride and cap do not apply); the printed line says how
many frames were used out of how many the video has, and which flag dropped the rest.

Features: without ``--workdir``, the fixed random-weight conv features of
``fva_jax.tools.clustering_demo`` (no training needed); with ``--workdir``, the stem (conv1 ...
cluster point, running BatchNorm statistics) of the latest checkpoint of a run trained by
``fva_jax.main``: exactly the activations the model clusters. Backbone, width, cluster
point and compute dtype come from the run's latest config (``config.json``, or the
``config.resumed-<step>.json`` of its last start).

The picture is drawn by ``fva_jax.training.timeline.render_timeline``, which also draws the
trainer's TensorBoard pictures of the clusters.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np

from fva_jax.tools import user_video
from fva_jax.training.timeline import render_timeline, save_png

# ----------------------------------------------------------------------------- features


def random_feature_fn(seed: int = 0) -> Callable:
    """The fixed random-weight conv features of ``fva_jax.tools.clustering_demo``."""
    from fva_jax.tools import clustering_demo

    return lambda chunk: clustering_demo.random_features(chunk, seed=seed)


def stem_from_config(model_config, params: dict, batch_stats: dict) -> tuple[Any, dict, str]:
    """(ResNetStem, its variables, description) of a FullVideoModel's checkpoint.

    Args:
      model_config: the run's ``config.model`` (backbone, width, cluster_point, dtype).
      params, batch_stats: the checkpoint's variables (top-level ``stem`` and ``trunk``).

    Raises:
      ValueError: the checkpoint's stem is not the one the config describes.
    """
    import jax
    import jax.numpy as jnp

    from fva_jax.models import resnet

    if "stem" not in params or "trunk" not in params:
        raise ValueError(
            f"checkpoint params have no stem/trunk (top-level keys {sorted(params)}); "
            "is this a fva_jax FullVideoModel checkpoint?"
        )
    m = model_config
    stem = resnet.ResNetStem(
        depth=resnet.depth_of(m.backbone),
        width=m.width,
        cluster_point=m.cluster_point,
        dtype=jnp.dtype(m.dtype),
    )
    variables = {"params": params["stem"], "batch_stats": batch_stats.get("stem", {})}
    expected = jax.eval_shape(
        lambda: stem.init(
            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), use_running_average=True
        )
    )

    def shapes(tree):
        return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)

    if shapes(expected) != shapes(variables):
        raise ValueError(
            f"the checkpoint's stem is not the one config.model describes ({m.backbone}, width "
            f"{m.width}, cluster_point {m.cluster_point}): was the run's config file changed "
            "after training?"
        )
    return stem, variables, f"{m.backbone} width {m.width} stem up to {m.cluster_point}"


def load_checkpoint_stem(
    workdir: str | pathlib.Path, step: int | None = None
) -> tuple[Callable, str]:
    """(feature function uint8 (n, H, W, 3) -> (n, F), description) from ``workdir/checkpoints``.

    Reads the latest step (or ``step``) written by ``fva_jax.training.train``, and the model's
    configuration from the run's latest config (``checkpoints.load_run_config``).
    """
    from fva_jax.models import resnet
    from fva_jax.training import checkpoints

    config, _ = checkpoints.load_run_config(workdir)
    state, step = checkpoints.restore_variables(workdir, step)
    stem, variables, what = stem_from_config(
        config.model, state["params"], state.get("batch_stats", {})
    )

    def features(chunk):
        x = stem.apply(variables, resnet.normalize_images(chunk), use_running_average=True)
        return x.reshape(x.shape[0], -1)

    return features, f"{what}, checkpoint step {step} of {workdir}"


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from fva_jax.tools import clustering_demo

    parser = argparse.ArgumentParser(
        prog="python -m fva_jax.tools.visualize",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("video", help="video file or folder of frames")
    parser.add_argument("--out", required=True, help="PNG to write")
    clustering_demo.add_clustering_arguments(parser)
    parser.add_argument(
        "--workdir",
        default=None,
        help="a training run: use the stem of its latest checkpoint as features",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="with --workdir: this checkpoint step"
    )
    parser.add_argument("--thumbnails", type=int, default=None, help="number of thumbnails")
    parser.add_argument("--width", type=int, default=1400, help="picture width in pixels")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random filters (no --workdir)"
    )
    args = parser.parse_args(argv)
    clustering_demo.check_positive(
        parser,
        args,
        ("num_clusters", "window", "stride", "resize", "chunk_size"),
        ("max_frames", "thumbnails"),
    )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes the picture; returns dict(out=path, segment_ids, distances, frames=T)."""
    from fva_jax import clustering
    from fva_jax.data import video as video_lib
    from fva_jax.tools import clustering_tools

    args = parse_args(argv)
    try:
        # Every frame unless --stride / --max-frames, even with --workdir: a run's training
        # stride and cap (data.frame_stride, data.max_frames) do not apply to the user's video.
        video = user_video.read(
            args.video, stride=args.stride, max_frames=args.max_frames, resize=args.resize
        )
        frames = video.frames
    except video_lib.VideoDecodeError as err:
        raise SystemExit(f"visualize: {err}") from None
    if args.workdir:
        try:
            feature_fn, what = load_checkpoint_stem(args.workdir, args.step)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"visualize: {err}") from None
    else:
        feature_fn, what = random_feature_fn(args.seed), "fixed random conv features"
    bits, num_features = clustering_tools.chunked_sign_bits(feature_fn, frames, args.chunk_size)
    distances = np.asarray(
        clustering.hamming_distances(bits, args.window, num_features=num_features)
    )
    ids = np.asarray(clustering.segmenter(args.method)(distances, args.num_clusters))
    title = (
        f"{pathlib.Path(args.video).name}: {args.method} clustering, K={args.num_clusters}, "
        f"window {args.window}; {what}"
    )
    image = render_timeline(
        frames,
        distances,
        ids,
        num_clusters=args.num_clusters,
        title=title,
        width=args.width,
        num_thumbnails=args.thumbnails,
        frame_numbers=video.frame_numbers,
    )
    out = save_png(image, args.out)
    print(
        f"{args.video}: {video.describe()}, {len(np.unique(ids))} segments ({what}) -> {out} "
        f"({image.shape[1]}x{image.shape[0]})"
    )
    return {
        "out": out,
        "segment_ids": ids,
        "distances": distances,
        "frames": video.used,
        "total_frames": video.total,  # frames in the video; "frames": those used
    }


if __name__ == "__main__":
    main(sys.argv[1:])
