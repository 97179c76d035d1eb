"""Picture of a video's clustering: thumbnails, Hamming distance curve, segments by colour.

    python -m fva_jax.visualize VIDEO --out clusters.png [--num-clusters 8]
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
``fva_jax.clustering_demo`` (no training needed); with ``--workdir``, the stem (conv1 ...
cluster point, running BatchNorm statistics) of the latest checkpoint of a run trained by
``fva_jax.main``: exactly the activations the model clusters. Backbone, width, cluster
point and compute dtype come from the run's ``config.json``.

``render_timeline(frames, distances, segment_ids)`` returns the picture as a uint8 array,
for TensorBoard image summaries (``writer.write_images``) as well as for the PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np

from fva_jax import user_video

# 20 well-separated colours (matplotlib's tab20 reordered so that consecutive ids contrast:
# dark shades first, then their light partners). Segment k gets PALETTE[k % 20].
_PALETTE_HEX = (
    "1f77b4",
    "ff7f0e",
    "2ca02c",
    "d62728",
    "9467bd",
    "8c564b",
    "e377c2",
    "7f7f7f",
    "bcbd22",
    "17becf",
    "aec7e8",
    "ffbb78",
    "98df8a",
    "ff9896",
    "c5b0d5",
    "c49c94",
    "f7b6d2",
    "c7c7c7",
    "dbdb8d",
    "9edae5",
)
PALETTE = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _PALETTE_HEX], np.uint8)
PADDING_COLOR = np.array([255, 255, 255], np.uint8)  # frames with segment id >= num_clusters
BOUNDARY_COLOR = np.array([0, 0, 0], np.uint8)


def cluster_colors(segment_ids: np.ndarray, num_clusters: int) -> np.ndarray:
    """uint8 (..., 3) colour of each segment id; ids >= num_clusters (padding) are white."""
    ids = np.asarray(segment_ids)
    colors = PALETTE[np.mod(ids, len(PALETTE))]
    return np.where((ids >= num_clusters)[..., None], PADDING_COLOR, colors).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Pixel geometry of the picture; boxes are (left, top, width, height), top-left origin.

    The three panels share ``left`` and ``width``: frame t (of T) spans columns
    ``left + t * width / T`` to ``left + (t + 1) * width / T``.
    """

    width: int
    height: int
    thumbs: tuple[int, int, int, int]
    curve: tuple[int, int, int, int] | None
    band: tuple[int, int, int, int]
    num_thumbnails: int
    border: int


