"""VGG networks for 32x32 inputs, in full precision.

Low precision is added from outside (see quantization.py); the network only
says where its activation quantizers belong, through `quantizer_sites`.
"""

import torch.nn as nn

STAGES = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(depth, batch_norm):
    layers = []
    in_channels = 3
    for width in STAGES[depth]:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, num_classes=10, depth=16, batch_norm=False):
        super().__init__()
        self.features = make_features(depth, batch_norm)
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He-normal with fan-in, as the seed; linear layers keep PyTorch's default.
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.features(x)
        x = x.flatten(1)
        return self.classifier(x)

    def quantizer_sites(self, placement):
        """Modules whose output gets an activation/error quantizer.

        "layer": every convolution and linear layer except the last one, whose
        logits stay in full precision (the seed). "relu": every ReLU (the original).
        """
        if placement == "layer":
            layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            return layers[:-1]
        if placement == "relu":
            return [m for m in self.modules() if isinstance(m, nn.ReLU)]
        raise ValueError(f"unknown quantizer placement {placement!r}")
