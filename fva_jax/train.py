"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One readable loop in the style of big_vision / flax examples/imagenet:

* a `Mesh` over every device of every host with one axis, "data"; batches are
  `NamedSharding(mesh, P("data"))` global arrays built from each host's slice with
  `jax.make_array_from_process_local_data`; parameters, BatchNorm statistics and the
  optimizer state are replicated;
* `jax.jit` train and eval steps, the train state donated;
* optax SGD with momentum (the paper's recipe) or AdamW, linear warm-up then cosine or step
  decay, global-norm clipping, a larger learning rate for the classifier;
* optional uniform-sampling warm-up: the first `config.train.uniform_warmup_epochs` train with
  uniform frame sampling, then full videos with clustering (two jitted steps, same params);
* orbax `CheckpointManager` in `workdir/checkpoints`: every `config.checkpoint.every_steps` and
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

import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from fva_jax import config_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_BATCH_KEYS = ("video", "mask", "label", "batch_mask")


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds besides the data iterator state.

    step: int32 scalar, number of optimizer steps taken.
    rng: uint32 (2,) raw PRNG key; step t uses fold_in(rng, t), so resuming needs no RNG state
         beyond this key.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


# ----------------------------------------------------------------------------- metrics


@flax.struct.dataclass
class PerClassAccuracy(metrics.Metric):
    """Mean over classes of the per-class top-1 accuracy (classes without examples ignored).

    correct, total: float32 (num_classes,) counts of correct and all (unmasked) examples.
    """

    correct: jax.Array
    total: jax.Array

    @classmethod
    def from_model_output(cls, *, logits, labels, mask=None, **_):
        num_classes = logits.shape[-1]
        if mask is None:
            mask = jnp.ones(labels.shape, bool)
        onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
        hit = (jnp.argmax(logits, -1) == labels)[:, None]
        return cls(correct=(onehot * hit).sum(0), total=onehot.sum(0))

    def merge(self, other):
        return type(self)(correct=self.correct + other.correct, total=self.total + other.total)

    def compute(self):
        seen = self.total > 0
        return jnp.sum(
            jnp.where(seen, self.correct / jnp.maximum(self.total, 1), 0.0)
        ) / jnp.maximum(seen.sum(), 1)

    def per_class(self) -> np.ndarray:
        """float (num_classes,) accuracy of each class; NaN for classes without examples."""
        correct, total = np.asarray(self.correct), np.asarray(self.total)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, correct / total, np.nan)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")
    grad_norm: metrics.LastValue.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")
    mean_class_accuracy: PerClassAccuracy


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """float32 (B,): 1 where the label is among the k highest logits (ties count as wrong)."""
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    higher = jnp.sum(logits > label_logit, axis=-1)
    return (higher < k).astype(jnp.float32)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


# ----------------------------------------------------------------------------- optimizer


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def classifier_lr_multipliers(params, optim_config) -> Any:
    """Tree of floats like params: classifier kernel x classifier_lr_mult, its bias x
    classifier_bias_lr_mult, everything else 1. The classifier is every parameter under a
    module named `optim_config.classifier_name` (the model's final Dense)."""
    name = optim_config.classifier_name
    found = []

    def mult(path, _):
        names = _path_names(path)
        if name not in names[:-1]:
            return 1.0
        found.append(names)
        return (
            optim_config.classifier_bias_lr_mult
            if names[-1] == "bias"
            else optim_config.classifier_lr_mult
        )

    tree = jax.tree_util.tree_map_with_path(mult, params)
    if not found:
        top = sorted(params.keys()) if isinstance(params, Mapping) else []
        raise ValueError(
            f"config.optim.classifier_name={name!r} matches no module in the model's params; "
            f"top-level modules: {top}"
        )
    return tree


