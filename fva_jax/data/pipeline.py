"""Input pipeline: whole videos from TFDS ArrayRecord files, planned globally, read by Grain.

No TensorFlow: records are read at random through ArrayRecord (the files TFDS's
`data_source` reads), parsed with TFDS's own `tf_example_pb2` protos, and their JPEG frames
decoded with simplejpeg, cropped and resized with OpenCV, all in NumPy. (Building a data set
that is not built yet may import TensorFlow; reading never does.)

Steps come from a batch plan (`batch_plan.py`), a pure function of (seed, epoch, the videos'
lengths from the build-time frame index, process count, devices per process, frame budget,
chunk size, buckets), so every process runs the same global shape (b, L) at every step and
reads only the videos of its own rows:

* mode "full": every frame after `data.frame_stride` and `data.max_frames` (0 = no cap);
  videos grouped by length into buckets (multiples of `model.chunk_size`), each step holding
  `max(1, data.frames_per_device // L)` videos per device, padded to the bucket length L.
* mode "sampled": exactly K = `model.num_clusters` frames per video, chosen here on the host
  with the model's own rule (`model.sampling` "uniform", or "cluster" which warms up with
  uniform; "dense"): TSN uniform = K equal segments of the valid length, a random frame of
  each in training, the centre at test; dense = K frames `model.dense_stride` apart, a random
  start in training, centred at test (identical to models/full_video.py's
  uniform_indices / dense_indices for the same uniforms). Only those K frames are decoded.
  Global videos per step: `train.batch_size` (training), `eval.batch_size` (evaluation).

Batches are dicts of NumPy arrays, this process's rows (b = local devices x videos per
device):
  video      uint8 (b, L, crop_size, crop_size, 3), zero past each video's end
  mask       bool  (b, L)   True on real frames (a prefix of each row)
  label      int32 (b,)
  batch_mask bool  (b,)     False on empty slots (all of whose frames are zero and masked)

Augmentation: training takes one TSN multi-scale crop per video ((scale_h, scale_w) pairs of
`data.crop_scales` with |i - j| <= 1, as TSN's GroupMultiScaleCrop, at a random position)
and flips it horizontally with probability 1/2 (`data.hflip`); evaluation takes the centre
square of side round(short * crop_size / resize_short). Crops are computed on the stored
frames (the same fraction of the shorter side as after resizing it to `resize_short`) and
resized to `crop_size` (OpenCV INTER_AREA when shrinking: antialiased; bilinear when
enlarging). All randomness is a function of (config.seed, epoch, video index).

Reading: a Grain `MapDataset` over the steps, each element one step of this process, computed
in `data.num_workers` worker processes (0 = in this process) with `data.prefetch` steps
buffered ahead. No shuffle buffer holds videos: at most `max_steps_in_memory` steps exist
at once (prefetch + 1 in this process; with workers about prefetch + 2 x num_workers + 1,
at least 4 x num_workers + 1, as Grain buffers each worker's output on both sides), each
at most local devices x max(frames_per_device, longest bucket) frames. A
training stream runs on across epoch boundaries (workers started once, steps of the next
epoch prefetched), as long as the epochs are read in order.

Worker processes ignore SIGTERM and SIGINT: a scheduler that signals the whole process group
(preemption) must not kill them before the trainer has finished its step and checkpoint;
the trainer stops them (`TrainData.close`, the end of an evaluation, or at the latest at
interpreter exit, where workers nobody stopped are killed: multiprocessing's own exit would
send them SIGTERM and wait for them forever).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import signal
import weakref
from typing import Iterator, Sequence

import numpy as np

from fva_jax import config_lib
from fva_jax.data import batch_plan, builders

MODES = ("full", "sampled")
# Random streams derived from (seed, epoch, video): crop/flip, sampled frames.
_CROP_STREAM, _SAMPLE_STREAM = 1, 2
# A training stream covers this many epochs ahead of its start; iterators beyond it restart.
_STREAM_EPOCHS = 100_000


class DataError(ValueError):
    """A stored video cannot be read as indexed (files changed, corrupt frames); the message
    names the video, the file and the reason."""


# --------------------------------------------------------------------------- data set


def get_builder(data_config):
    """The prepared TFDS builder of config.data (built from manual_dir if needed; then its
    frame index written if missing)."""
    b = builders.get_builder(
        data_config.name,
        data_config.builder_config,
        data_config.data_dir,
        skip_corrupt=bool(data_config.skip_corrupt),
    )
    builders.prepare(b, data_config.manual_dir)
    return b


def dataset_info(data_config) -> dict:
    """dict(num_classes, class_names, num_examples={split: int}) of config.data's set."""
    for field in ("name", "builder_config", "data_dir", "manual_dir", "skip_corrupt"):
        if field not in data_config:
            raise config_lib.ConfigError(f"config.data.{field} is missing")
    b = get_builder(data_config)
    label = b.info.features["label"]
    return dict(
        num_classes=label.num_classes,
        class_names=list(label.names),
        num_examples={k: v.num_examples for k, v in b.info.splits.items()},
    )


