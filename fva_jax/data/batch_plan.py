"""Global batch plans: which videos every process reads at every step, from the lengths alone.

A plan is a pure function of (seed, epoch, the videos' lengths, process count, devices per
process, frame budget, chunk size, buckets), in NumPy only, so every host computes the same
plan without talking to the others and runs the same global shape at the same step.

Full-video steps ("full" mode):

* Lengths are frame counts after the temporal stride and cap. Each video goes to the smallest
  *bucket* (a padded length, a multiple of the model's chunk size) that holds it.
* A step of bucket length L holds ``videos_per_device = max(1, frames_per_device // L)``
  videos on each device, so a step costs about the frame budget whatever the bucket, and a
  video longer than the budget gets a step of one video per device.
* Buckets are either given (``data.bucket_lengths``) or chosen from the split's lengths:
  at most ``data.max_buckets`` padded lengths that minimise the total padded frames, found
  exactly by a dynamic programme over the sorted distinct chunk-rounded lengths (the classic
  optimal 1-D grouping: the cost of a bucket is its length times its videos minus their
  frames, and an optimal bucket always sits at one of the rounded lengths).
* Each bucket's videos fill whole steps. The few left over (fewer than one step's slots)
  move up into the next bucket's steps, where they cost a longer padding but no empty slot,
  unless a step of their own with some empty slots computes fewer frames (then it is
  that); the last bucket ends with one partial step. So every video is in exactly one
  slot, empty slots are rare, and how many steps of which shape an epoch has depends only
  on the lengths, never on the shuffle.
* Training shuffles which videos of a bucket share a step and the order of the steps, per
  (seed, epoch). Evaluation keeps the index order (steps by bucket, short first).

Sampled-frame steps ("sampled" mode): ``global_batch`` videos per step, every video once per
epoch, shuffled per (seed, epoch) in training. Where ``global_batch`` does not divide the
videos, one partial step is padded with empty slots: the last in evaluation, at a random
place of the epoch in training.

Slots of a step are laid out process-major: process p owns slots
``[p * b, (p + 1) * b)`` with ``b = local_device_count * videos_per_device``; an empty slot
holds -1.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Mixed into the random streams so that plan shuffles never coincide with other streams
# that are derived from the same (seed, epoch).
_ORDER_STREAM = 0x0B47C4


class PlanError(ValueError):
    """A plan cannot be made from these settings; the message names the config field."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The steps of one epoch, identical on every process.

    Attributes:
      lengths: (S,) int64, padded frames per video of each step (L).
      videos_per_device: (S,) int64.
      slots: S arrays of ``process_count * local_device_count * videos_per_device[s]`` video
        indices, -1 for an empty slot, process-major.
      process_count, local_device_count: the layout the slots are for.
    """

    lengths: np.ndarray
    videos_per_device: np.ndarray
    slots: tuple[np.ndarray, ...]
    process_count: int
    local_device_count: int

    @property
    def num_steps(self) -> int:
        return len(self.slots)

    def local_batch_size(self, step: int) -> int:
        """b: rows of `step` on each process."""
        return self.local_device_count * int(self.videos_per_device[step])

    def rows(self, step: int, process_index: int) -> np.ndarray:
        """The video indices (-1 = empty) of `process_index`'s rows of `step`."""
        b = self.local_batch_size(step)
        return self.slots[step][process_index * b : (process_index + 1) * b]

    def shapes(self) -> list[tuple[int, int]]:
        """(b, L) of every step, in step order (b per process)."""
        return [(self.local_batch_size(s), int(self.lengths[s])) for s in range(self.num_steps)]


# --------------------------------------------------------------------------- lengths


