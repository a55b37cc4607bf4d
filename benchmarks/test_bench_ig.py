"""Integrated Gradients: fastig vs captum in the same process, on resnet50 (224x224) and a small CNN.

Run: ``pytest benchmarks/test_bench_ig.py --benchmark-columns=mean,stddev,rounds``. Each group compares the same
arguments; pytest-benchmark prints the ratios. ``test_peak_memory`` runs each configuration in a fresh process and
reports the growth of its peak resident memory during the attribution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG

import fastig
from fastig import models
from fastig.attr import IntegratedGradients

N_STEPS = 50  # captum's default


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return models.get("resnet50", weights="none").eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(1, 3, 224, 224)


def _run(benchmark, fn, rounds=3):
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="ig-resnet50-defaults")
def test_captum_default(benchmark, resnet50, image):
    _run(benchmark, lambda: CaptumIG(resnet50).attribute(image, target=3, n_steps=N_STEPS))


@pytest.mark.benchmark(group="ig-resnet50-defaults")
def test_fastig_default(benchmark, resnet50, image):
    _run(benchmark, lambda: IntegratedGradients(resnet50).attribute(image, target=3, n_steps=N_STEPS))


@pytest.mark.benchmark(group="ig-resnet50-defaults")
def test_fastig_prepared(benchmark, resnet50, image):
    prepared = fastig.prepare(resnet50)
    _run(benchmark, lambda: IntegratedGradients(prepared).attribute(image, target=3, n_steps=N_STEPS))


@pytest.mark.benchmark(group="ig-resnet50-batch10")
def test_captum_batch10(benchmark, resnet50, image):
    _run(benchmark, lambda: CaptumIG(resnet50).attribute(image, target=3, n_steps=N_STEPS, internal_batch_size=10))


@pytest.mark.benchmark(group="ig-resnet50-batch10")
def test_fastig_batch10(benchmark, resnet50, image):
    _run(benchmark, lambda: IntegratedGradients(resnet50).attribute(image, target=3, n_steps=N_STEPS,
                                                                    internal_batch_size=10))


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


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.mark.benchmark(group="ig-smallcnn-8x3x32x32")
def test_captum_small(benchmark, small_cnn):
    x = torch.randn(8, 3, 32, 32)
    _run(benchmark, lambda: CaptumIG(small_cnn).attribute(x, target=1, n_steps=N_STEPS), rounds=10)


@pytest.mark.benchmark(group="ig-smallcnn-8x3x32x32")
def test_fastig_small(benchmark, small_cnn):
    x = torch.randn(8, 3, 32, 32)
    _run(benchmark, lambda: IntegratedGradients(small_cnn).attribute(x, target=1, n_steps=N_STEPS), rounds=10)


_MEMORY_SCRIPT = r"""
import json, sys, torch
from captum.attr import IntegratedGradients as CaptumIG
import fastig
from fastig import models
from fastig.attr import IntegratedGradients
which = sys.argv[1]
torch.manual_seed(0)
model = models.get("resnet50", weights="none").eval()
if which == "fastig-prepared":
    model = fastig.prepare(model)
x = torch.randn(1, 3, 224, 224)
ig = CaptumIG(model) if which == "captum" else IntegratedGradients(model)
def status_kib(field):  # VmHWM: this process's peak RSS (getrusage's maxrss would include the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
before = status_kib("VmRSS")
ig.attribute(x, target=3, n_steps=50)
print(json.dumps({"which": which, "growth_mib": (status_kib("VmHWM") - before) / 1024}))
"""


def test_peak_memory(benchmark):
    """Peak memory growth during one attribution at captum's defaults (n_steps=50, internal_batch_size=None)."""
    growth = {}
    for which in ("captum", "fastig", "fastig-prepared"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, which], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        growth[which] = json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]
    benchmark.extra_info.update({f"{k}_peak_growth_mib": round(v, 1) for k, v in growth.items()})
    benchmark.extra_info["fastig_over_captum"] = round(growth["fastig"] / growth["captum"], 3)
    print("\npeak memory growth (MiB):", json.dumps(growth), "fastig/captum =", growth["fastig"] / growth["captum"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
