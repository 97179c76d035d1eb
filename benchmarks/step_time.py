"""Wall time and FLOPs of one training step: sampling="cluster" vs "uniform" vs "dense".

Compiles one training step (fva_jax.steps.train_step with plain SGD: forward + backward +
update) per sampling on the same batch
of whole videos (plus "unchunked": the clustered math in one piece, no scan, no remat), then
times them interleaved (round robin, median of --steps runs each), so load on a shared
machine hits all three alike. Times are reported as ratios to uniform; on an
accelerator the absolute milliseconds are printed too (the device is named).

FLOPs come from XLA's ``compiled.cost_analysis()``. XLA counts the body of a while loop
(``jax.lax.scan``) once, not once per iteration, so for the chunked cluster model the figure
is built from loop-free pieces: FLOPs of the unchunked step (same math, no scan) + 2 x the
stem's forward FLOPs on all frames (pass 1 and the recomputation in the backward pass).
The raw (undercounted) figure is printed alongside.

On XLA:CPU, convolution gradients inside a while loop (the scan of pass 2) run several times
slower than the same ops outside a loop (jax-ml/jax#12868: a 3x3 conv's filter gradient
~11x slower here), so the cluster/unchunked time ratio on CPU overstates the cost of the
two passes; compare on an accelerator.

    python benchmarks/step_time.py --model resnet18 --width 16 --resolution 64 --frames 128
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from memory import make_batch, sgd_state, sgd_train_step  # noqa: E402  (benchmarks/memory.py)

from fva_jax.models.full_video import FullVideoModel  # noqa: E402
from fva_jax.models.resnet import normalize_images  # noqa: E402


def flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--frames", type=int, default=128, help="frames per video (all valid)")
    p.add_argument("--num-clusters", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument(
        "--steps", type=int, default=5, help="timed steps per sampling (after one warm-up)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)

    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({jax.default_backend()}), {args.model} width {args.width}, "
        f"{args.resolution}px, T={args.frames}, K={args.num_clusters}, chunk {args.chunk_size}, "
        f"batch {args.batch_size}, {args.dtype}"
    )
    common = dict(
        num_classes=100,
        backbone=args.model,
        width=args.width,
        num_clusters=args.num_clusters,
        chunk_size=args.chunk_size,
        dtype=jnp.dtype(args.dtype),
    )
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.frames, args.resolution, args.resolution, 3)
    videos = jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8))
    mask = jnp.ones(shape[:2], bool)
    labels = jnp.asarray(rng.integers(0, 100, (args.batch_size,)), jnp.int32)
    batch = make_batch(videos, mask, labels)

    models = {s: FullVideoModel(sampling=s, **common) for s in ("cluster", "uniform", "dense")}
    variables = jax.jit(
        lambda v, m: models["cluster"].init({"params": jax.random.key(0)}, v, m, train=False)
    )(videos, mask)
    state = sgd_state(variables)
    steps, fl = {}, {}
    for name, model in models.items():
        t0 = time.time()
        steps[name] = jax.jit(sgd_train_step(model)).lower(state, batch).compile()
        fl[name] = flops(steps[name])
        print(f"  compiled {name} in {time.time() - t0:.1f}s", file=sys.stderr)
    raw_cluster = fl["cluster"]
    unchunked = (
        jax.jit(sgd_train_step(models["cluster"], "unchunked")).lower(state, batch).compile()
    )
    stem_fwd = (
        jax.jit(
            lambda vs, v: models["cluster"].apply(
                vs,
                normalize_images(v.reshape((-1,) + v.shape[2:]), common["dtype"]),
                method=lambda m, x: m.stem(x, use_running_average=True),
            )
        )
        .lower(variables, videos)
        .compile()
    )
    fl["cluster"] = flops(unchunked) + 2 * flops(stem_fwd)
    # The same clustered math without chunks or rematerialisation (memory O(T)): shows what the
    # two passes and the scan cost in time.
    steps["unchunked"], fl["unchunked"] = unchunked, flops(unchunked)

    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        jax.block_until_ready(step(state, batch))
    for _ in range(args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(state, batch))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    accel = jax.default_backend() != "cpu"
    print(
        f"{'sampling':>9} {'time/uniform':>13} {'GFLOPs':>9} {'FLOPs/uniform':>14}"
        + ("   ms/step" if accel else "")
    )
    for name in steps:
        line = (
            f"{name:>9} {med[name] / med['uniform']:13.2f} {fl[name] / 1e9:9.2f} "
            f"{fl[name] / fl['uniform']:14.2f}"
        )
        print(line + (f" {1e3 * med[name]:9.1f}" if accel else ""))
    print(
        f"(cluster raw cost_analysis, scan bodies counted once: {raw_cluster / 1e9:.2f} GFLOPs; "
        f"unchunked step {flops(unchunked) / 1e9:.2f}, "
        f"stem forward on all frames {flops(stem_fwd) / 1e9:.2f})"
    )
    out = {
        "device": dev.device_kind,
        "sampling": list(steps),
        "time_ratio_to_uniform": [med[n] / med["uniform"] for n in steps],
        "flops": [fl[n] for n in steps],
        "frames": args.frames,
        "num_clusters": args.num_clusters,
        "resolution": args.resolution,
        "model": args.model,
        "width": args.width,
        "batch_size": args.batch_size,
    }
    if accel:
        out["ms_per_step"] = [1e3 * med[n] for n in steps]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
