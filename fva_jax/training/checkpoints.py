"""A run directory on disk: checkpoints while training, and reading a finished run back.

Layout of a workdir written by fva_jax.training.train:

  config.json, dataset_info.json   the run's config at its first start and {num_classes,
                                    class_names, num_examples} (CONFIG_FILE, DATASET_INFO_FILE)
  config.resumed-<step>.json        the config of a later start that resumed checkpoint <step>
                                    (RESUMED_CONFIG_FILE); tools read the latest
  checkpoints/<step>/state          the TrainState (orbax StandardSave)
  checkpoints/<step>/data           JSON: the data state {"epoch", "step"}, the host layout,
                                    the last step's training metrics, the run's settings
                                    (config_lib.run_settings) and its total steps

  checkpoints/corrupt-<step>-<time>  a checkpoint that could not be read, moved aside by
                                    `restore_latest` (Orbax ignores the name)

The trainer uses `check_resume` (before it opens the data), `checkpoint_manager`, `save`,
`restore_latest`; tools (predict, visualize) use `load_run_config` and `restore_variables`,
which need no config and no trainer.

Faults: orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete,
so a run killed while saving leaves the previous steps as they were. A save that fails for
lack of space or permission raises fva_jax.training.faults.CheckpointWriteError naming the directory
and the reason (its partial directory removed). A latest checkpoint that cannot be read
(truncated array files, missing metadata) is moved aside with a warning, and the previous
one restored.
"""

import json
import os
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from fva_jax import config_lib
from fva_jax.training import faults

CONFIG_FILE = "config.json"
# The config of each later start that resumed checkpoint <step>; config.json stays the first's.
RESUMED_CONFIG_FILE = "config.resumed-{step}.json"
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
    *,
    settings: dict[str, Any] | None = None,
    total_steps: int | None = None,
) -> None:
    """Saves the train state and, as JSON, the data state {"epoch", "step"} (the position of
    the next batch, the same on every host), the host layout it was planned for, the last
    step's training metrics (so final_metrics.json is complete even if a restart only
    evaluates), `epoch` (the trainer's description of the data state's epoch, e.g. its
    mode and length, to check a resume against), and the run's `settings`
    (config_lib.run_settings) and `total_steps`, which `check_resume` compares a restarted
    run's config with. A collective: every process calls it.

    Raises fva_jax.training.faults.CheckpointWriteError when the file system refuses the write (no
    space, no permission): the latest complete checkpoint is left as it was."""
    try:
        _save(mngr, step, state, data_state, last_train, epoch, settings, total_steps)
    except Exception as error:  # pylint: disable=broad-except
        found = faults.storage_error(error)
        if found is None:
            raise
        code, reason = found
        directory = str(mngr.directory)
        _remove_partial_save(mngr.directory, step)
        latest = _latest_complete_step(mngr, below=step)
        kept = (
            f"the latest complete checkpoint, step {latest}, is intact: free space (or fix the "
            f"permissions) and run the same command again to resume from it"
            if latest is not None
            else "no earlier checkpoint exists: free space (or fix the permissions) and run the "
            "same command again to start over"
        )
        raise faults.CheckpointWriteError(
            f"cannot write checkpoint step {step} to {directory}: {errno_name(code)}, {reason}. "
            f"Training stopped; {kept}",
            errno_=code,
            directory=directory,
            latest_step=latest,
        ) from error


def errno_name(code: int) -> str:
    import errno  # pylint: disable=g-import-not-at-top

    return errno.errorcode.get(code, str(code))


def _latest_complete_step(mngr: ocp.CheckpointManager, below: int) -> int | None:
    try:
        mngr.reload()
        steps = [s for s in mngr.all_steps() if s < below]
    except Exception:  # pylint: disable=broad-except  (only for the message)
        return None
    return max(steps) if steps else None


def _remove_partial_save(directory, step: int) -> None:
    """Removes what a failed save of `step` left (orbax's temporary directory), best effort:
    on a full disk this frees the space it took."""
    if jax.process_index() != 0:
        return
    for partial in epath.Path(directory).glob(f"{step}.orbax-checkpoint-tmp*"):
        try:
            partial.rmtree()
        except OSError as e:
            logging.warning("could not remove the partial checkpoint %s: %s", partial, e)


def _save(mngr, step, state, data_state, last_train, epoch, settings, total_steps) -> None:
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
                    **(
                        {"config": settings, "total_steps": int(total_steps)}
                        if settings is not None
                        else {}
                    ),
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


