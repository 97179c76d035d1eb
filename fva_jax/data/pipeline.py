"""tf.data input pipeline: whole videos from TFDS, padded to max_frames with a frame mask.

Per video: stored JPEG frames -> temporal stride -> cap at max_frames -> crop (train:
TSN multi-scale crop + optional horizontal flip, one crop for all frames of a video;
test: centre crop) decoded with `decode_and_crop_jpeg` and resized to crop_size, so only
the cropped region of the kept frames is ever decoded -> pad to max_frames.

Geometry follows TSN: frames are (conceptually) resized so the shorter side is
`resize_short`; at test the centre `crop_size` square is taken; in training a crop of
(scale_h * short, scale_w * short), scales from `crop_scales` with |i - j| <= 1 as in
TSN's GroupMultiScaleCrop, is taken at a random position and resized to `crop_size`.
Crops are computed in stored-frame coordinates (the same fraction of the shorter side),
which makes the intermediate resize unnecessary.

Batches are dicts of NumPy arrays:
  video      uint8 (b, max_frames, crop_size, crop_size, 3)
  mask       bool  (b, max_frames)   True on real frames
  label      int32 (b,)
  batch_mask bool  (b,)             False on eval padding examples

Determinism and resuming: the training order of epoch e is fixed by (seed, e, host):
files and the shuffle buffer use seed-derived seeds, augmentation uses stateless random
ops keyed by (seed, epoch, position in the epoch). `TrainIterator.get_state()` records
(epoch, examples consumed); resuming rebuilds that epoch and skips the consumed records
before they are decoded.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from fva_jax.data import builders

# TensorFlow only feeds the host; keep it off accelerators so JAX owns them.
try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # already initialised / no such device type
    pass

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-order

_FIELDS = (
    "name",
    "builder_config",
    "data_dir",
    "manual_dir",
    "train_split",
    "eval_split",
    "max_frames",
    "frame_stride",
    "resize_short",
    "crop_size",
    "crop_scales",
    "hflip",
    "shuffle_buffer",
    "skip_corrupt",
)


# --------------------------------------------------------------------------- config


def _check_config(cfg) -> None:
    missing = [f for f in _FIELDS if not hasattr(cfg, f)]
    if missing:
        raise ValueError(f"config.data lacks fields {missing}")
    for f in ("max_frames", "frame_stride", "resize_short", "crop_size"):
        if int(getattr(cfg, f)) < 1:
            raise ValueError(f"config.data.{f} must be >= 1, got {getattr(cfg, f)}")
    if cfg.crop_size > cfg.resize_short:
        raise ValueError(
            f"config.data.crop_size ({cfg.crop_size}) must not exceed "
            f"config.data.resize_short ({cfg.resize_short})"
        )
    scales = tuple(cfg.crop_scales)
    if not scales or not all(0 < s <= 1 for s in scales):
        raise ValueError(f"config.data.crop_scales must be non-empty, in (0, 1], got {scales}")


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def get_builder(cfg):
    """The prepared TFDS builder of config.data (built from manual_dir if needed)."""
    b = builders.get_builder(
        cfg.name, cfg.builder_config, cfg.data_dir, skip_corrupt=bool(cfg.skip_corrupt)
    )
    builders.prepare(b, cfg.manual_dir)
    return b


def dataset_info(data_config) -> dict:
    """dict(num_classes, class_names, num_examples={split: int}) of the configured set."""
    _check_config(data_config)
    b = get_builder(data_config)
    label = b.info.features["label"]
    return dict(
        num_classes=label.num_classes,
        class_names=list(label.names),
        num_examples={k: v.num_examples for k, v in b.info.splits.items()},
    )


def _seed(*parts) -> int:
    """A 31-bit seed derived from integers (stable across processes)."""
    return zlib.crc32(np.asarray(parts, np.int64).tobytes()) & 0x7FFFFFFF


# --------------------------------------------------------------------------- per video


def _tsn_scale_pairs(scales):
    """(scale_h, scale_w) pairs of TSN's GroupMultiScaleCrop with max_distort=1."""
    n = len(scales)
    return [(scales[i], scales[j]) for i in range(n) for j in range(n) if abs(i - j) <= 1]


