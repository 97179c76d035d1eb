"""Grain streams over a function of the step number: workers, prefetch, bounded memory.

`grain_iterator(reader, start, stop, num_workers, prefetch)` iterates reader(start), ...,
reader(stop - 1) in order, with a Grain `MapDataset` computed in `num_workers` worker
processes (0 = in this process, with one background thread) and `prefetch` steps buffered
ahead. Nothing here knows about videos: the input pipeline (`pipeline.py`) passes its step
reader, which returns one step's batch of this process.

No shuffle buffer holds videos: at most `max_steps_in_memory` steps exist at once (prefetch +
1 in this process; with workers about prefetch + 2 x num_workers + 1, at least
4 x num_workers + 1, as Grain buffers each worker's output on both sides).

A `Stream` is one running iterator with the global step it stands at, so a training stream
runs on across epoch boundaries (workers started once, steps of the next epoch prefetched);
an `EpochIterator` hands out one epoch's steps of it, then StopIteration.

Worker processes ignore SIGTERM and SIGINT: a scheduler that signals the whole process group
(preemption) must not kill them before the trainer has finished its step and checkpoint;
the trainer stops them (`TrainData.close`, the end of an evaluation, or at the latest at
interpreter exit, where workers nobody stopped are killed: multiprocessing's own exit would
send them SIGTERM and wait for them forever).
"""

from __future__ import annotations

import atexit
import math
import signal
import weakref
from typing import Iterator


def _worker_buffer(num_workers: int, prefetch: int) -> int:
    # Grain buffers each worker's steps twice: in the worker's output queue and in the
    # thread that reads that queue in this process; together about `prefetch` steps.
    return max(1, math.ceil(prefetch / (2 * num_workers)))


def max_steps_in_memory(num_workers: int, prefetch: int) -> int:
    """Most steps that exist at once (host memory for videos is this x the largest step).

    In this process (num_workers 0): `prefetch` buffered + the one the consumer holds.
    With Grain workers, per worker: its output queue and the reading thread's buffer in this
    process (buffer b each, about prefetch / 2 / num_workers, at least 1), the step it is
    making and the one the reading thread holds, so num_workers * (2b + 2) + 1 (measured by
    tests/test_pipeline.py::test_steps_in_memory_are_bounded); at least 4 * num_workers + 1.
    """
    if num_workers > 0:
        return num_workers * (2 * _worker_buffer(num_workers, prefetch) + 2) + 1
    return prefetch + 1


def grain_iterator(reader, start: int, stop: int, num_workers: int, prefetch: int):
    """A Grain iterator over reader(start), ..., reader(stop - 1), in order."""
    import grain  # pylint: disable=g-import-not-at-top

    ds = grain.MapDataset.range(start, stop).map(reader)
    if num_workers > 0:
        from absl import flags  # pylint: disable=g-import-not-at-top

        # Grain's multiprocessing reads absl flags (with defaults) outside absl.app too.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers compute their steps one at a time (no threads, no read-ahead inside a
        # worker); about `prefetch` steps wait in buffers (see max_steps_in_memory).
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers,
                per_worker_buffer_size=_worker_buffer(num_workers, prefetch),
            ),
            worker_init_fn=_worker_ignores_termination,
        )
    else:
        # In this process: one background thread reads `prefetch` steps ahead (0: none).
        threads = 1 if prefetch > 0 else 0
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        )
    return iter(ds)


def _worker_ignores_termination(worker_index: int, worker_count: int) -> None:
    """In each Grain worker process, first: SIGTERM / SIGINT sent to the whole process group
    (a preemption notice, Ctrl-C) are left to the trainer, which stops its workers itself."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def close_iterator(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


# Finalizers of the streams with worker processes; `_stop_workers_at_exit` runs the live ones.
_WORKER_STREAMS: set = set()


def _stop_workers_at_exit() -> None:
    """At interpreter exit, before multiprocessing's own exit handler (which sends worker
    processes SIGTERM, which ours ignore, and then waits for them without a timeout): stops
    the streams still open, then kills any Grain worker process left."""
    import multiprocessing  # pylint: disable=g-import-not-at-top

    for finalizer in list(_WORKER_STREAMS):
        finalizer()
    for process in multiprocessing.active_children():
        if process.name.startswith("grain-"):
            process.kill()
            process.join(timeout=10)


class Stream:
    """A running Grain iterator over consecutive global steps, with where it stands."""

    def __init__(self, mode, first_epoch, reader, start, stop, num_workers, prefetch):
        self.mode, self.first_epoch = mode, first_epoch
        self.position = start  # next global step, counted from first_epoch's step 0
        self.stop = stop
        self._iterator = grain_iterator(reader, start, stop, num_workers, prefetch)
        self._finalizer = weakref.finalize(self, close_iterator, self._iterator)
        if num_workers > 0:
            # (Re)registered after multiprocessing's exit handler (Grain imported it), so it
            # runs before that one: atexit runs the last registered first.
            atexit.unregister(_stop_workers_at_exit)
            atexit.register(_stop_workers_at_exit)
            for dead in [f for f in _WORKER_STREAMS if not f.alive]:
                _WORKER_STREAMS.discard(dead)
            _WORKER_STREAMS.add(self._finalizer)

    def next(self) -> dict:
        batch = next(self._iterator)
        self.position += 1
        return batch

    def close(self) -> None:
        self._finalizer()


class EpochIterator(Iterator[dict]):
    """`count` steps of a stream, then StopIteration (the stream stays open for the next
    epoch's iterator)."""

    def __init__(self, stream: Stream, count: int, on_end=None):
        self._stream, self._left, self._on_end = stream, count, on_end

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._left <= 0:
            if self._on_end is not None:
                self._on_end()
                self._on_end = None
            raise StopIteration
        self._left -= 1
        return self._stream.next()
