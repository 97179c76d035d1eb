"""The builders of the real data sets, each reading its official download from `manual_dir`.

Registered TFDS names: breakfast, hmdb51, something_something_v1, something_something_v2
(and ucf101, kept out of TFDS's global registry: see `Ucf101`). docs/DATASETS.md shows the
layout each expects (as the official downloads unpack) and its splits; each builder's
MANUAL_DOWNLOAD_INSTRUCTIONS says where to get the files and how to build. The stored
features, the storage bounds and the corrupt-file policy are `builder_base.VideoBuilder`'s.
To store smaller frames, pass your own config, e.g.
  Breakfast(config=VideoConfig(name="s1_128", split_index=1, resize_short=128)).
"""

from __future__ import annotations

import json
import os
import re

from fva_jax.data.builder_base import MissingDataError, VideoBuilder, VideoConfig

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


class Breakfast(VideoBuilder):
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


class Ucf101(VideoBuilder, skip_registration=True):
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


class Hmdb51(VideoBuilder):
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


class SomethingSomethingV1(VideoBuilder):
    """Something-Something V1 (Goyal et al., ICCV 2017): 174 classes, JPEG frame folders."""

    NUM_CLASSES = 174
    DESCRIPTION = __doc__
    HOMEPAGE = "https://20bn.com/datasets/something-something/v1"
    BUILDER_CONFIGS = [VideoConfig(name="default")]
    PREFIX = "something-something-v1"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download Something-Something V1 (20bn-something-something-v1 frame archives and the
label CSVs; first released by 20BN at {HOMEPAGE}; where it is distributed today is not
known to fva_jax), join and unpack the archives into manual_dir, so that these exist:
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


class SomethingSomethingV2(VideoBuilder):
    """Something-Something V2 (Goyal et al., ICCV 2017): 174 classes, webm videos."""

    NUM_CLASSES = 174
    DESCRIPTION = __doc__
    HOMEPAGE = "https://developer.qualcomm.com/software/ai-datasets/something-something"
    BUILDER_CONFIGS = [VideoConfig(name="default")]
    PREFIX = "something-something-v2"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download Something-Something V2 from {HOMEPAGE}: the video archive in parts (today
20bn-something-something-v2-00 and -01) and the labels zip. Join the parts (cat, in order),
unpack the videos and the labels into manual_dir, so that these exist:
  <manual_dir>/20bn-something-something-v2/<id>.webm
  <manual_dir>/labels/labels.json, labels/train.json, labels/validation.json  (today's labels zip)
or, as the older release named them,
  <manual_dir>/{PREFIX}-labels.json, {PREFIX}-train.json, {PREFIX}-validation.json
The test split has no labels and is not built.
Then build:  python -m fva_jax.data.build --name=something_something_v2 --manual_dir=<manual_dir>"""

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        videos = self._require(root / "20bn-something-something-v2", "the webm folder")
        labels_file = self._labels_json(root, "labels")
        mapping = json.loads(labels_file.read_text())
        names = [n for n, _ in sorted(mapping.items(), key=lambda kv: int(kv[1]))]
        if sorted(int(v) for v in mapping.values()) != list(range(len(mapping))):
            raise ValueError(f"{labels_file}: indices must be 0..{len(mapping) - 1}")
        self._set_class_names(names, labels_file)
        index = {n: i for i, n in enumerate(names)}

        def read(split):
            f = self._labels_json(root, split)
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

    def _labels_json(self, root, kind: str):
        """`labels/<kind>.json` (today's labels zip) or `<PREFIX>-<kind>.json` (the older
        release); both hold the same JSON. Neither: the error names both and the download."""
        for path in (root / "labels" / f"{kind}.json", root / f"{self.PREFIX}-{kind}.json"):
            if path.exists():
                return path
        return self._require(
            root / "labels" / f"{kind}.json",
            f"the {kind} JSON (or, as the older release names it, {self.PREFIX}-{kind}.json)",
        )