@dataclasses.dataclass(frozen=True)
class _Split:
    """One split's records: where they are and what the frame index says about them."""

    name: str
    file_instructions: tuple  # TFDS FileInstructions (filename, skip, take, ...)
    num_frames: np.ndarray  # (N,) stored frames per video, data-source order
    labels: np.ndarray  # (N,)
    video_ids: tuple[str, ...]

    @classmethod
    def open(cls, builder, split: str) -> "_Split":
        try:
            instructions = builder.info.splits[split].file_instructions
        except (KeyError, ValueError) as e:
            raise config_lib.ConfigError(
                f"split {split!r} (config.data.train_split / eval_split) is not in "
                f"{builder.name}/{builder.builder_config.name}; it has "
                f"{', '.join(builder.info.splits)} ({e})"
            ) from None
        index = builders.read_frame_index(builder)
        stale = [
            f.filename
            for f in instructions
            if os.path.basename(f.filename) not in index
            or len(index[os.path.basename(f.filename)]["num_frames"]) != f.examples_in_shard
        ]
        if stale:
            logging.warning("frame index of %s is stale (%s); rewriting it", builder.name, stale)
            builders.write_frame_index(builder)
            index = builders.read_frame_index(builder)
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

    def where(self, index: int) -> str:
        """'file (record r)' of a video, for messages."""
        for f in self.file_instructions:
            if index < f.take:
                return f"{f.filename} (record {f.skip + index})"
            index -= f.take
        return "?"


class _Records:
    """Raw records of a split by index; opens its ArrayRecord readers lazily (picklable, so
    every Grain worker opens its own)."""

    def __init__(self, split: _Split):
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


# --------------------------------------------------------------------------- frames & crops


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
class _VideoSettings:
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
    def of(cls, config) -> "_VideoSettings":
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


def _rng(seed: int, epoch: int, video: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, video, stream])


def frame_selection(
    num_stored: int, settings: _VideoSettings, mode: str, *, train: bool, epoch: int, video: int
) -> np.ndarray:
    """Indices of the stored frames a video contributes (in time order)."""
    kept = int(
        batch_plan.effective_lengths([num_stored], settings.frame_stride, settings.max_frames)[0]
    )
    if mode == "full":
        chosen = np.arange(kept, dtype=np.int64)
    else:
        k = settings.num_clusters
        rng = _rng(settings.seed, epoch, video, _SAMPLE_STREAM) if train else None
        if settings.sampling == "uniform":
            u = rng.random(k, dtype=np.float32) if rng is not None else None
            chosen = uniform_indices(kept, k, u)
        else:
            u = rng.random(1, dtype=np.float32) if rng is not None else None
            chosen = dense_indices(kept, k, settings.dense_stride, u)
    return chosen * settings.frame_stride


# --------------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True)
class _PlanSpec:
    """Everything a plan is a function of, except the epoch."""

    mode: str
    lengths: np.ndarray  # effective lengths (full) ; unused for sampled
    shuffle: bool
    seed: int
    process_count: int
    local_device_count: int
    frames_per_device: int
    chunk_size: int
    buckets: tuple
    global_batch: int
    num_frames: int  # K (sampled)
    batch_field: str

    def plan(self, epoch: int) -> batch_plan.Plan:
        if self.mode == "full":
            return batch_plan.full_plan(
                self.lengths,
                seed=self.seed,
                epoch=epoch,
                process_count=self.process_count,
                local_device_count=self.local_device_count,
                frames_per_device=self.frames_per_device,
                chunk_size=self.chunk_size,
                buckets=self.buckets,
                shuffle=self.shuffle,
            )
        return batch_plan.sampled_plan(
            len(self.lengths),
            seed=self.seed,
            epoch=epoch,
            process_count=self.process_count,
            local_device_count=self.local_device_count,
            global_batch=self.global_batch,
            num_frames=self.num_frames,
            shuffle=self.shuffle,
            batch_field=self.batch_field,
        )


