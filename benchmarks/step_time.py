"""Wall time, frames/s and MFU of the trainer's own training step, by sampling and memory plan.

What is timed is what `fva_jax.training.train` runs: the config's optimizer
(`fva_jax.training.optim`: the paper's SGD recipe with clipping, weight decay, momentum and
classifier learning-rate multipliers), `fva_jax.training.steps.train_step` jitted with the
trainer's mesh shardings and state donation (`fva_jax.training.experiment.make_run` +
`jitted_train_steps`), on batches already on the devices. Rows:

  cluster    the full-video step (mode "full") with model.plan="auto": the plan the budget
             (--activation-budget-mb; -1 = the device's default) chooses for this shape;
  uniform    the sampled step (mode "sampled": K host-chosen frames per video, B videos),
             the baseline of the ratios (sampling "dense" trains with the same step);
  unchunked, keep_stem, recompute
             the full-video step with the plan forced (--plans); the row of the chosen plan
             is the same program as "cluster" and shares its timing.

Steps are timed interleaved (round robin, median of --steps runs each, after one warm-up),
so load on a shared machine hits every row alike; the state is threaded from step to step
as in the trainer.

FLOPs are counted per layer from shapes (`fva_jax.models.flops`: convolutions and dense
layers, forward + backward, the plan's recomputation included), not taken from XLA's
`cost_analysis()`, which on a GPU does not count cuDNN convolutions and counts a scan body
once; its figure is printed alongside for reference. MFU = model FLOPs (the math without
recomputation) / time / the chip's peak (a table of known chips, or --peak-tflops); HFU uses
the FLOPs the plan executes. Frames/s: frames through the stem (B*T full video, B*K uniform).

    python benchmarks/step_time.py --model resnet18 --width 8 --resolution 32 --frames 128
    python benchmarks/step_time.py --model resnet50 --width 64 --resolution 224 --frames 256 \
        --num-clusters 16 --batch-size 4 --dtype bfloat16

Last line: one JSON object; lists are per row, in the order of "sampling".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import trainer_step  # noqa: E402  (benchmarks/trainer_step.py)

from fva_jax.models import flops as flop_count  # noqa: E402
from fva_jax.models.full_video import choose_plan  # noqa: E402
from fva_jax.training import experiment  # noqa: E402

FORCED_PLANS = ("unchunked", "keep_stem", "recompute")
# Dense peak TFLOP/s per chip by compute dtype (float32 convolutions run as TF32 on NVIDIA
# tensor cores under XLA's default precision); matched against jax's device_kind.
PEAK_TFLOPS = (
    ("H100", {"bfloat16": 989.0, "float32": 494.7}),
    ("H200", {"bfloat16": 989.0, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0}),
)


def peak_flops(device_kind: str, dtype: str, override_tflops: float) -> float | None:
    """The chip's peak FLOP/s for `dtype`, or None where unknown (e.g. CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, peaks in PEAK_TFLOPS:
        if name in device_kind and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


