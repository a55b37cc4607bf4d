"""Metrics: fastig vs the reference implementations, same model and images, same process.

Run: ``pytest benchmarks/test_bench_metrics.py --benchmark-columns=mean,rounds``. Sizes are modest by default
(``FASTIG_BENCH_IMAGES`` images, insertion/deletion step ``FASTIG_BENCH_STEP`` pixels); each test records its
scores in ``extra_info`` and checks that both sides agree (a correctness check, not a timing assertion).

- insertion + deletion on resnet50 (random weights; the timing does not depend on them): a straight RISE
  ``CausalMetric.single_run`` loop (one model pass per step, pixels copied by coordinates) on the plain model vs
  ``fastig.metrics`` on ``fastig.prepare(model)``, batched through ``perturb``. ``extra_info["outside_model"]``
  is the fraction of fastig's time spent outside the model's forward passes.
- PIC (SIC + AIC): PAIR saliency's per-image ``compute_pic_metric`` (called twice per image, SIC and AIC, as its
  notebook does) vs ``fastig.metrics.pic`` with PAIR's own PIL-WebP estimator (identical scores), OpenCV WebP and
  PNG. The model is a small detail-sensitive net so that every image takes the full path; with a real model the
  CPU work (interpolation and encoding) dominates just the same.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import fastig
from fastig import models
from fastig.metrics import deletion, insertion
from fastig.metrics.insertion import blur, rise_auc
from fastig.io.images import uint8_to_input

import fastig.metrics.pic  # noqa: E402

fpic = sys.modules["fastig.metrics.pic"]

N_IMAGES = int(os.environ.get("FASTIG_BENCH_IMAGES", "2"))
STEP = int(os.environ.get("FASTIG_BENCH_STEP", str(224 * 8)))


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return models.get("resnet50", weights="none").eval()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(N_IMAGES, 3, 224, 224), torch.rand(N_IMAGES, 224, 224)


def rise_single_run(model, image, saliency, mode, step):
    """RISE's CausalMetric.single_run (softmax model, blur / zeros substrates), without plotting."""
    hw = image.shape[2] * image.shape[3]
    with torch.no_grad():
        c = int(model(image).argmax(1))
        n_steps = (hw + step - 1) // step
        if mode == "del":
            start, finish = image.clone(), torch.zeros_like(image)
        else:
            start, finish = blur(image), image.clone()
        scores = np.empty(n_steps + 1)
        order = np.flip(np.argsort(saliency.reshape(-1, hw).numpy(), axis=1), axis=-1)
        for i in range(n_steps + 1):
            scores[i] = float(torch.softmax(model(start), 1)[0, c])
            if i < n_steps:
                coords = order[:, step * i:step * (i + 1)]
                start.numpy().reshape(1, 3, hw)[0, :, coords] = finish.numpy().reshape(1, 3, hw)[0, :, coords]
    return rise_auc(scores)


class TimedModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.seconds = model, 0.0

    def forward(self, x):
        start = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - start
        return out


@pytest.mark.benchmark(group="insertion+deletion resnet50")
def test_rise_loop(benchmark, resnet50, batch):
    images, saliency = batch

    def run():
        return [[rise_single_run(resnet50, images[i:i + 1], saliency[i], m, STEP) for m in ("ins", "del")]
                for i in range(N_IMAGES)]

    result = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["auc"] = np.asarray(result).tolist()
    test_rise_loop.result = np.asarray(result)


@pytest.mark.benchmark(group="insertion+deletion resnet50")
def test_fastig_insertion_deletion(benchmark, resnet50, batch):
    images, saliency = batch
    timed = TimedModel(fastig.prepare(resnet50))

    def run():
        timed.seconds = 0.0
        start = time.perf_counter()
        a = insertion(timed, images, saliency, step=STEP).auc
        b = deletion(timed, images, saliency, step=STEP).auc
        run.outside = 1.0 - timed.seconds / (time.perf_counter() - start)
        return np.stack([a, b], 1)

    result = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["auc"] = result.tolist()
    benchmark.extra_info["outside_model"] = run.outside
    reference = getattr(test_rise_loop, "result", None)  # set when the RISE loop ran first in this session
    if reference is not None:
        benchmark.extra_info["max_auc_difference_vs_rise"] = float(np.abs(result - reference).max())
        np.testing.assert_allclose(result, reference, atol=1e-3)


class DetailNet(nn.Module):
    """Class 0's logit grows with fine detail: blurring lowers its score, as it does on a real classifier."""

    def __init__(self):
        super().__init__()
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("lap", lap.expand(3, 1, 3, 3).contiguous())

    def forward(self, x):
        d = torch.nn.functional.conv2d(x, self.lap, groups=3).abs().mean((1, 2, 3))
        return torch.stack([40.0 * d, torch.full_like(d, 2.0), torch.zeros_like(d)], 1)


@pytest.fixture(scope="module")
def pic_images():
    rng = np.random.default_rng(0)
    coarse = torch.tensor(rng.uniform(0, 255, (N_IMAGES, 3, 28, 28)))
    up = torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False).numpy()
    up = up + rng.normal(0, 8, up.shape)
    images = np.clip(np.round(up), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()
    saliency = rng.random((N_IMAGES, 224, 224)).astype(np.float32)
    masks = [fpic.random_mask(224, 224, 0.01, rng) for _ in range(N_IMAGES)]
    return images, saliency, masks


@pytest.mark.benchmark(group="pic (sic+aic) 224x224")
def test_pair_pic(benchmark, pic_images):
    pair = pytest.importorskip("saliency.metrics.pic")
    if not hasattr(np, "trapz"):  # PAIR calls np.trapz, removed in numpy 2.4 (np.trapezoid is the same)
        np.trapz = np.trapezoid
    images, saliency, masks = pic_images
    model, to_input = DetailNet().eval(), uint8_to_input()

    def run():
        out = []
        for i in range(N_IMAGES):
            with torch.no_grad():
                cls = int(model(to_input(images[i][None])).argmax(1))

            def sic(b):
                with torch.no_grad():
                    return list(torch.softmax(model(to_input(b)), 1)[:, cls].double().numpy())

            def aic(b):
                with torch.no_grad():
                    return list((model(to_input(b)).argmax(1) == cls).double().numpy())

            row = []
            for f in (sic, aic):
                try:
                    row.append(pair.compute_pic_metric(images[i], saliency[i], masks[i], f,
                                                       fpic.PAIR_THRESHOLDS).auc)
                except pair.ComputePicMetricError:
                    row.append(float("nan"))
            out.append(row)
        return out

    result = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["auc"] = result
    test_pair_pic.result = np.asarray(result)


@pytest.mark.parametrize("information", ["webp_pil", "webp", "png"])
@pytest.mark.benchmark(group="pic (sic+aic) 224x224")
def test_fastig_pic(benchmark, pic_images, information):
    images, saliency, masks = pic_images
    model = DetailNet().eval()

    def run():
        r = fpic.pic(model, images, saliency, masks=masks, information=information)
        return np.stack([r["sic"].auc, r["aic"].auc], 1)

    result = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["auc"] = result.tolist()
    reference = getattr(test_pair_pic, "result", None)
    if reference is not None:
        benchmark.extra_info["max_auc_difference_vs_pair"] = float(np.nanmax(np.abs(result - reference)))
        if information == "webp_pil":
            np.testing.assert_allclose(result, reference, atol=1e-6)
