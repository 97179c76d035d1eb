"""An experiment: what one config builds for training and evaluation, and how its batches
reach the devices.

* `Run` / `make_run`: the config checked against the devices, the data (`data.TrainData`,
  `data.EvalData` of this process), the epoch plan, both models (mode "full": the configured
  model; mode "sampled": the same with sampling="uniform", which on K host-chosen valid frames
  takes each frame once), the optimizer and schedule, the mesh shardings;
* `init_state`, `load_pretrained`: the TrainState;
* `jitted_train_steps` / `jitted_eval_steps`: fva_jax.training.steps jitted with the shardings, by
  data mode (each compiles once per batch shape);
* `video_loss_weights`: each video's coefficient in its step's loss (the batch's "weight");
* `global_batch`, `prefetch_to_devices`: NumPy rows of this process -> global arrays, put on
  the devices ahead of the step that uses them.
"""

import collections
import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from fva_jax import config_lib
from fva_jax.training import optim, steps
from fva_jax.training.epochs import EpochPlan

_BATCH_KEYS = ("video", "mask", "label", "batch_mask")
_OPTIONAL_BATCH_KEYS = ("weight",)  # training batches (video_loss_weights); eval has none


@dataclasses.dataclass(frozen=True)
class Run:
    """What training and evaluation of one config share; built whole by `make_run`."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    info: dict[str, Any]  # data.dataset_info(config.data)
    class_names: list[str]
    train_data: Any  # data.TrainData of this process (None when only evaluating)
    eval_data: Any  # data.EvalData of this process
    plan: EpochPlan | None  # the training epochs (None when only evaluating)
    batch_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding
    models: dict[str, Any]  # by data mode: "full" (configured), "sampled" (sampling="uniform")
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
    frames = max(c.model.num_clusters * c.model.dense_stride, c.model.chunk_size)
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


def make_run(config: ml_collections.ConfigDict, workdir, data, model_cls, *, training: bool) -> Run:
    """Validates the config against the devices, opens the data, builds models and optimizer.
    training=False (evaluate only) opens no training data."""
    config_lib.validate_config(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    info = data.dataset_info(config.data)
    num_classes = int(info["num_classes"])
    layout = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
    )
    train_data, plan = None, None
    if training:
        train_data = data.TrainData(config, **layout)
        plan = EpochPlan.from_config(
            config, {mode: train_data.steps_per_epoch(mode) for mode in EpochPlan.modes_of(config)}
        )
        schedule = optim.make_schedule(config, plan.total_steps, plan.epoch_to_step)
    else:
        # Evaluation restores the optimizer state only for its structure: any schedule will do.
        schedule = optax.constant_schedule(config.schedule.base_lr)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    models = {
        "full": model_cls(num_classes=num_classes, **steps.model_kwargs(config)),
        "sampled": model_cls(
            num_classes=num_classes, **steps.model_kwargs(config, sampling="uniform")
        ),
    }
    # The optimizer reads only the parameters' structure and shapes: abstract ones suffice.
    abstract_params, _ = jax.eval_shape(
        _init_variables_fn(config, models["full"]), jax.random.PRNGKey(0)
    )
    return Run(
        config=config,
        workdir=epath.Path(workdir),
        info=info,
        class_names=list(info.get("class_names", [])),
        train_data=train_data,
        eval_data=data.EvalData(config, **layout),
        plan=plan,
        batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
        replicated=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        models=models,
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
        _init_variables_fn(run.config, run.models["full"]), out_shardings=run.replicated
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
    (fva_jax.models.resnet_weights; the classifier is kept when the class count differs). The
    optimizer state is rebuilt from the new params."""
    from fva_jax.models import resnet_weights  # pylint: disable=g-import-not-at-top

    path = run.config.train.init_from
    merged = resnet_weights.merge_pretrained(
        {"params": state.params, "batch_stats": state.batch_stats},
        resnet_weights.load_pretrained(path),
        log_fn=logging.info,
    )
    logging.info("Initialised the backbone from %s", path)
    opt_state = run.jit(run.tx.init, out_shardings=run.replicated)(merged["params"])
    return state.replace(
        params=merged["params"], batch_stats=merged["batch_stats"], opt_state=opt_state
    )


def jitted_train_steps(run: Run) -> dict[str, Callable]:
    """Jitted train steps by data mode ("sampled", "full") for the modes the plan trains in.
    Each compiles once per batch shape (length bucket)."""

    def make(model):
        return run.jit(
            functools.partial(steps.train_step, model=model, tx=run.tx, schedule=run.schedule),
            in_shardings=(run.replicated, run.batch_sharding),
            out_shardings=(run.replicated, run.replicated),
            donate_argnums=(0,),
        )

    return {mode: make(run.models[mode]) for mode in {e.mode for e in run.plan.epochs}}


def jitted_eval_steps(run: Run, modes: Iterable[str]) -> dict[str, Callable]:
    """Jitted eval steps by data mode, for `modes`."""

    def make(model):
        # Per-video outputs stay sharded like the batch: each host reads its own rows.
        return run.jit(
            functools.partial(steps.eval_step, model=model),
            in_shardings=(run.replicated, run.batch_sharding),
            out_shardings=(run.replicated, run.batch_sharding),
        )

    return {mode: make(run.models[mode]) for mode in set(modes)}


def video_loss_weights(batch_mask: np.ndarray, real_videos_per_step: float) -> np.ndarray:
    """float32 (b,): each row's coefficient in its step's loss (steps.loss_and_grads), 0 on
    empty slots.

    Every real video of an epoch gets 1 / real_videos_per_step (the epoch's mean number of
    real videos per global step, batch_plan.real_videos_per_step), whatever its length bucket
    and however many videos share its step: a step's loss is the sum of its videos' weighted
    cross-entropies, on average over the epoch the mean cross-entropy of a step, so the
    learning rate keeps its meaning. (A mean per step would weigh a video alone in a long
    bucket's step as much as a whole step of short videos.) Clipping and the optimizer still
    act on each step's gradient.
    """
    return np.asarray(batch_mask, np.float32) / np.float32(real_videos_per_step)


def global_batch(run: Run, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows (NumPy) -> global arrays sharded over "data" (an asynchronous copy
    to the devices). Only the keys the steps read (and the loss weight) are copied; host-only
    keys of the batch (the pipeline's "index") stay in `local`."""
    missing = [k for k in _BATCH_KEYS if k not in local]
    if missing:
        raise KeyError(f"the data pipeline's batch lacks {missing}; it has {sorted(local)}")
    return {
        k: jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(local[k]))
        for k in _BATCH_KEYS + tuple(k for k in _OPTIONAL_BATCH_KEYS if k in local)
    }


def prefetch_to_devices(items: Iterable, put: Callable, size: int = 2) -> Iterator:
    """put(item) of every item, `size` ahead: while the caller's step runs (JAX dispatch is
    asynchronous), the next batches are read on the host and copied to the devices."""
    items = iter(items)
    queue = collections.deque(put(item) for item in itertools.islice(items, size))
    while queue:
        yield queue.popleft()
        queue.extend(put(item) for item in itertools.islice(items, 1))
