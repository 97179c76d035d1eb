"""A small stand-in for fva_jax.data.pipeline with exactly the agreed data API, for trainer
tests: `dataset_info`, `TrainData`, `EvalData` (modes "full" and "sampled").

Videos are generated in NumPy (no files, no TensorFlow): 12 train and 6 test videos of
widely varying lengths (9-16 and 33-40 frames) at config.data.crop_size pixels, 4 classes,
each showing a class-coloured square for a few frames. What the real pipeline does, in small:

* mode "full": every frame (after data.frame_stride / data.max_frames); videos grouped in
  length buckets (lengths rounded up to a multiple of model.chunk_size); a step holds
  max(1, data.frames_per_device // bucket) videos per device; training shuffles the videos
  and the order of the steps per (seed, epoch), evaluation keeps the order;
* mode "sampled": model.num_clusters frames per video chosen on the host: TSN uniform (or
  model.sampling "dense"), random offsets in training per (seed, epoch, video), centred at
  test; config.train.batch_size (eval.batch_size) videos per global step;
* a global step's slots are split over processes in order (process p gets rows
  p * b .. (p + 1) * b - 1); empty slots have batch_mask False; training flips a video
  horizontally per (seed, epoch, video).

`STEP_LOG` (per process) records (split, mode, epoch, step, shape, video indices) of every
step read, for tests that check what the trainer asked for; the same is logged as
"FAKE_DATA_STEP {json}" lines for tests that run the trainer in other processes.
"""

from __future__ import annotations

import json
import math
from typing import Iterator

import jax
import numpy as np
from absl import logging

CLASS_NAMES = ("red_square", "green_disc", "blue_triangle", "yellow_cross")
_COLOURS = ((230, 30, 30), (30, 210, 40), (40, 60, 240), (240, 220, 20))
LENGTHS = {
    "train": (9, 16, 12, 38, 14, 10, 33, 15, 40, 11, 13, 36),
    "test": (16, 35, 10, 40, 13, 37),
}
MODES = ("full", "sampled")
STEP_LOG: list[tuple] = []


def dataset_info(data_config) -> dict:
    del data_config
    return {
        "num_classes": len(CLASS_NAMES),
        "class_names": list(CLASS_NAMES),
        "num_examples": {split: len(lengths) for split, lengths in LENGTHS.items()},
    }


def label_of(split: str, index: int) -> int:
    return (index * 3 + (split == "test")) % len(CLASS_NAMES)


