"""Insertion/deletion: equal to RISE's CausalMetric semantics (a float64 reference written here from RISE's
description), stable tie rule, steps that do not divide the pixel count, batching, and a real ground truth."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from fastig import models
import fastig.metrics.insertion

ins = sys.modules["fastig.metrics.insertion"]  # the module (fastig.metrics.insertion is also the function)


def small_cnn(channels: int, classes: int = 7) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, classes)).eval()


def reference_curve(model, image, saliency, mode, step, substrate, target=None):
    """RISE's CausalMetric.single_run in float64, one image, one model pass per step.

    The order is RISE's "decreasing saliency", with fastig's documented tie rule (lower row-major index first)."""
    x = image.double().clone()  # [1, C, H, W]
    _, c, h, w = x.shape
    hw = h * w
    with torch.no_grad():
        cls = int(model(x).argmax(1)) if target is None else int(target)
    flat = saliency.double().reshape(-1).numpy()
    order = np.lexsort((np.arange(hw), -flat))
    start, finish = (substrate.double().clone(), x.clone()) if mode == "insertion" else (x.clone(), substrate.double().clone())
    n_steps = (hw + step - 1) // step
    scores = []
    for i in range(n_steps + 1):
        with torch.no_grad():
            scores.append(float(torch.softmax(model(start), 1)[0, cls]))
        if i < n_steps:
            coords = torch.as_tensor(order[step * i:step * (i + 1)].copy())
            start.view(1, c, hw)[0][:, coords] = finish.view(1, c, hw)[0][:, coords]
    scores = np.array(scores)
    return scores, (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1)


@pytest.mark.parametrize("mode", ["insertion", "deletion"])
@pytest.mark.parametrize("shape,step,ties", [((2, 3, 12, 10), 7, False), ((3, 1, 9, 9), 81, True),
                                             ((2, 2, 8, 11), 5, True), ((1, 3, 6, 6), 1, False)])
def test_equals_rise_reference_float64(mode, shape, step, ties):
    n, c, h, w = shape
    model = small_cnn(c).double()
    images = torch.randn(shape, dtype=torch.float64)
    saliency = torch.randint(0, 3, (n, h, w)).double() if ties else torch.randn(n, h, w, dtype=torch.float64)
    result = ins.causal_metric(model, images, saliency, mode, step=step, batch_size=5)
    sub = ins.make_substrate(images, ins.DEFAULT_SUBSTRATE[mode])
    assert result.scores.shape == (n, (h * w + step - 1) // step + 1)
    assert result.counts[-1] == h * w and result.counts[0] == 0
    for i in range(n):
        ref_scores, ref_auc = reference_curve(model, images[i:i + 1], saliency[i], mode, step, sub[i:i + 1])
        np.testing.assert_allclose(result.scores[i], ref_scores, rtol=0, atol=1e-12)
        assert abs(result.auc[i] - ref_auc) < 1e-12


@pytest.mark.parametrize("substrate", ["mean", "zeros", "blur"])
def test_float32_model_and_given_target_match_reference(substrate):
    model = small_cnn(3)
    images = torch.randn(2, 3, 10, 10)
    saliency = torch.randn(2, 10, 10)
    target = [1, 4]
    got = ins.deletion(model, images, saliency, target=target, step=9, substrate=substrate, batch_size=3)
    sub = ins.make_substrate(images.double(), substrate)
    for i in range(2):
        ref, ref_auc = reference_curve(model.double(), images[i:i + 1], saliency[i], "deletion", 9,
                                       sub[i:i + 1], target[i])
        np.testing.assert_allclose(got.scores[i], ref, atol=2e-6)
        assert abs(got.auc[i] - ref_auc) < 2e-6
    model.float()
    assert list(got.target) == target


def test_batch_size_does_not_change_results():
    model = small_cnn(3)
    images = torch.randn(3, 3, 8, 8)
    saliency = torch.randn(3, 8, 8)
    a = ins.insertion(model, images, saliency, step=3, batch_size=7)
    b = ins.insertion(model, images, saliency, step=3, batch_size=200)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_stable_tie_rule_lower_index_first():
    sal = torch.tensor([[[1.0, 2.0, 2.0], [0.0, 2.0, -0.0]]])
    rank = ins.saliency_rank(sal)
    # order: the three 2.0 (indices 1, 2, 4), then 1.0 (index 0), then 0.0 and -0.0 (indices 3, 5)
    assert rank.reshape(-1).tolist() == [3, 0, 1, 4, 2, 5]


def test_blur_matches_per_channel_zero_padded_convolution():
    from scipy.ndimage import convolve

    kernel = ins.rise_blur_kernel()
    assert kernel.shape == (11, 11) and abs(kernel.sum() - 1) < 1e-12
    np.testing.assert_allclose(kernel, kernel.T)
    x = torch.randn(2, 3, 15, 13, dtype=torch.float64)
    got = ins.blur(x).numpy()
    for n in range(2):
        for c in range(3):
            want = convolve(x[n, c].numpy(), kernel, mode="constant", cval=0.0)
            np.testing.assert_allclose(got[n, c], want, atol=1e-12)


def test_auc_formula():
    assert ins.rise_auc([0.0, 1.0, 1.0]) == pytest.approx((2 - 0 - 0.5) / 2)
    np.testing.assert_allclose(ins.rise_auc(np.ones((3, 5))), np.ones(3))


def test_decisive_pixel_first_beats_random_on_center_pixel_model():
    """The center-pixel model's class depends on one pixel only: a saliency ranking it first must win."""
    model = models.get("centerpixel")
    gen = torch.Generator().manual_seed(3)
    n = 2
    images = torch.rand(n, 1, 227, 227, generator=gen)
    intensities = torch.tensor([60, 200])
    images[:, 0, 113, 113] = intensities / 255.0
    truth = torch.zeros(n, 227, 227)
    truth[:, 113, 113] = 1.0
    random_sal = torch.rand(n, 227, 227, generator=gen)
    random_sal[:, 113, 113] = -1.0  # the decisive pixel last
    step = 227 * 8  # 29 points per curve keeps the test fast; the default (227) behaves the same
    results = {name: (ins.insertion(model, images, sal, step=step), ins.deletion(model, images, sal, step=step))
               for name, sal in (("truth", truth), ("random", random_sal))}
    assert list(results["truth"][0].target) == intensities.tolist()
    assert (results["truth"][0].auc > results["random"][0].auc + 0.3).all()
    assert (results["truth"][1].auc < results["random"][1].auc - 0.3).all()


def test_bad_inputs_are_clear_errors():
    model = small_cnn(1)
    images = torch.randn(2, 1, 6, 6)
    with pytest.raises(ValueError, match="saliency must be"):
        ins.insertion(model, images, torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="NaN"):
        ins.insertion(model, images, torch.full((2, 6, 6), float("nan")))
    with pytest.raises(ValueError, match="step"):
        ins.insertion(model, images, torch.randn(2, 6, 6), step=0)
    with pytest.raises(ValueError, match="mode"):
        ins.causal_metric(model, images, torch.randn(2, 6, 6), "both")
    with pytest.raises(ValueError, match="substrate"):
        ins.insertion(model, images, torch.randn(2, 6, 6), substrate="noise")
