"""Training and evaluation loop: `train_and_evaluate(config, workdir)`, `evaluate(...)`.

One readable loop in the style of big_vision / flax examples/imagenet:

* a `Mesh` over every device of every host with one axis, "data"; batches are
  `NamedSharding(mesh, P("data"))` global arrays built from each host's slice with
  `jax.make_array_from_process_local_data`; parameters, BatchNorm statistics and the
  optimizer state are replicated;
* `jax.jit` of fva_jax.steps.train_step / eval_step, the train state donated;
* the optimizer and schedule of fva_jax.optim;
* optional uniform-sampling warm-up: the first `config.train.uniform_warmup_epochs` train with
  uniform frame sampling, then full videos with clustering (two jitted steps, same params);
* fva_jax.checkpoints in `workdir/checkpoints`: every `config.checkpoint.every_steps` and
  at the end, resumed automatically with params, BatchNorm statistics, optimizer state, step,
  RNG key and the data iterator state, so an interrupted run restarted with the same command
  ends with exactly the metrics of an uninterrupted one;
* clu metrics and metric writers (TensorBoard + logging; only process 0 writes files), clu
  `ReportProgress` (steps/s, ETA);
* a NaN/Inf training loss stops the run with `FloatingPointError` before anything non-finite
  is checkpointed;
* `workdir/final_metrics.json` with the step, the last step's training metrics and the
  evaluation metrics (clustered, and uniform when `config.eval.also_uniform`).

Test seam: `train_and_evaluate(..., data=..., model_cls=..., on_step=...)` accept replacements
for the data pipeline module and the model class, and a callback after every step (tests use
it to simulate a crash). The defaults are `fva_jax.data.pipeline` and `FullVideoModel`.
"""

import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from fva_jax import checkpoints, config_lib, optim, steps, summaries
from fva_jax.distributed import initialize_distributed, to_host

_BATCH_KEYS = ("video", "mask", "label", "batch_mask")


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class Run:
    """What training and evaluation of one config share; built whole by `make_run`."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    data: Any  # the data pipeline module
    info: dict[str, Any]  # data.dataset_info(config.data)
    class_names: list[str]
    steps_per_epoch: int
    total_steps: int
    uniform_steps: int  # the first steps train with uniform sampling (warm-up)
    batch_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding
    model: Any  # the configured model
    uniform_model: Any  # the same with sampling="uniform"
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    jit: Callable  # jax.jit with the config's compiler options

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])


def _init_variables_fn(config: ml_collections.ConfigDict, model) -> Callable:
    """rng -> (params, batch_stats) of the model, initialised on a short video (parameter
    shapes do not depend on the number of frames)."""
    c = config
    frames = min(
        c.data.max_frames, max(c.model.num_clusters * c.model.dense_stride, c.model.chunk_size)
    )
    video = jnp.zeros((1, frames, c.data.crop_size, c.data.crop_size, 3), jnp.uint8)
    mask = jnp.ones((1, frames), bool)

    def init(rng):
        r_params, r_dropout, r_sampling = jax.random.split(rng, 3)
        variables = model.init(
            {"params": r_params, "dropout": r_dropout, "sampling": r_sampling},
            video,
            mask,
            train=False,
        )
        return variables["params"], variables.get("batch_stats", {})

    return init


def make_run(config: ml_collections.ConfigDict, workdir, data, model_cls) -> Run:
    config_lib.validate_config(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    info = data.dataset_info(config.data)
    num_classes = int(info["num_classes"])
    num_train = int(info["num_examples"][config.data.train_split])
    steps_per_epoch = max(1, num_train // config.train.batch_size)
    if config.train.num_train_steps > 0:
        total_steps = int(config.train.num_train_steps)
    else:
        total_steps = max(1, int(math.ceil(config.train.num_epochs * steps_per_epoch)))
    uniform_steps = min(
        total_steps, int(round(config.train.uniform_warmup_epochs * steps_per_epoch))
    )
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    model = model_cls(num_classes=num_classes, **steps.model_kwargs(config))
    schedule = optim.make_schedule(config, total_steps, steps_per_epoch)
    # The optimizer reads only the parameters' structure and shapes: abstract ones suffice.
    abstract_params, _ = jax.eval_shape(_init_variables_fn(config, model), jax.random.PRNGKey(0))
    return Run(
        config=config,
        workdir=epath.Path(workdir),
        data=data,
        info=info,
        class_names=list(info.get("class_names", [])),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        uniform_steps=uniform_steps,
        batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
        replicated=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        model=model,
        uniform_model=model_cls(
            num_classes=num_classes, **steps.model_kwargs(config, sampling="uniform")
        ),
        schedule=schedule,
        tx=optim.make_optimizer(config, abstract_params, schedule),
        jit=functools.partial(
            jax.jit,
            compiler_options=(
                {"xla_backend_optimization_level": 0} if config.fast_compile else None
            ),
        ),
    )


def init_state(run: Run) -> steps.TrainState:
    """A fresh replicated TrainState: random parameters (seed config.seed), zero step."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(run.config.seed))
    params, batch_stats = run.jit(
        _init_variables_fn(run.config, run.model), out_shardings=run.replicated
    )(init_rng)
    opt_state = run.jit(run.tx.init, out_shardings=run.replicated)(params)
    return steps.TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=jax.device_put(train_rng, run.replicated),
    )


