"""Training and evaluation: `train_and_evaluate(config, workdir)`, `evaluate(config, workdir)`.

One readable loop in the style of big_vision / flax examples/imagenet:

* a `Mesh` over every device of every host with one axis, "data"; batches are
  `NamedSharding(mesh, P("data"))` global arrays built from each host's rows with
  `jax.make_array_from_process_local_data`, put on the devices two steps ahead while the
  current step runs; parameters, BatchNorm statistics and the optimizer state are replicated;
* the data (`data.TrainData` / `data.EvalData`, fva_jax.data.pipeline) plans every step from
  the videos' lengths, so steps have different shapes (one per length bucket): `jax.jit`
  compiles each shape once, and JAX's persistent compilation cache (config.compilation_cache_dir,
  by default WORKDIR/compilation_cache) lets a restarted run reuse them;
* epochs (fva_jax.training.epochs): the first config.train.uniform_warmup_epochs train on K
  host-chosen frames per video (mode "sampled", the model run with sampling="uniform", which
  on K valid frames takes each once), the rest on full videos (mode "full", the configured
  model); configs with sampling "uniform" / "dense" train every epoch sampled. The learning
  rate's epochs are converted with the step at which each epoch really starts;
* training.steps.train_step / eval_step, jitted here with the shardings, the state donated;
  every real video of an epoch weighs the same in the loss, whatever its length bucket (the
  batch's "weight", experiment.video_loss_weights), while train/loss reports the mean
  cross-entropy over the real videos of the steps since the previous log line;
* checkpoints (training.checkpoints) every config.checkpoint.every_steps and at the end, with
  the data state {"epoch", "step"}: a run killed at any moment and restarted with the same
  command ends with exactly the metrics of an uninterrupted one;
* TensorBoard events and log lines without TensorFlow (fva_jax.training.summaries), a progress line
  with steps/s and ETA;
* a step whose training loss or gradient norm is NaN/Inf stops the run with
  `faults.NonFiniteError` (a FloatingPointError) naming the step, before anything of that step
  is checkpointed: the last good checkpoint is the latest;
* evaluation of every video of the eval split once: whole videos ("eval"; and, with
  config.eval.also_uniform, K uniformly chosen frames, "eval_uniform"), or K frames for the
  sampling baselines; `workdir/final_metrics.json` (training) or `eval_metrics.json`
  (evaluate);
* faults (training.faults): SIGTERM finishes the step in flight, checkpoints it and exits 75;
  a checkpoint that cannot be written stops with 74; a lost process ends the others with 69;
  a NaN/Inf loss or gradient norm stops with 65;
  an unreadable latest checkpoint is moved aside and the previous one restored.

The module is a little over 400 lines because the loop and `evaluate` each wrap their work in
the fault handling above; the jobs around them live in the modules named here.

Test seam: `train_and_evaluate(..., data=..., model_cls=..., on_step=...)` accept replacements
for the data module (anything with dataset_info, TrainData, EvalData of the
fva_jax.data.pipeline API) and the model class, and a callback after every step (tests use
it to simulate a crash). The defaults are `fva_jax.data.pipeline` and `FullVideoModel`.
"""

import contextlib
import functools
import json
import math
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from fva_jax import config_lib
from fva_jax.data import batch_plan
from fva_jax.training import checkpoints, experiment, faults, steps, summaries
from fva_jax.training.distributed import initialize_distributed, to_host
from fva_jax.training.evaluation import eval_modes, evaluate_state
from fva_jax.training.experiment import Run


class _TrainProgress:
    """At each logging step: a line "step i/n (epoch e, mode), x steps/s, ETA" and the
    scalar steps_per_sec (over the steps since the last call)."""

    def __init__(self, total: int, start: int):
        self.total, self.last_step, self.last_time = total, start, time.monotonic()

    def __call__(self, step: int, epoch) -> dict[str, float]:
        now = time.monotonic()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.total - step) / max(rate, 1e-9)
        logging.info(
            "step %d/%d (epoch %d, %s): %.2f steps/s, ETA %.0f s",
            step,
            self.total,
            epoch.index,
            epoch.mode,
            rate,
            eta,
        )
        return {"steps_per_sec": rate}


