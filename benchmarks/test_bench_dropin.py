"""The drop-ins issue 17 added, fastig vs captum in the same process: DeepLiftShap, FeaturePermutation, and
FeatureAblation on a model that returns one value for the batch (Captum's aggregated mode).

Each test runs fastig and Captum alternately (which goes first alternates by round, so the order does not decide
the ratio), same inputs and seeds, and records both medians and the ratio in the benchmark's ``extra_info`` (and
prints them). Run: ``flock -x /tmp/fastig-cpu.lock pytest benchmarks/test_bench_dropin.py -s``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import captum.attr as ca
import fastig.attr as fa
from fastig import models
from _harness import alternate
from test_bench_deeplift_lrp import DistinctReluResNet  # the same model in Captum's form

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def compare(benchmark, fastig_run, captum_run, rounds: int, seed: int = 0) -> None:
    """fastig and Captum in alternating rounds (benchmarks/_harness.py), each run from the same torch seed."""

    def seeded(run):
        return lambda: (torch.manual_seed(seed), run())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = alternate({"captum": seeded(captum_run), "fastig": seeded(fastig_run)}, rounds=rounds)
    timings.record(benchmark, reference="captum")


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return models.get("resnet18", weights="none").eval()


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


# -- DeepLiftShap: every input against every baseline row, averaged ------------------------------------------------

def test_deeplift_shap_small_cnn(benchmark, small_cnn):
    torch.manual_seed(1)
    x, distribution = torch.randn(8, 3, 32, 32), torch.randn(10, 3, 32, 32)
    compare(benchmark, lambda: fa.DeepLiftShap(small_cnn).attribute(x, distribution, target=1),
              lambda: ca.DeepLiftShap(small_cnn).attribute(x, distribution, target=1), rounds=10)


def test_deeplift_shap_resnet18(benchmark, resnet18):
    torch.manual_seed(1)
    x, distribution = torch.randn(1, 3, 224, 224), torch.randn(4, 3, 224, 224)
    captum_model = DistinctReluResNet(resnet18).eval()
    compare(benchmark, lambda: fa.DeepLiftShap(resnet18).attribute(x, distribution, target=3),
              lambda: ca.DeepLiftShap(captum_model).attribute(x, distribution, target=3), rounds=3)


# -- FeaturePermutation: 16 feature groups of a batch of 16 images ---------------------------------------------------

@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(2)
    x = torch.randn(16, 3, 32, 32)
    mask = ((torch.arange(32) // 8)[:, None] * 4 + torch.arange(32)[None, :] // 8).reshape(1, 1, 32, 32)
    return x, mask


def test_feature_permutation_per_example_outputs(benchmark, resnet18, batch):
    # fastig batches the shuffled copies (Captum: one copy per model call, its default)
    x, mask = batch
    compare(benchmark, lambda: fa.FeaturePermutation(resnet18).attribute(x, target=0, feature_mask=mask),
              lambda: ca.FeaturePermutation(resnet18).attribute(x, target=0, feature_mask=mask), rounds=3)


def test_feature_permutation_batch_loss(benchmark, resnet18, batch):
    # the common use: forward returns one loss for the batch, so each shuffled copy needs its own model call
    x, mask = batch
    labels = torch.arange(16) % 10

    def loss(t):
        return nn.functional.cross_entropy(resnet18(t), labels)
    compare(benchmark, lambda: fa.FeaturePermutation(loss).attribute(x, feature_mask=mask),
              lambda: ca.FeaturePermutation(loss).attribute(x, feature_mask=mask), rounds=3)


def test_feature_ablation_batch_scalar(benchmark, resnet18, batch):
    x, mask = batch
    total = lambda t: resnet18(t)[:, 0].sum()  # noqa: E731
    compare(benchmark, lambda: fa.FeatureAblation(total).attribute(x, feature_mask=mask),
              lambda: ca.FeatureAblation(total).attribute(x, feature_mask=mask), rounds=3)
