"""Networks: ResNet backbones with temporal shift, and the full-video model (any backbone)."""

from fva_jax.models.full_video import FullVideo, FullVideoModel
from fva_jax.models.resnet import ResNet, ResNetStem, ResNetTrunk, temporal_shift

__all__ = ["FullVideo", "FullVideoModel", "ResNet", "ResNetStem", "ResNetTrunk", "temporal_shift"]
