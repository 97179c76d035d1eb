"""UCF101 (101 classes, short clips, 25 fps). Paper: K=8, top-1 96.4.

  python -m fva_jax.main --config=configs/ucf101.py --workdir=/tmp/ucf101 \
      --config.data.manual_dir=/data/ucf101 --config.data.builder_config=split1
"""

from fva_jax import config_lib


def get_config():
    config = config_lib.default_config()
    config.data.name = "ucf101"
    config.data.builder_config = "split1"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    # Every frame of every clip (no stride, no cap: the defaults).
    config.model.backbone = "resnet50"
    config.model.num_clusters = 8
    config.train.uniform_warmup_epochs = 5.0
    return config
