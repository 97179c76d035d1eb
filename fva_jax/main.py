r"""Entry point: train or evaluate a config.

  python -m fva_jax.main --config=configs/demo.py --workdir=/tmp/fva_demo
  python -m fva_jax.main --config=configs/breakfast.py --workdir=gs://BUCKET/breakfast \
      --config.data.manual_dir=/data/breakfast --config.model.num_clusters=16
  python -m fva_jax.main --config=configs/demo.py --workdir=/tmp/fva_demo --mode=eval
  python -m fva_jax.main --config=configs/ucf101.py --workdir=/tmp/x --mode=prepare \
      --config.data.manual_dir=/data/ucf101 --config.data.data_dir=gs://BUCKET/tfds

Any config field can be overridden with --config.<group>.<field>=VALUE. A misspelt field
name (fva_jax.config_lib.check_overrides) or a bad value (config_lib.validate_config) ends the
program before any work with one line on stderr naming the field, the value and the fix, and
exit status 2. Training resumes from WORKDIR/checkpoints by itself; a resume whose config
changes a field the checkpoint stored (one outside config_lib.RESUMABLE_FIELDS) ends the same
way, naming each field with its old and new value (training.checkpoints.check_resume).

Exit statuses (training.faults): 0 done; 1 an unexpected error (traceback); 2 a config error;
75 stopped by SIGTERM (preemption) after checkpointing the step reached: run the same command
again to resume; 74 a checkpoint could not be written (no space, no permission; the latest
complete one is intact); 69 another process of a multi-process run was lost (start all again:
they resume from the latest checkpoint); 65 a training step's loss or gradient norm was NaN/Inf
(nothing of it was saved; a rerun would resume and diverge again, and a resume refuses changed
settings: start anew in a new --workdir with a safer config). Each of 65, 69, 74, 75 prints one
line on stderr.
"""

import json
import multiprocessing
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fva_jax import config_lib
from fva_jax.training import distributed, faults

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/<name>.py) with get_config().", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory (or gs:// path) for checkpoints, TensorBoard events and final_metrics.json.",
)
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "prepare"],
    "train: train (resuming if possible) then evaluate; "
    "eval: evaluate the latest checkpoint in --workdir; "
    "prepare: only build the TFDS data set of config.data (run it once, "
    "on one host, before a multi-host run).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _exit_on_config_error(error: config_lib.ConfigError, argv) -> None:
    """One line on stderr (no traceback) and exit status 2: a user error, not a crash."""
    where = ""
    if error.field:
        flag = f"--config.{error.field}="
        given = [a for a in argv if a.startswith(flag)]
        where = f" (given as {given[-1]})" if given else " (set in the --config file)"
    print(f"fva_jax.main: config error: {error}{where}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    """absl's flag parsing, after checking the names of --config.* overrides (ml_collections
    fails on an unknown name with a long traceback)."""
    try:
        config_lib.check_overrides(argv[1:])
    except config_lib.ConfigError as error:
        print(f"fva_jax.main: config error: {error}", file=sys.stderr)
        sys.exit(2)
    return app.parse_flags_with_usage(argv)


def _stop(message: str, status: int) -> None:
    """One line on stderr (and in the log), then exit `status`."""
    logging.error("%s", message)
    print(f"fva_jax.main: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _exit_lost_process(error: faults.LostProcessError) -> None:
    """Exits at once: a normal exit would wait in jax.distributed's shutdown barrier for the
    lost process and abort there (after the heartbeat timeout). Data worker processes are
    stopped first, log and output streams flushed."""
    logging.error("%s", error)
    print(f"fva_jax.main: {error}", file=sys.stderr, flush=True)
    for child in multiprocessing.active_children():
        child.kill()
    logging.flush()
    sys.stdout.flush()
    os._exit(faults.EXIT_LOST_PROCESS)  # pylint: disable=protected-access


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    run_with_exit_statuses(lambda: _main(_CONFIG.value))


def run_with_exit_statuses(work) -> None:
    """work(); its config errors and faults end the program with their exit status (see the
    module docstring) and one line on stderr."""
    try:
        work()
    except config_lib.ConfigError as error:
        _exit_on_config_error(error, sys.argv)
    except faults.Preempted as stop:
        _stop(str(stop), faults.EXIT_PREEMPTED)
    except faults.CheckpointWriteError as error:
        _stop(str(error), faults.EXIT_CHECKPOINT_WRITE_FAILED)
    except faults.NonFiniteError as error:
        _stop(str(error), faults.EXIT_NON_FINITE)
    except faults.LostProcessError as error:
        _exit_lost_process(error)


def _main(config):
    # Names and values are checked before anything starts (and before the trainer is
    # imported); device counts once JAX is up. Training imports no TensorFlow.
    config_lib.validate_config(config)
    from fva_jax.training import train  # pylint: disable=g-import-not-at-top

    distributed.initialize_distributed(config.distributed)

    logging.info(
        "JAX %s, process %d of %d, %d local / %d global devices: %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )
    logging.info("Config:\n%s", json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))

    if _MODE.value == "train":
        train.train_and_evaluate(config, _WORKDIR.value)
    elif _MODE.value == "eval":
        train.evaluate(config, _WORKDIR.value)
    else:
        from fva_jax.data import pipeline  # pylint: disable=g-import-not-at-top

        # SIGTERM stops the build at once; TFDS removes its unfinished files.
        with faults.StopNotice() as notice, notice.interruptible("the data set build"):
            info = pipeline.dataset_info(config.data)
        logging.info(
            "Data set %s/%s ready: %d classes, examples per split %s",
            config.data.name,
            config.data.builder_config or "default",
            info["num_classes"],
            info["num_examples"],
        )


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main, flags_parser=_parse_flags)
