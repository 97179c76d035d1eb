"""A run directory on disk: checkpoints while training, and reading a finished run back.

Layout of a workdir written by fva_jax.train:

  config.json, dataset_info.json   the run's config and {num_classes, class_names,
                                    num_examples} (CONFIG_FILE, DATASET_INFO_FILE)
  checkpoints/<step>/state          the TrainState (orbax StandardSave)
  checkpoints/<step>/data           JSON: the data state {"epoch", "step"}, the host layout
                                    and the last step's training metrics

The trainer uses `checkpoint_manager`, `save`, `restore`; tools (predict, visualize) use
`load_run_config` and `restore_variables`, which need no config and no trainer.
"""

import json
from typing import Any

import flax
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from fva_jax import config_lib

CONFIG_FILE = "config.json"
DATASET_INFO_FILE = "dataset_info.json"


def checkpoint_manager(workdir, keep: int) -> ocp.CheckpointManager:
    """Synchronous orbax manager of `workdir/checkpoints`, keeping the last `keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options)


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state,
    data_state: dict[str, int],
    last_train: dict[str, float],
    epoch: dict[str, Any] | None = None,
) -> None:
    """Saves the train state and, as JSON, the data state {"epoch", "step"} (the position of
    the next batch, the same on every host), the host layout it was planned for, the last
    step's training metrics (so final_metrics.json is complete even if a restart only
    evaluates) and `epoch` (the trainer's description of the data state's epoch, e.g. its
    mode and length, to check a resume against). A collective: every process calls it."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            data=ocp.args.JsonSave(
                {
                    "data_state": {
                        "epoch": int(data_state["epoch"]),
                        "step": int(data_state["step"]),
                    },
                    "process_count": jax.process_count(),
                    "device_count": jax.device_count(),
                    "last_train": last_train,
                    "epoch": epoch or {},
                }
            ),
        ),
        force=True,
    )
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, state):
    """(state, data state {"epoch", "step"}, last_train, epoch) of checkpoint `step`, as saved
    by `save`; `state` gives the structure, shapes and shardings to restore into."""
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
    layout = (data["process_count"], data["device_count"])
    if layout != (jax.process_count(), jax.device_count()):
        raise ValueError(
            f"checkpoint step {step} in {mngr.directory} was written by {layout[0]} processes "
            f"with {layout[1]} devices; this run has {jax.process_count()} with "
            f"{jax.device_count()}. The batch plan (and so the data position) depends on them: "
            "resume with the same hosts and devices"
        )
    return (
        flax.serialization.from_state_dict(state, restored["state"]),
        data["data_state"],
        data["last_train"],
        data.get("epoch", {}),
    )


def write_json(path: epath.Path, obj) -> None:
    """Writes `obj` as JSON from process 0 only."""
    if jax.process_index() == 0:
        path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_run_info(workdir, config: ml_collections.ConfigDict, info: dict[str, Any]) -> None:
    """config.json and dataset_info.json: what fva_jax.tools.predict needs to rebuild the model and
    name the classes."""
    workdir = epath.Path(workdir)
    write_json(workdir / CONFIG_FILE, config.to_dict())
    write_json(
        workdir / DATASET_INFO_FILE,
        {
            "num_classes": int(info["num_classes"]),
            "class_names": list(info.get("class_names", [])),
            "num_examples": {k: int(v) for k, v in info["num_examples"].items()},
        },
    )


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