# ----------------------------------------------------------------------------- the loop


def _default_data():
    from fva_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    return pipeline


def _default_model_cls():
    from fva_jax.models.full_video import FullVideoModel  # pylint: disable=g-import-not-at-top

    return FullVideoModel


@contextlib.contextmanager
def compilation_cache_for(config: ml_collections.ConfigDict, workdir):
    """JAX's persistent compilation cache in config.compilation_cache_dir ("" =
    WORKDIR/compilation_cache) while the block runs, unless one is already configured (e.g.
    JAX_COMPILATION_CACHE_DIR) or the field is "off"."""
    if jax.config.jax_compilation_cache_dir or config.compilation_cache_dir == "off":
        yield
        return
    path = config.compilation_cache_dir or str(epath.Path(workdir) / "compilation_cache")
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # the cache may have been checked (off) by earlier compiles
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()


def _train_batches(run: Run, start: int) -> Iterator[tuple[Any, int, dict[str, np.ndarray]]]:
    """(epoch, step within it, this process's rows) of every step after `start` completed
    ones, across epochs, from TrainData.iterator(mode, epoch=e, start_step=i); each batch
    gains "weight", its videos' loss coefficients (experiment.video_loss_weights) from the
    epoch's whole plan, TrainData.plan(mode, e), so a resumed step weighs what it did."""
    for epoch in run.plan.epochs:
        if epoch.first_step + epoch.num_steps <= start:
            continue
        first = max(0, start - epoch.first_step)
        videos_per_step = batch_plan.real_videos_per_step(
            run.train_data.plan(epoch.mode, epoch.index)
        )
        it = iter(run.train_data.iterator(epoch.mode, epoch=epoch.index, start_step=first))
        for i in range(first, epoch.num_steps):
            local = next(it, None)
            if local is None:
                raise ValueError(
                    f"TrainData.iterator({epoch.mode!r}, epoch={epoch.index}, "
                    f"start_step={first}) ended before step {i} of its "
                    f"steps_per_epoch = {epoch.steps_per_epoch}"
                )
            weight = experiment.video_loss_weights(local["batch_mask"], videos_per_step)
            yield epoch, i, {**local, "weight": weight}
        if epoch.num_steps == epoch.steps_per_epoch and next(it, None) is not None:
            raise ValueError(
                f"TrainData.iterator({epoch.mode!r}, epoch={epoch.index}) yielded more than "
                f"its steps_per_epoch = {epoch.steps_per_epoch} steps"
            )


def _check_finite(pending: list[tuple[int, Any]], last_saved: int | None, workdir) -> None:
    """Raises faults.NonFiniteError at the first step whose training loss or gradient norm is
    NaN/Inf (a finite loss with a non-finite gradient leaves non-finite parameters)."""
    for step, m in pending:
        if float(m.loss.count) == 0:  # a step without a real video has nothing to check
            continue
        values = {"loss": float(m.loss.compute()), "gradient norm": float(m.grad_norm.compute())}
        bad = [f"the {name} is {v}" for name, v in values.items() if not math.isfinite(v)]
        if bad:
            kept = (
                f"the last good checkpoint is step {last_saved} in {workdir}/checkpoints"
                if last_saved is not None
                else "no checkpoint was written"
            )
            raise faults.NonFiniteError(
                f"training stopped at step {step}: {' and '.join(bad)} ({kept}; nothing of step "
                f"{step} was saved). Rerunning resumes and diverges again: start anew with a new "
                "--workdir and a lower config.schedule.base_lr, config.optim.grad_clip_norm > 0 "
                "or config.model.dtype='float32' (a resume refuses changed settings).",
                step=step,
                latest_step=last_saved,
            )


def _epoch_info(epoch) -> dict[str, Any]:
    """What a checkpoint records of its data state's epoch, to check a resume against."""
    return {"mode": epoch.mode, "steps_per_epoch": epoch.steps_per_epoch}


