"""Networks: ResNet backbones with temporal shift, and the full-video model."""
