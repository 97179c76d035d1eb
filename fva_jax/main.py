r"""Entry point: train or evaluate a config.

  python -m fva_jax.main --config=configs/demo.py --workdir=/tmp/fva_demo
  python -m fva_jax.main --config=configs/breakfast.py --workdir=gs://BUCKET/breakfast \
      --config.data.manual_dir=/data/breakfast --config.model.num_clusters=16
  python -m fva_jax.main --config=configs/demo.py --workdir=/tmp/fva_demo --mode=eval
  python -m fva_jax.main --config=configs/ucf101.py --workdir=/tmp/x --mode=prepare \
      --config.data.manual_dir=/data/ucf101 --config.data.data_dir=gs://BUCKET/tfds

Any config field can be overridden with --config.<group>.<field>=VALUE; a misspelled field
is rejected by ml_collections, a bad value by fva_jax.config_lib.validate_config (before any
work). Training resumes from WORKDIR/checkpoints by itself.
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fva_jax import config_lib, train

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


def _hide_accelerators_from_tensorflow() -> None:
    """tf.data runs on the host; keep TensorFlow off GPUs/TPUs so JAX gets all their memory."""
    try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
    except ImportError:
        return
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    config = _CONFIG.value
    # Names and values are checked before anything starts; device counts once JAX is up.
    config_lib.validate_config(config)
    _hide_accelerators_from_tensorflow()
    train.initialize_distributed(config.distributed)

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
    app.run(main)
