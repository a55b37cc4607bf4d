"""DeepLift and LRP: fastig vs captum in the same process, same inputs, on a small CNN and resnet18 (random weights).

Run: ``pytest benchmarks/test_bench_deeplift_lrp.py --benchmark-columns=mean,stddev,rounds``; each group holds
one comparison. Captum's DeepLift cannot run torchvision's ResNet (one ReLU module per block, called twice), so
its resnet18 timing uses the same weights with a distinct ReLU per call (same amount of work).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import LRP as CaptumLRP
from captum.attr import DeepLift as CaptumDeepLift
from torch import nn

from fastig import models
from fastig.attr import LRP, DeepLift

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class DistinctReluResNet(nn.Module):
    """A fastig ResNet run with one ReLU module per call (what Captum's DeepLift requires)."""

    def __init__(self, resnet):
        super().__init__()
        self.net = resnet
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(17))

    def forward(self, x):
        net, relus = self.net, iter(self.relus)
        x = net.maxpool(next(relus)(net.bn1(net.conv1(x))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                identity = x if block.downsample is None else block.downsample(x)
                out = block.bn2(block.conv2(next(relus)(block.bn1(block.conv1(x)))))
                x = next(relus)(out + identity)
        return net.fc(torch.flatten(net.avgpool(x), 1))


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return models.get("resnet18", weights="none").eval()


@pytest.fixture(scope="module")
def small_input():
    torch.manual_seed(1)
    return torch.randn(8, 3, 32, 32)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


def _run(benchmark, fn, rounds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="deeplift-smallcnn-8x3x32x32")
def test_captum_deeplift_small(benchmark, small_cnn, small_input):
    _run(benchmark, lambda: CaptumDeepLift(small_cnn).attribute(small_input, target=1), rounds=20)


@pytest.mark.benchmark(group="deeplift-smallcnn-8x3x32x32")
def test_fastig_deeplift_small(benchmark, small_cnn, small_input):
    _run(benchmark, lambda: DeepLift(small_cnn).attribute(small_input, target=1), rounds=20)


@pytest.mark.benchmark(group="deeplift-resnet18-2x3x224x224")
def test_captum_deeplift_resnet18(benchmark, resnet18, image):
    model = DistinctReluResNet(resnet18).eval()
    _run(benchmark, lambda: CaptumDeepLift(model).attribute(image, target=3), rounds=3)


@pytest.mark.benchmark(group="deeplift-resnet18-2x3x224x224")
def test_fastig_deeplift_resnet18(benchmark, resnet18, image):
    _run(benchmark, lambda: DeepLift(resnet18).attribute(image, target=3), rounds=3)


@pytest.mark.benchmark(group="lrp-smallcnn-8x3x32x32")
def test_captum_lrp_small(benchmark, small_cnn, small_input):
    _run(benchmark, lambda: CaptumLRP(small_cnn).attribute(small_input, target=1), rounds=20)


@pytest.mark.benchmark(group="lrp-smallcnn-8x3x32x32")
def test_fastig_lrp_small(benchmark, small_cnn, small_input):
    _run(benchmark, lambda: LRP(small_cnn).attribute(small_input, target=1), rounds=20)


@pytest.mark.benchmark(group="lrp-resnet18-2x3x224x224")
def test_captum_lrp_resnet18(benchmark, resnet18, image):
    # Captum runs (its numbers are wrong across the shortcuts, see tests/test_lrp.py); timing only
    _run(benchmark, lambda: CaptumLRP(resnet18).attribute(image, target=3), rounds=3)


@pytest.mark.benchmark(group="lrp-resnet18-2x3x224x224")
def test_fastig_lrp_resnet18(benchmark, resnet18, image):
    _run(benchmark, lambda: LRP(resnet18).attribute(image, target=3), rounds=3)
