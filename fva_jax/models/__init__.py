"""Networks: ResNet backbones with temporal shift, and the full-video model."""

from fva_jax.models.full_video import FullVideoModel
from fva_jax.models.resnet import ResNet, ResNetStem, ResNetTrunk, temporal_shift

__all__ = ["FullVideoModel", "ResNet", "ResNetStem", "ResNetTrunk", "temporal_shift"]
