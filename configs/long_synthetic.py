"""Speed config: ResNet-50 at 224 px, bf16, on the long synthetic set (Breakfast-like lengths).

`sparse_events/long_slice`: 24 train / 6 test videos of 426-7,863 frames (69,425 train
frames), stored at 32x32 px (24 MB, so it can travel with the repository to a GPU machine)
and resized to 224 px crops by the data pipeline. Every frame of every video, full-video
steps of up to 4,096 frames per device, ResNet-50 (torchvision width) with K=16 clusters at
stage 1, the plan chosen per step shape by the device's memory. Not a recognition result:
a measure of the trainer's speed end to end (data pipeline included) on long videos.

  python -m fva_jax.main --config=configs/long_synthetic.py --workdir=/tmp/fva_long \
      --config.data.data_dir=/data/tfds
  python benchmarks/train_throughput.py --config=configs/long_synthetic.py --workdir=/tmp/x

The set builds in about 10 s (`python -m fva_jax.data.build --name=sparse_events
--config=long_slice --data_dir=...`; the trainer also builds it on first use).
"""

from fva_jax import config_lib


def get_config():
    config = config_lib.default_config()
    config.data.name = "sparse_events"
    config.data.builder_config = "long_slice"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.resize_short = 256
    config.data.crop_size = 224
    config.data.frames_per_device = 4096
    # Two length buckets (3,648 and 7,328 frames, one video per device each): every bucket
    # is a training step shape that compiles once (ResNet-50: 15-35 s each on a GPU). The
    # chunked plans skip chunks of only padding, so coarse buckets cost little there.
    config.data.max_buckets = 2
    # A step is up to 4,096 frames of 224x224x3 (616 MB): enough workers to decode,
    # crop and resize one while the device trains on another.
    config.data.num_workers = 6

    config.model.dtype = "bfloat16"
    config.model.num_clusters = 16

    # Full videos from the first step: one kind of step, fewer shapes to compile.
    config.train.uniform_warmup_epochs = 0.0
    config.train.num_train_steps = 200
    config.train.log_every_steps = 20
    config.checkpoint.every_steps = 1000  # and at the end
    config.eval.also_uniform = False
    return config
