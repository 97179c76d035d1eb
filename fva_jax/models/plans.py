"""The clustered passes of the full-video model under three memory plans, and the choice.

All three compute the same thing from the stem's activations of every frame: segment ids
(sign bits -> windowed Hamming distances -> ``clustering.segmenter(method)``), and the
per-segment float32 sums of the activations, whose gradient hands each member frame its
segment's cotangent. They differ only in what they keep for the backward pass:

``"unchunked"``
    the stem runs on all B*T frames at once and autodiff keeps every frame's stem
    activations (no scan, no rematerialisation): 3 stem-forward equivalents per frame
    (forward, and the backward's two halves). Memory O(T).
``"keep_stem"``
    pass 1 runs the stem chunk by chunk without gradient and keeps its outputs (in their
    dtype: bf16 when the model computes in bfloat16) next to the distances; the
    forward sums are taken from the kept outputs, so pass 2 has no forward. Its backward
    (a ``jax.custom_vjp``) recomputes one chunk's stem with ``jax.vjp`` at a time and
    feeds it the chunk's cotangent gathered from the segment cotangents: 4 stem-forward
    equivalents per frame. Memory O(T) in stem outputs only (R-50 at 224 px, stage 1:
    56*56*256 values, 1.6 MB a frame in bf16), plus one chunk's work.
``"recompute"``
    pass 1 keeps only the distances; pass 2 is a ``jax.lax.scan`` over chunks whose body
    is ``jax.checkpoint``-ed, so the backward recomputes each chunk: 5 stem-forward
    equivalents per frame and memory flat in T (docs/DESIGN.md §2).

In the chunked plans, a chunk whose frames are all padding (for every video of the batch;
videos are padded to length buckets) is skipped with ``jax.lax.cond``: no stem, no
gradient work. The last chunk is read at ``T - chunk`` (overlapping the previous one) and
its frames already seen are masked out, so T need not be a multiple of the chunk size.

The masks here are valid frames then padding (the model's input contract), so every plan
takes the distances with ``clustering.prefix_hamming_distances``, which compares frame
positions directly; ``clustering.hamming_distances`` would first gather the valid frames
to the front, which changes nothing on such masks but costs a gather of the bits (and,
chunk by chunk, could not reach across a hole into the next chunk anyway).

The estimate (`estimate`, bytes per device) comes from shapes, at trace time, for any stem
and trunk (``per_item_bytes``: no formula of a particular network):
  r = bytes the stem's VJP keeps per frame (its residuals, read off
      ``jax.eval_shape`` of ``jax.vjp`` of the stem on 2 frames minus 1 frame),
  o = stem output values per frame, s = bytes of one stem output value (its dtype),
  h = bytes the trunk's VJP keeps per video (K steps, in training), the same way,
  v = videos per device, c = min(chunk_size, T):
    common    = v*h + 2*v*K*o*4                      (head; float32 sums, their cotangent)
    chunk     = v*c*(r + 4*o)                        (one chunk's VJP + float32 cotangent)
    unchunked = v*T*(r + 4*o) + common
    keep_stem = max(v*T*o*s + chunk, chunk + common)  (the kept outputs die before the
                backward, which recomputes from the frames: pass 1 or the backward peaks)
    recompute = chunk + common
Parameters, optimizer state and the input videos are not counted: the budget is for
activations. "auto" takes the first of unchunked, keep_stem, recompute that fits.
Against XLA's ``memory_analysis()`` temporaries of a whole training step on CPU (float32,
K=8, chunk 32, one video): ResNet-50 width 16 at 64 px, unchunked 1.03-1.07x of XLA's
figure at T=32..128 (the per-frame slope within 2 %), recompute 1.35x, keep_stem up to
1.8x (conservative); the tiny ResNet-18 width 8 at 32 px, unchunked 0.5x (XLA:CPU keeps
about twice the residuals of so small a network).

Where the model runs without gradient (``train=False``: evaluation, prediction) nothing is
kept for a backward pass, so the choice takes *forward-only* estimates
(``per_item_bytes(..., forward_only=True)``, ``estimate(..., forward_only=True)``), with
  r = the stem's forward peak per frame: the most bytes live at once while the stem's jaxpr
      runs (values freed after their last use; ``_live_peak_bytes``), as the slope between
      8 and 16 frames (so that no parameter-heavy operation decides it),
  h = the trunk's forward peak per video (K steps, train=False), the same way:
    common    = v*h + v*K*o*4                        (head; one set of float32 sums)
    chunk     = v*c*(r + 4*o)                        (one chunk's stem + float32 copy)
    unchunked = v*T*(r + 4*o) + common               (every frame's stem at once)
    keep_stem = v*T*o*s + chunk + common             (all kept outputs, one chunk's work)
    recompute = chunk + common
A forward's peak is far below a training step's residuals, so long test videos keep a
faster plan than their training steps get under the same budget. Against XLA's temporaries
of ``jax.jit(model.apply, train=False)`` on CPU (float32, K=8, chunk 32, one video, each plan
forced): ResNet-50 width 16 at 64 px, 1.00-1.20x at T=32 and 128; ResNet-18 width 8 at
32 px, 0.94-0.98x, and unchunked 1.5x at T=128.
(The estimates stay in this module, which makes it a little over 500 lines, so that each
plan's formula sits beside the pass it describes and changes with it.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from absl import logging
from jax.extend import core as jax_core

from fva_jax import clustering

PLANS = ("auto", "unchunked", "keep_stem", "recompute")
_FASTEST_FIRST = ("unchunked", "keep_stem", "recompute")
# activation_budget_mb = -1: this fraction of the device's memory (what JAX reports as
# bytes_limit); the rest is left to parameters, optimizer state, the input videos and
# XLA's own temporaries.
DEVICE_MEMORY_FRACTION = 0.6
# ... and where the device reports no memory (CPU): a budget a laptop can afford.
NO_REPORT_BUDGET_MB = 2048.0


def activation_budget_bytes(budget_mb: float) -> tuple[int, str]:
    """(budget in bytes, where it came from) for ``activation_budget_mb``."""
    if budget_mb > 0:
        return int(budget_mb * 2**20), "model.activation_budget_mb"
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        limit = int(stats["bytes_limit"])
        return (
            int(DEVICE_MEMORY_FRACTION * limit),
            f"{DEVICE_MEMORY_FRACTION} of the device's {limit / 2**30:.1f} GiB",
        )
    return int(NO_REPORT_BUDGET_MB * 2**20), "the default for devices that report no memory"


@dataclasses.dataclass(frozen=True)
class PlanChoice:
    """The plan a batch shape gets, and the estimates it was chosen from (bytes per device)."""

    plan: str
    estimates: dict
    budget_bytes: int
    budget_source: str
    videos_per_device: int
    train: bool = True  # False: forward-only estimates (no gradient: evaluation, prediction)

    def describe(self) -> str:
        est = ", ".join(f"{p} {b / 2**20:.1f} MiB" for p, b in self.estimates.items())
        kind = "training step" if self.train else "forward only"
        return (
            f"plan {self.plan} ({kind}; {self.videos_per_device} video(s) per device; "
            f"estimated activation memory {est}; budget {self.budget_bytes / 2**20:.0f} MiB, "
            f"{self.budget_source})"
        )


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _residual_bytes(fn, params, *inputs) -> int:
    """Bytes that ``jax.vjp(fn, params)`` keeps for the backward pass (traced, not run)."""
    pullback = jax.eval_shape(lambda p, *x: jax.vjp(lambda q: fn(q, *x), p)[1], params, *inputs)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(pullback))


def _nbytes(var) -> int:
    aval = var.aval
    if not hasattr(aval, "shape"):  # tokens
        return 0
    return math.prod(aval.shape) * getattr(aval.dtype, "itemsize", 0)


def _live_peak_bytes(jaxpr: jax_core.Jaxpr) -> int:
    """The most bytes live at once while ``jaxpr``'s equations run in order: its inputs all
    along, each value from its equation to its last use, and inside an equation that calls
    jaxprs (scan, cond, custom rules, nested jit) the largest of their own peaks. No fusion
    is assumed, so XLA's peak is lower (the estimate errs on the safe side)."""
    inputs = set(jaxpr.constvars) | set(jaxpr.invars)
    last_use = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if isinstance(var, jax_core.Var):
                last_use[var] = i
    for var in jaxpr.outvars:
        if isinstance(var, jax_core.Var):
            last_use[var] = len(jaxpr.eqns)
    live = sum(_nbytes(var) for var in inputs)
    peak = live
    for i, eqn in enumerate(jaxpr.eqns):
        inner = max(map(_live_peak_bytes, jax_core.jaxprs_in_params(eqn.params)), default=0)
        outputs = sum(_nbytes(var) for var in eqn.outvars)
        peak = max(peak, live + max(outputs, inner))
        live += outputs
        used = [var for var in eqn.invars if isinstance(var, jax_core.Var)]
        for var in dict.fromkeys([*used, *eqn.outvars]):  # freed after their last use
            if var not in inputs and last_use.get(var, i) == i:
                live -= _nbytes(var)
    return peak


