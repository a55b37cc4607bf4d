"""VGG-16 and VGG-19 (no BatchNorm) with torchvision's module layout and initialization.

``features`` is one ``nn.Sequential`` of conv/ReLU/max-pool layers (so torchvision's keys ``features.<i>.weight``
hold), then a 7x7 adaptive average pool and the three-layer ``classifier`` (Linear, ReLU, Dropout, Linear, ReLU,
Dropout, Linear). Initialization as torchvision: Kaiming-normal (fan_out, ReLU) convolutions with zero bias,
Linear weights N(0, 0.01) with zero bias.
"""

from __future__ import annotations

import torch
from torch import nn

# Output channels of each 3x3 convolution, "M" for a 2x2 max-pool (configurations "D" and "E" of the VGG paper).
CONFIGS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(config: list) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG: convolutional ``features``, 7x7 adaptive average pool, fully connected ``classifier``."""

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16(num_classes: int = 1000) -> VGG:
    """VGG-16 (138,357,544 parameters with 1000 classes)."""
    return VGG(make_features(CONFIGS["vgg16"]), num_classes)


def vgg19(num_classes: int = 1000) -> VGG:
    """VGG-19 (143,667,240 parameters with 1000 classes)."""
    return VGG(make_features(CONFIGS["vgg19"]), num_classes)
