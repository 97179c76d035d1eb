"""Optimizer and learning-rate schedule of the paper's recipe (optax).

`make_optimizer(config, params, schedule)`: clip by global norm -> SGD with coupled weight
decay and momentum (PyTorch's torch.optim.SGD, as the paper) or AdamW -> learning rate ->
per-parameter multipliers (classifier kernel x5, bias x10). `make_schedule`: linear warm-up,
then cosine / step / constant, with epochs converted to steps by the caller's rule. The
optimizer reads only the parameters' tree structure and shapes, so abstract params
(jax.eval_shape) do as well as real ones.
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax


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
    config: ml_collections.ConfigDict,
    total_steps: int,
    epoch_to_step: Callable[[float], int],
) -> optax.Schedule:
    """Linear warm-up from 0 over schedule.warmup_epochs, then cosine/step/constant.

    epoch_to_step: the step at which a (fractional) number of epochs is reached
    (fva_jax.training.epochs.EpochPlan.epoch_to_step): epochs of the uniform warm-up and of full
    videos have different numbers of steps, so epochs are converted with the real step at
    which each starts. The cosine decays from the end of the warm-up to total_steps.
    """
    s = config.schedule
    warmup = min(epoch_to_step(s.warmup_epochs), total_steps)
    rest = max(total_steps - warmup, 1)
    if s.name == "cosine":
        main = optax.cosine_decay_schedule(s.base_lr, decay_steps=rest, alpha=s.end_lr_factor)
    elif s.name == "step":
        boundaries = {}
        for epoch in s.step_epochs:
            b = epoch_to_step(epoch) - warmup
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
