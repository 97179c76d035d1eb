"""Frames/s of the trainer end to end (data pipeline included) vs. its training step alone.

Two phases on the same config, the same steps (shapes, masks) and the same jitted steps:

  trainer    `fva_jax.training.train.train_and_evaluate` itself (Grain workers reading, decoding and
             augmenting whole videos, the batches put on the devices ahead of the step, the
             metrics, the TensorBoard writer), stopped after step N (before the final
             evaluation, through its `on_step` hook);
  step only  `experiment.jitted_train_steps` on the same sequence of step shapes and frame
             masks, the batches already on the devices (one video array per shape); run
             twice, dispatched ahead and waiting for each step, the faster counted.

Frames/s count the real frames of steps W+1..N (padding excluded; the padded rate is printed
too). W, the warm-up, is at least --warmup-steps and covers the first step of every shape, so
no compilation falls in the window; the trainer logs (a device sync) every W steps, which
places a sync at both ends of the window; N = W + at least --steps, a multiple of W.
The trainer runs first; it compiles every shape through JAX's persistent compilation cache
(config.compilation_cache_dir, or JAX_COMPILATION_CACHE_DIR), which the step-only phase then
reads. The run's own schedule (config.train.num_train_steps / epochs) is kept, so the
compiled steps are the same as those of `python -m fva_jax.main` with that config and cache.

    python benchmarks/train_throughput.py --config=configs/long_synthetic.py \
        --workdir=/tmp/fva_throughput --set data.data_dir=/data/tfds
    python benchmarks/train_throughput.py --config=configs/long_synthetic.py --steps 8 \
        --warmup-steps 4 --workdir=/tmp/x --set data.builder_config=long_tiny \
        --set model.backbone=resnet18 --set model.width=8 --set data.crop_size=32 \
        --set data.resize_short=32 --set data.frames_per_device=512 --set model.dtype=float32

Last line: one JSON object {"trainer_frames_per_s", "step_only_frames_per_s",
"trainer_over_step_only", "steps", "real_frames", "padded_frames", "shapes", "plans", ...}.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fva_jax import config_lib  # noqa: E402
from fva_jax.data import pipeline  # noqa: E402
from fva_jax.models.full_video import FullVideoModel, choose_plan  # noqa: E402
from fva_jax.training import experiment, train


class _WindowEnd(Exception):
    """Raised from the trainer's on_step hook after the last timed step."""


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, e.g. data.builder_config=long_tiny


