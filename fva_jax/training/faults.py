"""What stops a training run early, and the exit status of each (fva_jax.main).

* SIGTERM (how Cloud TPU VMs and most schedulers announce preemption): `StopNotice` watches
  for it. In one process a Python handler notes it; the trainer finishes the step in flight,
  checkpoints the step it reached and raises `Preempted`. Where nothing can be lost (building
  the data set and the model, restoring, evaluating) the handler raises `Preempted` at once.
  After `jax.distributed.initialize` JAX owns SIGTERM (a Python handler would replace its
  own): every process then asks `multihost_utils.reached_preemption_sync_point(step)`, which
  turns true at the same step on every host, and they checkpoint that step together.
* A checkpoint that cannot be written (no space, no permission): `CheckpointWriteError`
  (fva_jax.training.checkpoints), naming the directory and the reason.
* A lost process of a multi-process run: `LostProcessError`, from the failed collective
  (`lost_process_error`).
* A training step whose loss or gradient norm is NaN/Inf: `NonFiniteError` (raised by the
  trainer before anything of that step is saved).

This module imports only the standard library and absl (JAX inside functions):
fva_jax.main imports it before anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
import re
import signal
import threading
import time

from absl import logging

# Exit statuses of fva_jax.main (sysexits.h names); 2 is a config error (fva_jax.main).
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after checkpointing; run it again
EXIT_CHECKPOINT_WRITE_FAILED = 74  # EX_IOERR: a checkpoint could not be written
EXIT_LOST_PROCESS = 69  # EX_UNAVAILABLE: another process of a multi-process run was lost
# EX_DATAERR: training diverged (a NaN/Inf loss or gradient). A rerun resumes from the last
# good checkpoint and would diverge the same way, and a resume refuses changed settings: start
# anew in a new workdir with a safer config (learning rate, clipping, dtype).
EXIT_NON_FINITE = 65


class Preempted(BaseException):
    """SIGTERM stopped the run; the message says at which step and which checkpoint is the
    latest. A BaseException (as KeyboardInterrupt), because it may be raised from the signal
    handler inside any code: an `except Exception` there must not swallow it.

    checkpoint_step: the latest complete checkpoint when the run stopped (None: none yet).
    """

    def __init__(self, message: str, checkpoint_step: int | None = None):
        super().__init__(message)
        self.checkpoint_step = checkpoint_step


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written. errno: the OS error (errno.ENOSPC, ...); directory:
    the checkpoint directory; latest_step: the latest complete checkpoint there (or None)."""

    def __init__(self, message: str, *, errno_: int | None, directory: str, latest_step):
        super().__init__(message)
        self.errno = errno_
        self.directory = directory
        self.latest_step = latest_step


class NonFiniteError(FloatingPointError):
    """A training step's loss or gradient norm is NaN/Inf; nothing of that step (or after it)
    was saved. step: the first such step; latest_step: the last good checkpoint (or None)."""

    def __init__(self, message: str, *, step: int, latest_step: int | None):
        super().__init__(message)
        self.step = step
        self.latest_step = latest_step


class LostProcessError(RuntimeError):
    """Another process of a multi-process run is gone (a collective failed, or JAX's
    coordination service reported it). fva_jax.main exits at once with EXIT_LOST_PROCESS,
    without JAX's shutdown barrier, which would wait for the lost process."""


# Errors of the file system that a retry after freeing space / fixing permissions cures.
STORAGE_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
)


