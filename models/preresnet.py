"""Pre-activation ResNets for 32x32 inputs (He et al., 2016), in full precision.

Depth counts weighted layers: 6n+2 with basic blocks (two 3x3 convolutions)
below 44, 9n+2 with bottleneck blocks (three convolutions) from 44 on, so
PreResNet20 has 9 basic blocks and PreResNet164 54 bottlenecks.
"""

import math

import torch.nn as nn


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1
    depth = 2  # weighted layers

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample

    def convs(self):
        return [self.conv1, self.conv2]

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class Bottleneck(nn.Module):
    expansion = 4
    depth = 3

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def convs(self):
        return [self.conv1, self.conv2, self.conv3]

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


class PreResNet(nn.Module):
    def __init__(self, num_classes=10, depth=20):
        super().__init__()
        block = Bottleneck if depth >= 44 else BasicBlock
        if (depth - 2) % (3 * block.depth) != 0:
            raise ValueError(f"PreResNet depth must be {3 * block.depth}n+2, got {depth}")
        blocks_per_stage = (depth - 2) // (3 * block.depth)

        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_stage(block, 16, blocks_per_stage)
        self.layer2 = self._make_stage(block, 32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(block, 64, blocks_per_stage, stride=2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * block.expansion, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_stage(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1,
                          stride=stride, bias=False),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(x.flatten(1))

    def blocks(self):
        return [m for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))]

    def quantizer_sites(self, placement):
        """Modules whose output gets an activation/error quantizer.

        "layer": every convolution (shortcuts included) and linear layer except
        the classifier `fc`. "relu": the original's placement, before and after
        each convolution of a residual block (after its ReLUs and its convs)
        and after the stem convolution.
        """
        if placement == "layer":
            return [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        if placement == "relu":
            sites = [self.conv1]
            for block in self.blocks():
                sites += [block.relu] + block.convs()
            return sites
        raise ValueError(f"unknown quantizer placement {placement!r}")
