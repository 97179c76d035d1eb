"""Input pipeline: whole videos from TFDS ArrayRecord files, planned globally, read by Grain.

`dataset_info(config.data)`, and `TrainData` / `EvalData` (one per process): the data API the
trainer reads (fva_jax/training/train.py; tests pass a fake with the same names). Besides the
batches, the trainer reads `TrainData.steps_per_epoch(mode)` and `TrainData.plan(mode, epoch)`
(its slots give the epoch's number of real videos, which sets every video's loss weight).

No TensorFlow: records are read at random through ArrayRecord (the files TFDS's
`data_source` reads; `records.py`), parsed with TFDS's own `tf_example_pb2` protos, and their
JPEG frames decoded with simplejpeg, cropped and resized with OpenCV, all in NumPy
(`frames.py`). (Building a data set that is not built yet may import TensorFlow; reading
never does.)

Steps come from a batch plan (`batch_plan.py`), a pure function of (seed, epoch, the videos'
lengths from the build-time frame index, process count, devices per process, frame budget,
chunk size, buckets), so every process runs the same global shape (b, L) at every step and
reads only the videos of its own rows:

* mode "full": every frame after `data.frame_stride` and `data.max_frames` (0 = no cap);
  videos grouped by length into buckets (multiples of `model.chunk_size`), each step holding
  `max(1, data.frames_per_device // L)` videos per device, padded to the bucket length L.
* mode "sampled": exactly K = `model.num_clusters` frames per video, chosen on the host with
  the model's own rule (`frames.py`: TSN uniform, or dense). Only those K frames are decoded.
  Global videos per step: `train.batch_size` (training), `eval.batch_size` (evaluation).

Batches are dicts of NumPy arrays, this process's rows (b = local devices x videos per
device):
  video      uint8 (b, L, crop_size, crop_size, 3), zero past each video's end
  mask       bool  (b, L)   True on real frames (a prefix of each row)
  label      int32 (b,)
  batch_mask bool  (b,)     False on empty slots (all of whose frames are zero and masked)
  index      int32 (b,)     the dataset index of each row's video (-1 on empty slots): the
                            position in the split of the video_id of the record actually read,
                            checked against the plan (a mismatch is a DataError). Host-only:
                            the trainer does not send it to the devices.

Augmentation (`frames.py`): one TSN multi-scale crop and flip per video in training, the
centre crop at evaluation; all randomness is a function of (config.seed, epoch, video index).

Reading (`streams.py`): a Grain `MapDataset` over the steps, each element one step of this
process, computed in `data.num_workers` worker processes (0 = in this process) with
`data.prefetch` steps buffered ahead. No shuffle buffer holds videos: at most
`streams.max_steps_in_memory` steps exist at once, each at most local devices x
max(frames_per_device, longest bucket) frames. A training stream runs on across epoch
boundaries (workers started once, steps of the next epoch prefetched), as long as the epochs
are read in order.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from fva_jax import config_lib
from fva_jax.data import batch_plan, builders, frames, records, streams
from fva_jax.data.frames import DataError

MODES = ("full", "sampled")
# A training stream covers this many epochs ahead of its start; iterators beyond it restart.
_STREAM_EPOCHS = 100_000


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
        self._records = records.Records(split)
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
            "index": np.full((b,), -1, np.int32),
        }
        for r, video in enumerate(rows):
            if video < 0:
                continue
            n, index = self._read_video(int(video), epoch, batch["video"][r])
            batch["mask"][r, :n] = True
            batch["label"][r] = self._split.labels[index]
            batch["index"][r] = index
        return batch

    def _read_video(self, video: int, epoch: int, out: np.ndarray) -> tuple[int, int]:
        """Decodes the selected frames of planned video `video` into out[:n]; returns n and
        the dataset index of the record read (its video_id looked up in the split), which
        must be `video`."""
        split = self._split
        video_id = split.video_ids[video]
        where = split.where(video)
        ex = records.parse_record(self._records[video])
        try:
            records.check_video(ex["video_id"], ex["num_frames"], len(ex["video"]), where)
        except records.BadVideoError as e:
            raise DataError(str(e)) from None
        index = split.index_of(ex["video_id"])
        if index != video:
            listed = (
                f"which the frame index lists as video {index}"
                if index >= 0
                else "which the frame index of this split does not list"
            )
            raise DataError(
                f"video {video_id!r} in {where} of split {split.name!r}: the plan reads it as "
                f"video {video}, but the record holds {ex['video_id']!r}, {listed}: the files "
                "changed after frame_index.json was written, or come from another build. "
                "Delete frame_index.json beside them to have it rewritten, or rebuild the data "
                "set (python -m fva_jax.data.build)"
            )
        indexed = int(split.num_frames[video])
        if ex["num_frames"] != indexed:
            raise DataError(
                f"video {video_id!r} in {where}: the frame index says {indexed} frames of "
                f"{video_id!r}, the record holds {ex['num_frames']} frames of "
                f"{ex['video_id']!r}: the files changed after the index was written. Delete "
                f"frame_index.json beside them to have it rewritten, or rebuild the data set"
            )
        n = frames.read_frames(
            ex["video"],
            indexed,
            self._settings,
            self._spec.mode,
            train=self._train,
            epoch=epoch,
            video=video,
            out=out,
            name=f"video {video_id!r} in {where}",
        )
        return n, index


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
        self._split = records.Split.open(builder, split)
        if not len(self._split.num_frames):
            raise config_lib.ConfigError(
                f"split {split!r} of {builder.name}/{builder.builder_config.name} is empty"
            )
        self._settings = frames.VideoSettings.of(config)
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
        self._stream: streams.Stream | None = None

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
            stream = streams.Stream(
                mode,
                epoch,
                self._reader(mode, epoch),
                start_step,
                steps * _STREAM_EPOCHS,
                d.num_workers,
                d.prefetch,
            )
            self._stream = stream
        return streams.EpochIterator(stream, steps - start_step)

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
        stream = streams.Stream(mode, 0, self._reader(mode, 0), 0, steps, d.num_workers, d.prefetch)
        return streams.EpochIterator(stream, steps, on_end=stream.close)
