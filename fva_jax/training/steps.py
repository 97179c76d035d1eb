"""The training and evaluation steps, as module-level functions anything can call.

* `TrainState`: step, params, BatchNorm statistics, optimizer state, RNG key;
* `TrainMetrics` / `EvalMetrics` (clu metrics), `PerClassAccuracy`, `topk_correct` (a
  video is top-k correct only when its logits are finite and fewer than k other classes
  reach its label's: ties, NaN and Inf count as wrong);
* `loss_and_grads(params, batch_stats, batch, *, model, rngs)`: the loss the trainer
  minimises and its gradient: the sum of each video's cross-entropy times batch["weight"]
  when the batch has one (the trainer's batches do: every video of an epoch weighs the same,
  fva_jax.training.experiment.video_loss_weights), else the mean over the real videos;
* `train_step(state, batch, *, model, tx, schedule)`: one optimizer update;
* `eval_step(state, batch, *, model)`: metrics of one batch and per-video outputs.

None of these is jitted here: the trainer jits them with its shardings
(`jax.jit(functools.partial(train_step, model=..., tx=..., schedule=...))`), benchmarks with
none. A batch is a dict video uint8 (B, T, H, W, 3), mask bool (B, T), label int32 (B,),
batch_mask bool (B,) (False on padding slots), and optionally weight float32 (B,) (each
video's coefficient in the loss, 0 on padding slots).
"""

from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_kwargs(config: ml_collections.ConfigDict, **overrides) -> dict[str, Any]:
    """FullVideoModel's keyword arguments (all but num_classes) from config.model."""
    kwargs = dict(config.model.to_dict())
    kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
    kwargs.update(overrides)
    return kwargs


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

    A video is correct by the rule of `topk_correct` with k = 1 (ties and non-finite logits
    count as wrong), so this agrees with top1.

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
        hit = topk_correct(logits, labels, 1)[:, None]
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


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """float32 (B,): 1 where every logit of the video is finite and fewer than k other classes
    have a logit greater than or equal to the label's; else 0.

    Ties count as wrong (constant logits, e.g. a collapsed classifier, give 0, not 1), and so
    does any NaN or Inf logit of the video (a broken output is never a right answer).
    """
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    others = ~jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    rivals = jnp.sum(others & (logits >= label_logit), axis=-1)
    return (jnp.isfinite(logits).all(axis=-1) & (rivals < k)).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """float32 (B,) softmax cross-entropy, computed in float32 whatever the logits' dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


# ----------------------------------------------------------------------------- steps


def loss_and_grads(
    params,
    batch_stats,
    batch: dict[str, jax.Array],
    *,
    model,
    rngs: dict[str, jax.Array],
    train: bool = True,
    method: Any = None,
    **apply_kwargs,
):
    """((loss, (logits, new batch_stats)), grads w.r.t. params) of one batch.

    With batch["weight"] (the trainer's batches) the loss is sum(cross-entropy * weight): the
    trainer gives every real video of an epoch the same weight, 1 / (the epoch's mean number
    of real videos per step), whatever its length bucket, and 0 to empty slots
    (experiment.video_loss_weights). Without it (benchmarks), the mean cross-entropy over the
    real videos (batch["batch_mask"]). `method` / `apply_kwargs` go to model.apply (e.g.
    method="unchunked" for the reference math in benchmarks).
    """
    if "weight" in batch:
        weights, normaliser = batch["weight"].astype(jnp.float32), 1.0
    else:
        weights = batch["batch_mask"].astype(jnp.float32)
        normaliser = jnp.maximum(weights.sum(), 1.0)

    def loss_fn(p):
        (logits, _), new_vars = model.apply(
            {"params": p, "batch_stats": batch_stats},
            batch["video"],
            batch["mask"],
            train=train,
            rngs=rngs,
            mutable=["batch_stats"],
            method=method,
            **apply_kwargs,
        )
        per_video = cross_entropy(logits, batch["label"])
        loss = jnp.sum(per_video * weights) / normaliser
        return loss, (logits, new_vars.get("batch_stats", batch_stats))

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], Any],
    method: Any = None,
) -> tuple[TrainState, TrainMetrics]:
    """One optimizer update on one batch; returns the new state and the step's metrics.

    The metrics' loss is the mean cross-entropy over the step's real videos (comparable across
    steps and with the eval loss), whatever batch["weight"] gives the objective; grad_norm is
    the norm of the objective's gradient before clipping (non-finite when the gradient is).
    Dropout and the model's sampling draw from fold_in(state.rng, state.step), so a step's
    randomness depends only on the key and the step number (exact resume).
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    dropout_rng, sampling_rng = jax.random.split(step_rng)
    (_, (logits, batch_stats)), grads = loss_and_grads(
        state.params,
        state.batch_stats,
        batch,
        model=model,
        rngs={"dropout": dropout_rng, "sampling": sampling_rng},
        method=method,
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    labels = batch["label"]
    m = TrainMetrics.single_from_model_output(
        loss=cross_entropy(logits, labels),
        top1=topk_correct(logits, labels, 1),
        top5=topk_correct(logits, labels, 5),
        grad_norm=jnp.broadcast_to(optax.tree.norm(grads), labels.shape),
        learning_rate=jnp.broadcast_to(schedule(state.step), labels.shape),
        mask=batch["batch_mask"],
    )
    return new_state, m


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, model
) -> tuple[EvalMetrics, dict[str, jax.Array]]:
    """Metrics of one eval batch, and per video: segment_ids int32 (B, T), prediction int32
    (B,): the class with the highest logit, or -1 where no class is above all others or a
    logit is NaN or Inf (what top1 counts as wrong), so prediction == label exactly where top1
    is 1."""
    logits, segment_ids = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["video"],
        batch["mask"],
        train=False,
    )
    labels = batch["label"]
    m = EvalMetrics.single_from_model_output(
        loss=cross_entropy(logits, labels),
        top1=topk_correct(logits, labels, 1),
        top5=topk_correct(logits, labels, 5),
        logits=logits,
        labels=labels,
        mask=batch["batch_mask"],
    )
    best = jnp.argmax(logits, -1).astype(jnp.int32)
    prediction = jnp.where(topk_correct(logits, best, 1) > 0, best, -1)
    return m, {"segment_ids": segment_ids, "prediction": prediction}