def restore_latest(mngr: ocp.CheckpointManager, state):
    """(step, (state, data state, last_train, epoch)) of the latest checkpoint that can be
    read, or (None, None) when there is none.

    A checkpoint that cannot be read (an array file truncated, its metadata missing, ...) is
    named in a warning, moved aside to `checkpoints/corrupt-<step>-<time>` (orbax would
    refuse to write its step again, and ignores that name) and the previous one is tried. A
    checkpoint that can be read but does not fit `state` (e.g. the model changed) is an
    error, and nothing is moved. A collective: every process calls it.
    """
    while True:
        step = mngr.latest_step()
        if step is None:
            return None, None
        try:
            return step, restore(mngr, step, state)
        except Exception:  # pylint: disable=broad-except
            reason = unreadable_reason(mngr.directory, step)
            if reason is None:  # readable: the config, not the checkpoint, is at fault
                raise
        moved = _move_aside(mngr.directory, step)
        mngr.reload()
        previous = mngr.latest_step()
        logging.warning(
            "checkpoint step %d in %s cannot be read (%s); moved it to %s. %s",
            step,
            mngr.directory,
            reason,
            moved,
            f"Resuming from the previous complete checkpoint, step {previous}."
            if previous is not None
            else "No complete checkpoint is left: training starts from the beginning.",
        )


def _latest_data_record(ckpt_dir: epath.Path) -> tuple[int, dict[str, Any]] | None:
    """(step, the data JSON) of the latest checkpoint in `ckpt_dir` whose data JSON can be
    read (the one restore_latest restores, unless its arrays are unreadable: then an earlier
    one of the same run), or None when there is none. Reads files only."""
    if not ckpt_dir.is_dir():
        return None
    for step in sorted((int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()), reverse=True):
        try:
            data = json.loads((ckpt_dir / str(step) / "data" / "metadata").read_text())
        except (OSError, ValueError):
            continue  # restore_latest moves it aside
        if isinstance(data, dict) and "data_state" in data:
            return step, data
    return None


def check_resume(config: ml_collections.ConfigDict, workdir) -> list[str]:
    """Before any work: refuses to resume the latest checkpoint of `workdir` with another
    number of processes or devices, or with a config that changes a field it stored
    (config_lib.run_settings), raising config_lib.ConfigError with one line naming each field
    with its old and new value. Returns the warnings it
    logged: a longer run (the learning-rate schedule is recomputed), a checkpoint written
    before the settings were stored (only the data position can be checked). Nothing when
    there is no checkpoint. Every process reads the same files, so all decide the same."""
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    found = _latest_data_record(ckpt_dir)
    if found is None:
        return []
    step, data = found
    layout = (data.get("process_count"), data.get("device_count"))
    if None not in layout and layout != (jax.process_count(), jax.device_count()):
        raise config_lib.ConfigError(
            f"cannot resume checkpoint step {step} in {ckpt_dir}: it was written by {layout[0]} "
            f"processes with {layout[1]} devices, this run has {jax.process_count()} with "
            f"{jax.device_count()}; the batch plan (and so the data position) depends on them. "
            "Resume with the same hosts and devices, or use a new --workdir"
        )
    stored = data.get("config")
    if stored is None:
        warnings = [
            f"checkpoint step {step} in {ckpt_dir} was written before fva_jax stored the run's "
            "settings: a changed seed, crop, bucket, model or optimizer setting cannot be "
            "detected (only the data position is checked), and a sampled epoch that ends with "
            "a partial step now places it elsewhere (resumed inside such an epoch, some of its "
            "videos are read twice and others not at all); resuming"
        ]
    else:
        refused, longer, unchecked = config_lib.compare_for_resume(
            stored, config, finished=step >= int(data.get("total_steps", step + 1))
        )
        if refused:
            raise config_lib.ConfigError(
                f"cannot resume checkpoint step {step} in {ckpt_dir}: {', '.join(refused)} "
                "changed since it was written (a resumed run must continue the same run; "
                f"config_lib.RESUMABLE_FIELDS lists what may change). Restore them (the run's "
                f"config: {run_config_path(workdir)}), or use a new --workdir"
            )
        warnings = [
            f"{change}: training longer than the run was started for, from checkpoint step "
            f"{step}; the learning-rate schedule is recomputed for the new length, so the run "
            "no longer equals an uninterrupted one"
            for change in longer
        ]
        if unchecked:
            warnings.append(
                f"checkpoint step {step} in {ckpt_dir} does not store {', '.join(unchecked)} "
                "(written by an older fva_jax): a change of these cannot be detected"
            )
    for warning in warnings:
        logging.warning("%s", warning)
    return warnings


