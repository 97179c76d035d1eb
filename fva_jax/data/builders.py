"""TFDS builders for whole-video classification sets.

Registered names: sparse_events (procedural, no download), breakfast, hmdb51, ucf101,
something_something_v1, something_something_v2 (read from `manual_dir`, laid out as
the official downloads unpack; see DATASETS.md and MANUAL_DOWNLOAD_INSTRUCTIONS).

Every example holds the whole video as JPEG-encoded frames, in ArrayRecord files that
read without TensorFlow (`tfds.data_source`; fva_jax.data.pipeline reads the raw records):
  video:      tfds.features.Sequence(tfds.features.Image(encoding_format="jpeg")), fed the
              encoded JPEG bytes (tfds.features.Video cannot even be constructed without
              TensorFlow)
  num_frames: int32, number of stored frames
  label:      ClassLabel with the official class names in the official order
  video_id:   str, the file/folder path relative to the data set root
Beside the data, `frame_index.json` (written by `prepare`) lists every record's frame count,
label and video_id per shard file, in record order, so that batch plans never read videos
to learn their lengths. A video with zero frames or whose num_frames disagrees with its
frames stops the build with `BadVideoError` naming it.

Builder version 2.0.0 (this layout). A data_dir holding only a version-1.0.0 build (TFRecord,
tfds.features.Video) must be rebuilt; `prepare` says how when it cannot rebuild by itself.
Building may import TensorFlow (TFDS uses it for splits over 1 GB); reading never does.

Storage is bounded by three builder-config fields, applied while decoding:
  resize_short (shorter side is reduced to at most this; 0 keeps the source size),
  frame_stride (keep every n-th frame) and max_frames (0 = no cap).
To change them, pass your own config, e.g.
  Breakfast(config=VideoConfig(name="s1_128", split_index=1, resize_short=128)).

Corrupt or unreadable videos raise `VideoDecodeError` naming the file; with
`skip_corrupt=True` they are skipped instead, each one is logged and the count is
printed when the split is done. Nothing is dropped silently.

`ucf101` is not put into TFDS's global registry because TFDS ships a download-based
builder of that name; use `get_builder_class("ucf101")` or `python -m fva_jax.data.build`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import multiprocessing
import os
import pathlib
import re
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fva_jax.data import sparse_events as se
from fva_jax.data.build_worker import decode_item
from fva_jax.data.video import VideoDecodeError, encode_jpegs

_VERSION = tfds.core.Version("2.0.0")
_RELEASE_NOTES = {
    "1.0.0": "Initial release: TFRecord files, frames as tfds.features.Video (needs TensorFlow).",
    "2.0.0": "ArrayRecord files readable without TensorFlow: frames as a Sequence of JPEG "
    "Images fed encoded bytes; frame_index.json with every video's frame count beside the "
    "data. Data sets built by 1.0.0 must be rebuilt.",
}
FILE_FORMAT = "array_record"
FRAME_INDEX = "frame_index.json"
_INDEX_FORMAT = "fva_jax frame index v1"


# --------------------------------------------------------------------------- configs


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


@dataclasses.dataclass(eq=False)
class SparseEventsConfig(tfds.core.BuilderConfig):
    """Config of `sparse_events`: the generator spec and JPEG quality."""

    spec: se.SparseEventsSpec = dataclasses.field(default_factory=se.SparseEventsSpec)
    jpeg_quality: int = 90


# --------------------------------------------------------------------------- helpers


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


class BadVideoError(ValueError):
    """A stored video cannot be used: no frames, or a frame count that disagrees with its
    frames. The message names the video and the reason."""


def check_video(video_id: str, num_frames: int, frames_stored: int, where: str = "") -> None:
    """Raises BadVideoError unless a video has frames and num_frames counts them."""
    at = f" in {where}" if where else ""
    if frames_stored == 0:
        raise BadVideoError(f"video {video_id!r}{at} has zero frames")
    if num_frames != frames_stored:
        raise BadVideoError(
            f"video {video_id!r}{at}: stored num_frames is {num_frames} but it holds "
            f"{frames_stored} frames"
        )


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
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


class _VideoBuilder(_Builder, skip_registration=True):
    """Shared machinery: manual_dir checks, parallel decoding, corrupt-file policy."""

    VERSION = _VERSION
    RELEASE_NOTES = _RELEASE_NOTES
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
                        res.reason + " (set skip_corrupt / --config.data.skip_corrupt=True "
                        "to skip such files)",
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
            msg += ": " + ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else "")
        print(msg, flush=True)
        logging.info(msg)


# --------------------------------------------------------------------------- sparse_events


class SparseEvents(_Builder):
    """Procedural videos whose class shows in only a few frames (see sparse_events.py)."""

    VERSION = _VERSION
    RELEASE_NOTES = _RELEASE_NOTES
    BUILDER_CONFIGS = [
        SparseEventsConfig(
            name="default",
            description="1000 train / 250 test videos, "
            "48-256 frames, 64x64, 4-frame events, 6 classes.",
        ),
        SparseEventsConfig(
            name="small",
            description="256 / 64 videos, 48-128 frames.",
            spec=se.SparseEventsSpec(num_train=256, num_test=64, max_frames=128),
        ),
        SparseEventsConfig(
            name="tiny",
            description="For tests: 12 / 6 videos, 12-24 frames, 32x32, 3-frame events, 4 classes.",
            spec=se.SparseEventsSpec(
                num_classes=4,
                num_train=12,
                num_test=6,
                min_frames=12,
                max_frames=24,
                size=32,
                event_frames=3,
            ),
        ),
        SparseEventsConfig(
            name="long",
            description="Breakfast-like lengths: 128 / 32 videos of 300-9,000 frames "
            "(lognormal, mean 2,400), 32x32, 4-frame events, 6 classes (~0.4 M frames).",
            spec=se.LONG_SPEC,
        ),
        SparseEventsConfig(
            name="long_slice",
            description="The first 24 train / 6 test videos of `long` (the same videos), "
            "for benchmarks.",
            spec=dataclasses.replace(se.LONG_SPEC, num_train=24, num_test=6),
        ),
        SparseEventsConfig(
            name="long_tiny",
            description="For tests: `long` scaled down 32x in time, 16 / 8 videos of 10-280 "
            "frames (lognormal, mean 75), 32x32, 3-frame events, 4 classes.",
            spec=se.LONG_TINY_SPEC,
        ),
    ]

    def __init__(self, *, skip_corrupt: bool = False, num_workers: int | None = None, **kwargs):
        del skip_corrupt, num_workers  # Nothing to decode; same signature as the others.
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.builder_config.spec
        return self.dataset_info_from_configs(
            description=__doc__,
            features=video_features(
                tfds.features.ClassLabel(names=se.class_names(spec.num_classes)),
                frame_shape=(spec.size, spec.size, 3),
                event_start=tfds.features.Scalar(np.int32),
            ),
            supervised_keys=("video", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        spec = self.builder_config.spec
        return {
            "train": self._generate_examples("train", spec.num_train),
            "test": self._generate_examples("test", spec.num_test),
        }

    def _generate_examples(self, split, n):
        spec, q = self.builder_config.spec, self.builder_config.jpeg_quality
        for i in range(n):
            v = se.make_video(spec, split, i)
            vid = f"{split}/{i:06d}"
            example = {
                "video": encode_jpegs(v["video"], q),
                "num_frames": v["num_frames"],
                "label": v["label"],
                "video_id": vid,
                "event_start": v["event_start"],
            }
            check_video(vid, example["num_frames"], len(example["video"]), self.name)
            yield vid, example


# --------------------------------------------------------------------------- breakfast

BREAKFAST_CLASSES = [
    "cereals",
    "coffee",
    "friedegg",
    "juice",
    "milk",
    "pancake",
    "salat",
    "sandwich",
    "scrambledegg",
    "tea",
]
BREAKFAST_DIR = "BreakfastII_15fps_qvga_sync"
_BREAKFAST_FILE = re.compile(r"^(P\d\d)_([a-z]+?)(?:_(ch\d))?\.avi$")


class Breakfast(_VideoBuilder):
    """Breakfast Actions (Kuehne et al., CVPR 2014): 10 activities, 52 participants."""

    NUM_CLASSES = 10
    DESCRIPTION = __doc__
    HOMEPAGE = "https://serre-lab.clps.brown.edu/resource/breakfast-actions-dataset/"
    BUILDER_CONFIGS = [
        VideoConfig(
            name=f"s{i}",
            split_index=i,
            description=f"Official split s{i}: test on P{3 + 13 * (i - 1):02d}-"
            f"P{15 + 13 * (i - 1):02d}, train on the other participants.",
        )
        for i in range(1, 5)
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the Breakfast Actions videos (BreakfastII_15fps_qvga_sync.tar.gz, ~3.6 GB) from
{HOMEPAGE} and unpack it into manual_dir, so that
  <manual_dir>/{BREAKFAST_DIR}/P03/cam01/P03_cereals.avi
exists (cameras cam01, cam02, webcam01, webcam02, stereo; label files may stay).
Then build:  python -m fva_jax.data.build --name=breakfast --config=s1 --manual_dir=<manual_dir>"""

    def _split_generators(self, dl_manager):
        root = self._require(self._root(dl_manager) / BREAKFAST_DIR, "the unpacked video folder")
        i = self.builder_config.split_index
        test_ids = {f"P{p:02d}" for p in range(3 + 13 * (i - 1), 16 + 13 * (i - 1))}
        train, test, unknown = [], [], []
        for path in sorted(root.glob("P*/*/*.avi")):
            m = _BREAKFAST_FILE.match(path.name)
            participant = path.parent.parent.name
            if not m or m.group(1) != participant or m.group(2) not in BREAKFAST_CLASSES:
                unknown.append(path)
                continue
            channel = m.group(3)
            if channel and channel != self.builder_config.stereo_channel:
                continue  # the other stereo channel: a near-duplicate view
            item = (path, BREAKFAST_CLASSES.index(m.group(2)), os.fspath(path.relative_to(root)))
            (test if participant in test_ids else train).append(item)
        if unknown:
            print(
                f"breakfast: ignoring {len(unknown)} .avi files whose names do not follow "
                f"<Pxx>/<camera>/<Pxx>_<activity>[_chN].avi: " + ", ".join(map(str, unknown[:10])),
                flush=True,
            )
        if not train and not test:
            raise MissingDataError(
                f"breakfast: no videos under {root}/P*/<camera>/*.avi.\n"
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        self._set_class_names(BREAKFAST_CLASSES, root)
        return {
            "train": self._generate_examples("train", train),
            "test": self._generate_examples("test", test),
        }


# --------------------------------------------------------------------------- ucf101

UCF_VIDEOS, UCF_LISTS = "UCF-101", "ucfTrainTestlist"


class Ucf101(_VideoBuilder, skip_registration=True):
    """UCF101 (Soomro et al., 2012): 101 classes, 13,320 clips, 3 official splits."""

    name = "ucf101"
    NUM_CLASSES = 101
    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.crcv.ucf.edu/data/UCF101.php"
    BUILDER_CONFIGS = [
        VideoConfig(
            name=f"split{i}", split_index=i, description=f"Official trainlist0{i}/testlist0{i}."
        )
        for i in range(1, 4)
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip from {HOMEPAGE} and
unpack both into manual_dir, so that these exist:
  <manual_dir>/{UCF_VIDEOS}/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi
  <manual_dir>/{UCF_LISTS}/classInd.txt, trainlist01.txt, testlist01.txt, ...
Then build:  python -m fva_jax.data.build --name=ucf101 --config=split1 --manual_dir=<manual_dir>"""

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        videos = self._require(root / UCF_VIDEOS, "the unpacked UCF-101 video folder")
        lists = self._require(root / UCF_LISTS, "the unpacked split lists")
        class_ind = self._require(lists / "classInd.txt", "classInd.txt")
        names = []
        for n, line in enumerate(class_ind.read_text().split("\n"), 1):
            if line.strip():
                idx, name = line.split()
                if int(idx) != len(names) + 1:
                    raise ValueError(f"{class_ind}:{n}: expected index {len(names) + 1}, got {idx}")
                names.append(name)
        self._set_class_names(names, class_ind)
        lower = {name.lower(): i for i, name in enumerate(names)}
        i = self.builder_config.split_index

        def read(kind):
            f = self._require(lists / f"{kind}list0{i}.txt", f"{kind}list0{i}.txt")
            items = []
            for n, line in enumerate(f.read_text().split("\n"), 1):
                parts = line.split()
                if not parts:
                    continue
                rel = parts[0].replace("\\", "/")
                folder = rel.split("/")[0].lower()  # the class folder decides the label
                if folder not in lower:
                    raise ValueError(
                        f"{f}:{n}: class folder {rel.split('/')[0]!r} not in classInd.txt"
                    )
                label = lower[folder]
                if len(parts) > 1 and int(parts[1]) - 1 != label:
                    raise ValueError(f"{f}:{n}: label {parts[1]} disagrees with folder of {rel}")
                items.append((videos / rel, label, rel))
            return items

        return {
            "train": self._generate_examples("train", read("train")),
            "test": self._generate_examples("test", read("test")),
        }


# --------------------------------------------------------------------------- hmdb51

HMDB_SPLITS = "testTrainMulti_7030_splits"
HMDB_VIDEOS = "hmdb51_org"


class Hmdb51(_VideoBuilder):
    """HMDB51 (Kuehne et al., ICCV 2011): 51 classes, 6,766 clips, 3 official splits."""

    NUM_CLASSES = 51
    DESCRIPTION = __doc__
    HOMEPAGE = "https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/"
    BUILDER_CONFIGS = [
        VideoConfig(
            name=f"split{i}", split_index=i, description=f"Official split {i} (id 1 train, 2 test)."
        )
        for i in range(1, 4)
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download hmdb51_org.rar and test_train_splits.rar from {HOMEPAGE}. Unpack
hmdb51_org.rar, then each <class>.rar inside it, into <manual_dir>/{HMDB_VIDEOS}/, and the
split files into <manual_dir>/{HMDB_SPLITS}/, so that these exist:
  <manual_dir>/{HMDB_VIDEOS}/brush_hair/<video>.avi
  <manual_dir>/{HMDB_SPLITS}/brush_hair_test_split1.txt   (153 files)
(The class folders may also sit directly in <manual_dir>.)
Then build:  python -m fva_jax.data.build --name=hmdb51 --config=split1 --manual_dir=<manual_dir>"""

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        splits = self._require(root / HMDB_SPLITS, "the unpacked split files")
        videos = root / HMDB_VIDEOS if (root / HMDB_VIDEOS).is_dir() else root
        i = self.builder_config.split_index
        suffix = f"_test_split{i}.txt"
        # Classes in alphabetical order of their names (not of the file names, where
        # "climb_stairs_test..." would sort before "climb_test...").
        by_name = {f.name[: -len(suffix)]: f for f in splits.glob(f"*{suffix}")}
        names = sorted(by_name)
        files = [by_name[n] for n in names]
        self._set_class_names(names, splits)
        train, test = [], []
        for label, (name, f) in enumerate(zip(names, files)):
            for n, line in enumerate(f.read_text().split("\n"), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    raise ValueError(f"{f}:{n}: expected '<video>.avi <0|1|2>', got {line!r}")
                if parts[1] == "0":
                    continue
                item = (
                    self._require(videos / name, f"class folder {name}") / parts[0],
                    label,
                    f"{name}/{parts[0]}",
                )
                (train if parts[1] == "1" else test).append(item)
        return {
            "train": self._generate_examples("train", train),
            "test": self._generate_examples("test", test),
        }


# --------------------------------------------------------------------------- something-something


class SomethingSomethingV1(_VideoBuilder):
    """Something-Something V1 (Goyal et al., ICCV 2017): 174 classes, JPEG frame folders."""

    NUM_CLASSES = 174
    DESCRIPTION = __doc__
    HOMEPAGE = "https://20bn.com/datasets/something-something/v1 (now via Qualcomm)"
    BUILDER_CONFIGS = [VideoConfig(name="default")]
    PREFIX = "something-something-v1"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download Something-Something V1 (20bn-something-something-v1 frame archives and the
label CSVs; the data set is now distributed by Qualcomm: {HOMEPAGE}), join and
unpack the archives into manual_dir, so that these exist:
  <manual_dir>/20bn-something-something-v1/<id>/00001.jpg
  <manual_dir>/{PREFIX}-labels.csv, {PREFIX}-train.csv, {PREFIX}-validation.csv
The test split has no labels and is not built.
Then build:  python -m fva_jax.data.build --name=something_something_v1 --manual_dir=<manual_dir>"""

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        frames = self._require(root / "20bn-something-something-v1", "the frame folders")
        labels_file = self._require(root / f"{self.PREFIX}-labels.csv", "the labels CSV")
        names = [s.strip() for s in labels_file.read_text().split("\n") if s.strip()]
        self._set_class_names(names, labels_file)
        index = {n: i for i, n in enumerate(names)}

        def read(split):
            f = self._require(root / f"{self.PREFIX}-{split}.csv", f"the {split} CSV")
            items = []
            for n, line in enumerate(f.read_text().split("\n"), 1):
                if not line.strip():
                    continue
                vid, sep, name = line.strip().partition(";")
                if not sep or name not in index:
                    raise ValueError(
                        f"{f}:{n}: expected '<id>;<class in {labels_file.name}>', got {line!r}"
                    )
                items.append((frames / vid, index[name], vid))
            return items

        return {
            "train": self._generate_examples("train", read("train")),
            "validation": self._generate_examples("validation", read("validation")),
        }


class SomethingSomethingV2(_VideoBuilder):
    """Something-Something V2 (Goyal et al., ICCV 2017): 174 classes, webm videos."""

    NUM_CLASSES = 174
    DESCRIPTION = __doc__
    HOMEPAGE = "https://developer.qualcomm.com/software/ai-datasets/something-something"
    BUILDER_CONFIGS = [VideoConfig(name="default")]
    PREFIX = "something-something-v2"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download Something-Something V2 (20bn-something-something-v2-00..19 archives and the
labels zip) from {HOMEPAGE}, join and unpack them into manual_dir, so that these exist:
  <manual_dir>/20bn-something-something-v2/<id>.webm
  <manual_dir>/{PREFIX}-labels.json, {PREFIX}-train.json, {PREFIX}-validation.json
The test split has no labels and is not built.
Then build:  python -m fva_jax.data.build --name=something_something_v2 --manual_dir=<manual_dir>"""

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        videos = self._require(root / "20bn-something-something-v2", "the webm folder")
        labels_file = self._require(root / f"{self.PREFIX}-labels.json", "the labels JSON")
        mapping = json.loads(labels_file.read_text())
        names = [n for n, _ in sorted(mapping.items(), key=lambda kv: int(kv[1]))]
        if sorted(int(v) for v in mapping.values()) != list(range(len(mapping))):
            raise ValueError(f"{labels_file}: indices must be 0..{len(mapping) - 1}")
        self._set_class_names(names, labels_file)
        index = {n: i for i, n in enumerate(names)}

        def read(split):
            f = self._require(root / f"{self.PREFIX}-{split}.json", f"the {split} JSON")
            items = []
            for n, entry in enumerate(json.loads(f.read_text())):
                name = entry["template"].replace("[", "").replace("]", "")
                if name not in index:
                    raise ValueError(
                        f"{f}: entry {n} (id {entry['id']}): template {name!r} "
                        f"not in {labels_file.name}"
                    )
                items.append((videos / f"{entry['id']}.webm", index[name], f"{entry['id']}.webm"))
            return items

        return {
            "train": self._generate_examples("train", read("train")),
            "validation": self._generate_examples("validation", read("validation")),
        }


# --------------------------------------------------------------------------- lookup

BUILDERS: dict[str, type] = {
    "sparse_events": SparseEvents,
    "breakfast": Breakfast,
    "ucf101": Ucf101,
    "hmdb51": Hmdb51,
    "something_something_v1": SomethingSomethingV1,
    "something_something_v2": SomethingSomethingV2,
}


def get_builder_class(name: str) -> type:
    if name not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name]


def get_builder(
    name: str,
    builder_config: str = "",
    data_dir: str = "",
    *,
    skip_corrupt: bool = False,
    num_workers: int | None = None,
) -> tfds.core.DatasetBuilder:
    """The builder `name` with config `builder_config` ("" = the first) in `data_dir`."""
    cls = get_builder_class(name)
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    config = builder_config or configs[0]
    if config not in configs:
        raise ValueError(
            f"{name} has no builder config {builder_config!r}; choose from {', '.join(configs)}"
        )
    return cls(
        config=config, data_dir=data_dir or None, skip_corrupt=skip_corrupt, num_workers=num_workers
    )


def prepare(builder, manual_dir: str = "") -> None:
    """Builds `builder` if its data_dir does not hold it yet (reads manual_dir), then writes
    its frame index if missing.

    Raises MissingDataError saying how to rebuild when the data_dir holds only an older
    version of the data set and the official download is not there to rebuild it from.
    """
    if not builder.is_prepared():
        old = older_versions(builder)
        if old:
            logging.warning(
                "%s: found version(s) %s, which this fva_jax cannot read; building %s",
                _variant_dir(builder),
                ", ".join(old),
                builder.version,
            )
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None),
                file_format=FILE_FORMAT,
            )
        except MissingDataError as e:
            if not old:
                raise
            raise MissingDataError(
                f"{_variant_dir(builder)} holds only version(s) {', '.join(old)} of "
                f"{builder.name}/{builder.builder_config.name}, written by an older fva_jax "
                f"in a format this version cannot read (TFRecord files with "
                f"tfds.features.Video frames, which need TensorFlow). Rebuild it as version "
                f"{builder.version} (the old folder can then be deleted):\n"
                f"  python -m fva_jax.data.build --name={builder.name} "
                f"--config={builder.builder_config.name} --data_dir={builder.data_dir_root} "
                f"--manual_dir=<the unpacked official download>\n"
                f"({e})"
            ) from e
    if not (epath.Path(builder.data_dir) / FRAME_INDEX).exists():
        write_frame_index(builder)


