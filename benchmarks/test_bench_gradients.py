"""Gradient family: fastig vs captum in the same process, and 2ndG's Hessian-vector products vs the original loop.

Run: ``pytest benchmarks/test_bench_gradients.py --benchmark-columns=mean,stddev,rounds``. Each group runs the same
arguments and seeds through both libraries (SmoothGrad = NoiseTunnel over Saliency; GradientShap), on a small CNN
(32x32) and resnet18 with random weights (224x224). The 2ndG group compares SecondOrderGradients with the released
code's algorithm (one backward pass per channel and location) on a small smooth network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import GradientShap as CaptumGradientShap
from captum.attr import NoiseTunnel as CaptumNoiseTunnel
from captum.attr import Saliency as CaptumSaliency

from fastig import models
from fastig.attr import GradientShap, NoiseTunnel, Saliency, SecondOrderGradients


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        )
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


CASES = {
    # name: (model builder, input shape, nt_samples / n_samples, rounds)
    "small_cnn": (lambda: SmallCNN(), (8, 3, 32, 32), 20, 5),
    "resnet18": (lambda: models.get("resnet18", weights="none"), (1, 3, 224, 224), 10, 2),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, shape, samples, rounds = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    return request.param, model, x, samples, rounds


def _seeded(fn):
    def run():
        torch.manual_seed(0)
        np.random.seed(0)
        return fn()

    return run


def _run(benchmark, fn, rounds):
    benchmark.pedantic(_seeded(fn), rounds=rounds, iterations=1, warmup_rounds=1)


def _smoothgrad(impl, case):
    _, model, x, samples, _ = case
    if impl == "captum":
        return lambda: CaptumNoiseTunnel(CaptumSaliency(model)).attribute(x, nt_samples=samples, stdevs=0.15, target=3)
    return lambda: NoiseTunnel(Saliency(model)).attribute(x, nt_samples=samples, stdevs=0.15, target=3)


def _gradient_shap(impl, case):
    _, model, x, samples, _ = case
    baselines = torch.cat([torch.zeros_like(x[:1]), torch.rand_like(x[:1])])
    cls = CaptumGradientShap if impl == "captum" else GradientShap
    return lambda: cls(model).attribute(x, baselines, n_samples=samples, stdevs=0.1, target=3)


@pytest.mark.parametrize("impl", ["captum", "fastig"])
def test_smoothgrad(benchmark, case, impl):
    benchmark.group = f"smoothgrad-{case[0]}"
    _run(benchmark, _smoothgrad(impl, case), case[4])


@pytest.mark.parametrize("impl", ["captum", "fastig"])
def test_gradient_shap(benchmark, case, impl):
    benchmark.group = f"gradient_shap-{case[0]}"
    _run(benchmark, _gradient_shap(impl, case), case[4])


def test_same_numbers(case):
    """The benchmarked calls give the same attributions (a benchmark of different work would mean nothing)."""
    for make in (_smoothgrad, _gradient_shap):
        ours, theirs = _seeded(make("fastig", case))(), _seeded(make("captum", case))()
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


# -- 2ndG -----------------------------------------------------------------------------------------------------


class SmoothNet(torch.nn.Module):
    def __init__(self, channels=8, size=6):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.Softplus())
        self.tail = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.Tanh(),
                                        torch.nn.Flatten(), torch.nn.Linear(8 * size * size, 10))

    def forward(self, x):
        return self.tail(self.head(x))


def original_double_loop(model, x, target):
    """The released 2ndG code's algorithm: H_pp row by row, one backward pass per (location, channel)."""
    acts = model.head(x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(model.tail(acts)[0, target], acts, create_graph=True)
    c, h, w = acts.shape[1:]
    out = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            block = torch.stack([torch.autograd.grad(grad[0, d, i, j], acts, retain_graph=True)[0][0, :, i, j]
                                 for d in range(c)])
            a = acts[0, :, i, j].detach()
            out[i, j] = (a * grad[0, :, i, j].detach().clamp(min=0)).sum() + 0.5 * (a @ block @ a).abs()
    return out


@pytest.fixture(scope="module")
def smooth():
    torch.manual_seed(0)
    return SmoothNet().eval(), torch.randn(1, 3, 6, 6)


@pytest.mark.benchmark(group="2ndG-8ch-6x6")
def test_second_order_double_loop(benchmark, smooth):
    model, x = smooth
    benchmark.pedantic(lambda: original_double_loop(model, x, 3), rounds=2, iterations=1)


@pytest.mark.benchmark(group="2ndG-8ch-6x6")
def test_second_order_hvp(benchmark, smooth):
    model, x = smooth
    result = benchmark.pedantic(lambda: SecondOrderGradients(model, "head").attribute(x, target=3), rounds=3,
                                iterations=1)
    torch.testing.assert_close(result[0, 0], original_double_loop(model, x, 3), rtol=1e-4, atol=1e-5)