def load_config(path: str, overrides) -> config_lib.ml_collections.ConfigDict:
    config = config_lib.load_config_file(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: use --set group.field=value")
        config_lib.check_overrides([f"--config.{key}={value}"])
        group, _, field = key.rpartition(".")
        node = config
        for part in group.split(".") if group else []:
            node = node[part]
        node[field] = _parse_value(value)
    config.eval.every_steps = 0
    return config


def step_sequence(run: experiment.Run, count: int):
    """(mode, (b, L), this process's row lengths, real frames of all processes) of the
    first `count` training steps, from the data's batch plans (no video is read)."""
    out = []
    lengths = run.train_data.lengths
    for epoch in run.plan.epochs:
        plan = run.train_data.plan(epoch.mode, epoch.index)
        for i in range(epoch.num_steps):
            if len(out) == count:
                return out
            if epoch.mode == "full":
                big_l = int(plan.lengths[i])
                rows = plan.rows(i, jax.process_index())
                row_lengths = np.where(rows >= 0, np.minimum(lengths[rows], big_l), 0)
                real = int(np.minimum(lengths[plan.slots[i][plan.slots[i] >= 0]], big_l).sum())
            else:
                big_l = int(run.config.model.num_clusters)
                rows = plan.rows(i, jax.process_index())
                row_lengths = np.where(rows >= 0, big_l, 0)
                real = int((plan.slots[i] >= 0).sum()) * big_l
            out.append((epoch.mode, (len(rows), big_l), row_lengths, real))
    return out


def step_only(run: experiment.Run, sequence, first: int, sync_each: bool) -> float:
    """Seconds for steps first+1..len(sequence) of `sequence` with batches already on the
    devices (steps 1..first run before, untimed). One video array per shape; masks, labels
    and batch masks per step, as the plan has them. sync_each: wait for every step before
    dispatching the next (on a CPU, dispatching far ahead competes with the step itself for
    the cores; on an accelerator it only adds the launch gap)."""
    crop = int(run.config.data.crop_size)
    rng = np.random.default_rng(0)

    def put(x):
        return jax.make_array_from_process_local_data(run.batch_sharding, x)

    videos, batches = {}, []
    for mode, (b, big_l), row_lengths, _ in sequence:
        if (mode, b, big_l) not in videos:
            frames = rng.integers(0, 256, (b, big_l, crop, crop, 3), np.uint8)
            videos[(mode, b, big_l)] = put(frames)
        batch = {
            "video": videos[(mode, b, big_l)],
            "mask": put(np.arange(big_l)[None] < row_lengths[:, None]),
            "label": put(rng.integers(0, run.num_classes, (b,)).astype(np.int32)),
            "batch_mask": put(row_lengths > 0),
            # The trainer's batches carry a loss weight (its value does not change the speed).
            "weight": put(experiment.video_loss_weights(row_lengths > 0, max(len(row_lengths), 1))),
        }
        batches.append((mode, batch))
    jax.block_until_ready(batches)
    steps = experiment.jitted_train_steps(run)
    state = experiment.init_state(run)
    for mode, batch in batches[:first]:
        state, metrics = steps[mode](state, batch)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for mode, batch in batches[first:]:
        state, metrics = steps[mode](state, batch)
        if sync_each:
            jax.block_until_ready((state, metrics))
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - t0


def window(shapes, warmup_steps: int, steps: int) -> tuple[int, int]:
    """(W, N): W >= warmup_steps covers the first step of every shape among steps 1..N, and
    N = W * (1 + ceil(steps / W)) (trainer syncs every W steps land on both ends)."""
    warmup = warmup_steps
    while True:
        last = warmup * (1 + math.ceil(steps / warmup))
        seen = shapes[:last]
        first_of_each = max(seen.index(s) for s in set(seen)) + 1
        if first_of_each <= warmup:
            return warmup, last
        warmup = first_of_each


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/long_synthetic.py", help="a configs/*.py file")
    p.add_argument("--workdir", required=True, help="emptied first; holds the trainer's run")
    p.add_argument("--steps", type=int, default=48, help="timed steps (at least)")
    p.add_argument("--warmup-steps", type=int, default=8, help="untimed steps first (at least)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GROUP.FIELD=VALUE",
        help="config override, as --config.GROUP.FIELD=VALUE of fva_jax.main (repeatable)",
    )
    args = p.parse_args(argv)
    # Every compiled step goes to the persistent cache, however fast it compiled.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    config = load_config(args.config, args.set)
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    trainer_dir = os.path.join(args.workdir, "trainer")
    if not config.compilation_cache_dir:
        config.compilation_cache_dir = os.path.join(args.workdir, "compilation_cache")

    run = experiment.make_run(config, trainer_dir, pipeline, FullVideoModel, training=True)
    total = run.plan.total_steps
    sequence = step_sequence(run, total)
    shapes = [(mode, shape) for mode, shape, _, _ in sequence]
    warmup, last = window(shapes, max(1, args.warmup_steps), max(1, args.steps))
    if last >= total:
        raise SystemExit(
            f"{last} steps needed (warm-up {warmup}, the first step of every shape included, "
            f"+ >= {args.steps} timed, a multiple of the warm-up) but the config trains "
            f"{total}: raise config.train.num_train_steps or lower --steps / --warmup-steps"
        )
    sequence = sequence[:last]
    timed = sequence[warmup:]
    real = sum(s[3] for s in timed)
    padded = sum(b * big_l * jax.process_count() for _, (b, big_l), _, _ in timed)
    mesh_batch = {s: (s[1][0] * jax.process_count(),) + s[1][1:] for s in set(shapes[:last])}
    crop = int(config.data.crop_size)
    plans = {
        f"{mode} {b}x{big_l}": (
            choose_plan(run.models[mode], (b, big_l, crop, crop, 3)).plan
            if run.models[mode].sampling == "cluster"
            else run.models[mode].sampling
        )
        for (mode, _), (b, big_l) in sorted(mesh_batch.items())
    }
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); "
        f"{config.data.name}/{config.data.builder_config}, {config.model.backbone} width "
        f"{config.model.width}, {crop}px, {config.model.dtype}, K={config.model.num_clusters}; "
        f"{config.data.num_workers} data workers; steps {warmup + 1}..{last} timed "
        f"({len(timed)} steps, {real} real / {padded} padded frames)"
    )
    print("step shapes (global videos x padded frames) and plans: " + json.dumps(plans))

    # --- the trainer itself
    config.train.log_every_steps = warmup
    marks = {}

    def on_step(step):
        if step in (warmup, last):
            marks[step] = time.perf_counter()
        if step == last:
            raise _WindowEnd

    t_start = time.perf_counter()
    try:
        train.train_and_evaluate(config, trainer_dir, on_step=on_step)
    except _WindowEnd:
        pass
    trainer_s = marks[last] - marks[warmup]
    startup_s = marks[warmup] - t_start
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")

    # --- the step alone, the same steps
    # Dispatched ahead as JAX does, and waiting for each step: the faster counts, so the
    # ratio to the trainer is the conservative one.
    with train.compilation_cache_for(config, args.workdir):
        repeats = [step_only(run, sequence, warmup, sync_each) for sync_each in (False, True)]
    step_s = min(repeats)

    trainer_fps, step_fps = real / trainer_s, real / step_s
    print(f"{'phase':>10} {'seconds':>9} {'frames/s':>10} {'padded frames/s':>16}")
    print(f"{'trainer':>10} {trainer_s:9.2f} {trainer_fps:10.0f} {padded / trainer_s:16.0f}")
    print(f"{'step only':>10} {step_s:9.2f} {step_fps:10.0f} {padded / step_s:16.0f}")
    print(
        f"trainer / step only: {trainer_fps / step_fps:.3f} (the trainer's first {warmup} steps, "
        f"start-up and compilation included, took {startup_s:.1f} s)"
    )
    if peak is not None:
        print(f"peak device memory after the trainer: {peak / 2**30:.2f} GiB")
    out = {
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "config": args.config,
        "overrides": args.set,
        "trainer_frames_per_s": trainer_fps,
        "step_only_frames_per_s": step_fps,
        "trainer_over_step_only": trainer_fps / step_fps,
        "trainer_seconds": trainer_s,
        "step_only_seconds": step_s,
        "step_only_seconds_async_and_synced": repeats,
        "startup_seconds": startup_s,
        "steps": len(timed),
        "first_timed_step": warmup + 1,
        "real_frames": real,
        "padded_frames": padded,
        "plans": plans,
        "peak_bytes_in_use": peak,
        "num_workers": int(config.data.num_workers),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