def unreadable_reason(directory, step: int) -> str | None:
    """Why checkpoint `step` in `directory` cannot be read, or None if it can (its data state
    JSON, its state metadata and every array are read, onto the host)."""
    step_dir = epath.Path(directory) / str(step)
    checkpointer = None
    try:
        data = json.loads((step_dir / "data" / "metadata").read_text())
        missing = [k for k in ("data_state", "process_count", "device_count") if k not in data]
        if missing:
            return f"{step_dir / 'data' / 'metadata'} lacks {missing}"
        checkpointer = ocp.PyTreeCheckpointer()
        meta = checkpointer.metadata(step_dir / "state")
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if tree is None:
            tree = getattr(meta, "item_metadata", meta)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        checkpointer.restore(step_dir / "state", restore_args=restore_args)
    except Exception as error:  # pylint: disable=broad-except
        return f"{type(error).__name__}: {str(error).strip()[:300]}"
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return None


def _move_aside(directory, step: int) -> epath.Path:
    """checkpoints/<step> -> checkpoints/corrupt-<step>-<UTC time> (by process 0; the others
    wait for it)."""
    directory = epath.Path(directory)
    target = directory / f"corrupt-{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if jax.process_count() > 1:
        # Every process decided from the same files; process 0's name (its clock) for all.
        target = directory / _broadcast_name(target.name)
    if jax.process_index() == 0:
        (directory / str(step)).rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices(f"fva_jax moved checkpoint {step} aside")
    return target


def _broadcast_name(name: str) -> str:
    """Process 0's `name` on every process."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    raw = np.zeros(128, np.uint8)
    encoded = name.encode()[:128]
    raw[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(raw[raw > 0]).decode()


def write_json(path: epath.Path, obj) -> None:
    """Writes `obj` as JSON from process 0 only, whole or not at all: into a temporary file
    beside `path`, then renamed over it."""
    if jax.process_index() == 0:
        path = epath.Path(path)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
            tmp.replace(path)
        finally:
            if tmp.exists():
                tmp.unlink()


def write_run_info(
    workdir,
    config: ml_collections.ConfigDict,
    info: dict[str, Any],
    resumed_from: int | None = None,
) -> None:
    """The config and dataset_info.json: what fva_jax.tools.predict needs to rebuild the model
    and name the classes. The config goes to config.json at the first start and, when the run
    resumes checkpoint `resumed_from`, to config.resumed-<step>.json beside it (config.json
    keeps the first start's)."""
    workdir = epath.Path(workdir)
    name = CONFIG_FILE if resumed_from is None else RESUMED_CONFIG_FILE.format(step=resumed_from)
    write_json(workdir / name, config.to_dict())
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
        raise FileNotFoundError(f"no checkpoint {state_dir} (written by fva_jax.training.train)")
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


def run_config_path(workdir) -> epath.Path:
    """The latest config of the run in `workdir`: config.resumed-<step>.json of the highest
    step, else config.json (which may not exist)."""
    workdir = epath.Path(workdir)
    prefix, suffix = RESUMED_CONFIG_FILE.split("{step}")
    resumed = [
        (int(p.name[len(prefix) : -len(suffix)]), p)
        for p in (workdir.glob(RESUMED_CONFIG_FILE.format(step="*")) if workdir.is_dir() else [])
        if p.name[len(prefix) : -len(suffix)].isdigit()
    ]
    return max(resumed)[1] if resumed else workdir / CONFIG_FILE


def load_run_config(workdir) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, dataset info {num_classes, class_names, num_examples}) that train_and_evaluate
    saved in `workdir`: the latest config (`run_config_path`: the one of the last start) and
    dataset_info.json."""
    workdir = epath.Path(workdir)
    found = [run_config_path(workdir), workdir / DATASET_INFO_FILE]
    missing = [str(f) for f in found if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found: {workdir} is not a training "
            "workdir of fva_jax.main (it writes them when training starts)"
        )
    config = config_lib.from_dict(json.loads(found[0].read_text()))
    return config, json.loads(found[1].read_text())
