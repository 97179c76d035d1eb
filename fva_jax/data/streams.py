"""Grain streams over a function of the step number: workers, prefetch, bounded memory.

`grain_iterator(reader, start, stop, num_workers, prefetch)` iterates reader(start), ...,
reader(stop - 1) in order, with a Grain `MapDataset` computed in `num_workers` worker
processes (0 = in this process, with one background thread) and `prefetch` steps buffered
ahead. Nothing here knows about videos: the input pipeline (`pipeline.py`) passes its step
reader, which returns one step's batch of this process.

No shuffle buffer holds videos: at most `max_steps_in_memory` steps exist at once (prefetch +
1 in this process; with workers about prefetch + 2 x num_workers + 1, at least
4 x num_workers + 1, as Grain buffers each worker's output on both sides).

Steps from workers arrive in Grain's shared memory. A `Stream` unlinks their names as it hands
them out (the memory is freed when the last array viewing it dies) and, when closed, waits
for Grain's own unlinking of the steps it dropped: nothing is left for multiprocessing's
resource_tracker to report as leaked at exit, and no step is copied.

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


def _close_and_release_shared_memory(iterator) -> None:
    """Closes a Grain iterator with workers, then waits until Grain has unlinked the shared
    memory of the steps it still buffered. Closing drops them, and Grain unlinks a dropped
    array's shared memory in a background thread pool, which interpreter exit stops with its
    queue unrun; multiprocessing's resource_tracker then warns of "leaked shared_memory
    objects" (and unlinks them itself)."""
    import gc  # pylint: disable=g-import-not-at-top

    from grain.multiprocessing import SharedMemoryArray  # pylint: disable=g-import-not-at-top

    close_iterator(iterator)
    gc.collect()  # arrays held by reference cycles (e.g. a traceback's frames) die now
    # Grain 0.2.18's pool of one thread runs its requests in order: when a no-op has run,
    # every unlink requested before it has too.
    del_pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if del_pool is not None:
        try:
            del_pool.apply(int)
        except ValueError:  # "Pool not running": multiprocessing's exit already stopped it
            pass


def _own_shared_memory(tree):
    """Removes the names of the shared memory a step's arrays live in, as soon as this process
    has them, and leaves the memory to the arrays: the OS frees it when the last array
    viewing it dies, or at this process's exit. No name is then left to unlink later: arrays
    that the trainer still holds at exit (the last batch, the device prefetch queue) leak
    nothing, and no copy is made. Grain (0.2.18) would otherwise unlink each name when its
    array is garbage collected, which at interpreter exit does not happen."""
    from grain.multiprocessing import SharedMemoryArray  # pylint: disable=g-import-not-at-top

    if isinstance(tree, dict):
        for value in tree.values():
            _own_shared_memory(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _own_shared_memory(value)
    elif isinstance(tree, SharedMemoryArray) and getattr(tree, "_unlink_on_del", False):
        tree.shm.unlink()  # also tells multiprocessing's resource_tracker
        tree._unlink_on_del = False  # pylint: disable=protected-access
    return tree


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
        self._with_workers = num_workers > 0
        close = _close_and_release_shared_memory if self._with_workers else close_iterator
        self._finalizer = weakref.finalize(self, close, self._iterator)
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
        if self._with_workers:
            _own_shared_memory(batch)
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