def effective_lengths(num_frames, frame_stride: int = 1, max_frames: int = 0) -> np.ndarray:
    """Frames the model sees of videos with `num_frames` stored frames: every
    `frame_stride`-th frame, at most `max_frames` (0 = no cap)."""
    n = np.asarray(num_frames, np.int64)
    kept = -(-n // int(frame_stride))
    return np.minimum(kept, max_frames) if max_frames > 0 else kept


def rounded_lengths(lengths, chunk_size: int) -> np.ndarray:
    """Lengths rounded up to a multiple of `chunk_size` (at least one chunk)."""
    n = np.asarray(lengths, np.int64)
    return np.maximum(-(-n // chunk_size), 1) * chunk_size


def _check_lengths(lengths) -> np.ndarray:
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be a 1-D array of frame counts, got shape {lengths.shape}")
    if lengths.size and lengths.min() < 1:
        bad = int(np.argmin(lengths))
        raise ValueError(f"video {bad} has {lengths[bad]} frames; every video needs at least one")
    return lengths


def _check_budget(frames_per_device: int, chunk_size: int) -> None:
    if chunk_size < 1:
        raise PlanError(f"config.model.chunk_size must be >= 1, got {chunk_size}")
    if frames_per_device < chunk_size:
        raise PlanError(
            f"config.data.frames_per_device ({frames_per_device}) must hold at least one chunk "
            f"(config.model.chunk_size = {chunk_size})"
        )


# --------------------------------------------------------------------------- buckets


def choose_buckets(
    lengths,
    *,
    chunk_size: int,
    max_buckets: int,
    num_devices: int | None = None,
    frames_per_device: int | None = None,
) -> tuple[int, ...]:
    """At most `max_buckets` padded lengths (multiples of chunk_size) for `lengths`; the
    largest holds the longest video.

    For each m <= max_buckets, the m lengths that minimise the total padded frames are found
    exactly by a dynamic programme over the sorted distinct rounded lengths v_0 < ... <
    v_{n-1}: best[m][j] = least padding of the videos up to v_j with m buckets, the last at
    v_j; a bucket at v_j taking the values after v_i costs v_j * count(i, j] - frames(i, j]
    (O(max_buckets * n^2), n <= longest / chunk_size). Without a layout the largest m is
    returned. With `num_devices` and `frames_per_device`, the m whose plan (`full_plan`:
    steps, left-over videos, empty slots) computes the fewest frames is returned, fewer
    buckets on ties: with many devices and few videos per bucket, fewer, fuller buckets win.
    """
    if max_buckets < 1:
        raise PlanError(f"config.data.max_buckets must be >= 1, got {max_buckets}")
    lengths = _check_lengths(lengths)
    if not lengths.size:
        return ()
    values, counts = np.unique(rounded_lengths(lengths, chunk_size), return_counts=True)
    n = len(values)
    v = values.astype(np.float64)
    cum_count = np.concatenate([[0.0], np.cumsum(counts)])
    cum_frames = np.concatenate([[0.0], np.cumsum(counts * v)])

    def cost(i_after: np.ndarray, j: int) -> np.ndarray:
        # Bucket at v_j holding the values with index in (i_after, j]; i_after = -1: all.
        c = cum_count[j + 1] - cum_count[i_after + 1]
        f = cum_frames[j + 1] - cum_frames[i_after + 1]
        return v[j] * c - f

    best = v * cum_count[1:] - cum_frames[1:]  # one bucket at v_j holding everything up to it
    choices = [np.full(n, -1, np.int64)]  # choices[m-1][j]: previous bucket's value index
    for _ in range(1, min(max_buckets, n)):
        new_best = best.copy()
        choice = np.full(n, -1, np.int64)
        for j in range(1, n):
            total = best[:j] + cost(np.arange(j), j)
            k = int(np.argmin(total))
            if total[k] < new_best[j]:
                new_best[j], choice[j] = total[k], k
        best = new_best
        choices.append(choice)

    def backtrack(m: int) -> tuple[int, ...]:
        # The last value is always a bucket: it holds the longest video.
        out, j = [], n - 1
        for level in range(m - 1, -1, -1):
            out.append(int(values[j]))
            j = int(choices[level][j])
            if j < 0:
                break
        return tuple(sorted(out))

    if num_devices is None or frames_per_device is None:
        return backtrack(len(choices))
    candidates = sorted({backtrack(m) for m in range(1, len(choices) + 1)}, key=len)
    costs = [
        _computed_frames(lengths, c, num_devices, frames_per_device, chunk_size) for c in candidates
    ]
    return candidates[int(np.argmin(costs))]  # argmin: the first (fewest buckets) on ties


def _computed_frames(lengths, buckets, num_devices, frames_per_device, chunk_size) -> int:
    plan = full_plan(
        lengths,
        seed=0,
        epoch=0,
        process_count=1,
        local_device_count=num_devices,
        frames_per_device=frames_per_device,
        chunk_size=chunk_size,
        buckets=buckets,
        shuffle=False,
    )
    return int(sum(len(s) * int(n) for s, n in zip(plan.slots, plan.lengths)))


def check_buckets(bucket_lengths: Sequence[int], lengths, *, chunk_size: int) -> tuple[int, ...]:
    """Explicit bucket lengths, checked (PlanError naming config.data.bucket_lengths)."""
    field = "config.data.bucket_lengths"
    buckets = tuple(int(b) for b in bucket_lengths)
    if not buckets:
        raise PlanError(f"{field} is empty")
    if any(b < 1 or b % chunk_size for b in buckets):
        raise PlanError(
            f"{field} must be positive multiples of config.model.chunk_size ({chunk_size}), "
            f"got {buckets}"
        )
    if list(buckets) != sorted(set(buckets)):
        raise PlanError(f"{field} must be strictly increasing, got {buckets}")
    lengths = _check_lengths(lengths)
    if lengths.size and buckets[-1] < lengths.max():
        raise PlanError(
            f"{field} cannot hold the longest video ({int(lengths.max())} frames after "
            f"config.data.frame_stride / max_frames): the largest bucket is {buckets[-1]}; "
            f"add a bucket >= {int(rounded_lengths([lengths.max()], chunk_size)[0])}, or set "
            f"{field} = () to choose buckets from the lengths"
        )
    return buckets


def buckets_for(
    lengths,
    *,
    chunk_size: int,
    max_buckets: int,
    bucket_lengths: Sequence[int] = (),
    num_devices: int | None = None,
    frames_per_device: int | None = None,
) -> tuple[int, ...]:
    """`bucket_lengths` if given (checked), else `choose_buckets`."""
    if len(bucket_lengths):
        return check_buckets(bucket_lengths, lengths, chunk_size=chunk_size)
    return choose_buckets(
        lengths,
        chunk_size=chunk_size,
        max_buckets=max_buckets,
        num_devices=num_devices,
        frames_per_device=frames_per_device,
    )


# --------------------------------------------------------------------------- plans


def _order_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), _ORDER_STREAM])


