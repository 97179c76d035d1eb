"""One video's part of a step: which stored frames, where the crop is, and the pixels.

NumPy, OpenCV and simplejpeg only (no TensorFlow, no JAX); the input pipeline
(`pipeline.py`) calls `read_frames` for every video of a step, in Grain workers.

Frames: mode "full" takes every stored frame after `data.frame_stride` and
`data.max_frames` (0 = no cap). Mode "sampled" takes exactly K = `model.num_clusters` frames,
chosen here on the host with the model's own rule (`model.sampling` "uniform", or "cluster"
which warms up with uniform; "dense"): TSN uniform = K equal segments of the valid length, a
random frame of each in training, the centre at test; dense = K frames `model.dense_stride`
apart, a random start in training, centred at test (`uniform_indices` / `dense_indices`
equal models/full_video.py's functions of the same names for the same uniforms). Only the
chosen frames are decoded.

Crops: training takes one TSN multi-scale crop per video ((scale_h, scale_w) pairs of
`data.crop_scales` with |i - j| <= 1, as TSN's GroupMultiScaleCrop, at a random position)
and flips it horizontally with probability 1/2 (`data.hflip`); evaluation takes the centre
square of side round(short * crop_size / resize_short). Crops are computed on the stored
frames (the same fraction of the shorter side as after resizing it to `resize_short`) and
resized to `crop_size` (OpenCV INTER_AREA when shrinking: antialiased; bilinear when
enlarging). All randomness is a function of (config.seed, epoch, video index).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fva_jax.data import batch_plan

# Random streams derived from (seed, epoch, video): crop/flip, sampled frames.
CROP_STREAM, SAMPLE_STREAM = 1, 2


class DataError(ValueError):
    """A stored video cannot be read as indexed (files changed, corrupt frames); the message
    names the video, the file and the reason."""


def tsn_scale_pairs(scales: Sequence[float]) -> list[tuple[float, float]]:
    """(scale_h, scale_w) pairs of TSN's GroupMultiScaleCrop with max_distort=1."""
    n = len(scales)
    return [(scales[i], scales[j]) for i in range(n) for j in range(n) if abs(i - j) <= 1]


def centre_crop_window(h: int, w: int, crop_size: int, resize_short: int) -> tuple:
    """(y, x, ch, cw) of the evaluation crop: the centre square of side
    round(min(h, w) * crop_size / resize_short) (round half to even)."""
    c = int(np.round(min(h, w) * crop_size / resize_short))
    c = min(max(c, 1), h, w)
    return (h - c) // 2, (w - c) // 2, c, c


def train_crop_window(h: int, w: int, scales: Sequence[float], hflip: bool, u) -> tuple:
    """(y, x, ch, cw), flip of a TSN multi-scale crop from 4 uniforms u in [0, 1): u[0] picks
    the scale pair, u[1], u[2] the position, u[3] < 0.5 flips (when hflip)."""
    pairs = tsn_scale_pairs(tuple(scales))
    short = np.float32(min(h, w))
    k = min(int(u[0] * len(pairs)), len(pairs) - 1)
    ch = int(np.clip(np.round(np.float32(pairs[k][0]) * short), 1, h))
    cw = int(np.clip(np.round(np.float32(pairs[k][1]) * short), 1, w))
    y = min(int(u[1] * (h - ch + 1)), h - ch)
    x = min(int(u[2] * (w - cw + 1)), w - cw)
    return (y, x, ch, cw), bool(hflip) and bool(u[3] < 0.5)


def crop_resize(frame: np.ndarray, window, size: int, flip: bool, out: np.ndarray) -> None:
    """Writes frame[window] resized to (size, size) (and flipped) into `out`."""
    import cv2  # pylint: disable=g-import-not-at-top

    y, x, ch, cw = window
    crop = frame[y : y + ch, x : x + cw]
    if (ch, cw) != (size, size):
        # Antialiased when shrinking (area averaging), bilinear when enlarging.
        interp = cv2.INTER_AREA if ch >= size and cw >= size else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (size, size), interpolation=interp)
    out[...] = crop[:, ::-1] if flip else crop


def jpeg_size(jpeg: bytes, name: str = "video") -> tuple[int, int]:
    """(height, width) from a JPEG header (nothing decoded)."""
    import simplejpeg  # pylint: disable=g-import-not-at-top

    try:
        return tuple(simplejpeg.decode_jpeg_header(jpeg)[:2])
    except ValueError as e:
        raise DataError(f"{name}: frame 0 is not a JPEG ({e})") from None


