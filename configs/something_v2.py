"""Something-Something V2 (174 classes, webm at 12 fps). Paper: K=16, top-1 65.1.

No horizontal flip: several classes are defined by left/right direction.

  python -m fva_jax.main --config=configs/something_v2.py --workdir=/tmp/ssv2 \
      --config.data.manual_dir=/data/something-something-v2
"""

from fva_jax import config_lib


def get_config():
    config = config_lib.default_config()
    config.data.name = "something_something_v2"
    config.data.train_split = "train"
    config.data.eval_split = "validation"  # the test split has no labels
    # Every frame (clips are 2-6 s at 12 fps); no stride, no cap (the defaults).
    config.data.hflip = False
    config.model.backbone = "resnet50"
    config.model.num_clusters = 16
    config.train.uniform_warmup_epochs = 5.0
    return config