def storage_error(error: BaseException) -> tuple[int, str] | None:
    """(errno, reason) when `error` (or an error it was raised from) is a file system error
    of STORAGE_ERRNOS: an OSError, or TensorStore's ValueError, which says e.g.
    "RESOURCE_EXHAUSTED: Error writing local file ...: No space left on device
    [os_error_code='28']". None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error.errno, str(error)
        text = str(error)
        found = re.search(r"os_error_code='?(\d+)", text)
        if found and int(found.group(1)) in STORAGE_ERRNOS:
            return int(found.group(1)), text
        for code in STORAGE_ERRNOS:
            if _strerror(code) in text:
                return code, text
        error = error.__cause__ or error.__context__
    return None


def _strerror(code: int) -> str:
    import os  # pylint: disable=g-import-not-at-top

    return os.strerror(code)


# --------------------------------------------------------------------------- SIGTERM


class StopNotice:
    """Whether SIGTERM asked this run to stop, as a context manager around the run.

    In one process (jax.distributed not initialised) entering installs a SIGTERM handler (in
    the main thread only; the previous one is restored on exit). The handler notes the time
    and, inside `interruptible()`, raises Preempted at once; elsewhere (training steps,
    checkpoint writes) the trainer asks `reached(step)` after every step. After
    jax.distributed.initialize nothing is installed: JAX handles SIGTERM and `reached(step)`
    is multihost_utils.reached_preemption_sync_point(step), true at the same step on every
    process (it must be called at every step, on every process); always false when JAX's
    preemption service is off (jax_enable_preemption_service=False).
    """

    def __init__(self):
        import jax  # pylint: disable=g-import-not-at-top

        self.multi_process = jax.distributed.is_initialized()
        self.received_at: float | None = None  # time.monotonic() of the first SIGTERM
        self._interruptible: str | None = None  # what is running, while it may be interrupted
        self._previous = None
        self._installed = False
        self._no_preemption_service = False  # learnt from the first reached(step)

    @property
    def received(self) -> bool:
        return self.received_at is not None

    def __enter__(self) -> StopNotice:
        if self.multi_process:
            return self
        if threading.current_thread() is not threading.main_thread():
            logging.warning("not in the main thread: SIGTERM is not handled by fva_jax")
            return self
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        del signum, frame
        if self.received_at is None:
            self.received_at = time.monotonic()
            logging.warning(
                "SIGTERM received%s",
                f" during {self._interruptible}: stopping now"
                if self._interruptible
                else ": finishing the step in flight, then writing a checkpoint",
            )
        if self._interruptible:
            raise Preempted(f"stopped by SIGTERM during {self._interruptible}")

    def seconds_since(self) -> float:
        return time.monotonic() - self.received_at if self.received else 0.0

    @contextlib.contextmanager
    def interruptible(self, what: str):
        """Inside, SIGTERM raises Preempted at once ("stopped by SIGTERM during <what>"),
        also when it came before. For work whose loss costs nothing but time (one process
        only; with jax.distributed the work runs on to the next sync point)."""
        if self.multi_process or not self._installed:
            yield
            return
        if self.received:
            raise Preempted(f"stopped by SIGTERM before {what}")
        previous, self._interruptible = self._interruptible, what
        try:
            yield
        finally:
            self._interruptible = previous

    @contextlib.contextmanager
    def deferred(self):
        """Inside, SIGTERM is only noted (e.g. a file written whole or not at all); when this
        returns into an interruptible block, a SIGTERM noted meanwhile raises Preempted."""
        previous, self._interruptible = self._interruptible, None
        try:
            yield
        finally:
            self._interruptible = previous
        if previous and self.received:
            raise Preempted(f"stopped by SIGTERM during {previous}")

    def reached(self, step: int) -> bool:
        """True when the run should checkpoint `step` and stop. Call it after every step."""
        if self.multi_process:
            if self._no_preemption_service:
                return False
            return self._reached_sync_point(step)
        return self.received

    def _reached_sync_point(self, step: int) -> bool:
        import jax  # pylint: disable=g-import-not-at-top
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:
            # JAX raises RuntimeError when jax_enable_preemption_service=False (no service,
            # so no sync point ever: as Orbax's reached_preemption). Other RuntimeErrors, e.g.
            # of a lost process, are the trainer's to report (lost_process_error).
            if jax.config.jax_enable_preemption_service:
                raise
            self._no_preemption_service = True
            logging.warning(
                "JAX's preemption service is off (jax_enable_preemption_service=False): "
                "SIGTERM is not turned into a checkpoint in this multi-process run"
            )
            return False


# --------------------------------------------------------------------------- lost processes

# What failed collectives and JAX's coordination service say when a peer process is gone:
# gloo (CPU), NCCL (GPU), the coordination service (heartbeats, barriers; all platforms).
_PEER_FAILURE = re.compile(
    r"Gloo .*failed|Connection closed by peer|Connection reset by peer|Broken pipe"
    r"|heartbeat|unhealthy|CoordinationService|coordination service|Barrier failed"
    r"|NCCL .*(?:remote process exited|unhandled system error|Connection closed)"
    r"|remote process exited",
    re.IGNORECASE,
)


def lost_process_error(error: BaseException, *, latest_step, directory) -> LostProcessError | None:
    """A LostProcessError describing `error` when this is a multi-process run and `error` (or
    one it was raised from) is a failed collective or a coordination-service error; None
    otherwise. latest_step / directory: the checkpoint a restart resumes from."""
    import jax  # pylint: disable=g-import-not-at-top

    if jax.process_count() < 2:
        return None
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause)
        if _PEER_FAILURE.search(text):
            break
        cause = cause.__cause__ or cause.__context__
    else:
        return None
    which = _lost_task(text)
    resume = (
        f"checkpoint step {latest_step} in {directory}"
        if latest_step is not None
        else f"the start (no checkpoint in {directory} yet)"
    )
    first_line = text.strip().splitlines()[0][:400] if text.strip() else type(cause).__name__
    return LostProcessError(
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{which or 'another process of this run'} was lost ({first_line}); stopping. Start "
        f"all {jax.process_count()} processes again: they resume from {resume}"
    )


def _lost_task(text: str) -> str | None:
    """'process N' where JAX's message names the task (e.g. "Task 1 heartbeat timeout",
    "The following tasks are unhealthy (stopped sending heartbeats):\\n1")."""
    found = re.search(r"[Tt]ask[: ]+(\d+)\b.*heartbeat", text) or re.search(
        r"unhealthy[^:]*:\s*([\d,\s]+)", text
    )
    if not found:
        return None
    tasks = [t for t in re.split(r"[,\s]+", found.group(1).strip()) if t]
    return f"process{'es' if len(tasks) > 1 else ''} {', '.join(tasks)}"