def decode_frames(jpegs, frame_ids, window, flip: bool, size: int, out, name: str = "video"):
    """Decodes jpegs[frame_ids] (simplejpeg), crops `window`, resizes to (size, size) and
    flips into out[:len(frame_ids)]; DataError naming `name` and the frame on bad data."""
    import simplejpeg  # pylint: disable=g-import-not-at-top

    h, w = window[0] + window[2], window[1] + window[3]  # at least this big
    first = None
    for o, f in enumerate(frame_ids):
        try:
            frame = simplejpeg.decode_jpeg(jpegs[f], colorspace="RGB")
        except ValueError as e:
            raise DataError(f"{name}: frame {f} cannot be decoded ({e})") from None
        if first is None:
            first = frame.shape
        if frame.shape != first or frame.shape[0] < h or frame.shape[1] < w:
            raise DataError(
                f"{name}: frame {f} is {frame.shape[1]}x{frame.shape[0]}, other frames "
                f"{first[1]}x{first[0]} (crop window {window})"
            )
        crop_resize(frame, window, size, flip, out[o])


def uniform_indices(length: int, k: int, u=None) -> np.ndarray:
    """TSN sampling on the host: NumPy twin of models.full_video.uniform_indices for one
    video (float32 arithmetic, so equal for the same uniforms u (K,))."""
    ks = np.arange(k, dtype=np.int64)
    if u is None:
        idx = (2 * ks + 1) * length // (2 * k)
    else:
        lo, hi = ks * length // k, (ks + 1) * length // k
        span = np.maximum(hi - lo, 1).astype(np.float32)
        idx = lo + np.floor(np.asarray(u, np.float32) * span).astype(np.int64)
    return np.clip(idx, 0, max(length - 1, 0))


def dense_indices(length: int, k: int, stride: int, u=None) -> np.ndarray:
    """Dense sampling on the host: NumPy twin of models.full_video.dense_indices for one
    video (u: one uniform, or None for the centred clip)."""
    max_start = max(length - ((k - 1) * stride + 1), 0)
    if u is None:
        start = max_start // 2
    else:
        start = int(np.floor(np.float32(np.asarray(u).reshape(-1)[0]) * np.float32(max_start + 1)))
    return np.clip(start + stride * np.arange(k, dtype=np.int64), 0, max(length - 1, 0))


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """What a step reader needs of the config (small, picklable)."""

    frame_stride: int
    max_frames: int
    crop_size: int
    resize_short: int
    crop_scales: tuple
    hflip: bool
    num_clusters: int
    sampling: str  # "uniform" | "dense" (sampled mode's host rule)
    dense_stride: int
    seed: int

    @classmethod
    def of(cls, config) -> "VideoSettings":
        d, m = config.data, config.model
        return cls(
            frame_stride=int(d.frame_stride),
            max_frames=int(d.max_frames),
            crop_size=int(d.crop_size),
            resize_short=int(d.resize_short),
            crop_scales=tuple(float(s) for s in d.crop_scales),
            hflip=bool(d.hflip),
            num_clusters=int(m.num_clusters),
            sampling="dense" if m.sampling == "dense" else "uniform",
            dense_stride=int(m.dense_stride),
            seed=int(config.seed),
        )


def video_rng(seed: int, epoch: int, video: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, video, stream])


def frame_selection(
    num_stored: int, settings: VideoSettings, mode: str, *, train: bool, epoch: int, video: int
) -> np.ndarray:
    """Indices of the stored frames a video contributes (in time order)."""
    kept = int(
        batch_plan.effective_lengths([num_stored], settings.frame_stride, settings.max_frames)[0]
    )
    if mode == "full":
        chosen = np.arange(kept, dtype=np.int64)
    else:
        k = settings.num_clusters
        rng = video_rng(settings.seed, epoch, video, SAMPLE_STREAM) if train else None
        if settings.sampling == "uniform":
            u = rng.random(k, dtype=np.float32) if rng is not None else None
            chosen = uniform_indices(kept, k, u)
        else:
            u = rng.random(1, dtype=np.float32) if rng is not None else None
            chosen = dense_indices(kept, k, settings.dense_stride, u)
    return chosen * settings.frame_stride


def read_frames(
    jpegs,
    num_stored: int,
    settings: VideoSettings,
    mode: str,
    *,
    train: bool,
    epoch: int,
    video: int,
    out: np.ndarray,
    name: str = "video",
) -> int:
    """Decodes the frames video `video` (of `num_stored` JPEG frames) contributes in `mode`,
    cropped and resized, into out[:n]; returns n. DataError naming `name` on bad data."""
    chosen = frame_selection(num_stored, settings, mode, train=train, epoch=epoch, video=video)
    h, w = jpeg_size(jpegs[0], name)
    if train:
        u = video_rng(settings.seed, epoch, video, CROP_STREAM).random(4)
        window, flip = train_crop_window(h, w, settings.crop_scales, settings.hflip, u)
    else:
        window = centre_crop_window(h, w, settings.crop_size, settings.resize_short)
        flip = False
    decode_frames(jpegs, chosen, window, flip, settings.crop_size, out, name)
    return len(chosen)
