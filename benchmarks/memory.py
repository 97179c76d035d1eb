"""XLA temporary memory of the trainer's training step vs. video length T, and the plan an
activation budget chooses per T.

For each T, compiles (lower + compile only: nothing is allocated or run) the trainer's own
training step (`fva_jax.training.experiment.jitted_train_steps`: the config's optax chain, the mesh
shardings; forward + backward + update; batch of --batch-size videos) and prints
``compiled.memory_analysis().temp_size_in_bytes`` for

  (a) the full-video model with the memory-flat plan forced (model.plan="recompute": two
      passes, chunked, rematerialised),
  (b) model.plan="unchunked" (every frame's stem activations kept for the backward pass, as
      the original release), and with --keep-stem also model.plan="keep_stem" (pass 1's stem
      outputs kept in the compute dtype),
  (c) the uniform step: K host-chosen frames per video (independent of T; compiled once).

It also prints, per T, the plan that model.plan="auto" takes under --activation-budget-mb
(-1: the default of the device this runs on) and the estimates it chose from
(`fva_jax.models.full_video.choose_plan`; traced from shapes, nothing compiled).

Arguments and inputs are not temporaries: the uint8 video itself (T*H*W*3 bytes) is an input.

    python benchmarks/memory.py --model resnet50 --resolution 224 --num-clusters 16 \
        --frames 256,1024,4096,27000 --skip-unchunked-above 1024

Last line: one JSON object {"frames", "full_video_temp_bytes", "unchunked_temp_bytes",
"uniform_temp_bytes", "keep_stem_temp_bytes", "chosen_plan", "plan_estimates_bytes",
"activation_budget_bytes", ...settings}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import trainer_step  # noqa: E402  (benchmarks/trainer_step.py)

from fva_jax.models.full_video import choose_plan  # noqa: E402
from fva_jax.training import experiment  # noqa: E402


def temp_bytes(run, mode: str, frames: int, args) -> int:
    """Temporary bytes of the compiled training step of `run` in data `mode` at T=frames."""
    t0 = time.time()
    state = trainer_step.abstract_state(run)
    batch = trainer_step.abstract_batch(run, args.batch_size, frames, args.resolution)
    compiled = experiment.jitted_train_steps(run)[mode].lower(state, batch).compile()
    out = int(compiled.memory_analysis().temp_size_in_bytes)
    print(f"    compiled in {time.time() - t0:.1f}s", file=sys.stderr)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--num-clusters", type=int, default=16)
    p.add_argument(
        "--frames", default="256,1024,4096,27000", help="comma-separated video lengths T"
    )
    p.add_argument("--width", type=int, default=64, help="base width (64 = torchvision)")
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--skip-unchunked-above",
        type=int,
        default=0,
        help="do not compile the unchunked (or keep_stem) step for T above this (0 = never skip)",
    )
    p.add_argument(
        "--keep-stem", action="store_true", help="also compile plan keep_stem (memory O(T))"
    )
    p.add_argument(
        "--activation-budget-mb",
        type=float,
        default=-1.0,
        help="budget of the plan choice printed per T (-1: this device's default)",
    )
    p.add_argument(
        "--fast-compile",
        action="store_true",
        help="config.fast_compile (XLA backend optimisation level 0; buffer sizes are decided "
        "before it): for smoke tests",
    )
    args = p.parse_args(argv)
    frames = [int(f) for f in args.frames.split(",")]

    def make_run(plan):
        return trainer_step.run_from_args(args, plan)

    runs = {plan: make_run(plan) for plan in ("auto", "recompute", "unchunked", "keep_stem")}
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {args.model} "
        f"width {args.width}, "
        f"{args.resolution}px, K={args.num_clusters}, chunk {args.chunk_size}, "
        f"batch {args.batch_size}, {args.dtype}; the trainer's step "
        f"({runs['auto'].config.optim.name} optax chain)"
    )

    def skipped(t):
        return bool(args.skip_unchunked_above) and t > args.skip_unchunked_above

    full, unchunked, kept, choices = [], [], [], []
    for t in frames:
        print(f"T={t}", file=sys.stderr)
        shape = (args.batch_size, t, args.resolution, args.resolution, 3)
        choices.append(choose_plan(runs["auto"].models["full"], shape))
        full.append(temp_bytes(runs["recompute"], "full", t, args))
        unchunked.append(None if skipped(t) else temp_bytes(runs["unchunked"], "full", t, args))
        if args.keep_stem:
            kept.append(None if skipped(t) else temp_bytes(runs["keep_stem"], "full", t, args))
    uni = temp_bytes(runs["auto"], "sampled", args.num_clusters, args)

    def mib(x):
        return f"{x / 2**20:15.1f}" if x is not None else f"{'skipped':>15}"

    print(
        f"{'T':>8} {'full-video MiB':>15} {'unchunked MiB':>15}"
        + (f" {'keep_stem MiB':>15}" if args.keep_stem else "")
        + f" {'uniform MiB':>12}"
    )
    for i, t in enumerate(frames):
        print(
            f"{t:>8} {mib(full[i])} {mib(unchunked[i])}"
            + (f" {mib(kept[i])}" if args.keep_stem else "")
            + f" {uni / 2**20:12.1f}"
        )
    print(
        f"full-video (recompute) growth {frames[0]}->{frames[-1]} frames: "
        f"{full[-1] / full[0]:.3f}x; full-video / uniform at T={frames[-1]}: {full[-1] / uni:.2f}x"
    )
    budget = choices[0]
    print(
        f"plan chosen by model.plan='auto' (budget {budget.budget_bytes / 2**20:.0f} MiB, "
        f"{budget.budget_source}; estimates per device):"
    )
    for t, c in zip(frames, choices):
        est = ", ".join(f"{p} {b / 2**20:.1f}" for p, b in c.estimates.items())
        print(f"{t:>8} {c.plan:>10}   ({est} MiB)")
    print(
        json.dumps(
            {
                "frames": frames,
                "full_video_temp_bytes": full,
                "unchunked_temp_bytes": unchunked,
                "uniform_temp_bytes": uni,
                "keep_stem_temp_bytes": kept if args.keep_stem else None,
                "chosen_plan": [c.plan for c in choices],
                "plan_estimates_bytes": [c.estimates for c in choices],
                "activation_budget_bytes": budget.budget_bytes,
                "model": args.model,
                "resolution": args.resolution,
                "num_clusters": args.num_clusters,
                "width": args.width,
                "chunk_size": args.chunk_size,
                "batch_size": args.batch_size,
                "dtype": args.dtype,
                "device": jax.devices()[0].device_kind,
            }
        )
    )


if __name__ == "__main__":
    main()