def _variant_dir(builder) -> epath.Path:
    return epath.Path(builder.data_dir).parent


def older_versions(builder) -> list[str]:
    """Versions below the builder's that are built in its data_dir (e.g. ["1.0.0"])."""
    root = _variant_dir(builder)
    if not root.exists():
        return []
    found = []
    for d in root.iterdir():
        try:
            version = tfds.core.Version(d.name)
        except ValueError:
            continue
        if version < builder.version and (d / "dataset_info.json").exists():
            found.append(d.name)
    return sorted(found)


# --------------------------------------------------------------------------- frame index


def parse_record(raw: bytes) -> dict:
    """One raw ArrayRecord record (a serialized tf.train.Example) -> dict(video=[JPEG bytes],
    num_frames, label, video_id), parsed with TFDS's own protos (no TensorFlow)."""
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

    feature = tf_example_pb2.Example.FromString(raw).features.feature

    def scalar(name):
        values = feature[name].int64_list.value
        return int(values[0]) if len(values) == 1 else -1

    return dict(
        video=feature["video"].bytes_list.value,
        num_frames=scalar("num_frames"),
        label=scalar("label"),
        video_id=b"".join(feature["video_id"].bytes_list.value).decode("utf-8", "replace"),
    )


def _shards(builder) -> list[epath.Path]:
    files = []
    for split_info in builder.info.splits.values():
        files += [epath.Path(f.filename) for f in split_info.file_instructions]
    return files


