"""PIC (SIC/AIC) equals PAIR saliency's compute_pic_metric (pip package `saliency`) on the same inputs and random
masks, with the same information estimator, including its skip cases."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import fastig.metrics.pic
from fastig.io.images import uint8_to_input

fpic = sys.modules["fastig.metrics.pic"]  # the module (fastig.metrics.pic is also the function)

pair = pytest.importorskip("saliency.metrics.pic", reason="PAIR's saliency package (test extra) is not installed")
pytest.importorskip("PIL", reason="PAIR's PIC estimator needs Pillow (test extra)")


@pytest.fixture(autouse=True)
def _numpy2_trapz(monkeypatch):
    # PAIR calls np.trapz, which numpy 2.4 removed; np.trapezoid is the same function under its new name.
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


def smooth_images(n, h, w, channels, seed):
    """Natural-ish uint8 images: upsampled noise plus a little fine noise (so blurring loses information)."""
    rng = np.random.default_rng(seed)
    coarse = torch.tensor(rng.uniform(0, 255, (n, channels, h // 4, w // 4)))
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).numpy()
    up = up + rng.normal(0, 6, up.shape)
    out = np.clip(np.round(up), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return out[..., 0] if channels == 1 else out


class DetailNet(nn.Module):
    """Class 0 grows with fine detail (mean |Laplacian|), so blurring lowers its score as on real images; a small
    random CNN adds image-dependent variation to every class."""

    def __init__(self, channels, images, classes=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        self.register_buffer("lap", lap.expand(channels, 1, 3, 3).contiguous())
        self.noise = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                   nn.Flatten(), nn.Linear(16, classes)).double()
        self.scale = 1.0
        with torch.no_grad():
            detail = self.detail(uint8_to_input(dtype=torch.float64)(images))
        self.scale = 6.0 / float(detail.min())  # the least detailed original image gets logit 6 - 2 = 4 over the rest

    def detail(self, x):
        return torch.nn.functional.conv2d(x, self.lap, groups=x.shape[1]).abs().mean((1, 2, 3)) * self.scale

    def forward(self, x):
        logits = 0.3 * self.noise(x) + 2.0
        return torch.cat([logits[:, :1] - 2.0 + self.detail(x)[:, None], logits[:, 1:]], 1)


def detail_net(channels, images, seed=0):
    return DetailNet(channels, images, seed=seed).eval()


def pair_results(model, input_fn, images, saliency, masks, metric, classes, min_pred_value, thresholds):
    out = []
    for i in range(len(images)):
        def pred_func(batch, i=i):
            with torch.no_grad():
                logits = model(input_fn(batch))
            if metric == "sic":
                return list(torch.softmax(logits, 1)[:, classes[i]].numpy())
            return list((logits.argmax(1) == classes[i]).double().numpy())

        try:
            out.append(pair.compute_pic_metric(images[i], saliency[i], masks[i], pred_func, thresholds,
                                               min_pred_value=min_pred_value))
        except pair.ComputePicMetricError as e:
            out.append(str(e))
    return out


PAIR_MESSAGE = {1: "lower than `min_pred_value`", 2: "entropy in the completely blurred image is not lower",
                3: "score on the completely blurred image is not lower"}


def assert_same_as_pair(ours, theirs):
    for i, ref in enumerate(theirs):
        code = int(ours.skipped[i])
        if isinstance(ref, str):
            assert code != 0 and PAIR_MESSAGE[code] in ref, (i, code, ref)
            assert np.isnan(ours.auc[i])
        else:
            assert code == 0, (i, fpic.SKIP_REASONS[code])
            assert abs(ours.auc[i] - ref.auc) < 1e-6
            np.testing.assert_allclose(ours.curves[i], ref.curve_y, atol=1e-6)
            np.testing.assert_allclose(ours.curve_x, ref.curve_x, atol=0)
            np.testing.assert_allclose(ours.predictions[i], ref.predictions, atol=1e-12)


@pytest.mark.parametrize("channels,information,min_pred", [(3, "webp_pil", 0.8), (1, "webp_pil", 0.3),
                                                           (3, "png", 0.5)])
def test_equals_pair_compute_pic_metric(monkeypatch, channels, information, min_pred):
    if information == "png":  # both sides with the same (fastig's) PNG estimator
        monkeypatch.setattr(pair, "estimate_image_entropy", fpic.png_size)
    n, h, w = 3, 28, 24
    images = smooth_images(n, h, w, channels, seed=channels)
    rng = np.random.default_rng(5)
    saliency = rng.normal(size=(n, h, w)).astype(np.float32)
    saliency[0] = np.round(saliency[0])  # many ties at the quantiles
    masks = [fpic.random_mask(h, w, 0.01, rng) for _ in range(n)]
    model = detail_net(channels, images)
    input_fn = uint8_to_input(dtype=torch.float64)
    # PAIR's thresholds once; a shorter list elsewhere keeps the test fast (PAIR's loop is the slow side)
    thresholds = fpic.PAIR_THRESHOLDS if channels == 3 and information == "webp_pil" else (0.01, 0.05, 0.2, 0.6)
    ours = fpic.pic(model, images, saliency, masks=masks, information=information, min_pred_value=min_pred,
                    input_fn=input_fn, batch_size=7, workers=2, thresholds=thresholds)
    for metric in ("sic", "aic"):
        theirs = pair_results(model, input_fn, images, saliency, masks, metric, ours[metric].target, min_pred,
                              thresholds)
        assert_same_as_pair(ours[metric], theirs)
    assert (ours["sic"].skipped == 0).any()  # the comparison covered scored images


def test_skip_cases_match_pair():
    n, h, w = 3, 24, 24
    images = smooth_images(n, h, w, 3, seed=9)
    images[2] = 77  # a flat image: blurring cannot lose information -> skip reason 2
    saliency = np.random.default_rng(1).normal(size=(n, h, w))
    masks = [fpic.random_mask(h, w, 0.01, s) for s in range(n)]
    input_fn = uint8_to_input(dtype=torch.float64)

    constant = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, 4)).double().eval()
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.tensor([5.0, 0, 0, 0]))  # same score everywhere -> reason 3 (or 2)
    ours = fpic.pic(constant, images, saliency, masks=masks, information="webp_pil", min_pred_value=0.5,
                    input_fn=input_fn)
    assert list(ours["sic"].skipped) == [3, 3, 2]
    assert ours["sic"].reasons() == ["blurred_prediction_not_lower"] * 2 + ["blurred_not_less_informative"]
    for metric in ("sic", "aic"):
        assert_same_as_pair(ours[metric], pair_results(constant, input_fn, images, saliency, masks, metric,
                                                       ours[metric].target, 0.5, fpic.PAIR_THRESHOLDS))
    high = fpic.pic(constant, images, saliency, masks=masks, information="webp_pil", min_pred_value=0.99,
                    input_fn=input_fn, metrics=("sic",))
    assert list(high["sic"].skipped) == [1, 1, 1]  # softmax 0.98 < 0.99: reason 1 comes first
    assert np.isnan(high["sic"].auc).all()


@pytest.mark.parametrize("grey", [False, True])
def test_blurred_image_equals_pair(grey):
    images = smooth_images(2, 30, 27, 1 if grey else 3, seed=2)
    rng = np.random.default_rng(0)
    for fraction in (0.0, 0.01, 0.3, 0.9):
        mask = fpic.random_mask(30, 27, fraction, rng)
        for im in images:
            np.testing.assert_array_equal(fpic.blurred_image(im, mask), pair.create_blurred_image(im, mask))


def test_aggregate_equals_pair(monkeypatch):
    n, h, w = 4, 24, 24
    images = smooth_images(n, h, w, 3, seed=4)
    saliency = np.random.default_rng(3).normal(size=(n, h, w))
    model = detail_net(3, images, seed=1)
    input_fn = uint8_to_input(dtype=torch.float64)
    ours = fpic.pic(model, images, saliency, seed=11, information="webp_pil", min_pred_value=0.0, input_fn=input_fn,
                    thresholds=(0.05, 0.3))
    scored = [i for i in range(n) if ours["sic"].skipped[i] == 0]
    assert scored
    fake = [pair.PicMetricResult(ours["sic"].curve_x, ours["sic"].curves[i], [], [], [], 0.0) for i in scored]
    for method in ("median", "mean"):
        curve, auc = ours["sic"].aggregate(method)
        ref = pair.aggregate_individual_pic_results(fake, method=method)
        np.testing.assert_allclose(curve, ref.curve_y)
        assert abs(auc - ref.auc) < 1e-12


def test_information_estimators():
    image = smooth_images(1, 64, 64, 3, seed=0)[0]
    flat = np.full_like(image, 128)
    for name, estimate in fpic.INFORMATION.items():
        assert estimate(image) > estimate(flat) > 0, name
    # OpenCV's lossless WebP is near PIL's (PAIR's), not identical: within 2% here
    assert abs(fpic.webp_size(image) - fpic.pil_webp_size(image)) <= 0.02 * fpic.pil_webp_size(image)


def test_bad_inputs():
    images = smooth_images(2, 16, 16, 3, seed=0)
    model = detail_net(3, images)
    with pytest.raises(ValueError, match="uint8"):
        fpic.pic(model, images.astype(np.float32), np.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match="saliency"):
        fpic.pic(model, images, np.zeros((2, 15, 16)))
    with pytest.raises(ValueError, match="information"):
        fpic.pic(model, images, np.zeros((2, 16, 16)), information="gzip")
    with pytest.raises(ValueError, match="metrics"):
        fpic.pic(model, images, np.zeros((2, 16, 16)), metrics=("auc",))