def video(config, split: str, index: int) -> np.ndarray:
    """uint8 (L, S, S, 3) frames of a video after data.frame_stride and data.max_frames."""
    size = config.data.crop_size
    n = LENGTHS[split][index]
    rng = np.random.default_rng([split == "test", index])
    frames = rng.integers(0, 80, (n, size, size, 3), dtype=np.uint8)
    start = int(rng.integers(0, n - 3))
    y, x = rng.integers(0, size // 2, 2)
    frames[start : start + 3, y : y + size // 2, x : x + size // 2] = _COLOURS[
        label_of(split, index)
    ]
    frames = frames[:: config.data.frame_stride]
    if config.data.max_frames > 0:
        frames = frames[: config.data.max_frames]
    return frames


def num_frames(config, split: str, index: int) -> int:
    n = math.ceil(LENGTHS[split][index] / config.data.frame_stride)
    return min(n, config.data.max_frames) if config.data.max_frames > 0 else n


def sampled_indices(config, length: int, rng: np.random.Generator | None) -> np.ndarray:
    """K frame indices by the model's rule: TSN uniform (or dense), random offsets given
    `rng`, centred without."""
    k = config.model.num_clusters
    if config.model.sampling == "dense":
        span = (k - 1) * config.model.dense_stride + 1
        room = max(length - span, 0)
        first = int(rng.integers(0, room + 1)) if rng is not None else room // 2
        return np.minimum(first + np.arange(k) * config.model.dense_stride, length - 1)
    u = rng.uniform(size=k) if rng is not None else np.full(k, 0.5)
    return np.minimum(np.floor((np.arange(k) + u) * length / k), length - 1).astype(np.int64)


def _layout(process_index, process_count, local_device_count):
    return (
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
        jax.local_device_count() if local_device_count is None else local_device_count,
    )


class _Data:
    _train: bool

    def __init__(self, config, split, process_index, process_count, local_device_count):
        self._config = config
        self._split = split
        self._pi, self._pc, self._ld = _layout(process_index, process_count, local_device_count)
        self._n = len(LENGTHS[split])

    def _plan(self, mode: str, epoch: int) -> list[tuple[int, np.ndarray]]:
        """[(padded length, global slots (video index, -1 empty))] of every step."""
        c = self._config
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rng = np.random.default_rng([c.seed, epoch, 7]) if self._train else None
        order = rng.permutation(self._n) if rng is not None else np.arange(self._n)
        steps = []
        if mode == "sampled":
            per_step = c.train.batch_size if self._train else c.eval.batch_size
            for first in range(0, self._n, per_step):
                slots = np.full(per_step, -1)
                chunk = order[first : first + per_step]
                slots[: len(chunk)] = chunk
                steps.append((c.model.num_clusters, slots))
            return steps
        chunk = c.model.chunk_size
        buckets = {}
        for v in order:
            bucket = math.ceil(num_frames(c, self._split, v) / chunk) * chunk
            buckets.setdefault(bucket, []).append(v)
        for bucket in sorted(buckets):
            per_step = self._pc * self._ld * max(1, c.data.frames_per_device // bucket)
            videos = buckets[bucket]
            for first in range(0, len(videos), per_step):
                slots = np.full(per_step, -1)
                slots[: len(videos[first : first + per_step])] = videos[first : first + per_step]
                steps.append((bucket, slots))
        if rng is not None:
            steps = [steps[i] for i in rng.permutation(len(steps))]
        return steps

    def _num_steps(self, mode: str) -> int:
        return len(self._plan(mode, 0))

    def _rows(self, mode: str, epoch: int, step: int, length: int, slots: np.ndarray) -> dict:
        c = self._config
        b = len(slots) // self._pc
        mine = slots[self._pi * b : (self._pi + 1) * b]
        size = c.data.crop_size
        batch = {
            "video": np.zeros((b, length, size, size, 3), np.uint8),
            "mask": np.zeros((b, length), bool),
            "label": np.zeros((b,), np.int32),
            "batch_mask": mine >= 0,
        }
        for row, v in enumerate(mine):
            if v < 0:
                continue
            frames = video(c, self._split, v)
            rng = np.random.default_rng([c.seed, epoch, v]) if self._train else None
            if mode == "sampled":
                frames = frames[sampled_indices(c, len(frames), rng)]
            if rng is not None and c.data.hflip and rng.uniform() < 0.5:
                frames = frames[:, :, ::-1]
            batch["video"][row, : len(frames)] = frames
            batch["mask"][row, : len(frames)] = True
            batch["label"][row] = label_of(self._split, v)
        record = (self._split, mode, epoch, step, batch["video"].shape, tuple(map(int, mine)))
        STEP_LOG.append(record)
        logging.info("FAKE_DATA_STEP %s", json.dumps(record))
        return batch


class TrainData(_Data):
    _train = True

    def __init__(self, config, *, process_index=None, process_count=None, local_device_count=None):
        super().__init__(
            config, config.data.train_split, process_index, process_count, local_device_count
        )

    def steps_per_epoch(self, mode: str) -> int:
        return self._num_steps(mode)

    def iterator(self, mode: str, *, epoch: int, start_step: int = 0) -> Iterator[dict]:
        plan = self._plan(mode, epoch)
        if not 0 <= start_step <= len(plan):
            raise ValueError(f"start_step {start_step} not in [0, {len(plan)}]")
        for step in range(start_step, len(plan)):
            yield self._rows(mode, epoch, step, *plan[step])


class EvalData(_Data):
    _train = False

    def __init__(self, config, *, process_index=None, process_count=None, local_device_count=None):
        super().__init__(
            config, config.data.eval_split, process_index, process_count, local_device_count
        )

    def num_steps(self, mode: str) -> int:
        return self._num_steps(mode)

    def iterator(self, mode: str) -> Iterator[dict]:
        for step, (length, slots) in enumerate(self._plan(mode, 0)):
            yield self._rows(mode, 0, step, length, slots)
