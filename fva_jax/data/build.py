r"""Builds one of the data sets into a TFDS data_dir.

  python -m fva_jax.data.build --name=sparse_events
  python -m fva_jax.data.build --name=breakfast --config=s1 \
      --manual_dir=/data/breakfast --data_dir=/data/tfds [--skip_corrupt]

Build every split config you train on (e.g. breakfast s1..s4); each is a separate
TFDS dataset variant under <data_dir>/<name>/<config>/. The trainer builds a missing
data set itself on first use, but on a multi-host setup build once beforehand so the
hosts do not race.

Writes ArrayRecord files (builder version 2.0.0) and frame_index.json (every video's frame
count, for the batch plans). Building may import TensorFlow (TFDS uses it to shuffle splits
over 1 GB; install tensorflow-cpu where you build); training reads without it.
"""

from __future__ import annotations

import sys

from absl import app, flags

from fva_jax import config_lib

_NAME = flags.DEFINE_string("name", "sparse_events", "Data set (fva_jax.data.builders.BUILDERS).")
_CONFIG = flags.DEFINE_string("config", "", "Builder config ('' = the first, e.g. s1, split1).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir ('' = ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Where the official download is unpacked.")
_SKIP = flags.DEFINE_bool(
    "skip_corrupt",
    # One policy for the CLI and the trainer's automatic build: the config's default.
    config_lib.default_config().data.skip_corrupt,
    "Skip undecodable videos (printing how many and which) instead of stopping at the first.",
)
_WORKERS = flags.DEFINE_integer("num_workers", None, "Decoding processes (default: CPUs, <= 8).")


def main(argv):
    del argv
    from fva_jax.data import builders, records  # pylint: disable=g-import-not-at-top
    from fva_jax.data.video import VideoDecodeError  # pylint: disable=g-import-not-at-top

    b = builders.get_builder(
        _NAME.value,
        _CONFIG.value,
        _DATA_DIR.value,
        skip_corrupt=_SKIP.value,
        num_workers=_WORKERS.value,
    )
    try:
        builders.prepare(b, _MANUAL_DIR.value)
    except (builders.MissingDataError, records.BadVideoError, VideoDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    label = b.info.features["label"]
    print(
        f"{b.name}/{b.builder_config.name} in {b.data_dir}: {label.num_classes} classes, "
        + ", ".join(f"{k}: {v.num_examples}" for k, v in b.info.splits.items())
    )
    for split, paths in getattr(b, "skipped", {}).items():
        if paths:
            print(f"  {split}: skipped {len(paths)} corrupt videos")


if __name__ == "__main__":
    app.run(main)
