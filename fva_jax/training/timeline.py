"""The picture of one video's clustering: thumbnails, Hamming distance curve, segments by colour.

Top to bottom, on one time axis (frame 0 at the left): a strip of thumbnails (each framed
in the colour of its frame's cluster and centred on its frame), the windowed Hamming
distance d[t] between the sign bits of frame t and the next frames with the segments as
coloured bands and the boundaries as vertical lines (left out when there are no distances),
and a band of one colour per segment.

``render_timeline(frames, distances, segment_ids)`` returns it as a uint8 array, drawn with
matplotlib (imported only when a picture is drawn); ``save_png`` writes it. The trainer's
TensorBoard pictures (training.summaries) and the ``visualize`` tool both draw with it, so it
imports neither of them.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

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
