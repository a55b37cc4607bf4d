"""fastig vs Captum in the same process: Occlusion, ShapleyValueSampling and Lime on resnet18 (random weights),
one 3x64x64 image, Captum's defaults for Captum (one perturbation per model call) and fastig's (batched).

Run: pytest benchmarks/test_bench_perturbation.py --benchmark-only. Timings on a shared CPU are indicative."""

import pytest
import torch

import captum.attr as ca
import fastig.models
from fastig.attr import Lime, Occlusion, ShapleyValueSampling
from fastig.attr.surrogate import Lasso

pytestmark = pytest.mark.benchmark(group="perturbation")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = fastig.models.get("resnet18", weights="none").eval()
    x = torch.randn(1, 3, 64, 64)
    mask = ((torch.arange(64) // 16)[:, None] * 4 + torch.arange(64)[None, :] // 16).reshape(1, 1, 64, 64)
    return net, x, mask


def run(benchmark, fn):
    return benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)


# 49 windows of 16x16, stride 8
@pytest.mark.parametrize("impl", ["fastig", "captum"])
def test_occlusion(benchmark, setup, impl):
    net, x, _ = setup
    cls = Occlusion if impl == "fastig" else ca.Occlusion
    run(benchmark, lambda: cls(net).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), target=0))


# 16 superpixels x 16 permutations = 256 evaluations
@pytest.mark.parametrize("impl", ["fastig", "captum"])
def test_shapley(benchmark, setup, impl):
    net, x, mask = setup
    cls = ShapleyValueSampling if impl == "fastig" else ca.ShapleyValueSampling
    run(benchmark, lambda: cls(net).attribute(x, target=0, feature_mask=mask, n_samples=16))


# 256 samples over 16 superpixels; both use fastig's Lasso (Captum's default Lasso needs scikit-learn)
@pytest.mark.parametrize("impl", ["fastig", "captum"])
def test_lime(benchmark, setup, impl):
    net, x, mask = setup
    explainer = Lime(net) if impl == "fastig" else ca.Lime(net, interpretable_model=Lasso(alpha=0.01))
    run(benchmark, lambda: explainer.attribute(x, target=0, feature_mask=mask, n_samples=256))
