"""Path methods: Guided IG fastig vs PAIR saliency (same model, same 8 images), IDGI vs IG, Blur IG vs PAIR.

Run: ``pytest benchmarks/test_bench_path_methods.py --benchmark-columns=mean,stddev,rounds``. Each group runs the
same work; pytest-benchmark prints the ratios.

- ``guided-ig``: PAIR's ``GuidedIG.GetMask`` image by image (its batch-of-one passes and per-step host round
  trips) against fastig's batched Guided IG, plain and with ``fastig.prepare``, and against the bare model
  passes the method needs (``n_steps`` forward+backward passes of the 8-image batch on the prepared model):
  ``1 - bare / fastig_prepared`` is the share of fastig's time spent outside the model's passes.
- ``idgi-vs-ig``: IntegratedGradients with and without ``idgi=True``, same rule and steps.
- ``blur-ig``: PAIR's ``BlurIG.GetMask`` (batch_size=8) against fastig on the same images.

Sizes come from the environment so a GPU run can use the papers' settings: FASTIG_BENCH_MODEL (resnet50),
FASTIG_BENCH_GUIDED_STEPS (8; PAIR's default is 200, which only multiplies every time here by 25),
FASTIG_BENCH_IMAGES (8), FASTIG_BENCH_DEVICE (cpu, or cuda).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

import fastig
from fastig import models
from fastig.attr import BlurIntegratedGradients, GuidedIntegratedGradients, IntegratedGradients
from fastig.core.engine import Engine

saliency_core = pytest.importorskip("saliency.core")
from saliency.core import guided_ig as pair_guided_ig_module  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' PAIR helpers
from _pair import NumpyWithQuantileInterpolation, pair_model_function  # noqa: E402

MODEL = os.environ.get("FASTIG_BENCH_MODEL", "resnet50")
GUIDED_STEPS = int(os.environ.get("FASTIG_BENCH_GUIDED_STEPS", "8"))
N_IMAGES = int(os.environ.get("FASTIG_BENCH_IMAGES", "8"))
DEVICE = os.environ.get("FASTIG_BENCH_DEVICE", "cpu")
IG_STEPS = 32
BLUR_STEPS = 8


pair_guided_ig_module.np = NumpyWithQuantileInterpolation("numpy")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.get(MODEL, weights="none", device=DEVICE).eval()


@pytest.fixture(scope="module")
def prepared(model):
    return fastig.prepare(model)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(N_IMAGES, 3, 224, 224, device=DEVICE)


TARGETS = list(range(3, 3 + 64))


def _run(benchmark, fn, rounds=1):
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


# --- Guided IG ---------------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="guided-ig")
def test_pair_guided_ig(benchmark, model, images):
    def run():
        for i, x in enumerate(images.cpu().numpy()):
            saliency_core.GuidedIG().GetMask(x, pair_model_function(model, TARGETS[i]), x_steps=GUIDED_STEPS)

    _run(benchmark, run)


@pytest.mark.benchmark(group="guided-ig")
def test_fastig_guided_ig(benchmark, model, images):
    _run(benchmark, lambda: GuidedIntegratedGradients(model).attribute(images, target=TARGETS[:N_IMAGES], n_steps=GUIDED_STEPS))


@pytest.mark.benchmark(group="guided-ig")
def test_fastig_guided_ig_prepared(benchmark, prepared, images, monkeypatch):
    """Also times the engine's forward+backward calls inside the same run: ``extra_info`` holds the share of the
    time spent outside the model's passes (path steps, accumulation, Python), robust to a shared CPU's drift."""
    in_passes = []
    passes = Engine.gradients

    def timed_passes(self, *args):
        start = time.perf_counter()
        result = passes(self, *args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        in_passes.append(time.perf_counter() - start)
        return result

    monkeypatch.setattr(Engine, "gradients", timed_passes)

    def run():
        in_passes.clear()
        start = time.perf_counter()
        GuidedIntegratedGradients(prepared).attribute(images, target=TARGETS[:N_IMAGES], n_steps=GUIDED_STEPS)
        total = time.perf_counter() - start
        benchmark.extra_info["share_outside_model_passes"] = round(1 - sum(in_passes) / total, 4)

    _run(benchmark, run)


@pytest.mark.benchmark(group="guided-ig")
def test_bare_passes_prepared(benchmark, prepared, images):
    """The floor: the model passes Guided IG needs and nothing else."""
    target = torch.tensor(TARGETS[:N_IMAGES], device=DEVICE).reshape(-1, 1)

    def run():
        for _ in range(GUIDED_STEPS):
            x = images.detach().requires_grad_()
            torch.autograd.grad(prepared(x).gather(1, target).sum(), x)

    _run(benchmark, run)


# --- IDGI vs IG ----------------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="idgi-vs-ig")
@pytest.mark.parametrize("idgi", [False, True], ids=["ig", "idgi"])
def test_integrated_gradients(benchmark, prepared, images, idgi):
    _run(benchmark, lambda: IntegratedGradients(prepared).attribute(
        images[:1], target=3, n_steps=IG_STEPS, method="riemann_left", idgi=idgi), rounds=2)


# --- Blur IG -----------------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="blur-ig")
def test_pair_blur_ig(benchmark, model, images):
    def run():
        for i, x in enumerate(images[:2].cpu().numpy()):
            saliency_core.BlurIG().GetMask(x.transpose(1, 2, 0), pair_model_function(model, TARGETS[i], layout="hwc"),
                                           steps=BLUR_STEPS, batch_size=BLUR_STEPS)

    _run(benchmark, run)


@pytest.mark.benchmark(group="blur-ig")
def test_fastig_blur_ig_prepared(benchmark, prepared, images):
    _run(benchmark, lambda: BlurIntegratedGradients(prepared).attribute(images[:2], target=TARGETS[:2], n_steps=BLUR_STEPS))