def weight_decay_mask(params) -> Any:
    """True for conv/dense kernels (ndim > 1): as in TSM, BatchNorm scales/biases and biases
    get no weight decay."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by a fixed per-parameter factor (per-group learning rates;
    after momentum this equals PyTorch's per-group lr, since momentum is linear)."""
    return optax.stateless(
        lambda updates, params=None: jax.tree.map(
            lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers
        )
    )


def make_schedule(
    config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warm-up from 0 over schedule.warmup_epochs, then cosine/step/constant."""
    s = config.schedule
    warmup = min(int(round(s.warmup_epochs * steps_per_epoch)), total_steps)
    rest = max(total_steps - warmup, 1)
    if s.name == "cosine":
        main = optax.cosine_decay_schedule(s.base_lr, decay_steps=rest, alpha=s.end_lr_factor)
    elif s.name == "step":
        boundaries = {}
        for epoch in s.step_epochs:
            b = int(round(epoch * steps_per_epoch)) - warmup
            if 0 < b < rest:
                boundaries[b] = boundaries.get(b, 1.0) * s.step_factor
        main = optax.piecewise_constant_schedule(s.base_lr, boundaries)
    else:
        main = optax.constant_schedule(s.base_lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, s.base_lr, warmup), main], [warmup])


def make_optimizer(
    config: ml_collections.ConfigDict, params, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Clip -> (SGD: coupled weight decay, momentum | AdamW) -> lr -> classifier multipliers.

    SGD follows PyTorch's `torch.optim.SGD(weight_decay=...)` used by the paper: the decay is
    added to the (clipped) gradient before momentum.
    """
    o = config.optim
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    mask = weight_decay_mask(params)
    if o.name == "sgd":
        if o.weight_decay > 0:
            parts.append(optax.add_decayed_weights(o.weight_decay, mask=mask))
        if o.momentum > 0:
            parts.append(optax.trace(decay=o.momentum, nesterov=o.nesterov))
    else:
        parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
        if o.weight_decay > 0:
            parts.append(optax.add_decayed_weights(o.weight_decay, mask=mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    parts.append(_scale_by_tree(classifier_lr_multipliers(params, o)))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- distributed


def _multi_host_environment() -> bool:
    """True in environments that launch one process per host (pods, SLURM, Open MPI)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def initialize_distributed(dist_config: ml_collections.ConfigDict) -> bool:
    """Calls jax.distributed.initialize() when config.distributed asks for it (see config_lib).

    Must run before any JAX computation. Returns True if this call initialised it.
    """
    if jax.distributed.is_initialized() or dist_config.initialize == "never":
        return False
    if (
        dist_config.initialize == "auto"
        and not dist_config.coordinator_address
        and not _multi_host_environment()
    ):
        return False
    if dist_config.cpu_collectives != "none":
        # Only affects the CPU backend; needed for multi-process CPU runs (DESIGN.md §4).
        jax.config.update("jax_cpu_collectives_implementation", dist_config.cpu_collectives)
    kwargs = {}
    if dist_config.coordinator_address:
        kwargs["coordinator_address"] = dist_config.coordinator_address
    if dist_config.num_processes >= 1:
        kwargs["num_processes"] = dist_config.num_processes
    if dist_config.process_id >= 0:
        kwargs["process_id"] = dist_config.process_id
    jax.distributed.initialize(**kwargs)
    return True


def _gather_json_from_processes(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    lengths = lengths.reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(everything[i, : lengths[i]]).decode()) for i in range(len(lengths))]


def _to_host(tree):
    """numpy copy of a replicated (possibly multi-host) tree of arrays."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------- the run


def model_kwargs(config: ml_collections.ConfigDict, **overrides) -> dict[str, Any]:
    """FullVideoModel's keyword arguments (all but num_classes) from config.model."""
    kwargs = dict(config.model.to_dict())
    kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
    kwargs.update(overrides)
    return kwargs


class _Run:
    """The objects shared by training and evaluation of one config (mesh, models, steps)."""

    def __init__(self, config, workdir, data, model_cls):
        self.config = config
        self.workdir = epath.Path(workdir)
        self.data = data
        config_lib.validate_config(
            config, device_count=jax.device_count(), process_count=jax.process_count()
        )
        self.info = data.dataset_info(config.data)
        self.num_classes = int(self.info["num_classes"])
        self.class_names = list(self.info.get("class_names", []))
        num_train = int(self.info["num_examples"][config.data.train_split])
        self.num_eval = int(self.info["num_examples"][config.data.eval_split])
        self.steps_per_epoch = max(1, num_train // config.train.batch_size)
        if config.train.num_train_steps > 0:
            self.total_steps = int(config.train.num_train_steps)
        else:
            self.total_steps = max(
                1, int(math.ceil(config.train.num_epochs * self.steps_per_epoch))
            )
        self.uniform_steps = min(
            self.total_steps, int(round(config.train.uniform_warmup_epochs * self.steps_per_epoch))
        )

        self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
        self.batch_sharding = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec("data")
        )
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        self.model = model_cls(num_classes=self.num_classes, **model_kwargs(config))
        self.uniform_model = model_cls(
            num_classes=self.num_classes, **model_kwargs(config, sampling="uniform")
        )
        self.schedule = make_schedule(config, self.total_steps, self.steps_per_epoch)
        self.tx = None  # needs params; set by init_state
        self.jit = functools.partial(
            jax.jit,
            compiler_options=(
                {"xla_backend_optimization_level": 0} if config.fast_compile else None
            ),
        )

    # -- state ------------------------------------------------------------------

    def init_state(self) -> TrainState:
        c = self.config
        rng = jax.random.PRNGKey(c.seed)
        init_rng, train_rng = jax.random.split(rng)
        # Parameter shapes do not depend on the number of frames: initialise on a short video.
        frames = min(
            c.data.max_frames, max(c.model.num_clusters * c.model.dense_stride, c.model.chunk_size)
        )
        video = jnp.zeros((1, frames, c.data.crop_size, c.data.crop_size, 3), jnp.uint8)
        mask = jnp.ones((1, frames), bool)

        def init(rng):
            r_params, r_dropout, r_sampling = jax.random.split(rng, 3)
            variables = self.model.init(
                {"params": r_params, "dropout": r_dropout, "sampling": r_sampling},
                video,
                mask,
                train=False,
            )
            return variables["params"], variables.get("batch_stats", {})

        params, batch_stats = self.jit(init, out_shardings=self.replicated)(init_rng)
        self.tx = make_optimizer(c, params, self.schedule)
        opt_state = self.jit(self.tx.init, out_shardings=self.replicated)(params)
        return TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            rng=jax.device_put(train_rng, self.replicated),
        )

    def load_pretrained(self, state: TrainState) -> TrainState:
        """state with config.train.init_from's backbone copied into params and batch_stats
        (fva_jax.import_weights; the classifier is kept when the class count differs). The
        optimizer state is rebuilt from the new params."""
        from fva_jax import import_weights  # pylint: disable=g-import-not-at-top

        path = self.config.train.init_from
        merged = import_weights.merge_pretrained(
            {"params": state.params, "batch_stats": state.batch_stats},
            import_weights.load_pretrained(path),
            log_fn=logging.info,
        )
        logging.info("Initialised the backbone from %s", path)
        opt_state = self.jit(self.tx.init, out_shardings=self.replicated)(merged["params"])
        return state.replace(
            params=merged["params"], batch_stats=merged["batch_stats"], opt_state=opt_state
        )

    def write_timelines(self, writer, step: int, timelines) -> None:
        if jax.process_index() == 0:
            write_timelines(
                writer, step, timelines, self.config.model.num_clusters, self.class_names
            )

    # -- steps ------------------------------------------------------------------

    def _train_step(self, state: TrainState, batch, *, model) -> tuple[TrainState, TrainMetrics]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        dropout_rng, sampling_rng = jax.random.split(step_rng)
        weights = batch["batch_mask"].astype(jnp.float32)

        def loss_fn(params):
            (logits, _), new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["video"],
                batch["mask"],
                train=True,
                rngs={"dropout": dropout_rng, "sampling": sampling_rng},
                mutable=["batch_stats"],
            )
            loss = jnp.sum(_cross_entropy(logits, batch["label"]) * weights) / jnp.maximum(
                weights.sum(), 1.0
            )
            return loss, (logits, new_vars.get("batch_stats", state.batch_stats))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        labels, mask = batch["label"], batch["batch_mask"]
        m = TrainMetrics.single_from_model_output(
            loss=jnp.broadcast_to(loss, labels.shape),
            top1=_topk_correct(logits, labels, 1),
            top5=_topk_correct(logits, labels, 5),
            grad_norm=jnp.broadcast_to(optax.tree.norm(grads), labels.shape),
            learning_rate=jnp.broadcast_to(self.schedule(state.step), labels.shape),
            mask=mask,
        )
        return new_state, m

    def _eval_step(self, state: TrainState, batch, *, model) -> tuple[EvalMetrics, dict]:
        """Metrics of one eval batch, and per video: segment_ids int32 (B, T), prediction (B,)."""
        logits, segment_ids = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            batch["video"],
            batch["mask"],
            train=False,
        )
        labels = batch["label"]
        m = EvalMetrics.single_from_model_output(
            loss=_cross_entropy(logits, labels),
            top1=_topk_correct(logits, labels, 1),
            top5=_topk_correct(logits, labels, 5),
            logits=logits,
            labels=labels,
            mask=batch["batch_mask"],
        )
        return m, {"segment_ids": segment_ids, "prediction": jnp.argmax(logits, -1)}

    @functools.cached_property
    def train_steps(self) -> dict[str, Callable]:
        """Jitted train steps by sampling: the configured one and, for warm-up, "uniform"."""

        def make(model):
            return self.jit(
                functools.partial(self._train_step, model=model),
                in_shardings=(self.replicated, self.batch_sharding),
                out_shardings=(self.replicated, self.replicated),
                donate_argnums=(0,),
            )

        steps = {"main": make(self.model)}
        if self.uniform_steps > 0:
            steps["uniform"] = make(self.uniform_model)
        return steps

    @functools.cached_property
    def eval_steps(self) -> dict[str, Callable]:
        def make(model):
            # Per-video outputs stay sharded like the batch: each host reads its own rows.
            return self.jit(
                functools.partial(self._eval_step, model=model),
                in_shardings=(self.replicated, self.batch_sharding),
                out_shardings=(self.replicated, self.batch_sharding),
            )

        steps = {"eval": make(self.model)}
        if self.config.eval.also_uniform and self.config.model.sampling != "uniform":
            steps["eval_uniform"] = make(self.uniform_model)
        return steps

    # -- data -------------------------------------------------------------------

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Per-host numpy batch -> global arrays sharded over "data"."""
        missing = [k for k in _BATCH_KEYS if k not in local]
        if missing:
            raise KeyError(f"the data pipeline's batch lacks {missing}; it has {sorted(local)}")
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local[k]))
            for k in _BATCH_KEYS
        }

    def _padding_batch(self, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.zeros_like(np.asarray(like[k])) for k in _BATCH_KEYS}

    def evaluate(
        self, state: TrainState, timelines: list | None = None
    ) -> dict[str, dict[str, Any]]:
        """Metrics over the whole eval split, per eval mode ("eval", maybe "eval_uniform").

        timelines: if a list, the first config.eval.num_timeline_videos videos of this host's
          first eval batch are appended to it as (frames uint8 (n, H, W, 3) of the valid frames,
          segment_ids int32 (n,), label, prediction) of the "eval" mode (the configured sampling).
        """
        c = self.config
        local_batch = c.eval.batch_size // jax.process_count()
        # Every host must run the same number of steps (each is a collective): hosts whose
        # slice runs out early feed all-padding batches (batch_mask False).
        per_host = math.ceil(self.num_eval / jax.process_count())
        num_batches = max(1, math.ceil(per_host / local_batch))
        results = {}
        for name, step_fn in self.eval_steps.items():
            it = iter(self.data.eval_iterator(c.data, batch_size=local_batch))
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
                    local = self._padding_batch(template)
                m, per_video = step_fn(state, self.global_batch(local))
                if timelines is not None and name == "eval" and template is None:
                    timelines += _timeline_inputs(local, per_video, c.eval.num_timeline_videos)
                template = local
                total = m if total is None else total.merge(m)
            if next(it, None) is not None:
                raise ValueError(
                    f"eval_iterator yielded more than {num_batches} batches of "
                    f"{local_batch} on process {jax.process_index()} for "
                    f"{self.num_eval} eval examples over {jax.process_count()} processes"
                )
            total = _to_host(total)
            progress(num_batches)
            values = {k: float(v) for k, v in total.compute().items()}
            per_class = total.mean_class_accuracy.per_class()
            values["num_examples"] = int(np.asarray(total.mean_class_accuracy.total).sum())
            values["per_class_accuracy"] = {
                (self.class_names[i] if i < len(self.class_names) else str(i)): (
                    None if np.isnan(a) else float(a)
                )
                for i, a in enumerate(per_class)
            }
            results[name] = values
        return results

    # -- checkpoints ------------------------------------------------------------

    def checkpoint_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.checkpoint.keep, create=True, enable_async_checkpointing=False
        )
        return ocp.CheckpointManager(self.workdir / "checkpoints", options=options)

    def save(
        self,
        mngr: ocp.CheckpointManager,
        step: int,
        state: TrainState,
        data_state,
        last_train: dict[str, float],
    ) -> None:
        """Saves the train state and, as JSON, every process's data iterator state and the last
        step's training metrics (so final_metrics.json is complete even if a restart only
        evaluates)."""
        states = _gather_json_from_processes(data_state)
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                data=ocp.args.JsonSave(
                    {"process_count": len(states), "states": states, "last_train": last_train}
                ),
            ),
            force=True,
        )
        mngr.wait_until_finished()

    def restore(self, mngr: ocp.CheckpointManager, step: int, state: TrainState):
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(state)
        )
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        data = restored["data"]
        if data["process_count"] != jax.process_count():
            raise ValueError(
                f"checkpoint step {step} in {self.workdir / 'checkpoints'} was written by "
                f"{data['process_count']} processes; this run has {jax.process_count()}. The data "
                "iterator state is per process: resume with the same number of hosts"
            )
        return (
            flax.serialization.from_state_dict(state, restored["state"]),
            data["states"][jax.process_index()],
            data["last_train"],
        )


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


def _local_rows(x: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded array, in the order of its local batch."""
    shards = sorted(x.addressable_shards, key=lambda sh: sh.index[0].start or 0)
    rows, seen = [], set()
    for sh in shards:  # a replicated axis would repeat rows: keep each slice once
        key = (sh.index[0].start, sh.index[0].stop)
        if key not in seen:
            seen.add(key)
            rows.append(np.asarray(sh.data))
    return np.concatenate(rows)


