"""The trainer's own training step for benchmarks: a config from benchmark arguments, and a
`fva_jax.training.experiment.Run` built from it without opening a data set.

`make_run(config)` is `experiment.make_run` (the config's optax chain and schedule, the
models of both data modes, the mesh shardings) with a stand-in data module, so
`experiment.jitted_train_steps(run)[mode]` is exactly what `fva_jax.training.train` jits:
mode "full"
(whole videos, the configured model and memory plan) and mode "sampled" (K host-chosen
frames per video, the model with sampling="uniform").
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from fva_jax import config_lib  # noqa: E402
from fva_jax.models.full_video import FullVideoModel  # noqa: E402
from fva_jax.training import experiment

NUM_CLASSES = 100


def trainer_config(
    *,
    model: str,
    width: int,
    resolution: int,
    num_clusters: int,
    chunk_size: int,
    dtype: str,
    batch_size: int,
    plan: str = "auto",
    activation_budget_mb: float = -1.0,
    fast_compile: bool = False,
) -> ml_collections.ConfigDict:
    """The default config (the paper's recipe: SGD with momentum, coupled weight decay,
    clipping, classifier learning-rate multipliers) with these model settings, and one
    uniform warm-up epoch before the full-video epochs, so a run has both step modes."""
    c = config_lib.default_config()
    c.fast_compile = fast_compile
    c.data.crop_size = c.data.resize_short = resolution
    c.model.backbone = model
    c.model.width = width
    c.model.num_clusters = num_clusters
    c.model.chunk_size = chunk_size
    c.model.dtype = dtype
    c.model.plan = plan
    c.model.activation_budget_mb = activation_budget_mb
    c.train.batch_size = batch_size
    c.train.uniform_warmup_epochs = 1.0
    c.train.num_epochs = 2.0
    c.eval.batch_size = batch_size
    return c


class _NoSplit:
    """TrainData / EvalData stand-in: one step per epoch in each mode, no files."""

    def __init__(self, config, **layout):
        del config, layout

    def steps_per_epoch(self, mode: str) -> int:
        del mode
        return 1


NO_DATA = types.SimpleNamespace(
    dataset_info=lambda data_config: {
        "num_classes": NUM_CLASSES,
        "class_names": [],
        "num_examples": {},
    },
    TrainData=_NoSplit,
    EvalData=_NoSplit,
)


def make_run(config: ml_collections.ConfigDict) -> experiment.Run:
    return experiment.make_run(config, "/tmp/unused", NO_DATA, FullVideoModel, training=True)


def run_from_args(args, plan: str) -> experiment.Run:
    """The trainer's run for the command-line arguments that step_time.py and memory.py share
    (model, width, resolution, num_clusters, chunk_size, dtype, batch_size,
    activation_budget_mb, fast_compile), with model.plan = `plan`."""
    return make_run(
        trainer_config(
            model=args.model,
            width=args.width,
            resolution=args.resolution,
            num_clusters=args.num_clusters,
            chunk_size=args.chunk_size,
            dtype=args.dtype,
            batch_size=args.batch_size,
            plan=plan,
            activation_budget_mb=args.activation_budget_mb,
            fast_compile=args.fast_compile,
        )
    )


def random_batch(run: experiment.Run, rng, batch: int, frames: int, resolution: int) -> dict:
    """Whole videos (every frame valid) on the devices, sharded as the trainer's batches
    (with the loss weight the trainer adds: here every video 1 / batch)."""
    return experiment.global_batch(
        run,
        {
            "video": rng.integers(0, 256, (batch, frames, resolution, resolution, 3), np.uint8),
            "mask": np.ones((batch, frames), bool),
            "label": rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32),
            "batch_mask": np.ones((batch,), bool),
            "weight": experiment.video_loss_weights(np.ones((batch,), bool), batch),
        },
    )


def abstract_batch(run: experiment.Run, batch: int, frames: int, resolution: int) -> dict:
    """Shapes, dtypes and shardings of such a batch (for lowering without data)."""

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=run.batch_sharding)

    return {
        "video": spec((batch, frames, resolution, resolution, 3), jnp.uint8),
        "mask": spec((batch, frames), jnp.bool_),
        "label": spec((batch,), jnp.int32),
        "batch_mask": spec((batch,), jnp.bool_),
        "weight": spec((batch,), jnp.float32),
    }


def abstract_state(run: experiment.Run):
    """The TrainState's shapes and shardings, without allocating it."""
    # jit without compiler options: those are refused on a jit nested in eval_shape.
    plain = dataclasses.replace(run, jit=jax.jit)
    state = jax.eval_shape(lambda: experiment.init_state(plain))
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=run.replicated), state
    )