def _crop_window(h, w, cfg, train: bool, seed):
    """[y, x, ch, cw] int32 crop window in a stored (h, w) frame, and whether to flip."""
    short = tf.cast(tf.minimum(h, w), tf.float32)
    if train:
        pairs = tf.constant(_tsn_scale_pairs(tuple(cfg.crop_scales)), tf.float32)
        u = tf.random.stateless_uniform([4], seed=seed)
        k = tf.minimum(tf.cast(u[0] * len(pairs), tf.int32), len(pairs) - 1)
        ch = tf.cast(tf.round(pairs[k, 0] * short), tf.int32)
        cw = tf.cast(tf.round(pairs[k, 1] * short), tf.int32)
        ch, cw = tf.clip_by_value(ch, 1, h), tf.clip_by_value(cw, 1, w)
        y = tf.minimum(tf.cast(u[1] * tf.cast(h - ch + 1, tf.float32), tf.int32), h - ch)
        x = tf.minimum(tf.cast(u[2] * tf.cast(w - cw + 1, tf.float32), tf.int32), w - cw)
        flip = tf.logical_and(tf.constant(bool(cfg.hflip)), u[3] < 0.5)
    else:
        c = tf.cast(tf.round(short * cfg.crop_size / cfg.resize_short), tf.int32)
        c = tf.clip_by_value(c, 1, tf.minimum(h, w))
        ch = cw = c
        y, x = (h - c) // 2, (w - c) // 2
        flip = tf.constant(False)
    return tf.stack([y, x, ch, cw]), flip


def preprocess(ex, cfg, train: bool, seed=None) -> dict:
    """One stored example -> padded, cropped video, mask, label (tf ops, see module doc).

    Args:
      ex: {"video": tf.string (N,) encoded JPEG frames, "label": int scalar}.
      cfg: config.data (frame_stride, max_frames, crop_size, resize_short, crop_scales,
        hflip).
      train: multi-scale crop + flip (train) or centre crop (test).
      seed: int64 (2,) stateless seed of this example's augmentation (train only).

    Returns:
      video uint8 (max_frames, crop, crop, 3), mask bool (max_frames,), label int32,
      batch_mask True.
    """
    frames = ex["video"][:: cfg.frame_stride][: cfg.max_frames]  # encoded JPEGs (n,)
    n = tf.shape(frames)[0]
    tf.debugging.assert_positive(n, message="video without frames")
    shape = tf.io.extract_jpeg_shape(frames[0])  # header only, no decode
    window, flip = _crop_window(shape[0], shape[1], cfg, train, seed)
    size = cfg.crop_size

    same_size = tf.logical_and(tf.equal(window[2], size), tf.equal(window[3], size))

    def resize(img):
        img = tf.image.resize(img, [size, size], method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)

    def decode(jpeg):
        img = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3)
        # Skip the resize when the crop already has the output size (common at test).
        img = tf.cond(same_size, lambda: tf.ensure_shape(img, [size, size, 3]), lambda: resize(img))
        # Per frame with tf.reverse: a reversed strided slice of the whole video is ~7x slower.
        return tf.cond(flip, lambda: tf.reverse(img, [1]), lambda: img)

    # Frame by frame: only the crop window is decoded and the peak is the output clip
    # (measured a little faster than resizing the whole clip in one op as well).
    video = tf.map_fn(
        decode,
        frames,
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
        parallel_iterations=16,
    )
    video = tf.pad(video, [[0, cfg.max_frames - n], [0, 0], [0, 0], [0, 0]])
    video = tf.ensure_shape(video, [cfg.max_frames, size, size, 3])
    return {
        "video": video,
        "mask": tf.range(cfg.max_frames) < n,
        "label": tf.cast(ex["label"], tf.int32),
        "batch_mask": tf.constant(True),
    }


def _read(builder, split, *, shuffle_files: bool, file_seed: int | None):
    read_config = tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False)
    options = tf.data.Options()
    options.deterministic = True
    read_config.options = options
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        read_config=read_config,
        decoders={"video": tfds.decode.SkipDecoding()},
    )


# --------------------------------------------------------------------------- train