def _timeline_inputs(
    local: Mapping[str, np.ndarray], per_video: Mapping[str, jax.Array], count: int
) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """(frames, segment_ids, label, prediction) of the first `count` real videos of a batch."""
    if count <= 0:
        return []
    seg, pred = _local_rows(per_video["segment_ids"]), _local_rows(per_video["prediction"])
    out = []
    for i in np.flatnonzero(np.asarray(local["batch_mask"]))[:count]:
        n = int(np.asarray(local["mask"][i]).sum())
        out.append(
            (np.asarray(local["video"][i, :n]), seg[i, :n], int(local["label"][i]), int(pred[i]))
        )
    return out


def write_timelines(writer, step: int, timelines, num_clusters: int, class_names) -> None:
    """One TensorBoard image per video, "clusters/video<i>": fva_jax.visualize.render_timeline
    of its frames and segment ids (the model returns no distances, so no curve)."""
    if not timelines:
        return
    from fva_jax import visualize  # pylint: disable=g-import-not-at-top  (matplotlib: lazy)

    def name(k):
        return class_names[k] if k < len(class_names) else str(k)

    images = {}
    for i, (frames, seg, label, pred) in enumerate(timelines):
        title = (
            f"eval video {i}: {len(frames)} frames, label {name(label)}, predicted "
            f"{name(pred)} (step {step})"
        )
        images[f"clusters/video{i}"] = visualize.render_timeline(
            frames, None, seg, num_clusters=num_clusters, title=title, width=1000
        )[None]
    writer.write_images(step, images)


