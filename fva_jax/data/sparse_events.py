"""Procedural "sparse events" videos: the class is visible in only a few frames.

Each video shows a greyscale texture drifting at a constant random velocity (plus a
little per-frame noise), of random length in [min_frames, max_frames] (uniform, or
lognormal with a given mean for Breakfast-like length distributions). For
`event_frames` consecutive frames at a random time a large, saturated coloured shape
appears at a random place; its colour and shape decide the class. Everything else is
class-independent, so a model that looks at 8 uniformly sampled frames is at chance
level whenever its samples miss the event (most of the time for long videos), while a
model that sees every frame can find it. The event is recognisable from one frame
(colour + shape on a grey background), which a small CNN learns quickly.

Pure NumPy (no TensorFlow): the TFDS builder in `builders.py` stores these videos,
and tests or demos can call `make_video` directly. Deterministic for a given
(seed, split, index).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

# (name, RGB colour, shape) for each class, in label order.
EVENTS = (
    ("red_square", (230, 30, 30), "square"),
    ("green_disc", (30, 210, 40), "disc"),
    ("blue_triangle", (40, 60, 240), "triangle"),
    ("yellow_cross", (240, 220, 20), "cross"),
    ("magenta_ring", (230, 30, 220), "ring"),
    ("cyan_bars", (20, 220, 230), "bars"),
    ("orange_diamond", (250, 130, 10), "diamond"),
    ("white_checker", (250, 250, 250), "checker"),
)
MAX_CLASSES = len(EVENTS)


@dataclasses.dataclass(frozen=True)
class SparseEventsSpec:
    """Parameters of the generated set.

    Attributes:
      num_classes: number of event classes (<= MAX_CLASSES), the first of EVENTS.
      num_train, num_test: videos per split.
      min_frames, max_frames: video length range (inclusive).
      length_distribution: "uniform" over [min_frames, max_frames], or "lognormal" with
        mean `mean_frames` and log-standard-deviation `length_sigma`, clipped to the range
        (Breakfast's lengths are roughly lognormal).
      mean_frames, length_sigma: parameters of the lognormal (ignored when uniform).
      size: frame height = width in pixels (even).
      event_frames: number of consecutive frames showing the event.
      seed: base seed; each video has its own stream derived from (seed, split, index).
    """

    num_classes: int = 6
    num_train: int = 1000
    num_test: int = 250
    min_frames: int = 48
    max_frames: int = 256
    size: int = 64
    event_frames: int = 4
    seed: int = 0
    length_distribution: str = "uniform"
    mean_frames: float = 0.0
    length_sigma: float = 0.65

    def __post_init__(self):
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")
        if not self.event_frames <= self.min_frames <= self.max_frames:
            raise ValueError(
                "need event_frames <= min_frames <= max_frames, got "
                f"{self.event_frames}, {self.min_frames}, {self.max_frames}"
            )
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be even and >= 16, got {self.size}")
        if self.length_distribution not in ("uniform", "lognormal"):
            raise ValueError(
                f"length_distribution must be 'uniform' or 'lognormal', "
                f"got {self.length_distribution!r}"
            )
        if self.length_distribution == "lognormal" and not (
            self.min_frames <= self.mean_frames <= self.max_frames and self.length_sigma > 0
        ):
            raise ValueError(
                "a lognormal length needs min_frames <= mean_frames <= max_frames and "
                f"length_sigma > 0, got mean_frames {self.mean_frames}, sigma {self.length_sigma}"
            )


def _long_spec(**kw) -> "SparseEventsSpec":
    return SparseEventsSpec(length_distribution="lognormal", size=32, **kw)


def lognormal_lengths(rng, n: int, *, mean: float, sigma: float, low: int, high: int):
    """n lognormal lengths (int64) with mean `mean` before clipping and log-sd `sigma`,
    clipped to [low, high]."""
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), low, high).astype(np.int64)


def breakfast_like_lengths(num_videos: int = 1712, seed: int = 0) -> np.ndarray:
    """Synthetic video lengths shaped like Breakfast's at 15 fps (1,712 videos, ~4.1 M
    frames, a mean near 2,400): lognormal, mean 2,400, log-sd 0.65, clipped to [300, 9000]."""
    rng = np.random.default_rng([seed, 1712])
    return lognormal_lengths(rng, num_videos, mean=2400.0, sigma=0.65, low=300, high=9000)


def class_names(num_classes: int) -> list[str]:
    return [e[0] for e in EVENTS[:num_classes]]


def _rng(spec: SparseEventsSpec, split: str, index: int) -> np.random.Generator:
    # crc32 (not hash()) so the stream is the same in every Python process.
    return np.random.default_rng([spec.seed, zlib.crc32(split.encode()), index])


def _texture(rng, n: int) -> np.ndarray:
    """Periodic smooth greyscale texture (n, n) float in [50, 200] (low-pass noise)."""
    noise = rng.standard_normal((n, n))
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.fftfreq(n)[None, :]
    # Mix of coarse blobs and finer grain so motion changes many activations a bit.
    spectrum = np.exp(-(fx**2 + fy**2) / (2 * 0.05**2)) + 0.15 * np.exp(
        -(fx**2 + fy**2) / (2 * 0.12**2)
    )
    tex = np.real(np.fft.ifft2(np.fft.fft2(noise) * spectrum))
    tex = (tex - tex.mean()) / (tex.std() + 1e-8)
    return np.clip(125 + 35 * tex, 50, 200)


def _shifted(tex, oy, ox, s):
    """Windows (T, s, s) float32 of the periodic texture at sub-pixel offsets oy, ox (T,)."""
    n = tex.shape[0]
    tiled = np.tile(tex.astype(np.float32), (2, 2))  # windows never wrap: offsets mod n
    out = np.empty((len(oy), s, s), np.float32)
    for i, (y, x) in enumerate(zip(oy, ox)):
        fy, fx = int(np.floor(y)), int(np.floor(x))
        wy, wx = np.float32(y - fy), np.float32(x - fx)
        w = tiled[fy % n : fy % n + s + 1, fx % n : fx % n + s + 1]
        top = (1 - wx) * w[:-1, :-1] + wx * w[:-1, 1:]
        bottom = (1 - wx) * w[1:, :-1] + wx * w[1:, 1:]
        out[i] = (1 - wy) * top + wy * bottom
    return out


def _shape_mask(kind: str, n: int) -> np.ndarray:
    """Boolean (n, n) mask of an event shape filling most of an n x n box."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    c = (n - 1) / 2
    dy, dx = y - c, x - c
    r = n / 2
    if kind == "square":
        return (np.abs(dy) < 0.8 * r) & (np.abs(dx) < 0.8 * r)
    if kind == "disc":
        return dy**2 + dx**2 < (0.9 * r) ** 2
    if kind == "triangle":
        return (y >= 0.1 * n) & (y <= 0.9 * n) & (np.abs(dx) <= (y - 0.1 * n) * 0.6)
    if kind == "cross":
        return ((np.abs(dy) < 0.25 * r) | (np.abs(dx) < 0.25 * r)) & (
            np.maximum(np.abs(dy), np.abs(dx)) < 0.95 * r
        )
    if kind == "ring":
        d2 = dy**2 + dx**2
        return (d2 < (0.95 * r) ** 2) & (d2 > (0.55 * r) ** 2)
    if kind == "bars":
        return ((y // max(1, n // 6)) % 2 == 0) & (np.abs(dx) < 0.9 * r)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) < 0.95 * r
    if kind == "checker":
        k = max(1, n // 4)
        return (y // k + x // k) % 2 == 0
    raise ValueError(kind)


def _draw_length(spec: SparseEventsSpec, rng) -> int:
    """The first draw of a video's stream: its length."""
    if spec.length_distribution == "lognormal":
        return int(
            lognormal_lengths(
                rng,
                1,
                mean=spec.mean_frames,
                sigma=spec.length_sigma,
                low=spec.min_frames,
                high=spec.max_frames,
            )[0]
        )
    return int(rng.integers(spec.min_frames, spec.max_frames + 1))


def video_length(spec: SparseEventsSpec, split: str, index: int) -> int:
    """make_video(spec, split, index)["num_frames"] without generating the video."""
    return _draw_length(spec, _rng(spec, split, index))


def make_video(spec: SparseEventsSpec, split: str, index: int) -> dict:
    """One video of the set.

    Returns:
      dict with video uint8 (T, size, size, 3), label int, event_start int (first event
      frame), num_frames int.
    """
    rng = _rng(spec, split, index)
    t = _draw_length(spec, rng)
    label = int(rng.integers(spec.num_classes))
    start = int(rng.integers(0, t - spec.event_frames + 1))
    s = spec.size

    tex = _texture(rng, 2 * s)
    speed = rng.uniform(0.3, 1.0)  # pixels per frame
    angle = rng.uniform(0, 2 * np.pi)
    vy, vx = speed * np.sin(angle), speed * np.cos(angle)
    oy0, ox0 = rng.integers(0, 2 * s, size=2)
    tint = rng.uniform(0.9, 1.1, size=3)  # slight, class-independent colour cast

    # Sub-pixel drift with bilinear sampling of the periodic texture, so consecutive
    # frames change smoothly and the event onset stands out from the motion.
    grey = _shifted(tex, oy0 + vy * np.arange(t), ox0 + vx * np.arange(t), s)  # (T, s, s)
    grey += rng.standard_normal(grey.shape, dtype=np.float32) * 2
    video = grey[..., None] * tint.astype(np.float32)

    name, colour, kind = EVENTS[label]
    del name
    box = int(rng.integers(int(0.4 * s), int(0.6 * s) + 1))
    py, px = rng.integers(0, s - box + 1, size=2)
    mask = _shape_mask(kind, box)
    region = video[start : start + spec.event_frames, py : py + box, px : px + box]
    region[:, mask] = np.asarray(colour, np.float32)
    video = np.clip(np.round(video), 0, 255).astype(np.uint8)
    return dict(video=video, label=label, event_start=start, num_frames=t)


# Breakfast-like lengths (see breakfast_like_lengths) at 32 px: the builder config "long".
LONG_SPEC = _long_spec(
    num_train=128, num_test=32, min_frames=300, max_frames=9000, mean_frames=2400.0
)
# "long" scaled down 32x in time (same shape of length distribution), for tests.
LONG_TINY_SPEC = _long_spec(
    num_classes=4,
    num_train=16,
    num_test=8,
    min_frames=10,
    max_frames=280,
    mean_frames=75.0,
    event_frames=3,
)