def _check_data_state(run: Run, data_state: Mapping[str, int], saved_epoch, step, where) -> None:
    """The checkpoint's data position must be its state's step, in an epoch of the same mode
    and length, under this config's epochs."""
    e = int(data_state["epoch"])
    position = run.plan.first_step(e) + int(data_state["step"])
    now = {"mode": run.plan.mode(e), "steps_per_epoch": run.plan.steps_per_epoch(e)}
    if position != step or (saved_epoch and saved_epoch != now):
        raise ValueError(
            f"the checkpoint in {where} is at step {step}, epoch {e} ({saved_epoch}), data step "
            f"{data_state['step']}; under this config that is step {position}, epoch {e} "
            f"({now}): config.train.uniform_warmup_epochs, train.batch_size or the data settings "
            "changed since it was written. Restore them, or use a new --workdir"
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    data: Any = None,
    model_cls: Any = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Trains (resuming from `workdir/checkpoints` if any) and evaluates; returns final metrics.

    Args:
      config: a validated-on-entry config (fva_jax.config_lib.default_config() layout).
      workdir: local path or gs:// bucket path; holds checkpoints/, TensorBoard events,
        config.json, dataset_info.json and final_metrics.json.
      data: the data module (default: fva_jax.data.pipeline): dataset_info(data_config),
        TrainData and EvalData classes (TrainData.plan(mode, epoch) sets the loss weights).
      model_cls: the model class, called as model_cls(num_classes=N, **config.model)
        (default: fva_jax.models.full_video.FullVideoModel).
      on_step: called with the step number after each step (and its periodic checkpoint, if
        any; before a checkpoint written because of SIGTERM).

    Returns:
      dict(step=int, train={last step's metrics}, eval={...}, eval_uniform={...} if enabled);
      the same dict is written to workdir/final_metrics.json by process 0.

    Raises:
      fva_jax.config_lib.ConfigError: workdir's checkpoint was written with other settings
        (checkpoints.check_resume), before the data set is opened.
      fva_jax.training.faults.Preempted: SIGTERM stopped the run (see training.faults): during
        training after checkpointing the step it reached; during the set-up or an
        evaluation at once, the latest checkpoint complete. Running again resumes.
      fva_jax.training.faults.CheckpointWriteError: a checkpoint could not be written (no space, no
        permission); the latest complete one is intact.
      fva_jax.training.faults.LostProcessError: another process of a multi-process run was lost.
      fva_jax.training.faults.NonFiniteError: a step's loss or gradient norm was NaN/Inf; the
        last good checkpoint is the latest.
    """
    initialize_distributed(config.distributed)
    # A resume that would change the run is refused before the data set is built or read.
    checkpoints.check_resume(config, workdir)
    with faults.StopNotice() as notice, compilation_cache_for(config, workdir):
        with notice.interruptible("the set-up (data set, model)"):
            run = experiment.make_run(
                config,
                workdir,
                data or _default_data(),
                model_cls or _default_model_cls(),
                training=True,
            )
        status = {"last_saved": None}  # the latest complete checkpoint, for messages
        try:
            return _train_and_evaluate(run, on_step, notice, status)
        except Exception as error:  # pylint: disable=broad-except
            lost = faults.lost_process_error(
                error, latest_step=status["last_saved"], directory=run.workdir / "checkpoints"
            )
            if lost is None:
                raise
            raise lost from error
        finally:
            close = getattr(run.train_data, "close", None)
            if close is not None:
                close()


def _until_data_fails_after_sigterm(items: Iterator, notice: faults.StopNotice) -> Iterator:
    """`items`; but when reading the next one fails after SIGTERM was received (data workers
    that the same signal killed while they were starting, before they ignore it), the end."""
    items = iter(items)
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as error:  # pylint: disable=broad-except
            if not notice.received:
                raise
            logging.warning("reading data failed after SIGTERM (%s); stopping", error)
            return
        yield item


def _train_and_evaluate(run: Run, on_step, notice: faults.StopNotice, status) -> dict[str, Any]:
    c, workdir, plan = run.config, run.workdir, run.plan
    ckpt_dir = workdir / "checkpoints"
    with notice.interruptible("the set-up (model, checkpoints)"):
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
        logging.info(
            "fva_jax: %d steps: %s; %d videos per sampled step, full-video steps of up to %d "
            "frames per device; %d devices / %d processes, %d classes",
            plan.total_steps,
            plan.describe(),
            c.train.batch_size,
            c.data.frames_per_device,
            jax.device_count(),
            jax.process_count(),
            run.num_classes,
        )
        state = experiment.init_state(run)
    mngr = checkpoints.checkpoint_manager(workdir, c.checkpoint.keep)
    writer = summaries.SummaryWriter(workdir if jax.process_index() == 0 else None)
    # Closed also when a step fails (NaN loss or gradient, an exception in on_step, SIGTERM).
    with contextlib.closing(writer), contextlib.closing(mngr):
        last_train = {}
        with notice.interruptible(f"restoring from {ckpt_dir}"):
            last_saved, restored = checkpoints.restore_latest(mngr, state)
        status["last_saved"] = last_saved
        with notice.deferred():  # whole files or none; a resumed start keeps config.json
            checkpoints.write_run_info(workdir, c, run.info, resumed_from=last_saved)
        if restored is not None:
            # The checkpoint already holds the (fine-tuned) weights: train.init_from is not
            # re-applied.
            state, data_state, last_train, saved_epoch = restored
            if last_saved <= plan.total_steps:
                _check_data_state(run, data_state, saved_epoch, last_saved, ckpt_dir)
            logging.info("Resumed from checkpoint step %d in %s", last_saved, ckpt_dir)
        elif c.train.init_from:
            with notice.interruptible("loading train.init_from"):
                state = experiment.load_pretrained(run, state)
        start = int(to_host(state.step))

        if start == 0:
            writer.write_hparams(summaries.flatten_hparams(c.to_dict()))
        train_steps, eval_steps = (
            experiment.jitted_train_steps(run),
            experiment.jitted_eval_steps(run, eval_modes(c).values()),
        )
        progress = _TrainProgress(plan.total_steps, start)

        def evaluate_and_write(step: int, state: steps.TrainState) -> dict[str, dict[str, Any]]:
            timelines = []
            results = evaluate_state(run, eval_steps, state, timelines)
            summaries.write_eval(writer, step, results)
            if jax.process_index() == 0:
                summaries.write_timelines(
                    writer, step, timelines, c.model.num_clusters, run.class_names
                )
            return results

        def save(step: int, epoch, i: int) -> None:
            nonlocal last_saved
            data_state = {"epoch": epoch.index, "step": i + 1}
            checkpoints.save(
                mngr,
                step,
                state,
                data_state,
                last_train,
                _epoch_info(epoch),
                settings=config_lib.run_settings(c),
                total_steps=plan.total_steps,
            )
            last_saved = status["last_saved"] = step

        def checkpoint_and_stop(done) -> faults.Preempted:
            """Checkpoints `done`, the last step trained (unless it is checkpointed), and
            returns the Preempted exception that stops the run."""
            nonlocal last_train
            if done is not None and done[0] != last_saved:
                checked = [(s, to_host(m)) for s, m in pending]
                _check_finite(checked, last_saved, workdir)  # nothing non-finite is saved
                if checked:
                    last_train = {k: float(v) for k, v in checked[-1][1].compute().items()}
                save(*done)
            where = (
                f"checkpoint step {last_saved} in {ckpt_dir}"
                if last_saved is not None
                else f"nothing checkpointed in {ckpt_dir}"
            )
            message = (
                f"stopped by SIGTERM at step {done[0] if done else start} of "
                f"{plan.total_steps}, {notice.seconds_since():.1f} s after the signal; {where}. "
                "Run the same command again to resume"
            )
            logging.warning("%s", message)
            return faults.Preempted(message, last_saved)

        batches = experiment.prefetch_to_devices(
            _train_batches(run, start),
            lambda item: (*item[:2], experiment.global_batch(run, item[2])),
        )
        pending: list[
            tuple[int, steps.TrainMetrics]
        ] = []  # per-step metrics not yet checked/written
        done = None  # (step, epoch, i) of the last step trained
        stop = False  # SIGTERM: checkpoint `done` and stop
        if notice.received:  # one process: SIGTERM came after the last interruptible part
            raise checkpoint_and_stop(None)
        for epoch, i, batch in _until_data_fails_after_sigterm(batches, notice):
            step = epoch.first_step + i + 1  # optimizer steps done after this one
            state, m = train_steps[epoch.mode](state, batch)
            pending.append((step, m))
            done = (step, epoch, i)

            is_last = step == plan.total_steps
            do_log = step % c.train.log_every_steps == 0 or is_last
            do_save = step % c.checkpoint.every_steps == 0 or is_last
            do_eval = (c.eval.every_steps > 0 and step % c.eval.every_steps == 0) and not is_last
            if do_log or do_save or do_eval:
                pending = [(s, to_host(m)) for s, m in pending]
                _check_finite(pending, last_saved, workdir)
                window = functools.reduce(lambda a, b: a.merge(b), [m for _, m in pending])
                scalars = {f"train/{k}": float(v) for k, v in window.compute().items()}
                writer.write_scalars(step, {**scalars, **progress(step, epoch)})
                last_train = {k: float(v) for k, v in pending[-1][1].compute().items()}
                pending = []
            if do_eval:
                try:
                    # Only time is lost: the state is checkpointed below either way (a restart
                    # does not repeat this evaluation).
                    with notice.interruptible(f"the evaluation at step {step}"):
                        evaluate_and_write(step, state)
                except faults.Preempted:
                    stop = True
            if do_save:
                save(step, epoch, i)
            if on_step is not None:
                on_step(step)
            if notice.reached(step) or stop:  # every step, on every process
                stop = True
                break
        if not stop and notice.received and (done[0] if done else start) < plan.total_steps:
            stop = True  # the data ended early after SIGTERM
        if stop:
            raise checkpoint_and_stop(done)

        if start >= plan.total_steps:
            logging.info("Training already finished at step %d; evaluating only.", start)
        final = {"step": int(to_host(state.step)), "train": last_train}
        with notice.interruptible(
            f"the final evaluation (checkpoint step {last_saved} is complete: the same command "
            "evaluates it again)"
        ):
            final.update(evaluate_and_write(final["step"], state))
    checkpoints.write_json(workdir / "final_metrics.json", final)
    logging.info("FINAL_METRICS %s", json.dumps(final, sort_keys=True))
    return final


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, data: Any = None, model_cls: Any = None
) -> dict[str, Any]:
    """Evaluates the latest checkpoint in workdir; writes workdir/eval_metrics.json.

    SIGTERM (one process) raises faults.Preempted at once; nothing is written then."""
    initialize_distributed(config.distributed)
    with (
        faults.StopNotice() as notice,
        notice.interruptible("the evaluation"),
        compilation_cache_for(config, workdir),
    ):
        run = experiment.make_run(
            config,
            workdir,
            data or _default_data(),
            model_cls or _default_model_cls(),
            training=False,
        )
        state = experiment.init_state(run)
        mngr = checkpoints.checkpoint_manager(run.workdir, config.checkpoint.keep)
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {run.workdir / 'checkpoints'}; train first "
                "(--mode=train) or point --workdir at a trained run"
            )
        state, *_ = checkpoints.restore(mngr, step, state)
        results = {
            "step": step,
            **evaluate_state(
                run, experiment.jitted_eval_steps(run, eval_modes(config).values()), state
            ),
        }
        mngr.close()
        with notice.deferred():
            checkpoints.write_json(run.workdir / "eval_metrics.json", results)
    logging.info("EVAL_METRICS %s", json.dumps(results, sort_keys=True))
    return results