def restore_variables(workdir, step: int | None = None) -> tuple[dict[str, Any], int]:
    """{"params", "batch_stats"} (jax arrays on the first local device) of a checkpoint written
    by train_and_evaluate in `workdir/checkpoints`: the latest step, or `step`. Needs no config:
    shapes come from the checkpoint's metadata. Returns (variables, step).

    Raises FileNotFoundError naming the directory when there is no such checkpoint.
    """
    workdir = epath.Path(workdir)
    if "://" not in str(workdir):
        workdir = workdir.absolute()  # orbax wants absolute local paths
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(
            f"no checkpoints in {ckpt_dir}: train first (python -m fva_jax.main "
            f"--config=... --workdir={workdir}) or point at a trained run"
        )
    if step is None:
        mngr = ocp.CheckpointManager(ckpt_dir)
        step = mngr.latest_step()
        mngr.close()
        if step is None:
            raise FileNotFoundError(f"no checkpoint step in {ckpt_dir} (an unfinished first save?)")
    state_dir = ckpt_dir / str(step) / "state"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint {state_dir} (written by fva_jax.train)")
    # Restore onto this machine's first device, whatever devices the run was trained on.
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = checkpointer.metadata(state_dir)
    meta = getattr(meta, "item_metadata", meta)  # StepMetadata -> TreeMetadata -> tree
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        getattr(meta, "tree", meta),
    )
    state = checkpointer.restore(state_dir, target)
    checkpointer.close()
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, int(step)


