"""A built data set as stored, read without TensorFlow: records, the frame index, splits.

A data set built by `builders.py` (builder version 2.0.0) is, for every split, ArrayRecord
files of serialized tf.train.Example records (the frames as JPEG bytes, num_frames, label,
video_id), and beside them one `frame_index.json` with every record's frame count, label and
video_id, so that batch plans never read videos to learn their lengths.

* `parse_record`: one raw record -> dict(video=[JPEG bytes], num_frames, label, video_id),
  parsed with TFDS's own protos;
* `write_frame_index` / `read_frame_index`: `frame_index.json` (written once per build);
* `check_video` / `BadVideoError`: what every stored video must satisfy (checked when
  building, when indexing and when reading);
* `Split.open(builder, split)`: where a split's records are and what the index says about
  them (rewriting a stale index); `Split.index_of(video_id)`: a video's dataset index;
  `Records(split)[i]`: the raw record of video i, its ArrayRecord readers opened lazily
  (picklable, so every Grain worker opens its own).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import numpy as np
from etils import epath

from fva_jax import config_lib

FRAME_INDEX = "frame_index.json"
_INDEX_FORMAT = "fva_jax frame index v1"


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


# --------------------------------------------------------------------------- splits


@dataclasses.dataclass(frozen=True)
class Split:
    """One split's records: where they are and what the frame index says about them."""

    name: str
    file_instructions: tuple  # TFDS FileInstructions (filename, skip, take, ...)
    num_frames: np.ndarray  # (N,) stored frames per video, data-source order
    labels: np.ndarray  # (N,)
    video_ids: tuple[str, ...]

    @classmethod
    def open(cls, builder, split: str) -> "Split":
        try:
            instructions = builder.info.splits[split].file_instructions
        except (KeyError, ValueError) as e:
            raise config_lib.ConfigError(
                f"split {split!r} (config.data.train_split / eval_split) is not in "
                f"{builder.name}/{builder.builder_config.name}; it has "
                f"{', '.join(builder.info.splits)} ({e})"
            ) from None
        index = read_frame_index(builder)
        stale = [
            f.filename
            for f in instructions
            if os.path.basename(f.filename) not in index
            or len(index[os.path.basename(f.filename)]["num_frames"]) != f.examples_in_shard
        ]
        if stale:
            logging.warning("frame index of %s is stale (%s); rewriting it", builder.name, stale)
            write_frame_index(builder)
            index = read_frame_index(builder)
        frames, labels, ids = [], [], []
        for f in instructions:
            entry = index[os.path.basename(f.filename)]
            sl = slice(f.skip, f.skip + f.take)
            frames.append(entry["num_frames"][sl])
            labels.append(entry["label"][sl])
            ids += entry["video_id"][sl]
        return cls(
            name=split,
            file_instructions=tuple(instructions),
            num_frames=np.concatenate(frames) if frames else np.zeros(0, np.int64),
            labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
            video_ids=tuple(ids),
        )

    @functools.cached_property
    def _index_by_id(self) -> dict[str, int]:
        return {video_id: i for i, video_id in enumerate(self.video_ids)}

    def index_of(self, video_id: str) -> int:
        """The dataset index (data-source order) of the video with this id; -1 if the frame
        index does not list it in this split."""
        return self._index_by_id.get(video_id, -1)

    def where(self, index: int) -> str:
        """'file (record r)' of a video, for messages."""
        for f in self.file_instructions:
            if index < f.take:
                return f"{f.filename} (record {f.skip + index})"
            index -= f.take
        return "?"


class Records:
    """Raw records of a split by index; opens its ArrayRecord readers lazily (picklable, so
    every Grain worker opens its own)."""

    def __init__(self, split: Split):
        self._instructions = split.file_instructions
        self._source = None

    def __getstate__(self):
        return {"_instructions": self._instructions, "_source": None}

    def __getitem__(self, index: int) -> bytes:
        if self._source is None:
            from array_record.python import (  # pylint: disable=g-import-not-at-top
                array_record_data_source,
            )

            self._source = array_record_data_source.ArrayRecordDataSource(list(self._instructions))
        return self._source[int(index)]