def _forward_peak_bytes(fn, params, *inputs) -> int:
    """Bytes live at the peak of ``fn(params, *inputs)`` without gradient (traced, not run)."""
    return _live_peak_bytes(jax.make_jaxpr(fn)(params, *inputs).jaxpr)


def per_item_bytes(
    stem_apply: Callable,
    init_stem: Callable,
    trunk_apply: Callable,
    init_trunk: Callable,
    frame_shape: tuple,
    *,
    num_clusters: int,
    forward_only: bool = False,
) -> tuple[int, jax.ShapeDtypeStruct, int]:
    """(stem VJP bytes per frame, stem output shape and dtype per frame, trunk VJP bytes per
    video of K steps), for any stem and trunk, from shapes only (nothing runs). With
    ``forward_only``: the stem's and the trunk's forward peaks instead of their VJPs'
    residuals (``_live_peak_bytes``; for ``estimate(..., forward_only=True)``).

    Args:
      stem_apply: (variables, uint8 frames (N, *frame_shape)) -> (N, *features), the stem as
        the clustered passes run it (differentiated with respect to ``variables["params"]``).
      init_stem: uint8 frames -> the variables ``stem_apply`` takes.
      trunk_apply: (variables, steps (B, K, *features), mask (B, K) bool) -> logits, in
        training (differentiated with respect to ``variables["params"]``), or without
        gradient (train=False) for ``forward_only``.
      init_trunk: (steps, mask) -> the trunk's variables.

    Residuals hold the parameters once plus a part linear in the batch: the difference
    between a batch of 2 and of 1 is the part per frame (per video for the trunk). A forward
    peak is the parameters plus the live values of one moment, whose operation can change
    with the batch while parameters weigh as much as activations: its slope is taken
    between 8 and 16 items, where activations decide.
    """
    measure, n = (_forward_peak_bytes, 8) if forward_only else (_residual_bytes, 1)

    def frames(n):
        return jax.ShapeDtypeStruct((n,) + tuple(frame_shape), jnp.uint8)

    def params_and_others(variables):
        others = {name: value for name, value in variables.items() if name != "params"}
        return variables.get("params", {}), others

    stem_params, stem_others = params_and_others(_abstract(jax.eval_shape(init_stem, frames(1))))

    def run_stem(params, x, others):
        return stem_apply({**others, "params": params}, x)

    def stem_bytes(n):
        return measure(run_stem, stem_params, frames(n), stem_others)

    out = jax.eval_shape(run_stem, stem_params, frames(1), stem_others)

    def steps(b):
        return (
            jax.ShapeDtypeStruct((b, num_clusters) + out.shape[1:], out.dtype),
            jax.ShapeDtypeStruct((b, num_clusters), jnp.bool_),
        )

    trunk_params, trunk_others = params_and_others(_abstract(jax.eval_shape(init_trunk, *steps(1))))

    def run_trunk(params, x, mask, others):
        return trunk_apply({**others, "params": params}, x, mask)

    def trunk_bytes(b):
        return measure(run_trunk, trunk_params, *steps(b), trunk_others)

    return (
        -(-(stem_bytes(2 * n) - stem_bytes(n)) // n),
        jax.ShapeDtypeStruct(out.shape[1:], out.dtype),
        -(-(trunk_bytes(2 * n) - trunk_bytes(n)) // n),
    )


def estimate(
    per_item: tuple,
    videos_shape,
    *,
    num_clusters: int,
    chunk_size: int,
    device_count: int,
    forward_only: bool = False,
) -> tuple[dict, int]:
    """({plan: estimated activation bytes per device}, videos per device); see the docstring.

    per_item: ``per_item_bytes`` of the model's stem and trunk (with the same
    ``forward_only``); videos_shape: (B, T, H, W, 3) of the whole batch, which is split over
    ``device_count`` devices. forward_only: a pass without gradient (evaluation).
    """
    b, t = videos_shape[:2]
    v = -(-b // device_count)
    r, out, h = per_item
    o = math.prod(out.shape)
    c = min(chunk_size, t)
    chunk = v * c * (r + 4 * o)
    if forward_only:  # nothing kept for a backward: no cotangents, the kept outputs stay
        common = v * h + v * num_clusters * o * 4
        return {
            "unchunked": v * t * (r + 4 * o) + common,
            "keep_stem": v * t * o * out.dtype.itemsize + chunk + common,
            "recompute": chunk + common,
        }, v
    common = v * h + 2 * v * num_clusters * o * 4
    return {
        "unchunked": v * t * (r + 4 * o) + common,
        "keep_stem": max(v * t * o * out.dtype.itemsize + chunk, chunk + common),
        "recompute": chunk + common,
    }, v


def choose(plan: str, estimates: dict, budget: int) -> str:
    """The requested plan, or for "auto" the fastest whose estimate fits the budget."""
    if plan != "auto":
        return plan
    for name in _FASTEST_FIRST:
        if estimates[name] <= budget:
            return name
    return "recompute"  # nothing fits: the plan whose memory does not grow with T


_logged: set = set()


def log_once(key, choice: PlanChoice, videos_shape, name: str = "FullVideoModel") -> None:
    """Logs the plan once per (model, batch shape, training or forward only): tracing repeats
    for init, grad, eval.

    key: hashable, the model (None: once per ``name`` and shape); name: the model's class.
    """
    seen = (name if key is None else key, tuple(videos_shape), choice.train)
    if seen in _logged:
        return
    _logged.add(seen)
    logging.info("%s, videos %s: %s", name, tuple(videos_shape), choice.describe())
    if choice.estimates[choice.plan] > choice.budget_bytes:
        logging.warning(
            "%s, videos %s: plan %s is estimated at %.0f MiB, over the activation "
            "budget of %.0f MiB; lower data.frames_per_device or model.chunk_size",
            name,
            tuple(videos_shape),
            choice.plan,
            choice.estimates[choice.plan] / 2**20,
            choice.budget_bytes / 2**20,
        )


# ----------------------------------------------------------------------------- the passes


def _segment_sums(x, ids, k):
    """x (B, N, ...) float32, ids (B, N) in 0..K (K = dropped) -> (B, K, ...) sums.

    vmapped over the batch (a scatter with a batch dimension), so that a batch sharded
    over devices stays sharded.
    """
    return jax.vmap(lambda xb, ib: jax.ops.segment_sum(xb, ib, k + 1)[:k])(x, ids)


class _Chunks:
    """Chunk geometry: chunk i holds frames s = i*c .. s+c-1 and is read at a = min(s, T-c)."""

    def __init__(self, stem_apply: Callable, videos, chunk_size: int):
        self.stem_apply = stem_apply
        self.videos = videos
        self.b, self.t = videos.shape[:2]
        self.c = min(chunk_size, self.t)
        self.n = -(-self.t // self.c)

    def window(self, i):
        s = i * self.c
        return s, jnp.minimum(s, self.t - self.c)

    def stem(self, variables, a):
        """Stem outputs (B, c, *features) of frames a .. a+c-1."""
        frames = jax.lax.dynamic_slice_in_dim(self.videos, a, self.c, axis=1)
        acts = self.stem_apply(variables, frames.reshape((-1,) + frames.shape[2:]))
        return acts.reshape((self.b, self.c) + acts.shape[1:])

    def fresh_ids(self, seg, s, a, k):
        """Segment ids of frames a .. a+c-1, with K (dropped) on frames before s (seen)."""
        ids = jax.lax.dynamic_slice_in_dim(seg, a, self.c, axis=1)
        return jnp.where((a + jnp.arange(self.c) >= s)[None], ids, k)


def _distances(chunks: _Chunks, variables, mask, out, window: int, keep: bool):
    """Pass 1 (no gradient): distances (B, T) and, with keep, the stem outputs (B, T, ...).

    Only the distances (and the kept outputs) leave a chunk; the packed bits of the last
    ``window`` frames are carried so that windows cross chunk boundaries.
    """
    b, t, c = chunks.b, chunks.t, chunks.c
    num_features = math.prod(out.shape)
    nbytes = -(-num_features // 8)
    zeros = jnp.zeros((b, c) + out.shape, out.dtype)

    def body(carry, i):
        prev_bits, prev_valid, kept = carry  # bits, validity of frames s-w .. s-1
        s, a = chunks.window(i)
        read = jax.lax.dynamic_slice_in_dim(mask, a, c, axis=1)
        # All-padding chunks (the read frames of every video) skip the stem.
        acts = jax.lax.cond(jnp.any(read), lambda a: chunks.stem(variables, a), lambda a: zeros, a)
        if keep:  # the overlap of the last chunk is rewritten with the same values
            kept = jax.lax.dynamic_update_slice_in_dim(kept, acts, a, axis=1)
        bits = clustering.sign_bits(acts.reshape(b, c, -1))
        # Align to frames s..s+c-1 (the last chunk was read from a <= s); frames >= T invalid.
        frame = s + jnp.arange(c)
        bits = jnp.take(bits, jnp.clip(frame - a, 0, c - 1), axis=1)
        valid = (frame < t)[None] & jnp.take(mask, jnp.minimum(frame, t - 1), axis=1)
        buf_bits = jnp.concatenate([prev_bits, bits], axis=1)
        buf_valid = jnp.concatenate([prev_valid, valid], axis=1)
        d = clustering.prefix_hamming_distances(
            buf_bits, window, buf_valid, num_features=num_features
        )
        # d[:, :c] (frames s-w .. s+c-w-1) have all their `window` successors in the buffer.
        return (buf_bits[:, c:], buf_valid[:, c:], kept), d[:, :c]

    kept0 = jnp.zeros((b, t) + out.shape, out.dtype) if keep else None
    init = (jnp.zeros((b, window, nbytes), jnp.uint8), jnp.zeros((b, window), bool), kept0)
    (last_bits, last_valid, kept), ds = jax.lax.scan(body, init, jnp.arange(chunks.n))
    d_tail = clustering.prefix_hamming_distances(
        last_bits, window, last_valid, num_features=num_features
    )
    # ds covers frames [-w, n*c - w), d_tail [n*c - w, n*c): drop the w leading dummies.
    d = jnp.concatenate([jnp.moveaxis(ds, 0, 1).reshape(b, -1), d_tail], axis=1)
    return d[:, window : window + t], kept


def _recomputed_sums(chunks: _Chunks, variables, seg, k, out):
    """Pass 2 of "recompute": per-segment sums, one rematerialised chunk at a time."""
    zeros = jnp.zeros((chunks.b, k) + out.shape, jnp.float32)

    def chunk_sums(vs, i):
        s, a = chunks.window(i)
        ids = chunks.fresh_ids(seg, s, a, k)

        def compute(vs):
            return _segment_sums(chunks.stem(vs, a).astype(jnp.float32), ids, k)

        return jax.lax.cond(jnp.any(ids < k), compute, lambda vs: zeros, vs)

    chunk_sums = jax.checkpoint(chunk_sums, prevent_cse=False)

    def body(acc, i):
        # The add stays outside the checkpoint: the scan then saves no per-chunk carry.
        return acc + chunk_sums(variables, i), None

    sums, _ = jax.lax.scan(body, zeros, jnp.arange(chunks.n))
    return sums


def _kept_sums(chunks: _Chunks, variables, kept, seg, k):
    """Sums of "keep_stem": forward from the kept outputs, backward one chunk's VJP at a time."""
    b, c = chunks.b, chunks.c
    feat_shape = kept.shape[2:]

    @jax.custom_vjp
    def sums_of(variables, kept, seg):
        def body(acc, i):
            s, a = chunks.window(i)
            acts = jax.lax.dynamic_slice_in_dim(kept, a, c, axis=1).astype(jnp.float32)
            return acc + _segment_sums(acts, chunks.fresh_ids(seg, s, a, k), k), None

        sums, _ = jax.lax.scan(
            body, jnp.zeros((b, k) + feat_shape, jnp.float32), jnp.arange(chunks.n)
        )
        return sums

    def forward(variables, kept, seg):
        return sums_of(variables, kept, seg), (variables, seg)

    def backward(residuals, g):
        variables, seg = residuals
        g = jnp.concatenate([g, jnp.zeros_like(g[:, :1])], axis=1)  # id K: no cotangent

        def body(acc, i):
            s, a = chunks.window(i)
            ids = chunks.fresh_ids(seg, s, a, k)

            def compute(acc):
                acts, pullback = jax.vjp(lambda vs: chunks.stem(vs, a), variables)
                cotangent = jax.vmap(lambda gb, ib: gb[ib])(g, ids).astype(acts.dtype)
                return jax.tree.map(jnp.add, acc, pullback(cotangent)[0])

            return jax.lax.cond(jnp.any(ids < k), compute, lambda acc: acc, acc), None

        grads, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, variables), jnp.arange(chunks.n))
        return grads, None, None

    sums_of.defvjp(forward, backward)
    return sums_of(variables, jax.lax.stop_gradient(kept), seg)


def clustered_sums(
    plan: str,
    stem_apply: Callable,
    variables,
    videos,
    mask,
    *,
    num_clusters: int,
    method: str,
    window: int,
    chunk_size: int,
):
    """Segment ids and per-segment sums of the stem outputs of every frame, by ``plan``.

    Args:
      plan: "unchunked" | "keep_stem" | "recompute" (see the module docstring).
      stem_apply: (variables, uint8 frames (N, H, W, 3)) -> stem outputs (N, *features),
        any feature shape.
      variables: the stem's variables (gradients reach them through every plan).
      videos: (B, T, H, W, 3) uint8; mask: (B, T) bool, valid frames first.

    Returns:
      (sums (B, K, *features) float32, counts (B, K) int32, segment ids (B, T) int32 with
      K on padding).
    """
    b, t = mask.shape
    k = num_clusters
    segment = clustering.segmenter(method)
    if plan == "unchunked":
        acts = stem_apply(variables, videos.reshape((b * t,) + videos.shape[2:]))
        acts = acts.reshape((b, t) + acts.shape[1:])
        flat = jax.lax.stop_gradient(acts).reshape(b, t, -1)
        d = clustering.prefix_hamming_distances(
            clustering.sign_bits(flat), window, mask, num_features=flat.shape[-1]
        )
        seg = segment(d, k, mask)
        sums = _segment_sums(acts.astype(jnp.float32), seg, k)
    elif plan in ("keep_stem", "recompute"):
        chunks = _Chunks(stem_apply, videos, chunk_size)
        out = jax.eval_shape(stem_apply, variables, videos[:1, 0])
        out = jax.ShapeDtypeStruct(out.shape[1:], out.dtype)
        frozen = jax.lax.stop_gradient(variables)
        keep = plan == "keep_stem"
        d, kept = _distances(chunks, frozen, mask, out, window, keep)
        seg = segment(d, k, mask)  # (B, T); padding has id K
        if keep:
            sums = _kept_sums(chunks, variables, kept, seg, k)
        else:
            sums = _recomputed_sums(chunks, variables, seg, k, out)
    else:
        raise ValueError(f"plan={plan!r}; use one of {_FASTEST_FIRST} (or 'auto' in the model)")
    counts = jnp.sum((seg[:, :, None] == jnp.arange(k)).astype(jnp.int32), axis=1)
    return sums, counts, seg