CONFIG_FILE = "config.json"
DATASET_INFO_FILE = "dataset_info.json"


def load_run_config(workdir) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, dataset info {num_classes, class_names, num_examples}) that train_and_evaluate
    saved in `workdir` (config.json, dataset_info.json)."""
    workdir = epath.Path(workdir)
    found = [workdir / f for f in (CONFIG_FILE, DATASET_INFO_FILE)]
    missing = [str(f) for f in found if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found: {workdir} is not a training "
            "workdir of fva_jax.main (it writes them when training starts)"
        )
    config = config_lib.from_dict(json.loads(found[0].read_text()))
    return config, json.loads(found[1].read_text())


def _default_data():
    from fva_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    return pipeline


def _default_model_cls():
    from fva_jax.models.full_video import FullVideoModel  # pylint: disable=g-import-not-at-top

    return FullVideoModel


def _write_json(path: epath.Path, obj) -> None:
    if jax.process_index() == 0:
        path.write_text(json.dumps(obj, indent=2, sort_keys=True))


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
    run = _Run(config, workdir, data or _default_data(), model_cls or _default_model_cls())
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

    # What fva_jax.predict needs to rebuild the model and name the classes.
    _write_json(workdir / CONFIG_FILE, c.to_dict())
    _write_json(
        workdir / DATASET_INFO_FILE,
        {
            "num_classes": run.num_classes,
            "class_names": run.class_names,
            "num_examples": {k: int(v) for k, v in run.info["num_examples"].items()},
        },
    )

    state = run.init_state()
    mngr = run.checkpoint_manager()
    data_state, last_train = None, {}
    last_saved = mngr.latest_step()
    if last_saved is not None:
        # The checkpoint already holds the (fine-tuned) weights: train.init_from is not re-applied.
        state, data_state, last_train = run.restore(mngr, last_saved, state)
        logging.info("Resumed from checkpoint step %d in %s", last_saved, workdir / "checkpoints")
    elif c.train.init_from:
        state = run.load_pretrained(state)
    start = int(_to_host(state.step))

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams(_flatten_hparams(c.to_dict()))
    report = periodic_actions.ReportProgress(
        num_train_steps=run.total_steps, writer=writer, every_steps=c.train.log_every_steps
    )
    train_iter = run.data.train_iterator(
        c.data, batch_size=c.train.batch_size // jax.process_count(), seed=c.seed, state=data_state
    )

    pending: list[tuple[int, TrainMetrics]] = []  # per-step metrics not yet checked/written
    for step in range(start + 1, run.total_steps + 1):
        batch = run.global_batch(next(train_iter))
        step_fn = run.train_steps["uniform" if step <= run.uniform_steps else "main"]
        state, m = step_fn(state, batch)
        pending.append((step, m))
        report(step)

        is_last = step == run.total_steps
        do_log = step % c.train.log_every_steps == 0 or is_last
        do_save = step % c.checkpoint.every_steps == 0 or is_last
        do_eval = (c.eval.every_steps > 0 and step % c.eval.every_steps == 0) and not is_last
        if do_log or do_save or do_eval:
            pending = [(s, _to_host(m)) for s, m in pending]
            _check_finite(pending, last_saved, workdir)
            window = functools.reduce(lambda a, b: a.merge(b), [m for _, m in pending])
            writer.write_scalars(
                step, {f"train/{k}": float(v) for k, v in window.compute().items()}
            )
            last_train = {k: float(v) for k, v in pending[-1][1].compute().items()}
            pending = []
        if do_eval:
            timelines = []
            _write_eval(writer, step, run.evaluate(state, timelines))
            run.write_timelines(writer, step, timelines)
        if do_save:
            run.save(mngr, step, state, train_iter.get_state(), last_train)
            last_saved = step
        if on_step is not None:
            on_step(step)

    if start >= run.total_steps:
        logging.info("Training already finished at step %d; evaluating only.", start)
    final = {"step": int(_to_host(state.step)), "train": last_train}
    timelines = []
    eval_results = run.evaluate(state, timelines)
    _write_eval(writer, final["step"], eval_results)
    run.write_timelines(writer, final["step"], timelines)
    final.update(eval_results)
    writer.flush()
    writer.close()
    mngr.close()
    _write_json(workdir / "final_metrics.json", final)
    logging.info("FINAL_METRICS %s", json.dumps(final, sort_keys=True))
    return final


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, data: Any = None, model_cls: Any = None
) -> dict[str, Any]:
    """Evaluates the latest checkpoint in workdir; writes workdir/eval_metrics.json."""
    initialize_distributed(config.distributed)
    run = _Run(config, workdir, data or _default_data(), model_cls or _default_model_cls())
    state = run.init_state()
    mngr = run.checkpoint_manager()
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {run.workdir / 'checkpoints'}; train first "
            "(--mode=train) or point --workdir at a trained run"
        )
    state, _, _ = run.restore(mngr, step, state)
    results = {"step": step, **run.evaluate(state)}
    mngr.close()
    _write_json(run.workdir / "eval_metrics.json", results)
    logging.info("EVAL_METRICS %s", json.dumps(results, sort_keys=True))
    return results


def _write_eval(writer, step: int, results: dict[str, dict[str, Any]]) -> None:
    for name, values in results.items():
        writer.write_scalars(
            step, {f"{name}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        )


def _flatten_hparams(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