def full_plan(
    lengths,
    *,
    seed: int,
    epoch: int,
    process_count: int,
    local_device_count: int,
    frames_per_device: int,
    chunk_size: int,
    buckets: Sequence[int],
    shuffle: bool,
) -> Plan:
    """The full-video steps of one epoch (see the module docstring).

    Args:
      lengths: (N,) frames per video (after stride and cap), index = video index.
      seed, epoch: fix the shuffle (ignored when shuffle is False).
      process_count, local_device_count: the global layout (same on every process).
      frames_per_device: the frame budget of one step on one device.
      chunk_size: the model's chunk size (bucket lengths are multiples of it).
      buckets: increasing bucket lengths, the largest >= the longest video
        (`buckets_for`).
      shuffle: training order (True) or index order (evaluation).
    """
    lengths = _check_lengths(lengths)
    _check_budget(frames_per_device, chunk_size)
    buckets = check_buckets(buckets, lengths, chunk_size=chunk_size) if lengths.size else ()
    num_devices = int(process_count) * int(local_device_count)
    if num_devices < 1:
        raise ValueError(f"need at least one device, got {process_count} x {local_device_count}")
    rng = _order_rng(seed, epoch) if shuffle else None
    which = np.searchsorted(np.asarray(buckets, np.int64), lengths) if lengths.size else lengths
    step_lengths, step_vpd, step_slots = [], [], []
    carried = np.zeros(0, np.int64)
    for k, bucket in enumerate(buckets):
        pool = np.concatenate([carried, np.flatnonzero(which == k)])
        if rng is not None:
            pool = rng.permutation(pool)
        vpd = max(1, frames_per_device // bucket)
        per_step = num_devices * vpd
        full, left = divmod(len(pool), per_step)
        last = k == len(buckets) - 1
        # Leftovers move up unless a partial step here costs fewer computed frames.
        own_step = left and (last or (per_step - left) * bucket <= left * (buckets[k + 1] - bucket))
        take = full * per_step + (len(pool) - full * per_step if own_step else 0)
        for start in range(0, take, per_step):
            slots = np.full(per_step, -1, np.int64)
            chunk = pool[start : min(start + per_step, take)]
            slots[: len(chunk)] = chunk
            step_lengths.append(bucket)
            step_vpd.append(vpd)
            step_slots.append(slots)
        carried = pool[take:]
    order = rng.permutation(len(step_slots)) if rng is not None else np.arange(len(step_slots))
    return Plan(
        lengths=np.asarray(step_lengths, np.int64)[order],
        videos_per_device=np.asarray(step_vpd, np.int64)[order],
        slots=tuple(step_slots[i] for i in order),
        process_count=int(process_count),
        local_device_count=int(local_device_count),
    )


def sampled_plan(
    num_videos: int,
    *,
    seed: int,
    epoch: int,
    process_count: int,
    local_device_count: int,
    global_batch: int,
    num_frames: int,
    shuffle: bool,
    batch_field: str = "config.train.batch_size",
) -> Plan:
    """Steps of `global_batch` videos with `num_frames` (K) frames each; every video once.

    `batch_field` names the config field of `global_batch` in errors.
    """
    num_devices = int(process_count) * int(local_device_count)
    if global_batch < 1 or global_batch % num_devices:
        raise PlanError(
            f"{batch_field} ({global_batch}) must be a positive multiple of the number of "
            f"devices ({num_devices} = {process_count} processes x {local_device_count})"
        )
    rng = _order_rng(seed, epoch) if shuffle else None
    order = rng.permutation(num_videos) if rng is not None else np.arange(num_videos)
    num_steps = -(-num_videos // global_batch)
    slots = np.full(num_steps * global_batch, -1, np.int64)
    slots[:num_videos] = order
    steps = list(slots.reshape(num_steps, global_batch))
    if rng is not None and num_videos % global_batch:
        # The partial step goes to a random place in the epoch rather than always last (the
        # last step of a baseline's training); the other steps keep their order.
        steps.insert(int(rng.integers(num_steps)), steps.pop())
    return Plan(
        lengths=np.full(num_steps, num_frames, np.int64),
        videos_per_device=np.full(num_steps, global_batch // num_devices, np.int64),
        slots=tuple(steps),
        process_count=int(process_count),
        local_device_count=int(local_device_count),
    )


# --------------------------------------------------------------------------- statistics


def real_videos_per_step(plan: Plan) -> float:
    """The epoch's mean number of real videos per global step (all processes together): the
    same on every process, at every step of the epoch, resumed or not. The trainer divides
    each video's loss by it (fva_jax.training.experiment.video_loss_weights)."""
    real = sum(int((slots >= 0).sum()) for slots in plan.slots)
    if real == 0:
        raise ValueError("the plan has no real video: no loss weight can be made from it")
    return real / plan.num_steps


def plan_stats(plan: Plan, lengths) -> dict:
    """What a plan costs the model: every slot computes its step's padded length.

    Returns dict(computed_over_real = computed frames / real frames, distinct_shapes
    = distinct (b, L), num_steps, real_frames, computed_frames, empty_slots).
    """
    lengths = np.asarray(lengths, np.int64)
    computed = sum(len(s) * int(n) for s, n in zip(plan.slots, plan.lengths))
    used = np.concatenate(plan.slots) if plan.slots else np.zeros(0, np.int64)
    real = int(lengths[used[used >= 0]].sum())
    return dict(
        computed_over_real=computed / max(real, 1),
        distinct_shapes=len(set(plan.shapes())),
        num_steps=plan.num_steps,
        real_frames=real,
        computed_frames=int(computed),
        empty_slots=int((used < 0).sum()),
    )
