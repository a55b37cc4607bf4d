"""ResNet-18/34/50 with torchvision's module layout, so torchvision's ``.pth`` files load with ``strict=True``.

The layout (attribute names, block order, the stride on the 3x3 convolution of a bottleneck, i.e. "ResNet v1.5")
and the initialization follow torchvision's published architecture: Kaiming-normal (fan_out, ReLU) convolutions,
BatchNorm weight 1 and bias 0, and PyTorch's default initialization for the final Linear layer.
"""

from __future__ import annotations

from typing import Type, Union

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and an identity (or 1x1-projected) shortcut: the block of ResNet-18/34."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, plus shortcut: the block of ResNet-50."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """The ImageNet ResNet: 7x7 stem, max-pool, four stages of blocks, global average pool, Linear classifier."""

    def __init__(self, block: Block, layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (11,689,512 parameters with 1000 classes)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    """ResNet-34 (21,797,672 parameters with 1000 classes)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (25,557,032 parameters with 1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


class SASceneNetRGB(nn.Module):
    """The RGB branch of SASceneNet (Lopez-Cifuentes et al., "Semantic-Aware Scene Recognition", Pattern
    Recognition 2020; github.com/vpulab/Semantic-Aware-Scene-Recognition, ``RGBBranch.py``) with its ResNet-18
    backbone: the Places365 scene classifier of their ``RGB_ResNet18_Places.pth.tar``.

    Module names follow that file's keys: ``in_block`` (7x7 conv, BatchNorm, ReLU, max-pool), ``encoder1..4``
    (ResNet-18's ``layer1..4``), a 7x7 average pool with stride 1 (so the input must be 224x224), dropout 0.3 and
    ``fc``. The original ``forward`` returns a 4-tuple (logits, last feature map, and the logits twice); this one
    returns the logits only. Random initialization (only used without weights) follows :class:`ResNet`.
    """

    def __init__(self, num_classes: int = 365):
        super().__init__()
        backbone = resnet18()
        self.in_block = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        nn.init.kaiming_normal_(self.in_block[0].weight, mode="fan_out", nonlinearity="relu")
        self.encoder1 = backbone.layer1
        self.encoder2 = backbone.layer2
        self.encoder3 = backbone.layer3
        self.encoder4 = backbone.layer4
        self.dropout = nn.Dropout(0.3)
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (224, 224):
            raise ValueError(f"sascenenet_rgb expects [N, 3, 224, 224] inputs, got {tuple(x.shape)}")
        x = self.encoder4(self.encoder3(self.encoder2(self.encoder1(self.in_block(x)))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def sascenenet_rgb(num_classes: int = 365) -> SASceneNetRGB:
    """SASceneNet's RGB branch on ResNet-18 for Places365 (11,363,757 parameters with 365 classes)."""
    return SASceneNetRGB(num_classes)
