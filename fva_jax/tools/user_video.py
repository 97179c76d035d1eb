"""A user's video as the command-line tools read it: every frame unless a flag says otherwise.

``predict`` and ``visualize`` classify or draw the video the user gives them, whatever
frame stride or cap a training config had: a run trained on capped or strided clips still
sees the whole video at prediction time. Frames are dropped only by the tools' own
``--stride`` / ``--max-frames`` flags, and the tools say how many frames they used out of how
many the video has (``describe``), and which flag dropped the rest.

    video = user_video.read(path, stride=1, max_frames=None, resize=112)
    video.frames          # uint8 (used, H, W, 3): source frames 0, stride, 2 * stride, ...
    video.describe()      # "250 of 250 frames" / "63 of 250 frames (--stride 4 dropped 187)"
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np

from fva_jax.data import video as video_lib


@dataclasses.dataclass(frozen=True)
class UserVideo:
    """The frames a tool uses and how they were chosen from the video.

    frames: uint8 (used, H, W, 3), source frames 0, stride, 2 * stride, ... (at most
      max_frames of them).
    total: number of frames in the video.
    stride, max_frames: the user's flags (1 and None: every frame).
    """

    frames: np.ndarray
    total: int
    stride: int = 1
    max_frames: int | None = None

    @property
    def used(self) -> int:
        return len(self.frames)

    @property
    def frame_numbers(self) -> np.ndarray:
        """int (used,) source frame number of each used frame."""
        return np.arange(self.used) * self.stride

    def describe(self) -> str:
        """ "N of M frames", plus the flags that dropped frames and how many they dropped."""
        text = f"{self.used} of {self.total} frames"
        flags = []
        if self.stride > 1:
            flags.append(f"--stride {self.stride}")
        if self.max_frames is not None and self.used == self.max_frames < self.total:
            flags.append(f"--max-frames {self.max_frames}")
        if flags:
            text += f" ({' '.join(flags)} dropped {self.total - self.used})"
        return text


def read(
    path,
    *,
    stride: int = 1,
    max_frames: int | None = None,
    resize=None,
    shrink_only: bool = False,
) -> UserVideo:
    """Decodes a video file or frame folder for a tool.

    Args:
      path: a video file or a folder of frame images (as `fva_jax.data.video.decode_video`).
      stride: keep source frames 0, stride, 2 * stride, ... (1: every frame).
      max_frames: keep at most this many of them; None or 0: no cap (the configs' convention).
      resize, shrink_only: as `decode_video`.

    Returns:
      UserVideo with the kept frames and the video's frame count.

    Raises:
      fva_jax.data.video.VideoDecodeError naming the file and the reason.
    """
    max_frames = max_frames or None
    frames = video_lib.decode_video(
        path, stride=stride, max_frames=max_frames, resize=resize, shrink_only=shrink_only
    )
    if stride == 1 and max_frames is None:
        total = len(frames)  # decoded to the end: the exact count
    else:
        total = count_frames(
            path, kept=len(frames), stride=stride, capped=len(frames) == max_frames
        )
    return UserVideo(frames=frames, total=total, stride=stride, max_frames=max_frames)


def count_frames(path, *, kept: int, stride: int, capped: bool) -> int:
    """Frames in the video, knowing that `kept` frames `stride` apart were decoded from it
    (the last kept one ended the decode if `capped`).

    A folder: its frame images (the files `decode_video` reads). A file: the count its
    container declares when that agrees with what was decoded (cheap, no decoding);
    otherwise (no declared count, e.g. WebM, or a declared count that the decoded frames
    contradict) every frame is decoded once more, at 1x1 pixels, and counted.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        return sum(
            1
            for p in path.iterdir()
            if p.suffix.lower() in video_lib.IMAGE_EXTENSIONS and p.is_file()
        )
    low = (kept - 1) * stride + 1  # the last kept frame exists
    high = math.inf if capped else kept * stride  # decoded to the end: no further kept frame
    declared = video_lib.probe_video(path)["num_frames"]
    if low <= declared <= high:
        return int(declared)
    return len(video_lib.decode_video(path, resize=(1, 1)))
