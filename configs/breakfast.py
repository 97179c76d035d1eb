"""Breakfast Actions (10 activities, long cooking videos): the paper's main benchmark.

Paper recipe (DESIGN.md §1): TSM-ResNet-50, K=16 clusters on stage 1, 224 px multi-scale
crops with horizontal flip, SGD momentum 0.9, weight decay 5e-4, lr 0.001, batch 16,
dropout 0.8, clip 20, classifier lr x5 (bias x10), 40 epochs, uniform-sampling warm-up.

  python -m fva_jax.main --config=configs/breakfast.py --workdir=/tmp/breakfast \
      --config.data.manual_dir=/data/breakfast --config.data.builder_config=s1

The split is the builder config: s1 tests on P03-P15, s2 on P16-P28, s3 on P29-P41,
s4 on P42-P54.
"""

from fva_jax import config_lib


def get_config():
    config = config_lib.default_config()
    config.data.name = "breakfast"
    config.data.builder_config = "s1"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    # Every frame of every video (15 fps, up to ~10 min): no stride, no cap (the defaults).
    # Steps are planned from the lengths: up to 16 length buckets, 4096 frames per device.
    config.data.frame_stride = 1
    config.data.max_frames = 0
    config.model.backbone = "resnet50"
    config.model.num_clusters = 16
    # The paper's first epochs use uniform sampling; how many is not stated, we use 5.
    config.train.uniform_warmup_epochs = 5.0
    return config