class TrainIterator(Iterator[dict]):
    """Infinite, deterministic, resumable iterator over training batches of this host."""

    def __init__(
        self,
        data_config,
        *,
        batch_size: int,
        seed: int,
        state: dict | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        _check_config(data_config)
        self._cfg = data_config
        self._bs = int(batch_size)
        self._seed = int(seed)
        self._pi, self._pc = _process(process_index, process_count)
        self._builder = get_builder(data_config)
        self._split = tfds.split_for_jax_process(
            data_config.train_split,
            process_index=self._pi,
            process_count=self._pc,
            drop_remainder=True,
        )  # equal slices: every host makes the same number of steps
        self._num_examples = self._builder.info.splits[self._split].num_examples
        if self._num_examples < self._bs:
            raise ValueError(
                f"{data_config.name}/{data_config.train_split}: this host's slice has "
                f"{self._num_examples} examples, fewer than the per-host batch size {self._bs}"
            )
        self._epoch, self._consumed = 0, 0
        if state is not None:
            self._restore(state)
        self._it = None

    @property
    def batches_per_epoch(self) -> int:
        return self._num_examples // self._bs

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position: pass as `state=` to resume at the next batch."""
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "examples_in_epoch": self._consumed,
            "process_count": self._pc,
        }

    def _restore(self, state):
        if int(state["seed"]) != self._seed:
            raise ValueError(
                f"iterator state was saved with seed {state['seed']}, "
                f"resuming with seed {self._seed}"
            )
        if int(state["process_count"]) != self._pc:
            logging.warning(
                "input state saved with %s processes, resuming with %s: the order "
                "of the resumed epoch differs",
                state["process_count"],
                self._pc,
            )
        self._epoch = int(state["epoch"])
        self._consumed = int(state["examples_in_epoch"])

    def _epoch_dataset(self) -> tf.data.Dataset:
        cfg, e = self._cfg, self._epoch
        ds = _read(
            self._builder,
            self._split,
            shuffle_files=True,
            file_seed=_seed(self._seed, e, self._pi, 0),
        )
        if cfg.shuffle_buffer > 1:
            ds = ds.shuffle(
                cfg.shuffle_buffer,
                seed=_seed(self._seed, e, self._pi, 1),
                reshuffle_each_iteration=False,
            )
        # Position in the epoch keys the augmentation, so skipping keeps it aligned.
        ds = ds.enumerate().skip(self._consumed)
        aug = _seed(self._seed, e, self._pi, 2)
        ds = ds.map(
            lambda i, ex: preprocess(ex, cfg, True, tf.stack([tf.constant(aug, tf.int64), i])),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return ds.batch(self._bs, drop_remainder=True).prefetch(2)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_dataset().as_numpy_iterator()
            try:
                batch = next(self._it)
            except StopIteration:
                self._it, self._epoch, self._consumed = None, self._epoch + 1, 0
                continue
            self._consumed += self._bs
            return batch
        raise RuntimeError("training epoch produced no batch")  # excluded by __init__ check


def train_iterator(
    data_config,
    *,
    batch_size: int,
    seed: int,
    state: dict | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Infinite iterator of training batches for this host (see module doc).

    Args:
      data_config: config.data.
      batch_size: per-host batch size.
      seed: fixes the order and augmentation.
      state: a `get_state()` dict to resume from.
      process_index, process_count: default to jax.process_index()/process_count().
    """
    return TrainIterator(
        data_config,
        batch_size=batch_size,
        seed=seed,
        state=state,
        process_index=process_index,
        process_count=process_count,
    )


# --------------------------------------------------------------------------- eval


class EvalIterable:
    """Finite iterable over this host's eval batches; every host yields `len()` batches."""

    def __init__(
        self,
        data_config,
        *,
        batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        _check_config(data_config)
        self._cfg = data_config
        self._bs = int(batch_size)
        pi, pc = _process(process_index, process_count)
        self._builder = get_builder(data_config)
        total = self._builder.info.splits[data_config.eval_split].num_examples
        if total < pc:
            raise ValueError(
                f"eval split {data_config.eval_split!r} has {total} examples, fewer "
                f"than the {pc} processes"
            )
        self._split = tfds.split_for_jax_process(
            data_config.eval_split, process_index=pi, process_count=pc, drop_remainder=False
        )
        self.num_examples = self._builder.info.splits[self._split].num_examples
        # Slices differ by at most one example; all hosts run the same number of batches.
        self.num_batches = math.ceil(math.ceil(total / pc) / self._bs)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        cfg = self._cfg
        ds = _read(self._builder, self._split, shuffle_files=False, file_seed=None)
        ds = ds.map(
            lambda ex: preprocess(ex, cfg, False),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        pad = self.num_batches * self._bs - self.num_examples
        if pad:
            s = cfg.crop_size
            blank = {
                "video": tf.zeros([cfg.max_frames, s, s, 3], tf.uint8),
                "mask": tf.zeros([cfg.max_frames], tf.bool),
                "label": tf.constant(0, tf.int32),
                "batch_mask": tf.constant(False),
            }
            ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
        return ds.batch(self._bs).prefetch(2).as_numpy_iterator()


def eval_iterator(
    data_config,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterable:
    """This host's eval batches: across hosts each eval video exactly once, the rest
    padding with batch_mask False; re-iterable, `len()` batches on every host."""
    return EvalIterable(
        data_config, batch_size=batch_size, process_index=process_index, process_count=process_count
    )