class _StepReader:
    """Global step index g -> this process's batch of step g % steps of epoch
    first_epoch + g // steps. Picklable; runs in Grain workers."""

    def __init__(self, split, spec, settings, process_index, first_epoch, train):
        self._split = split
        self._records = _Records(split)
        self._spec = spec
        self._settings = settings
        self._process_index = process_index
        self._first_epoch = first_epoch
        self._train = train
        self._steps = spec.plan(first_epoch).num_steps
        self._plans = {}

    def __getstate__(self):
        return {**self.__dict__, "_plans": {}}

    def _plan(self, epoch: int) -> batch_plan.Plan:
        if epoch not in self._plans:
            if len(self._plans) > 2:  # a worker moves through the epochs in order
                self._plans.pop(min(self._plans))
            self._plans[epoch] = self._spec.plan(epoch)
        return self._plans[epoch]

    def __call__(self, g: int) -> dict:
        epoch, step = self._first_epoch + g // self._steps, g % self._steps
        plan = self._plan(epoch)
        rows = plan.rows(step, self._process_index)
        return self.read_rows(rows, int(plan.lengths[step]), epoch)

    def read_rows(self, rows: np.ndarray, length: int, epoch: int) -> dict:
        s = self._settings.crop_size
        b = len(rows)
        batch = {
            "video": np.zeros((b, length, s, s, 3), np.uint8),
            "mask": np.zeros((b, length), bool),
            "label": np.zeros((b,), np.int32),
            "batch_mask": rows >= 0,
        }
        for r, video in enumerate(rows):
            if video < 0:
                continue
            n = self._read_video(int(video), epoch, batch["video"][r])
            batch["mask"][r, :n] = True
            batch["label"][r] = self._split.labels[video]
        return batch

    def _read_video(self, video: int, epoch: int, out: np.ndarray) -> int:
        """Decodes video `video`'s selected frames into out[:n]; returns n."""
        split, settings = self._split, self._settings
        video_id = split.video_ids[video]
        where = split.where(video)
        ex = builders.parse_record(self._records[video])
        try:
            builders.check_video(ex["video_id"], ex["num_frames"], len(ex["video"]), where)
        except builders.BadVideoError as e:
            raise DataError(str(e)) from None
        indexed = int(split.num_frames[video])
        if ex["video_id"] != video_id or ex["num_frames"] != indexed:
            raise DataError(
                f"video {video_id!r} in {where}: the frame index says {indexed} frames of "
                f"{video_id!r}, the record holds {ex['num_frames']} frames of "
                f"{ex['video_id']!r}: the files changed after the index was written. Delete "
                f"frame_index.json beside them to have it rewritten, or rebuild the data set"
            )
        jpegs = ex["video"]
        chosen = frame_selection(
            indexed, settings, self._spec.mode, train=self._train, epoch=epoch, video=video
        )
        name = f"video {video_id!r} in {where}"
        h, w = jpeg_size(jpegs[0], name)
        if self._train:
            u = _rng(settings.seed, epoch, video, _CROP_STREAM).random(4)
            window, flip = train_crop_window(h, w, settings.crop_scales, settings.hflip, u)
        else:
            window = centre_crop_window(h, w, settings.crop_size, settings.resize_short)
            flip = False
        decode_frames(jpegs, chosen, window, flip, settings.crop_size, out, name)
        return len(chosen)


# --------------------------------------------------------------------------- streams


def _worker_buffer(num_workers: int, prefetch: int) -> int:
    # Grain buffers each worker's steps twice: in the worker's output queue and in the
    # thread that reads that queue in this process; together about `prefetch` steps.
    return max(1, math.ceil(prefetch / (2 * num_workers)))


def max_steps_in_memory(num_workers: int, prefetch: int) -> int:
    """Most steps that exist at once (host memory for videos is this x the largest step).

    In this process (num_workers 0): `prefetch` buffered + the one the consumer holds.
    With Grain workers, per worker: its output queue and the reading thread's buffer in this
    process (buffer b each, about prefetch / 2 / num_workers, at least 1), the step it is
    making and the one the reading thread holds, so num_workers * (2b + 2) + 1 (measured by
    tests/test_pipeline.py::test_steps_in_memory_are_bounded); at least 4 * num_workers + 1.
    """
    if num_workers > 0:
        return num_workers * (2 * _worker_buffer(num_workers, prefetch) + 2) + 1
    return prefetch + 1


