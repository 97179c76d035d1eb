"""Tiny fake copies of the official data set layouts (docs/DATASETS.md), for tests.

Each writer creates a few short videos (PyAV-encoded .avi/.webm or JPEG folders) and the
real split/label files' formats under `root` (use as TFDS manual_dir), and returns the
expected content: {builder_config: {split: {video_id: (label, num_frames, grey)}}}.
Every video is a flat grey frame sequence with its own grey level `grey`, so a test
can tell which file ended up in which example.

`GradientVideos` is a TFDS builder of videos whose pixels say where they come from
(red = 4 * x, green = 4 * y, blue = 8 * frame index), so that tests can read crop geometry,
flips and the chosen frames off a batch.

Used by tests/test_builders.py, tests/test_pipeline.py and the trainer tests.
"""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from fva_jax.data import builder_base, builders
from fva_jax.data import sparse_events as se
from fva_jax.data.video import encode_jpegs, encode_video

# Small frames (even sizes for yuv420p). H < W like the real sets (landscape).
H, W = 24, 32
_grey = itertools.count()


def _frames(t: int, grey: int) -> np.ndarray:
    f = np.full((t, H, W, 3), grey, np.uint8)
    f[:, : H // 4, : W // 4] = 255 - grey  # a corner patch: not completely flat
    return f


def _next_grey() -> int:
    return 30 + (next(_grey) * 37) % 190


def _video(path: pathlib.Path, t: int) -> int:
    """Writes a t-frame video (container from the suffix) and returns its grey level."""
    grey = _next_grey()
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(path, _frames(t, grey), fps=15)
    return grey


def _jpeg_folder(path: pathlib.Path, t: int) -> int:
    grey = _next_grey()
    path.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(_frames(t, grey)):
        Image.fromarray(f).save(path / f"{i + 1:05d}.jpg", quality=95)
    return grey


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


def write_breakfast(root) -> dict:
    """BreakfastII_15fps_qvga_sync/<Pxx>/<camera>/<Pxx>_<activity>[_chN].avi for s1..s4."""
    root = pathlib.Path(root)
    base = root / "BreakfastII_15fps_qvga_sync"
    # (participant, camera, activity, stereo channel or None, frames)
    videos = [
        ("P03", "cam01", "cereals", None, 5),
        ("P03", "stereo", "coffee", "ch0", 6),
        ("P16", "webcam01", "tea", None, 4),
        ("P29", "cam02", "milk", None, 7),
        ("P42", "webcam02", "juice", None, 5),
        ("P54", "cam01", "salat", None, 4),
    ]
    recs = []
    for p, cam, act, ch, t in videos:
        name = f"{p}_{act}" + (f"_{ch}" if ch else "") + ".avi"
        grey = _video(base / p / cam / name, t)
        recs.append((p, f"{p}/{cam}/{name}", BREAKFAST_CLASSES.index(act), t, grey))
    # The other stereo channel (not used by default) and a segmentation label file.
    _video(base / "P03" / "stereo" / "P03_coffee_ch1.avi", 3)
    (base / "P03" / "cam01" / "P03_cereals.avi.labels").write_text("1-30 SIL\n")
    out = {}
    for s in range(1, 5):
        test_ids = {f"P{i:02d}" for i in range(3 + 13 * (s - 1), 16 + 13 * (s - 1))}
        out[f"s{s}"] = {
            split: {
                vid: (label, t, grey)
                for p, vid, label, t, grey in recs
                if (p in test_ids) == (split == "test")
            }
            for split in ("train", "test")
        }
    return out


# --------------------------------------------------------------------------- ucf101

UCF_CLASSES = (
    ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
    + [f"Action{i:03d}" for i in range(3, 36)]
    + ["HandstandPushups"]
    + [f"Action{i:03d}" for i in range(37, 101)]
)


def write_ucf101(root) -> dict:
    """UCF-101/<Class>/v_<Class>_gGG_cCC.avi +
    ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt."""
    root = pathlib.Path(root)
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    # Windows line endings as in the official files.
    (lists / "classInd.txt").write_text(
        "".join(f"{i + 1} {c}\r\n" for i, c in enumerate(UCF_CLASSES))
    )
    # (class, file-name class spelling, group, clip, frames). The official files spell
    # HandstandPushups as "HandStandPushups" in file names; the folder decides.
    clips = [
        ("ApplyEyeMakeup", "ApplyEyeMakeup", 1, 1, 4),
        ("ApplyEyeMakeup", "ApplyEyeMakeup", 8, 2, 5),
        ("Archery", "Archery", 1, 1, 6),
        ("Archery", "Archery", 9, 1, 4),
        ("HandstandPushups", "HandStandPushups", 2, 1, 5),
    ]
    recs = []
    for cls, spelled, g, c, t in clips:
        rel = f"{cls}/v_{spelled}_g{g:02d}_c{c:02d}.avi"
        recs.append((rel, UCF_CLASSES.index(cls), g, t, _video(root / "UCF-101" / rel, t)))
    out = {}
    for s in range(1, 4):
        # Official splits hold groups out: split s tests on groups 7(s-1)+1 .. 7s.
        test_groups = set(range(7 * (s - 1) + 1, 7 * s + 1))
        train = [r for r in recs if r[2] not in test_groups]
        test = [r for r in recs if r[2] in test_groups]
        (lists / f"trainlist0{s}.txt").write_text(
            "".join(f"{rel} {label + 1}\r\n" for rel, label, *_ in train)
        )
        (lists / f"testlist0{s}.txt").write_text("".join(f"{rel}\r\n" for rel, *_ in test))
        out[f"split{s}"] = {
            "train": {r[0]: (r[1], r[3], r[4]) for r in train},
            "test": {r[0]: (r[1], r[3], r[4]) for r in test},
        }
    return out


# --------------------------------------------------------------------------- hmdb51

HMDB_CLASSES = [
    "brush_hair",
    "cartwheel",
    "catch",
    "chew",
    "clap",
    "climb",
    "climb_stairs",
    "dive",
    "draw_sword",
    "dribble",
    "drink",
    "eat",
    "fall_floor",
    "fencing",
    "flic_flac",
    "golf",
    "handstand",
    "hit",
    "hug",
    "jump",
    "kick",
    "kick_ball",
    "kiss",
    "laugh",
    "pick",
    "pour",
    "pullup",
    "punch",
    "push",
    "pushup",
    "ride_bike",
    "ride_horse",
    "run",
    "shake_hands",
    "shoot_ball",
    "shoot_bow",
    "shoot_gun",
    "sit",
    "situp",
    "smile",
    "smoke",
    "somersault",
    "stand",
    "swing_baseball",
    "sword",
    "sword_exercise",
    "talk",
    "throw",
    "turn",
    "walk",
    "wave",
]


def write_hmdb51(root) -> dict:
    """hmdb51_org/<class>/<video>.avi + testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt."""
    root = pathlib.Path(root)
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    # class -> [(video, frames, ids for split1..3)] with id 1 train, 2 test, 0 unused.
    videos = {
        "brush_hair": [
            ("April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 4, (1, 2, 1)),
            ("Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi", 5, (2, 1, 0)),
        ],
        "wave": [
            ("wave_and_smile_wave_h_cm_np1_fr_goo_1.avi", 6, (1, 1, 2)),
            ("Hand_Wave_wave_u_cm_np1_le_bad_3.avi", 4, (0, 2, 1)),
        ],
    }
    recs = {}
    for label, cls in enumerate(HMDB_CLASSES):
        entries = videos.get(cls, [])
        for name, t, ids in entries:
            recs[f"{cls}/{name}"] = (label, t, _video(root / "hmdb51_org" / cls / name, t), ids)
        for s in range(1, 4):
            # Official files: "<video>.avi <id> \n" (trailing space).
            (splits / f"{cls}_test_split{s}.txt").write_text(
                "".join(f"{name} {ids[s - 1]} \n" for name, _, ids in entries)
            )
    out = {}
    for s in range(1, 4):
        out[f"split{s}"] = {
            split: {
                vid: (label, t, grey)
                for vid, (label, t, grey, ids) in recs.items()
                if ids[s - 1] == want
            }
            for split, want in (("train", 1), ("test", 2))
        }
    return out


# --------------------------------------------------------------------------- something-something

SS_CLASSES = [
    "Approaching something with your camera",
    "Holding something next to something",
    "Putting something on a surface",
] + [f"Doing something #{i}" for i in range(3, 174)]


def write_something_something_v1(root) -> dict:
    """20bn-something-something-v1/<id>/00001.jpg +
    something-something-v1-{labels,train,validation,test}.csv."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "something-something-v1-labels.csv").write_text("".join(c + "\n" for c in SS_CLASSES))
    data = {
        "train": [("100218", 1, 5), ("4242", 2, 4), ("7", 0, 6)],
        "validation": [("999", 2, 4), ("1001", 1, 3)],
    }
    out = {}
    for split, items in data.items():
        lines, exp = [], {}
        for vid, label, t in items:
            grey = _jpeg_folder(root / "20bn-something-something-v1" / vid, t)
            lines.append(f"{vid};{SS_CLASSES[label]}\n")
            exp[vid] = (label, t, grey)
        (root / f"something-something-v1-{split}.csv").write_text("".join(lines))
        out[split] = exp
    (root / "something-something-v1-test.csv").write_text("5\n")
    return {"default": out}


_SS2_LABEL_FILES = ("labels", "train", "validation", "test")


def write_something_something_v2(root, labels_layout="current") -> dict:
    """20bn-something-something-v2/<id>.webm + the label files as today's labels zip unpacks,
    labels/{labels,train,validation,test}.json, or with labels_layout="older" as the older
    release named them, something-something-v2-{labels,train,validation,test}.json."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if labels_layout == "current":
        (root / "labels").mkdir(exist_ok=True)
        labels_json = {k: root / "labels" / f"{k}.json" for k in _SS2_LABEL_FILES}
    else:
        assert labels_layout == "older", labels_layout
        labels_json = {k: root / f"something-something-v2-{k}.json" for k in _SS2_LABEL_FILES}
    labels_json["labels"].write_text(json.dumps({c: str(i) for i, c in enumerate(SS_CLASSES)}))
    templates = {
        0: "Approaching [something] with your camera",
        1: "Holding [something] next to [something]",
        2: "Putting [something] on a surface",
    }
    data = {
        "train": [("78687", 1, 5), ("42326", 0, 4), ("100", 2, 4)],
        "validation": [("74225", 2, 5), ("3", 0, 4)],
    }
    out = {}
    for split, items in data.items():
        entries, exp = [], {}
        for vid, label, t in items:
            grey = _video(root / "20bn-something-something-v2" / f"{vid}.webm", t)
            entries.append(
                {
                    "id": vid,
                    "label": "a label with placeholders filled in",
                    "template": templates[label],
                    "placeholders": ["x", "y"],
                }
            )
            exp[f"{vid}.webm"] = (label, t, grey)
        labels_json[split].write_text(json.dumps(entries))
        out[split] = exp
    labels_json["test"].write_text(json.dumps([{"id": "1"}]))
    return {"default": out}


WRITERS = {
    "breakfast": write_breakfast,
    "ucf101": write_ucf101,
    "hmdb51": write_hmdb51,
    "something_something_v1": write_something_something_v1,
    "something_something_v2": write_something_something_v2,
}


# --------------------------------------------------------------------------- gradient videos

GRADIENT_H, GRADIENT_W = 48, 64


def gradient_frames(t: int) -> np.ndarray:
    """uint8 (t, 48, 64, 3): red = 4 * x, green = 4 * y, blue = 8 * frame index."""
    y, x = np.mgrid[0:GRADIENT_H, 0:GRADIENT_W]
    f = np.stack([x * 4, y * 4, np.zeros_like(x)], -1)
    out = np.repeat(f[None], t, axis=0)
    out[..., 2] = 8 * np.arange(t)[:, None, None]
    return out.astype(np.uint8)


def gradient_length(split: str, index: int) -> int:
    """Frames of video `index` of `split`: 5..31, varied."""
    return 5 + (7 * index + (3 if split == "test" else 0)) % 27


class GradientVideos(builders.SparseEvents):
    """sparse_events' features with gradient_frames videos (48x64) of gradient_length frames;
    label = index % 4. Config "grad": 8 train, 5 test videos."""

    # TFDS reads metadata files from the builder's package; use the real builders'.
    pkg_dir_path = epath.Path(builders.__file__).parent
    BUILDER_CONFIGS = [
        builders.SparseEventsConfig(
            name="grad",
            spec=se.SparseEventsSpec(
                num_classes=4,
                num_train=8,
                num_test=5,
                min_frames=5,
                max_frames=31,
                size=32,
                event_frames=1,
            ),
            jpeg_quality=95,
        )
    ]

    def _info(self):
        return self.dataset_info_from_configs(
            features=builder_base.video_features(
                tfds.features.ClassLabel(names=se.class_names(4)),
                event_start=tfds.features.Scalar(np.int32),
            ),
        )

    def _generate_examples(self, split, n):
        for i in range(n):
            t = gradient_length(split, i)
            vid = f"{split}/{i:06d}"
            yield (
                vid,
                {
                    "video": encode_jpegs(gradient_frames(t), self.builder_config.jpeg_quality),
                    "num_frames": t,
                    "label": i % 4,
                    "video_id": vid,
                    "event_start": 0,
                },
            )


def read_gradient(video: np.ndarray) -> dict:
    """What a (T, c, c, 3) crop of gradient frames shows: frame index per frame, mean x and y
    of the source pixels (centre of the crop), its extent in source pixels, and whether it is
    mirrored. Endpoints are pixel centres: extent = (last - first) * c / (c - 1)."""
    v = video.astype(np.float64)
    c = v.shape[1]
    red, green = v[..., 0] / 4, v[..., 1] / 4
    left, right = red[:, :, 0].mean(), red[:, :, -1].mean()
    top, bottom = green[:, 0].mean(), green[:, -1].mean()
    return dict(
        frames=np.round(v[..., 2].mean(axis=(1, 2)) / 8).astype(int),
        x=red.mean(),
        y=green.mean(),
        width=abs(right - left) * c / (c - 1),
        height=(bottom - top) * c / (c - 1),
        flipped=left > right,
        per_frame_red=red.mean(axis=(1, 2)),
    )


class CountingStep:
    """A picklable step function for Grain that records each call as a file in `folder`
    (calls made in worker processes are seen by the test process)."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)

    def __call__(self, index):
        (self.folder / f"{index:06d}").touch()
        return {"x": np.full((4,), index)}
