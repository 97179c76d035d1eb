"""XLA temporary memory of one training step vs. video length T.

For each T, compiles (lower + compile only: nothing is allocated or run) one training step,
the trainer's own ``fva_jax.steps.train_step`` (forward + backward + update) with plain SGD,
batch of one video, and prints
``compiled.memory_analysis().temp_size_in_bytes`` for

  (a) the full-video model (sampling="cluster": two passes, chunked, rematerialised),
  (b) the same math without chunking or rematerialisation (``FullVideoModel.unchunked``:
      every frame's stem activations kept for the backward pass, as the original release),
  (c) uniform sampling of K frames (independent of T; compiled once, at the largest T).

Arguments and inputs are not temporaries: the uint8 video itself (T*H*W*3 bytes) is an input.

    python benchmarks/memory.py --model resnet50 --resolution 224 --num-clusters 16 \
        --frames 256,1024,4096,27000

Last line: one JSON object {"frames", "full_video_temp_bytes", "unchunked_temp_bytes",
"uniform_temp_bytes", ...settings}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from fva_jax import steps  # noqa: E402
from fva_jax.models.full_video import FullVideoModel  # noqa: E402

LEARNING_RATE = 0.01
SGD = optax.sgd(LEARNING_RATE)


def sgd_train_step(model, method=None):
    """fva_jax.steps.train_step with plain SGD: (TrainState, batch) -> (TrainState, metrics).
    method: a FullVideoModel method to train instead of __call__ (e.g. "unchunked")."""
    return functools.partial(
        steps.train_step,
        model=model,
        tx=SGD,
        schedule=optax.constant_schedule(LEARNING_RATE),
        method=method,
    )


def sgd_state(variables) -> steps.TrainState:
    """A TrainState at step 0 holding `variables` (works on abstract ones under eval_shape)."""
    return steps.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=SGD.init(variables["params"]),
        rng=jax.random.PRNGKey(1),
    )


def make_batch(videos, mask, labels) -> dict:
    """The trainer's batch dict; every video real (batch_mask all True)."""
    return {
        "video": videos,
        "mask": mask,
        "label": labels,
        "batch_mask": jnp.ones(labels.shape, bool),
    }


def compiled_step(model, frames, resolution, batch, method=None):
    """Lowers and compiles one training step on abstract inputs; returns the Compiled object."""
    videos = jax.ShapeDtypeStruct((batch, frames, resolution, resolution, 3), jnp.uint8)
    mask = jax.ShapeDtypeStruct((batch, frames), jnp.bool_)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    variables = jax.eval_shape(
        lambda v, m: model.init({"params": jax.random.key(0)}, v, m, train=False), videos, mask
    )
    state = jax.eval_shape(sgd_state, variables)
    inputs = {
        "video": videos,
        "mask": mask,
        "label": labels,
        "batch_mask": jax.ShapeDtypeStruct((batch,), jnp.bool_),
    }
    return jax.jit(sgd_train_step(model, method)).lower(state, inputs).compile()


def temp_bytes(model, frames, resolution, batch, method=None) -> int:
    t0 = time.time()
    compiled = compiled_step(model, frames, resolution, batch, method)
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
        help="do not compile the unchunked step for T above this (0 = never skip)",
    )
    args = p.parse_args(argv)
    frames = [int(f) for f in args.frames.split(",")]
    common = dict(
        num_classes=100,
        backbone=args.model,
        width=args.width,
        num_clusters=args.num_clusters,
        chunk_size=args.chunk_size,
        dtype=jnp.dtype(args.dtype),
    )
    cluster = FullVideoModel(sampling="cluster", **common)
    uniform = FullVideoModel(sampling="uniform", **common)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {args.model} "
        f"width {args.width}, "
        f"{args.resolution}px, K={args.num_clusters}, chunk {args.chunk_size}, "
        f"batch {args.batch_size}, {args.dtype}"
    )
    full, unchunked = [], []
    for t in frames:
        print(f"T={t}", file=sys.stderr)
        full.append(temp_bytes(cluster, t, args.resolution, args.batch_size))
        if args.skip_unchunked_above and t > args.skip_unchunked_above:
            unchunked.append(None)
        else:
            unchunked.append(
                temp_bytes(cluster, t, args.resolution, args.batch_size, method="unchunked")
            )
    uni = temp_bytes(uniform, frames[-1], args.resolution, args.batch_size)
    print(f"{'T':>8} {'full-video MiB':>15} {'unchunked MiB':>15} {'uniform MiB':>12}")
    for t, f, u in zip(frames, full, unchunked):
        us = f"{u / 2**20:15.1f}" if u is not None else f"{'skipped':>15}"
        print(f"{t:>8} {f / 2**20:15.1f} {us} {uni / 2**20:12.1f}")
    print(
        f"full-video growth {frames[0]}->{frames[-1]} frames: {full[-1] / full[0]:.3f}x; "
        f"full-video / uniform at T={frames[-1]}: {full[-1] / uni:.2f}x"
    )
    print(
        json.dumps(
            {
                "frames": frames,
                "full_video_temp_bytes": full,
                "unchunked_temp_bytes": unchunked,
                "uniform_temp_bytes": uni,
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