def load_pretrained(run: Run, state: steps.TrainState) -> steps.TrainState:
    """state with config.train.init_from's backbone copied into params and batch_stats
    (fva_jax.import_weights; the classifier is kept when the class count differs). The
    optimizer state is rebuilt from the new params."""
    from fva_jax import import_weights  # pylint: disable=g-import-not-at-top

    path = run.config.train.init_from
    merged = import_weights.merge_pretrained(
        {"params": state.params, "batch_stats": state.batch_stats},
        import_weights.load_pretrained(path),
        log_fn=logging.info,
    )
    logging.info("Initialised the backbone from %s", path)
    opt_state = run.jit(run.tx.init, out_shardings=run.replicated)(merged["params"])
    return state.replace(
        params=merged["params"], batch_stats=merged["batch_stats"], opt_state=opt_state
    )


def jitted_train_steps(run: Run) -> dict[str, Callable]:
    """Jitted train steps by sampling: "main" (the configured one) and, for the warm-up,
    "uniform"."""

    def make(model):
        return run.jit(
            functools.partial(steps.train_step, model=model, tx=run.tx, schedule=run.schedule),
            in_shardings=(run.replicated, run.batch_sharding),
            out_shardings=(run.replicated, run.replicated),
            donate_argnums=(0,),
        )

    jitted = {"main": make(run.model)}
    if run.uniform_steps > 0:
        jitted["uniform"] = make(run.uniform_model)
    return jitted


def jitted_eval_steps(run: Run) -> dict[str, Callable]:
    """Jitted eval steps by result name: "eval" and, if configured, "eval_uniform"."""

    def make(model):
        # Per-video outputs stay sharded like the batch: each host reads its own rows.
        return run.jit(
            functools.partial(steps.eval_step, model=model),
            in_shardings=(run.replicated, run.batch_sharding),
            out_shardings=(run.replicated, run.batch_sharding),
        )

    jitted = {"eval": make(run.model)}
    if run.config.eval.also_uniform and run.config.model.sampling != "uniform":
        jitted["eval_uniform"] = make(run.uniform_model)
    return jitted