def xla_flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float((ca or {}).get("flops", float("nan")))


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--frames", type=int, default=128, help="frames per video T (all valid)")
    p.add_argument("--num-clusters", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2, help="videos per step, all devices")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--activation-budget-mb",
        type=float,
        default=-1.0,
        help="model.activation_budget_mb for the chosen plan (-1: the device's default)",
    )
    p.add_argument(
        "--plans",
        default=",".join(FORCED_PLANS),
        help="forced plans to time besides the chosen one (comma-separated; '' = none)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="chip peak for MFU (0: known chips)"
    )
    p.add_argument(
        "--fast-compile",
        action="store_true",
        help="config.fast_compile (XLA backend optimisation level 0): for smoke tests only",
    )
    args = p.parse_args(argv)
    forced = [x for x in args.plans.split(",") if x]
    unknown = sorted(set(forced) - set(FORCED_PLANS))
    if unknown:
        p.error(f"--plans: unknown {unknown}; choose from {FORCED_PLANS}")

    dev = jax.devices()[0]

    def make_run(plan):
        return trainer_step.run_from_args(args, plan)

    auto = make_run("auto")
    video_shape = (args.batch_size, args.frames, args.resolution, args.resolution, 3)
    choice = choose_plan(auto.models["full"], video_shape)
    chosen = choice.plan
    runs = {x: make_run(x) for x in forced if x != chosen}
    runs[chosen] = auto  # the "auto" model traces the chosen plan: the same program
    print(
        f"device: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); "
        f"{args.model} width {args.width}, {args.resolution}px, T={args.frames}, "
        f"K={args.num_clusters}, chunk {args.chunk_size}, batch {args.batch_size}, {args.dtype}; "
        f"optimizer {auto.config.optim.name} (the trainer's optax chain)"
    )
    print(f"chosen: {choice.describe()}")

    rng = np.random.default_rng(0)
    batches = {
        "full": trainer_step.random_batch(auto, rng, args.batch_size, args.frames, args.resolution),
        "sampled": trainer_step.random_batch(
            auto, rng, args.batch_size, args.num_clusters, args.resolution
        ),
    }
    state = experiment.init_state(auto)
    # (row name, plan, data mode, run)
    rows = [("cluster", chosen, "full", auto), ("uniform", None, "sampled", auto)]
    rows += [(x, x, "full", runs[x]) for x in forced]
    compiled, temp, counted, model_flops, raw = {}, {}, {}, {}, {}
    for name, plan, mode, run in rows:
        key = (plan, mode)
        if key not in compiled:
            t0 = time.time()
            step_fn = experiment.jitted_train_steps(run)[mode]
            compiled[key] = step_fn.lower(state, batches[mode]).compile()
            print(f"  compiled {name} ({plan or mode}) in {time.time() - t0:.1f}s", file=sys.stderr)
        c = compiled[key]
        mem = c.memory_analysis()
        temp[name] = int(mem.temp_size_in_bytes) if mem is not None else None
        raw[name] = xla_flops(c)
        model = run.models[mode]
        shape = batches[mode]["video"].shape
        f = flop_count.train_step_flops(model, shape, plan)
        counted[name], model_flops[name] = f.total, f.model

    keys = list(dict.fromkeys((plan, mode) for _, plan, mode, _ in rows))
    times = {key: [] for key in keys}
    for key in keys:  # warm-up
        state, _ = compiled[key](state, batches[key[1]])
    jax.block_until_ready(state)
    for _ in range(args.steps):
        for key in keys:
            t0 = time.perf_counter()
            state, metrics = compiled[key](state, batches[key[1]])
            jax.block_until_ready((state, metrics))
            times[key].append(time.perf_counter() - t0)
    med = {name: statistics.median(times[(plan, mode)]) for name, plan, mode, _ in rows}
    frames = {
        name: args.batch_size * (args.frames if mode == "full" else args.num_clusters)
        for name, _, mode, _ in rows
    }
    peak = peak_flops(dev.device_kind, args.dtype, args.peak_tflops)
    peak_total = peak * jax.device_count() if peak else None

    def pct(x):
        return f"{100 * x:5.1f}%" if x is not None else "    -"

    print(
        f"{'row':>9} {'plan':>9} {'time/uniform':>12} {'FLOPs/uniform':>13} {'GFLOPs':>9} "
        f"{'ms':>8} {'frames/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'HFU':>6} {'temp MiB':>9}"
    )
    mfu, hfu = {}, {}
    for name, plan, _, _ in rows:
        t = med[name]
        mfu[name] = model_flops[name] / t / peak_total if peak_total else None
        hfu[name] = counted[name] / t / peak_total if peak_total else None
        mem = f"{temp[name] / 2**20:9.1f}" if temp[name] is not None else f"{'-':>9}"
        print(
            f"{name:>9} {plan or '-':>9} {t / med['uniform']:12.2f} "
            f"{counted[name] / counted['uniform']:13.2f} {counted[name] / 1e9:9.2f} "
            f"{1e3 * t:8.1f} {frames[name] / t:9.0f} {counted[name] / t / 1e12:8.2f} "
            f"{pct(mfu[name])} {pct(hfu[name])} {mem}"
        )
    time_ratio = med["cluster"] / med["uniform"]
    flops_ratio = counted["cluster"] / counted["uniform"]
    print(
        f"cluster ({chosen}): time/uniform {time_ratio:.2f}, FLOPs/uniform {flops_ratio:.2f}: "
        f"{time_ratio / flops_ratio:.2f}x what its FLOPs predict"
    )
    print(
        "(XLA cost_analysis GFLOPs, scan bodies counted once, no cuDNN convolutions on GPU: "
        + ", ".join(f"{n} {raw[n] / 1e9:.2f}" for n, *_ in rows)
        + ")"
    )
    if peak is None:
        print(f"(MFU: no known peak for {dev.device_kind!r}; pass --peak-tflops)")
    stats = dev.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory over the run: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    names = [n for n, *_ in rows]
    out = {
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "sampling": names,
        "plan": [plan for _, plan, _, _ in rows],
        "time_ratio_to_uniform": [med[n] / med["uniform"] for n in names],
        "flops": [counted[n] for n in names],
        "flops_ratio_to_uniform": [counted[n] / counted["uniform"] for n in names],
        "model_flops": [model_flops[n] for n in names],
        "xla_cost_analysis_flops": [raw[n] for n in names],
        "ms_per_step": [1e3 * med[n] for n in names],
        "frames_per_s": [frames[n] / med[n] for n in names],
        "mfu": [mfu[n] for n in names],
        "temp_bytes": [temp[n] for n in names],
        "chosen_plan": chosen,
        "plan_estimates_bytes": choice.estimates,
        "activation_budget_bytes": choice.budget_bytes,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "frames": args.frames,
        "num_clusters": args.num_clusters,
        "resolution": args.resolution,
        "model": args.model,
        "width": args.width,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "dtype": args.dtype,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
