"""HMDB51 (51 classes, short clips, 30 fps). Paper: K=8, top-1 73.4.

  python -m fva_jax.main --config=configs/hmdb51.py --workdir=/tmp/hmdb51 \
      --config.data.manual_dir=/data/hmdb51 --config.data.builder_config=split1
"""

from fva_jax import config_lib


def get_config():
    config = config_lib.default_config()
    config.data.name = "hmdb51"
    config.data.builder_config = "split1"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    # Every frame of every clip (no stride, no cap: the defaults).
    config.model.backbone = "resnet50"
    config.model.num_clusters = 8
    config.train.uniform_warmup_epochs = 5.0
    return config
