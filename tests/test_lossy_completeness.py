"""Lossy-compression MSE (0 for a lossless re-encode) and completeness / the step sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fastig
from fastig.metrics import completeness, lossy_mse, step_sweep
from fastig.metrics.lossy import normalized_map_mse, reencode
from fastig.io.images import uint8_to_input


def small_cnn(channels=3, classes=5):
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, classes)).eval()


def noisy_images(n=2, h=16, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_lossless_reencode_gives_zero():
    images = noisy_images()
    for im in images:
        np.testing.assert_array_equal(reencode(im, "png"), im)
        np.testing.assert_array_equal(reencode(im, "webp", 101), im)
    mse = lossy_mse(small_cnn(), images, codec="png", method="ig", n_steps=8)
    assert mse.shape == (2,) and (mse == 0).all()


def test_jpeg_mse_equals_manual_computation():
    model = small_cnn()
    images = noisy_images(seed=1)
    got = lossy_mse(model, images, target=[1, 3], quality=30, method="ig", n_steps=8)
    to_input = uint8_to_input()
    want = []
    for im, t in zip(images, [1, 3]):
        a = fastig.attribute(model, to_input(im[None]), target=t, method="ig", n_steps=8).sum(1)[0].double().numpy()
        b = fastig.attribute(model, to_input(reencode(im, "jpeg", 30)[None]), target=t, method="ig",
                             n_steps=8).sum(1)[0].double().numpy()
        a, b = a / np.abs(a).sum(), b / np.abs(b).sum()
        want.append(((a - b) ** 2).mean())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert (got > 0).all()


def test_normalized_mse_is_scale_free():
    a = np.random.default_rng(0).random((3, 5, 5))
    np.testing.assert_allclose(normalized_map_mse(a, 4.0 * a), 0.0, atol=1e-18)
    assert (normalized_map_mse(a, a[::-1]) > 0).any()


def test_reencode_rejects_bad_arguments():
    with pytest.raises(ValueError, match="codec"):
        reencode(noisy_images()[0], "gif")
    with pytest.raises(ValueError, match="quality"):
        reencode(noisy_images()[0], "jpeg", 101)


def test_completeness_equals_its_definition():
    model = small_cnn().double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    result = completeness(model, x, target=[0, 2, 4], method="ig", n_steps=16)
    attr = fastig.attribute(model, x, target=[0, 2, 4], method="ig", n_steps=16)
    with torch.no_grad():
        f = model(x)[torch.arange(3), torch.tensor([0, 2, 4])] - model(torch.zeros_like(x))[torch.arange(3),
                                                                                          torch.tensor([0, 2, 4])]
    delta = attr.reshape(3, -1).sum(1) - f
    np.testing.assert_allclose(result.delta, delta.numpy(), atol=1e-10)
    np.testing.assert_allclose(result.absolute, np.abs(delta.numpy()), atol=1e-10)
    np.testing.assert_allclose(result.relative, np.abs(delta.numpy()) / np.abs(f.numpy()), rtol=1e-8)
    np.testing.assert_allclose(result.difference, f.numpy(), atol=1e-10)


def test_completeness_needs_a_path_method():
    with pytest.raises(ValueError, match="path method"):
        completeness(small_cnn(), torch.randn(1, 3, 8, 8), method="saliency")


def test_step_sweep_rows():
    model = small_cnn().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rows = step_sweep(model, x, method="ig", steps=(2, 32), metric_options={"step": 16})
    assert [r["n_steps"] for r in rows] == [2, 32]
    for r in rows:
        assert np.isfinite(r["insertion_mean"]) and np.isfinite(r["deletion_mean"])
        direct = completeness(model, x, method="ig", n_steps=r["n_steps"])
        np.testing.assert_allclose(r["abs_delta"], direct.absolute, atol=1e-12)
    # more steps, smaller gap (a smooth tanh network)
    assert rows[1]["abs_delta_mean"] < rows[0]["abs_delta_mean"]
