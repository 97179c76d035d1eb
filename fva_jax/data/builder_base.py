"""What every data set builder here shares: the stored features, the configs, the
ArrayRecord base class, and the machinery of the builders that read an official download.

Every example holds the whole video as JPEG-encoded frames, in ArrayRecord files that
read without TensorFlow (`records.py` reads the raw records):
  video:      tfds.features.Sequence(tfds.features.Image(encoding_format="jpeg")), fed the
              encoded JPEG bytes (tfds.features.Video cannot even be constructed without
              TensorFlow)
  num_frames: int32, number of stored frames
  label:      ClassLabel with the official class names in the official order
  video_id:   str, the file/folder path relative to the data set root

Builder version 2.0.0 (this layout; `VERSION`, `RELEASE_NOTES`).

`VideoBuilder` (the base of the builders in `official_sets.py`) checks `manual_dir`, decodes
videos in parallel processes (`build_worker.py`), bounds storage by three `VideoConfig`
fields applied while decoding (resize_short: shorter side reduced to at most this, 0 keeps
the source size; frame_stride: keep every n-th frame; max_frames: 0 = no cap) and applies the
corrupt-file policy: a corrupt or unreadable video raises `VideoDecodeError` naming the
file (the default, for the build command and the trainer's automatic build alike); with
`skip_corrupt=True` it is skipped instead, each one is logged, and when the split is done the
count and the path of every skipped video are printed. Nothing is dropped silently. A video
with zero frames or whose num_frames disagrees with its frames stops the build with
`records.BadVideoError`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import multiprocessing
import os
import pathlib
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fva_jax.data.build_worker import decode_item
from fva_jax.data.records import check_video
from fva_jax.data.video import VideoDecodeError

VERSION = tfds.core.Version("2.0.0")
RELEASE_NOTES = {
    "1.0.0": "Initial release: TFRecord files, frames as tfds.features.Video (needs TensorFlow).",
    "2.0.0": "ArrayRecord files readable without TensorFlow: frames as a Sequence of JPEG "
    "Images fed encoded bytes; frame_index.json with every video's frame count beside the "
    "data. Data sets built by 1.0.0 must be rebuilt.",
}
FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False)
class VideoConfig(tfds.core.BuilderConfig):
    """Config of a real-data builder.

    Attributes:
      split_index: which official split (1-based: breakfast s1..s4, ucf101/hmdb51
        split1..split3); 0 where the set has only one (Something-Something).
      resize_short: store frames with the shorter side at most this (0: source size).
      frame_stride: store every `frame_stride`-th frame.
      max_frames: store at most this many frames per video (0: all).
      jpeg_quality: quality of the stored JPEG frames.
      stereo_channel: Breakfast only; which channel of the stereo camera to use
        ("ch0"; "" skips the stereo camera). One channel gives the customary 1,712 videos.
    """

    split_index: int = 0
    resize_short: int = 256
    frame_stride: int = 1
    max_frames: int = 0
    jpeg_quality: int = 90
    stereo_channel: str = "ch0"


def video_features(
    label: tfds.features.ClassLabel, frame_shape=(None, None, 3), **extra
) -> tfds.features.FeaturesDict:
    """The features of every builder here (plus `extra` ones, e.g. event_start)."""
    return tfds.features.FeaturesDict(
        {
            "video": tfds.features.Sequence(
                tfds.features.Image(shape=frame_shape, encoding_format="jpeg")
            ),
            "num_frames": tfds.features.Scalar(np.int32),
            "label": label,
            "video_id": tfds.features.Text(),
            **extra,
        }
    )


class MissingDataError(FileNotFoundError):
    """The official download is not where the builder looks for it."""


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of all builders here: writes ArrayRecord files."""

    # TFDS 4.9.10's default `code_path` touches `importlib_resources`, which it only
    # installs on Python < 3.9; the class's own file is all it needs to find.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(inspect.getfile(cls))

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)


