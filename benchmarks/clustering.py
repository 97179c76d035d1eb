"""Throughput of the frame clustering: sign bits in JAX vs float cosine in JAX vs NumPy.

    python benchmarks/clustering.py [--frames 512 4096] [--features 2048 802816]
        [--num-clusters 16] [--repeats 5] [--max-gb 2.0]

For every (T frames, F features per frame) it times, side by side in one run:
  sign-bit (JAX)   jitted `clustering.cluster`: sign bits -> Hamming distances of
                   consecutive frames (popcount of uint32 words) -> cumulative segments,
                   starting from float32 activations;
  cosine (JAX)     the same segmentation on float cosine distances 1 - cos(x_t, x_t+1);
  sign-bit (NumPy) a NumPy reference of the sign-bit clustering (np.packbits,
                   np.bitwise_count, the same cumulative rule);
and, for information, the sign-bit distances + segments from already packed bits
(what the model's two-pass training keeps per chunk: F/8 bytes per frame).

frames/s = T / best time of --repeats runs (the JSON has the median too).
Effective GB/s = the bytes of the method's input (T*F*4 of float32 activations;
T*ceil(F/8) for the packed-bits row) / best time:
the least traffic any implementation of that row needs. Ratios are relative to the
NumPy reference measured in the same run. The activations are synthetic post-ReLU
features with scene changes, generated on the device frame by frame.

Sizes whose float32 activations exceed --max-gb are skipped and listed (R-50 stage 1
at 224 px is F = 802,816; T=4096 of it is 13 GB). The full grid needs --max-gb 14 and
about 13 GB of accelerator memory plus ~20 GB of host memory (the NumPy copy and its
temporaries). The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fva_jax import clustering

# ---------------------------------------------------------------------------
# inputs


def make_activations(num_frames: int, num_features: int, num_scenes: int = 8, seed: int = 0):
    """float32 (T, F) post-ReLU activations: scene base + per-frame noise, built on device."""
    key_base, key_noise = jax.random.split(jax.random.PRNGKey(seed))
    scene_len = max(1, num_frames // num_scenes)

    @jax.jit
    def build():
        bases = jax.random.normal(key_base, (num_scenes, num_features), jnp.float32)

        def frame(t):  # one frame at a time: no (T, F) temporaries besides the output
            noise = jax.random.normal(
                jax.random.fold_in(key_noise, t), (num_features,), jnp.float32
            )
            return jax.nn.relu(bases[jnp.minimum(t // scene_len, num_scenes - 1)] + 0.3 * noise)

        return jax.lax.map(frame, jnp.arange(num_frames), batch_size=min(64, num_frames))

    return build()


# ---------------------------------------------------------------------------
# the three implementations


def consecutive_dots(x: jax.Array, chunk_bytes: int | None = None) -> jax.Array:
    """dot(x[t], x[t+1]) for t < T-1.

    chunk_bytes=None is the plain `jnp.sum(x[:-1] * x[1:], -1)` (used on GPU/TPU).
    XLA:CPU (jax 0.10) runs that fused shifted-slice reduction ~5-10x slower than
    the same reduction over two separate arrays, so on CPU the float baseline
    reads c frames (and the c frames one step later) per step with dynamic
    slices, c * F * 4 ~ chunk_bytes, which keeps the comparison fair.
    """
    if chunk_bytes is None:
        return jnp.sum(x[:-1] * x[1:], axis=-1)
    num_frames, num_features = x.shape
    pairs = num_frames - 1
    c = int(max(1, min(pairs, chunk_bytes // (4 * num_features))))
    starts = np.minimum(np.arange(0, pairs, c), pairs - c)  # the last chunk overlaps

    def chunk(start):
        a = jax.lax.dynamic_slice_in_dim(x, start, c)
        b = jax.lax.dynamic_slice_in_dim(x, start + 1, c)
        return jnp.einsum("tf,tf->t", a, b)

    dots = jax.lax.map(chunk, jnp.asarray(starts))  # (chunks, c)
    positions = (starts[:, None] + np.arange(c)).reshape(-1)
    return jnp.zeros((pairs,), x.dtype).at[positions].set(dots.reshape(-1))


def cosine_clustering(x: jax.Array, num_clusters: int, chunk_bytes: int | None = None) -> jax.Array:
    """Cumulative segments on float cosine distances 1 - cos(x_t, x_t+1), in JAX."""
    norms = jnp.sqrt(jnp.sum(x * x, axis=-1))
    cos = consecutive_dots(x, chunk_bytes) / jnp.maximum(norms[:-1] * norms[1:], 1e-12)
    d = jnp.concatenate([jnp.clip(1.0 - cos, 0.0, 1.0), jnp.zeros((1,), cos.dtype)])
    return clustering.cumulative_segments(d, num_clusters)


def default_cosine_chunk_bytes() -> int | None:
    return 4 << 20 if jax.default_backend() == "cpu" else None


def numpy_cumulative(d: np.ndarray, k: int) -> np.ndarray:
    """The documented cumulative rule (paper cut + fix-up) for one unpadded sequence."""
    n = d.shape[0]
    m = min(k, n)
    cs = np.cumsum(np.maximum(d[:-1], 0), dtype=np.float32)
    c = np.concatenate([[0.0], cs]).astype(np.float32)
    total = c[-1]
    j = np.arange(k)
    if total > 0:
        starts = np.searchsorted(c * k, j * total, side="left")  # #frames with K*c < j*D
    else:
        starts = (j * n) // m
    gap = np.clip(starts - j, 0, n - m)
    gap[0] = 0
    starts = np.maximum.accumulate(gap) + j
    ids = np.searchsorted(starts[1:m], np.arange(n), side="right")
    return ids.astype(np.int32)


def numpy_sign_bit_clustering(x: np.ndarray, num_clusters: int) -> np.ndarray:
    bits = np.packbits(x > 0, axis=-1)
    pad = (-bits.shape[-1]) % 8  # popcount on uint64 words
    if pad:
        bits = np.pad(bits, [(0, 0), (0, pad)])
    words = bits.view(np.uint64)
    counts = np.bitwise_count(words[:-1] ^ words[1:]).sum(axis=-1, dtype=np.int64)
    d = np.concatenate([counts / np.float32(x.shape[-1]), [0.0]]).astype(np.float32)
    return numpy_cumulative(d, num_clusters)


# ---------------------------------------------------------------------------
# timing


def best_seconds(fn, repeats: int) -> tuple[float, float]:
    """(best, median) wall time of `repeats` runs after one warm-up (compile) run.

    The figures use the best run: on a shared machine other processes only ever
    add time, so the minimum is the most reproducible estimate.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def run_size(num_frames: int, num_features: int, args) -> list[dict]:
    k = args.num_clusters
    x = make_activations(num_frames, num_features)
    x.block_until_ready()
    float_bytes = num_frames * num_features * 4
    bits_bytes = num_frames * -(-num_features // 8)

    sign_fn = jax.jit(lambda a: clustering.cluster(a, k))
    cos_fn = jax.jit(lambda a: cosine_clustering(a, k, default_cosine_chunk_bytes()))
    bits = jax.jit(clustering.sign_bits)(x).block_until_ready()
    from_bits_fn = jax.jit(
        lambda b: clustering.cumulative_segments(
            clustering.hamming_distances(b, num_features=num_features), k
        )
    )

    rows = []

    def add(name, fn, nbytes):
        seconds, median = best_seconds(fn, args.repeats)
        rows.append(
            dict(
                frames=num_frames,
                features=num_features,
                method=name,
                seconds=seconds,
                median_seconds=median,
                frames_per_s=num_frames / seconds,
                gb_per_s=nbytes / seconds / 1e9,
                segments=np.asarray(fn()),
            )
        )

    add("sign-bit (JAX)", lambda a=x: sign_fn(a).block_until_ready(), float_bytes)
    add("cosine (JAX)", lambda a=x: cos_fn(a).block_until_ready(), float_bytes)
    add(
        "sign-bit from packed bits (JAX)",
        lambda b=bits: from_bits_fn(b).block_until_ready(),
        bits_bytes,
    )
    del bits
    x_host = np.asarray(x)
    del x
    add("sign-bit (NumPy)", lambda: numpy_sign_bit_clustering(x_host, k), float_bytes)

    reference = rows[-1]
    for row in rows:
        row["speedup_vs_numpy"] = reference["seconds"] / row["seconds"]
        # A check, not a figure: the sign-bit rows must agree with the reference
        # (cosine distances are a different measure; None there).
        same = np.array_equal(row["segments"], reference["segments"])
        row["same_segments_as_numpy"] = None if row["method"].startswith("cosine") else bool(same)
    for row in rows:
        del row["segments"]
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, nargs="+", default=[512, 4096], help="T values")
    parser.add_argument("--features", type=int, nargs="+", default=[2048, 802816], help="F values")
    parser.add_argument("--num-clusters", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (best)")
    parser.add_argument(
        "--max-gb",
        type=float,
        default=2.0,
        help="skip sizes whose float32 activations exceed this many GB "
        "(T=4096 x F=802816 needs 13 GB on the device and again on the host)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    print(
        f"device: {device.platform} {device.device_kind} x{jax.device_count()}, "
        f"K={args.num_clusters}, best of {args.repeats} runs; cosine dots "
        f"{'chunked (XLA:CPU)' if default_cosine_chunk_bytes() else 'fused'}"
    )
    header = (
        f"{'T':>5} {'F':>8}  {'method':<32} {'ms':>10} {'frames/s':>12} {'GB/s':>8} "
        f"{'x NumPy':>8}  same segments"
    )
    print(header)
    results, skipped = [], []
    for num_frames in args.frames:
        for num_features in args.features:
            gb = num_frames * num_features * 4 / 1e9
            if gb > args.max_gb:
                skipped.append(dict(frames=num_frames, features=num_features, gb=round(gb, 2)))
                print(
                    f"{num_frames:>5} {num_features:>8}  skipped: {gb:.1f} GB of float32 "
                    f"activations > --max-gb {args.max_gb}"
                )
                continue
            for row in run_size(num_frames, num_features, args):
                results.append(row)
                print(
                    f"{num_frames:>5} {num_features:>8}  {row['method']:<32} "
                    f"{row['seconds'] * 1e3:>10.2f} {row['frames_per_s']:>12.0f} "
                    f"{row['gb_per_s']:>8.2f} {row['speedup_vs_numpy']:>8.2f}  "
                    f"{row['same_segments_as_numpy']}",
                    flush=True,
                )
    print(
        json.dumps(
            dict(
                device=f"{device.platform} {device.device_kind}",
                num_clusters=args.num_clusters,
                repeats=args.repeats,
                results=results,
                skipped=skipped,
            )
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