def write_frame_index(builder) -> epath.Path:
    """Reads every record once (no JPEG decoding) and writes `frame_index.json` beside the
    data: {"shards": {file name: {"num_frames": [...], "label": [...], "video_id": [...]}}}
    in record order. Raises BadVideoError naming a video without frames or whose num_frames
    disagrees with its frames."""
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

    shards = {}
    for path in _shards(builder):
        entry = {"num_frames": [], "label": [], "video_id": []}
        with array_record_data_source.ArrayRecordDataSource([os.fspath(path)]) as source:
            for i in range(len(source)):
                ex = parse_record(source[i])
                check_video(ex["video_id"], ex["num_frames"], len(ex["video"]), path.name)
                entry["num_frames"].append(ex["num_frames"])
                entry["label"].append(ex["label"])
                entry["video_id"].append(ex["video_id"])
        shards[path.name] = entry
    out = epath.Path(builder.data_dir) / FRAME_INDEX
    tmp = out.with_name(f"{FRAME_INDEX}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": _INDEX_FORMAT, "shards": shards}))
    tmp.replace(out)  # atomic: hosts that build at the same time never see half a file
    return out


def read_frame_index(builder) -> dict[str, dict[str, np.ndarray]]:
    """{shard file name: {"num_frames", "label" (int64 arrays), "video_id" (list)}} from
    `frame_index.json` (written by `prepare`)."""
    path = epath.Path(builder.data_dir) / FRAME_INDEX
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; fva_jax.data.builders.prepare(builder) writes it "
            "(the input pipeline calls it)"
        )
    data = json.loads(path.read_text())
    if data.get("format") != _INDEX_FORMAT:
        raise ValueError(f"{path}: not a {_INDEX_FORMAT!r} file; delete it to have it rewritten")
    return {
        name: {
            "num_frames": np.asarray(e["num_frames"], np.int64),
            "label": np.asarray(e["label"], np.int64),
            "video_id": list(e["video_id"]),
        }
        for name, e in data["shards"].items()
    }
