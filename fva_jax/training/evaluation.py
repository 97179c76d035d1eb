"""Evaluation: every video of the eval split exactly once, over all hosts.

`eval_modes(config)` names the evaluations (result name -> data mode): "eval", the configured
model on whole videos (or, for the sampling baselines, on their K host-chosen frames), and
with config.eval.also_uniform "eval_uniform", the same network on K uniformly chosen frames.
`evaluate_state` runs them and returns loss, top-1/5, mean class accuracy, per-class accuracy
and the number of videos seen.
"""

import time
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from fva_jax.training import steps, summaries
from fva_jax.training.distributed import to_host
from fva_jax.training.experiment import Run, global_batch, prefetch_to_devices


def eval_modes(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Result name -> data mode of each evaluation: the configured model on whole videos
    ("eval"), and for comparison K uniformly chosen frames ("eval_uniform"); the sampling
    baselines evaluate on their K host-chosen frames."""
    if config.model.sampling != "cluster":
        return {"eval": "sampled"}
    return {"eval": "full", **({"eval_uniform": "sampled"} if config.eval.also_uniform else {})}


class _Progress:
    """Logs "what: i/n steps in t s, x steps/s, ETA" at most every `every_s` seconds and
    when done: long evaluations (e.g. Breakfast's minutes-long videos) show they move."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = 30.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and (done == 0 or now - self.last < self.every_s):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        eta = (self.total - done) * elapsed / max(done, 1)
        logging.info(
            "%s: %d/%d %s in %.0f s, %.2f %s/s%s",
            self.what,
            done,
            self.total,
            self.unit,
            elapsed,
            done / elapsed,
            self.unit,
            "" if done >= self.total else f", ETA {eta:.0f} s",
        )


def _eval_batches(run: Run, mode: str) -> Iterator[dict[str, np.ndarray]]:
    """Exactly EvalData.num_steps(mode) local batches (the same count on every host: each
    step is a collective); an iterator that ends early or runs long is an error."""
    num_steps = run.eval_data.num_steps(mode)
    it = iter(run.eval_data.iterator(mode))
    for i in range(num_steps):
        local = next(it, None)
        if local is None:
            raise ValueError(
                f"EvalData.iterator({mode!r}) ended after {i} of its num_steps = {num_steps} "
                f"steps on process {jax.process_index()}"
            )
        yield local
    if next(it, None) is not None:
        raise ValueError(
            f"EvalData.iterator({mode!r}) yielded more than its num_steps = {num_steps} steps "
            f"on process {jax.process_index()}"
        )


def _check_every_video_counted(run: Run, name: str, counted: int) -> None:
    """An evaluation whose metrics count another number of videos than the split holds (a
    video read twice or left out, over all hosts) must not be reported."""
    split = run.config.data.eval_split
    expected = run.info.get("num_examples", {}).get(split)
    if expected is not None and counted != int(expected):
        raise ValueError(
            f"{name}: the metrics count {counted} videos, the {split!r} split of "
            f"{run.config.data.name} holds {expected} (dataset_info); every video must be "
            "evaluated exactly once. The data pipeline's evaluation plan is wrong: report this"
        )


def evaluate_state(
    run: Run,
    eval_steps: Mapping[str, Callable],
    state: steps.TrainState,
    timelines: list | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics over the whole eval split (every video once, checked against the split's size
    in dataset_info), per result of eval_modes.

    timelines: if a list, the first config.eval.num_timeline_videos real videos of this
      host's "eval" batches are appended to it as (frames uint8 (n, H, W, 3) of the valid
      frames, segment_ids int32 (n,), label, prediction).
    """
    c = run.config
    results = {}
    for name, mode in eval_modes(c).items():
        num_steps = run.eval_data.num_steps(mode)
        progress = _Progress(f"{name} on {c.data.name}/{c.data.eval_split}", num_steps, "steps")
        batches = prefetch_to_devices(
            _eval_batches(run, mode), lambda local: (local, global_batch(run, local))
        )
        total = None
        for i, (local, batch) in enumerate(batches):
            progress(i)
            m, per_video = eval_steps[mode](state, batch)
            wanted = c.eval.num_timeline_videos - len(timelines or ())
            if timelines is not None and name == "eval" and wanted > 0:
                timelines += summaries.timeline_inputs(local, per_video, wanted)
            total = m if total is None else total.merge(m)
        total = to_host(total)
        progress(num_steps)
        values = {k: float(v) for k, v in total.compute().items()}
        per_class = total.mean_class_accuracy.per_class()
        values["num_examples"] = int(np.asarray(total.mean_class_accuracy.total).sum())
        _check_every_video_counted(run, name, values["num_examples"])
        values["per_class_accuracy"] = {
            (run.class_names[i] if i < len(run.class_names) else str(i)): (
                None if np.isnan(a) else float(a)
            )
            for i, a in enumerate(per_class)
        }
        results[name] = values
    return results