class VideoBuilder(Builder, skip_registration=True):
    """Shared machinery: manual_dir checks, parallel decoding, corrupt-file policy."""

    VERSION = VERSION
    RELEASE_NOTES = RELEASE_NOTES
    NUM_CLASSES: int = 0
    DESCRIPTION: str = ""
    HOMEPAGE: str = ""

    def __init__(self, *, skip_corrupt: bool = False, num_workers: int | None = None, **kwargs):
        """Args: skip_corrupt: skip (and count) undecodable videos instead of stopping;
        num_workers: decoding processes at build time (None: up to 8 by CPU count;
        0: decode in this process); other args as tfds.core.DatasetBuilder."""
        self.skip_corrupt = skip_corrupt
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.skipped: dict[str, list[str]] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION,
            homepage=self.HOMEPAGE,
            features=video_features(tfds.features.ClassLabel(num_classes=self.NUM_CLASSES)),
            supervised_keys=("video", "label"),
        )

    # --- manual data

    def _root(self, dl_manager) -> pathlib.Path:
        try:
            return pathlib.Path(os.fspath(dl_manager.manual_dir))
        except AssertionError:
            where = getattr(dl_manager, "_manual_dir", None)
            raise MissingDataError(
                f"{self.name}: manual_dir {where} does not exist or is empty.\n"
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            ) from None

    def _require(self, path: pathlib.Path, what: str) -> pathlib.Path:
        if not path.exists():
            raise MissingDataError(
                f"{self.name}: expected {what} at {path}, not found.\n"
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        return path

    def _set_class_names(self, names: list[str], source: pathlib.Path):
        if len(names) != self.NUM_CLASSES or len(set(names)) != len(names):
            raise ValueError(
                f"{self.name}: {source} should list {self.NUM_CLASSES} distinct "
                f"classes, found {len(names)} ({len(set(names))} distinct)"
            )
        feature = self.info.features["label"]
        if feature.names != names:
            feature.names = names

    # --- examples

    def _decode_kwargs(self) -> dict:
        c = self.builder_config
        return dict(
            stride=c.frame_stride,
            max_frames=c.max_frames or None,
            resize=c.resize_short or None,
            shrink_only=True,
        )

    def _generate_examples(
        self, split: str, items: Iterable[tuple[pathlib.Path, int, str]]
    ) -> Iterator[tuple[str, dict]]:
        """Decodes (path, label, video_id) items into examples keyed by video_id."""
        kw, q = self._decode_kwargs(), self.builder_config.jpeg_quality
        args = [(vid, os.fspath(p), label, vid, kw, q) for p, label, vid in items]
        skipped = self.skipped.setdefault(split, [])
        if self.num_workers > 0 and len(args) > 1:
            # spawn: forking a process that has TensorFlow's threads running can deadlock.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(self.num_workers, len(args))) as pool:
                yield from self._collect(split, pool.imap(decode_item, args, chunksize=1), skipped)
        else:
            yield from self._collect(split, map(decode_item, args), skipped)

    def _collect(self, split, results, skipped):
        n = 0
        for key, res in results:
            if isinstance(res, VideoDecodeError):
                if not self.skip_corrupt:
                    raise VideoDecodeError(
                        res.path,
                        res.reason + " (to skip such files instead: --skip_corrupt for "
                        "python -m fva_jax.data.build, --config.data.skip_corrupt=True for the "
                        "trainer)",
                    ) from res
                logging.warning("%s/%s: skipping %s", self.name, split, res)
                skipped.append(res.path)
                continue
            check_video(res["video_id"], res["num_frames"], len(res["video"]), self.name)
            n += 1
            yield key, res
        msg = (
            f"{self.name}/{self.builder_config.name}/{split}: {n} videos, "
            f"{len(skipped)} corrupt skipped"
        )
        if skipped:
            msg += ": " + ", ".join(skipped)  # every one: the set differs from the official
        print(msg, flush=True)
        logging.info(msg)