def _grain_iterator(reader, start: int, stop: int, num_workers: int, prefetch: int):
    """A Grain iterator over reader(start), ..., reader(stop - 1), in order."""
    import grain  # pylint: disable=g-import-not-at-top

    ds = grain.MapDataset.range(start, stop).map(reader)
    if num_workers > 0:
        from absl import flags  # pylint: disable=g-import-not-at-top

        # Grain's multiprocessing reads absl flags (with defaults) outside absl.app too.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers compute their steps one at a time (no threads, no read-ahead inside a
        # worker); about `prefetch` steps wait in buffers (see max_steps_in_memory).
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers,
                per_worker_buffer_size=_worker_buffer(num_workers, prefetch),
            ),
            worker_init_fn=_worker_ignores_termination,
        )
    else:
        # In this process: one background thread reads `prefetch` steps ahead (0: none).
        threads = 1 if prefetch > 0 else 0
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        )
    return iter(ds)


def _worker_ignores_termination(worker_index: int, worker_count: int) -> None:
    """In each Grain worker process, first: SIGTERM / SIGINT sent to the whole process group
    (a preemption notice, Ctrl-C) are left to the trainer, which stops its workers itself."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


# Finalizers of the streams with worker processes; `_stop_workers_at_exit` runs the live ones.
_WORKER_STREAMS: set = set()


def _stop_workers_at_exit() -> None:
    """At interpreter exit, before multiprocessing's own exit handler (which sends worker
    processes SIGTERM, which ours ignore, and then waits for them without a timeout): stops
    the streams still open, then kills any Grain worker process left."""
    import multiprocessing  # pylint: disable=g-import-not-at-top

    for finalizer in list(_WORKER_STREAMS):
        finalizer()
    for process in multiprocessing.active_children():
        if process.name.startswith("grain-"):
            process.kill()
            process.join(timeout=10)


class _Stream:
    """A running Grain iterator over consecutive global steps, with where it stands."""

    def __init__(self, mode, first_epoch, reader, start, stop, num_workers, prefetch):
        self.mode, self.first_epoch = mode, first_epoch
        self.position = start  # next global step, counted from first_epoch's step 0
        self.stop = stop
        self._iterator = _grain_iterator(reader, start, stop, num_workers, prefetch)
        self._finalizer = weakref.finalize(self, _close, self._iterator)
        if num_workers > 0:
            # (Re)registered after multiprocessing's exit handler (Grain imported it), so it
            # runs before that one: atexit runs the last registered first.
            atexit.unregister(_stop_workers_at_exit)
            atexit.register(_stop_workers_at_exit)
            for dead in [f for f in _WORKER_STREAMS if not f.alive]:
                _WORKER_STREAMS.discard(dead)
            _WORKER_STREAMS.add(self._finalizer)

    def next(self) -> dict:
        batch = next(self._iterator)
        self.position += 1
        return batch

    def close(self) -> None:
        self._finalizer()


class _EpochIterator(Iterator[dict]):
    """`count` steps of a stream, then StopIteration (the stream stays open for the next
    epoch's iterator)."""

    def __init__(self, stream: _Stream, count: int, on_end=None):
        self._stream, self._left, self._on_end = stream, count, on_end

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._left <= 0:
            if self._on_end is not None:
                self._on_end()
                self._on_end = None
            raise StopIteration
        self._left -= 1
        return self._stream.next()


# --------------------------------------------------------------------------- public API


def _layout(process_index, process_count, local_device_count) -> tuple[int, int, int]:
    if process_index is None or process_count is None or local_device_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if local_device_count is None:
            local_device_count = jax.local_device_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if local_device_count < 1:
        raise ValueError(f"local_device_count must be >= 1, got {local_device_count}")
    return int(process_index), int(process_count), int(local_device_count)


class _Data:
    """Shared part of TrainData and EvalData: one split, its lengths, plans and reader."""

    _train: bool

    def __init__(self, config, split, process_index, process_count, local_device_count):
        config_lib.validate_config(config)
        self._config = config
        self._pi, self._pc, self._ld = _layout(process_index, process_count, local_device_count)
        builder = get_builder(config.data)
        self._split = _Split.open(builder, split)
        if not len(self._split.num_frames):
            raise config_lib.ConfigError(
                f"split {split!r} of {builder.name}/{builder.builder_config.name} is empty"
            )
        self._settings = _VideoSettings.of(config)
        d = config.data
        self._lengths = batch_plan.effective_lengths(
            self._split.num_frames, d.frame_stride, d.max_frames
        )
        try:
            self._buckets = batch_plan.buckets_for(
                self._lengths,
                chunk_size=config.model.chunk_size,
                max_buckets=d.max_buckets,
                bucket_lengths=tuple(d.bucket_lengths),
                num_devices=self._pc * self._ld,
                frames_per_device=d.frames_per_device,
            )
        except batch_plan.PlanError as e:
            raise config_lib.ConfigError(str(e)) from None
        self._specs = {}

    @property
    def num_examples(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) frames each video contributes in mode "full" (after stride and cap)."""
        return self._lengths

    @property
    def labels(self) -> np.ndarray:
        return self._split.labels

    @property
    def video_ids(self) -> tuple[str, ...]:
        return self._split.video_ids

    @property
    def buckets(self) -> tuple[int, ...]:
        """Padded lengths of the full-video steps."""
        return self._buckets

    def _spec(self, mode: str) -> _PlanSpec:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in self._specs:
            c = self._config
            batch_field = "config.train.batch_size" if self._train else "config.eval.batch_size"
            spec = _PlanSpec(
                mode=mode,
                lengths=self._lengths,
                shuffle=self._train,
                seed=int(c.seed),
                process_count=self._pc,
                local_device_count=self._ld,
                frames_per_device=int(c.data.frames_per_device),
                chunk_size=int(c.model.chunk_size),
                buckets=self._buckets,
                global_batch=int(c.train.batch_size if self._train else c.eval.batch_size),
                num_frames=int(c.model.num_clusters),
                batch_field=batch_field,
            )
            try:
                spec.plan(0)
            except batch_plan.PlanError as e:
                raise config_lib.ConfigError(str(e)) from None
            self._specs[mode] = spec
        return self._specs[mode]

    def plan(self, mode: str, epoch: int = 0) -> batch_plan.Plan:
        """The global plan of `epoch` in `mode` (the same on every process)."""
        return self._spec(mode).plan(epoch)

    def _reader(self, mode: str, first_epoch: int) -> _StepReader:
        return _StepReader(
            self._split, self._spec(mode), self._settings, self._pi, first_epoch, self._train
        )


class TrainData(_Data):
    """Training steps of this process (see the module docstring).

    Args:
      config: the whole experiment ConfigDict (config.seed, data, model, train).
      process_index, process_count, local_device_count: default to JAX's.
    """

    _train = True

    def __init__(self, config, *, process_index=None, process_count=None, local_device_count=None):
        super().__init__(
            config, config.data.train_split, process_index, process_count, local_device_count
        )
        self._stream: _Stream | None = None

    def steps_per_epoch(self, mode: str) -> int:
        """Global steps of one epoch in `mode`: the same every epoch and on every process."""
        return self.plan(mode, 0).num_steps

    def iterator(self, mode: str, *, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """This process's rows of global steps start_step, start_step + 1, ... of `epoch`,
        then StopIteration. Iterating epochs in order keeps one Grain stream running."""
        steps = self.steps_per_epoch(mode)
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step {start_step} not in [0, {steps}] for mode {mode!r}")
        stream = self._stream
        if (
            stream is None
            or stream.mode != mode
            or stream.position != (epoch - stream.first_epoch) * steps + start_step
        ):
            self.close()
            d = self._config.data
            stream = _Stream(
                mode,
                epoch,
                self._reader(mode, epoch),
                start_step,
                steps * _STREAM_EPOCHS,
                d.num_workers,
                d.prefetch,
            )
            self._stream = stream
        return _EpochIterator(stream, steps - start_step)

    def close(self) -> None:
        """Stops the Grain workers (also done when the object is garbage collected)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class EvalData(_Data):
    """Evaluation steps of this process: every video of config.data.eval_split exactly once
    over all processes, whole (mode "full") or as K frames (mode "sampled"); the remaining
    slots are empty (batch_mask False)."""

    _train = False

    def __init__(self, config, *, process_index=None, process_count=None, local_device_count=None):
        super().__init__(
            config, config.data.eval_split, process_index, process_count, local_device_count
        )

    def num_steps(self, mode: str) -> int:
        return self.plan(mode, 0).num_steps

    def iterator(self, mode: str) -> Iterator[dict]:
        """This process's rows of every evaluation step, in order."""
        steps = self.num_steps(mode)
        d = self._config.data
        stream = _Stream(mode, 0, self._reader(mode, 0), 0, steps, d.num_workers, d.prefetch)
        return _EpochIterator(stream, steps, on_end=stream.close)