def global_batch(run: Run, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global arrays sharded over "data"."""
    missing = [k for k in _BATCH_KEYS if k not in local]
    if missing:
        raise KeyError(f"the data pipeline's batch lacks {missing}; it has {sorted(local)}")
    return {
        k: jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(local[k]))
        for k in _BATCH_KEYS
    }


# ----------------------------------------------------------------------------- evaluation


class _Progress:
    """Logs "what: i/n batches (k videos), x videos/s, ETA" at most every `every_s` seconds
    and when done: long evaluations (e.g. Breakfast's minutes-long videos) show they move."""

    def __init__(
        self, what: str, total: int, items_per_batch: int, unit: str, every_s: float = 30.0
    ):
        self.what, self.total, self.per_batch, self.unit = what, total, items_per_batch, unit
        self.every_s = every_s
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and (done == 0 or now - self.last < self.every_s):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done * self.per_batch / elapsed
        eta = (self.total - done) * elapsed / max(done, 1)
        logging.info(
            "%s: %d/%d batches (%d %s) in %.0f s, %.1f %s/s%s",
            self.what,
            done,
            self.total,
            done * self.per_batch,
            self.unit,
            elapsed,
            rate,
            self.unit,
            "" if done >= self.total else f", ETA {eta:.0f} s",
        )


def evaluate_state(
    run: Run,
    eval_steps: Mapping[str, Callable],
    state: steps.TrainState,
    timelines: list | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics over the whole eval split, per eval mode ("eval", maybe "eval_uniform").

    timelines: if a list, the first config.eval.num_timeline_videos videos of this host's
      first eval batch are appended to it as (frames uint8 (n, H, W, 3) of the valid frames,
      segment_ids int32 (n,), label, prediction) of the "eval" mode (the configured sampling).
    """
    c = run.config
    num_eval = int(run.info["num_examples"][c.data.eval_split])
    local_batch = c.eval.batch_size // jax.process_count()
    # Every host must run the same number of steps (each is a collective): hosts whose
    # slice runs out early feed all-padding batches (batch_mask False).
    per_host = math.ceil(num_eval / jax.process_count())
    num_batches = max(1, math.ceil(per_host / local_batch))
    results = {}
    for name, step_fn in eval_steps.items():
        it = iter(run.data.eval_iterator(c.data, batch_size=local_batch))
        total, template = None, None
        progress = _Progress(
            f"{name} on {c.data.name}/{c.data.eval_split}",
            num_batches,
            local_batch * jax.process_count(),
            "videos",
        )
        for i in range(num_batches):
            progress(i)
            local = next(it, None)
            if local is None:
                if template is None:
                    raise ValueError(
                        f"eval split {c.data.eval_split!r} of {c.data.name!r} yielded no "
                        "batch on this host"
                    )
                local = {k: np.zeros_like(np.asarray(template[k])) for k in _BATCH_KEYS}
            m, per_video = step_fn(state, global_batch(run, local))
            if timelines is not None and name == "eval" and template is None:
                timelines += summaries.timeline_inputs(local, per_video, c.eval.num_timeline_videos)
            template = local
            total = m if total is None else total.merge(m)
        if next(it, None) is not None:
            raise ValueError(
                f"eval_iterator yielded more than {num_batches} batches of "
                f"{local_batch} on process {jax.process_index()} for "
                f"{num_eval} eval examples over {jax.process_count()} processes"
            )
        total = to_host(total)
        progress(num_batches)
        values = {k: float(v) for k, v in total.compute().items()}
        per_class = total.mean_class_accuracy.per_class()
        values["num_examples"] = int(np.asarray(total.mean_class_accuracy.total).sum())
        values["per_class_accuracy"] = {
            (run.class_names[i] if i < len(run.class_names) else str(i)): (
                None if np.isnan(a) else float(a)
            )
            for i, a in enumerate(per_class)
        }
        results[name] = values
    return results


def _write_timelines(run: Run, writer, step: int, timelines) -> None:
    if jax.process_index() == 0:
        summaries.write_timelines(
            writer, step, timelines, run.config.model.num_clusters, run.class_names
        )


# ----------------------------------------------------------------------------- the loop


def _default_data():
    from fva_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    return pipeline


def _default_model_cls():
    from fva_jax.models.full_video import FullVideoModel  # pylint: disable=g-import-not-at-top

    return FullVideoModel


def _check_finite(pending: list[tuple[int, Any]], last_saved: int | None, workdir) -> None:
    """Raises FloatingPointError at the first step whose training loss is NaN/Inf."""
    for step, m in pending:
        loss = float(m.loss.compute())
        if not math.isfinite(loss):
            kept = (
                f"the last good checkpoint is step {last_saved} in {workdir}/checkpoints"
                if last_saved is not None
                else "no checkpoint was written"
            )
            raise FloatingPointError(
                f"training loss is {loss} at step {step}; stopping ({kept}, nothing non-finite was "
                "saved). Try a lower config.schedule.base_lr, config.optim.grad_clip_norm > 0, or "
                "config.model.dtype='float32'."
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
      workdir: local path or gs:// bucket path; holds checkpoints/, TensorBoard events and
        final_metrics.json.
      data: the data pipeline, an object with dataset_info(data_config),
        train_iterator(data_config, *, batch_size, seed, state) and
        eval_iterator(data_config, *, batch_size) (default: fva_jax.data.pipeline).
      model_cls: the model class, called as model_cls(num_classes=N, **config.model)
        (default: fva_jax.models.full_video.FullVideoModel).
      on_step: called with the step number after each step (and its checkpoint, if any).

    Returns:
      dict(step=int, train={last step's metrics}, eval={...}, eval_uniform={...} if enabled);
      the same dict is written to workdir/final_metrics.json by process 0.
    """
    initialize_distributed(config.distributed)
    run = make_run(config, workdir, data or _default_data(), model_cls or _default_model_cls())
    c = config
    workdir = run.workdir
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    logging.info(
        "fva_jax: %d steps (%d per epoch, %d with uniform sampling), global batch %d "
        "over %d devices / %d processes, %d classes",
        run.total_steps,
        run.steps_per_epoch,
        run.uniform_steps,
        c.train.batch_size,
        jax.device_count(),
        jax.process_count(),
        run.num_classes,
    )
    checkpoints.write_run_info(workdir, c, run.info)

    state = init_state(run)
    mngr = checkpoints.checkpoint_manager(workdir, c.checkpoint.keep)
    data_state, last_train = None, {}
    last_saved = mngr.latest_step()
    if last_saved is not None:
        # The checkpoint already holds the (fine-tuned) weights: train.init_from is not re-applied.
        state, data_state, last_train = checkpoints.restore(mngr, last_saved, state)
        logging.info("Resumed from checkpoint step %d in %s", last_saved, workdir / "checkpoints")
    elif c.train.init_from:
        state = load_pretrained(run, state)
    start = int(to_host(state.step))

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams(summaries.flatten_hparams(c.to_dict()))
    report = periodic_actions.ReportProgress(
        num_train_steps=run.total_steps, writer=writer, every_steps=c.train.log_every_steps
    )
    train_iter = run.data.train_iterator(
        c.data, batch_size=c.train.batch_size // jax.process_count(), seed=c.seed, state=data_state
    )
    train_steps = jitted_train_steps(run)
    eval_steps = jitted_eval_steps(run)

    def evaluate_and_write(step: int, state: steps.TrainState) -> dict[str, dict[str, Any]]:
        timelines = []
        results = evaluate_state(run, eval_steps, state, timelines)
        summaries.write_eval(writer, step, results)
        _write_timelines(run, writer, step, timelines)
        return results

    pending: list[tuple[int, steps.TrainMetrics]] = []  # per-step metrics not yet checked/written
    for step in range(start + 1, run.total_steps + 1):
        batch = global_batch(run, next(train_iter))
        step_fn = train_steps["uniform" if step <= run.uniform_steps else "main"]
        state, m = step_fn(state, batch)
        pending.append((step, m))
        report(step)

        is_last = step == run.total_steps
        do_log = step % c.train.log_every_steps == 0 or is_last
        do_save = step % c.checkpoint.every_steps == 0 or is_last
        do_eval = (c.eval.every_steps > 0 and step % c.eval.every_steps == 0) and not is_last
        if do_log or do_save or do_eval:
            pending = [(s, to_host(m)) for s, m in pending]
            _check_finite(pending, last_saved, workdir)
            window = functools.reduce(lambda a, b: a.merge(b), [m for _, m in pending])
            writer.write_scalars(
                step, {f"train/{k}": float(v) for k, v in window.compute().items()}
            )
            last_train = {k: float(v) for k, v in pending[-1][1].compute().items()}
            pending = []
        if do_eval:
            evaluate_and_write(step, state)
        if do_save:
            checkpoints.save(mngr, step, state, train_iter.get_state(), last_train)
            last_saved = step
        if on_step is not None:
            on_step(step)

    if start >= run.total_steps:
        logging.info("Training already finished at step %d; evaluating only.", start)
    final = {"step": int(to_host(state.step)), "train": last_train}
    final.update(evaluate_and_write(final["step"], state))
    writer.flush()
    writer.close()
    mngr.close()
    checkpoints.write_json(workdir / "final_metrics.json", final)
    logging.info("FINAL_METRICS %s", json.dumps(final, sort_keys=True))
    return final


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, data: Any = None, model_cls: Any = None
) -> dict[str, Any]:
    """Evaluates the latest checkpoint in workdir; writes workdir/eval_metrics.json."""
    initialize_distributed(config.distributed)
    run = make_run(config, workdir, data or _default_data(), model_cls or _default_model_cls())
    state = init_state(run)
    mngr = checkpoints.checkpoint_manager(run.workdir, config.checkpoint.keep)
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {run.workdir / 'checkpoints'}; train first "
            "(--mode=train) or point --workdir at a trained run"
        )
    state, _, _ = checkpoints.restore(mngr, step, state)
    results = {"step": step, **evaluate_state(run, jitted_eval_steps(run), state)}
    mngr.close()
    checkpoints.write_json(run.workdir / "eval_metrics.json", results)
    logging.info("EVAL_METRICS %s", json.dumps(results, sort_keys=True))
    return results
