"""ResNet-18 for ImageNet, torchvision's architecture, in full precision."""

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    """torchvision's ResNet-18 (same modules, names and initialisation), plus
    where its activation quantizers go."""

    def __init__(self, num_classes=1000):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

    def quantizer_sites(self, placement):
        """"layer": every convolution (shortcuts included) but not the
        classifier `fc`; "relu": every ReLU (the stem's and each block's,
        applied twice per block)."""
        if placement == "layer":
            return [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        if placement == "relu":
            return [m for m in self.modules() if isinstance(m, nn.ReLU)]
        raise ValueError(f"unknown quantizer placement {placement!r}")