def timeline_layout(
    num_frames: int,
    frame_hw: tuple[int, int],
    *,
    width: int = 1200,
    num_thumbnails: int | None = None,
    with_curve: bool = True,
) -> Layout:
    """Where each panel goes for T frames of size (H, W) in a picture ``width`` pixels wide."""
    left, right, top = 70, 20, 34
    inner = width - left - right
    if inner < 100:
        raise ValueError(f"width={width} is too small (at least {left + right + 100} pixels)")
    h, w = frame_hw
    n = num_thumbnails or max(1, min(num_frames, inner // 90))
    n = min(n, num_frames)
    thumb_w = inner / n
    thumb_h = int(round(thumb_w * h / w))
    y = top
    thumbs = (left, y, inner, thumb_h)
    y += thumb_h + 12
    curve = None
    if with_curve:
        curve = (left, y, inner, 190)
        y += 190 + 8
    band = (left, y, inner, 30)
    y += 30 + 42  # x tick labels and the axis label below the band
    return Layout(width, y, thumbs, curve, band, n, border=max(2, int(thumb_w) // 25))


def thumbnail_frames(num_frames: int, num_thumbnails: int) -> np.ndarray:
    """Frame shown by thumbnail i: the centre of the i-th of n equal parts of the time axis."""
    i = np.arange(num_thumbnails)
    return np.minimum(((2 * i + 1) * num_frames) // (2 * num_thumbnails), num_frames - 1)


def _resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.minimum(
        (np.arange(height) + 0.5) * image.shape[0] / height, image.shape[0] - 1
    ).astype(int)
    cols = np.minimum((np.arange(width) + 0.5) * image.shape[1] / width, image.shape[1] - 1).astype(
        int
    )
    return image[rows][:, cols]


def _thumbnail_strip(frames, colors, layout: Layout) -> np.ndarray:
    """(thumb_h, inner, 3) uint8: the thumbnails side by side, each in a coloured frame."""
    _, _, inner, thumb_h = layout.thumbs
    n, b = layout.num_thumbnails, layout.border
    strip = np.full((thumb_h, inner, 3), 255, np.uint8)
    edges = np.round(np.linspace(0, inner, n + 1)).astype(int)
    for i, t in enumerate(thumbnail_frames(len(frames), n)):
        x0, x1 = edges[i], edges[i + 1]
        cell = strip[:, x0:x1]
        cell[...] = colors[t]
        gap = 1 if x1 - x0 > 2 * b + 4 else 0  # a white hairline between neighbours
        cell[:, x1 - x0 - gap :] = 255
        inner_h, inner_w = thumb_h - 2 * b, x1 - x0 - gap - 2 * b
        if inner_h > 0 and inner_w > 0:
            cell[b : b + inner_h, b : b + inner_w] = _resize_nearest(frames[t], inner_h, inner_w)
    return strip


def render_timeline(
    frames: np.ndarray,
    distances: np.ndarray | None,
    segment_ids: np.ndarray,
    *,
    num_clusters: int | None = None,
    title: str | None = None,
    width: int = 1200,
    num_thumbnails: int | None = None,
    frame_numbers: np.ndarray | None = None,
) -> np.ndarray:
    """Renders the clustering of one video.

    Args:
      frames: uint8 (T, H, W, 3).
      distances: float (T,) Hamming distances d[t] (frame t vs the next ones), or None to leave
        the curve out (e.g. from a model that returns segment ids only).
      segment_ids: int (T,), non-decreasing; ids >= num_clusters mark padding (drawn white).
      num_clusters: K (default: the largest id + 1).
      title: text above the picture.
      width: picture width in pixels; the height follows from the frames' aspect ratio.
      num_thumbnails: default: one per ~90 pixels, at most T.
      frame_numbers: (T,) source frame numbers for the axis labels (default 0..T-1), e.g.
        ``arange(T) * stride``.

    Returns:
      uint8 (height, width, 3) RGB; geometry as ``timeline_layout`` gives it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frames = np.asarray(frames)
    seg = np.asarray(segment_ids).astype(np.int64)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be uint8 (T>=1, H, W, 3), got {frames.dtype} {frames.shape}")
    t = frames.shape[0]
    if seg.shape != (t,):
        raise ValueError(f"segment_ids must have shape (T,) = ({t},), got {seg.shape}")
    if distances is not None:
        distances = np.asarray(distances, np.float64)
        if distances.shape != (t,):
            raise ValueError(f"distances must have shape (T,) = ({t},), got {distances.shape}")
    if num_clusters is None:
        num_clusters = int(seg.max()) + 1
    frame_numbers = np.arange(t) if frame_numbers is None else np.asarray(frame_numbers)

    layout = timeline_layout(
        t,
        frames.shape[1:3],
        width=width,
        num_thumbnails=num_thumbnails,
        with_curve=distances is not None,
    )
    colors = cluster_colors(seg, num_clusters)
    dpi = 100
    fig = Figure(figsize=(layout.width / dpi, layout.height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)

    def axes(box):
        left, top, w, h = box
        return fig.add_axes(
            (
                left / layout.width,
                1 - (top + h) / layout.height,
                w / layout.width,
                h / layout.height,
            )
        )

    xlim = (-0.5, t - 0.5)
    valid = seg < num_clusters
    boundaries = np.flatnonzero((seg[1:] != seg[:-1]) & valid[1:] & valid[:-1]) + 0.5
    starts = np.flatnonzero(np.concatenate([[True], seg[1:] != seg[:-1]]))
    ends = np.concatenate([starts[1:], [t]])

    ax = axes(layout.thumbs)
    ax.imshow(_thumbnail_strip(frames, colors, layout), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    if title:
        fig.text(0.5, 1 - 6 / layout.height, title, ha="center", va="top", fontsize=11)

    if distances is not None:
        ax = axes(layout.curve)
        for s, e in zip(starts, ends):
            if seg[s] < num_clusters:
                ax.axvspan(s - 0.5, e - 0.5, color=colors[s] / 255.0, alpha=0.28, lw=0)
        for x in boundaries:
            ax.axvline(x, color=BOUNDARY_COLOR / 255.0, lw=1.5)
        ax.plot(
            np.arange(t),
            distances,
            color="#08306b",
            lw=1.2,
            marker="o" if t <= 80 else None,
            ms=2.5,
        )
        top = float(distances.max()) if t else 0.0
        ax.set_xlim(*xlim)
        ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
        ax.set_ylabel("Hamming distance", fontsize=9)
        ax.tick_params(labelbottom=False, labelsize=8)

    ax = axes(layout.band)
    ax.imshow(colors[None], interpolation="nearest", aspect="auto", extent=(-0.5, t - 0.5, 1, 0))
    ax.set_xlim(*xlim)
    ax.set_yticks([])
    for s, e in zip(starts, ends):  # segment numbers where they fit
        if seg[s] < num_clusters and (e - s) * layout.band[2] / t >= 14:
            ax.text(
                (s + e - 1) / 2,
                0.5,
                str(seg[s]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if PALETTE[seg[s] % len(PALETTE)].mean() < 140 else "black",
            )
    ticks = ax.get_xticks()
    ticks = ticks[(ticks >= 0) & (ticks <= t - 1)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(int(frame_numbers[int(round(x))])) for x in ticks], fontsize=8)
    ax.set_xlabel(f"frame ({t} frames, {len(starts) - int((~valid).any())} segments)", fontsize=9)

    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if image.shape[:2] != (layout.height, layout.width):  # float rounding of the figure size
        image = _pad_or_crop(image, layout.height, layout.width)
    return image


def _pad_or_crop(image, height, width):
    out = np.full((height, width, 3), 255, np.uint8)
    h, w = min(height, image.shape[0]), min(width, image.shape[1])
    out[:h, :w] = image[:h, :w]
    return out


def save_png(image: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
    from PIL import Image

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- features


def random_feature_fn(seed: int = 0) -> Callable:
    """The fixed random-weight conv features of ``fva_jax.clustering_demo``."""
    from fva_jax import clustering_demo

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
            f"{m.width}, cluster_point {m.cluster_point}): was config.json changed after training?"
        )
    return stem, variables, f"{m.backbone} width {m.width} stem up to {m.cluster_point}"


def load_checkpoint_stem(
    workdir: str | pathlib.Path, step: int | None = None
) -> tuple[Callable, str]:
    """(feature function uint8 (n, H, W, 3) -> (n, F), description) from ``workdir/checkpoints``.

    Reads the latest step (or ``step``) written by ``fva_jax.train``, and the model's
    configuration from the run's ``config.json``.
    """
    from fva_jax import checkpoints
    from fva_jax.models import resnet

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
    from fva_jax import clustering_demo

    parser = argparse.ArgumentParser(
        prog="python -m fva_jax.visualize",
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
    from fva_jax import clustering, clustering_tools
    from fva_jax.data import video as video_lib

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
