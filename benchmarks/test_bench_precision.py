"""Reduced precision (``precision="bf16"|"fp16"``, autocast of the model's passes): error against fp32 and speed.

Run: ``pytest benchmarks/test_bench_precision.py -s`` (prints markdown tables).

- ``test_error_zoo``: IG (gausslegendre, FASTIG_PRECISION_STEPS=8 steps, zero baseline, the top-1 class) on one
  random image at FASTIG_PRECISION_SIZE=112 pixels (the VGGs at 64) for every RGB zoo model with random weights, and
  ``test_error_trained``: the same on a small CNN trained here on scikit-learn's digits (so the gradients have the
  structure of a trained model's). Columns: relative L2 error of the attributions against fp32, Spearman rank
  correlation of the channel-summed maps with fp32's, and the completeness gap
  ``|sum(attributions) - (f(x) - f(b))| / |f(x) - f(b)|`` at each precision (fp32's own gap is the quadrature
  error of 8 steps, the floor the others are compared with).
- ``test_speed``: forward+backward passes of resnet50 (prepared; FASTIG_PRECISION_SPEED_IMAGES=2 images at
  FASTIG_PRECISION_SPEED_SIZE=224 pixels) at each precision, alternating rounds.

FASTIG_PRECISION_MODELS (comma-separated) selects the zoo models. Error does not depend on the machine's load;
speed needs a quiet machine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _harness import alternate

from fastig import models
from fastig.attr import IntegratedGradients

STEPS = int(os.environ.get("FASTIG_PRECISION_STEPS", "8"))
SIZE = int(os.environ.get("FASTIG_PRECISION_SIZE", "112"))
# reduced precision is several times slower than fp32 on an AVX2-only CPU: the VGGs are measured on smaller images
SIZES = {"vgg16": 64, "vgg19": 64, "sascenenet_rgb": 224}  # sascenenet_rgb takes 224x224 only
# torchvision's googlenet init (truncated normal, std 0.01) leaves the random network's output independent of its
# input (f(x) = f(0) to 4 digits): no gradient to compare. Its convolutions and linear layers are re-drawn with
# Kaiming-normal init (fan-in, ReLU gain), which keeps the signal's scale through the depth.
KAIMING = {"googlenet"}
ZOO = os.environ.get("FASTIG_PRECISION_MODELS",
                     "resnet18,resnet34,resnet50,vgg16,vgg19,alexnet,googlenet,sascenenet_rgb").split(",")
LOW = ("bf16", "fp16")


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.reshape(-1).double().numpy()), _ranks(b.reshape(-1).double().numpy())
    return float(np.corrcoef(ra, rb)[0, 1])


def errors(model, x: torch.Tensor, steps: int = STEPS) -> dict:
    """Per precision: relative L2 error, Spearman of channel-summed maps (vs fp32), relative completeness gap."""
    target = int(model(x).argmax(1)[0])
    ig = IntegratedGradients(model)
    out = {}
    base, base_delta = ig.attribute(x, target=target, n_steps=steps, return_convergence_delta=True)
    f_diff = (model(x)[0, target] - model(torch.zeros_like(x))[0, target]).abs().item()
    out["fp32"] = {"gap": base_delta.abs().item() / f_diff}
    for precision in LOW:
        attr, delta = ig.attribute(x, target=target, n_steps=steps, precision=precision, return_convergence_delta=True)
        out[precision] = {"l2": ((attr - base).norm() / base.norm()).item(),
                          "spearman": spearman(attr.sum(1), base.sum(1)),
                          "gap": delta.abs().item() / f_diff}
    return out


def markdown(rows: dict[str, dict]) -> str:
    head = ("| model | bf16 rel. L2 | bf16 Spearman | fp16 rel. L2 | fp16 Spearman | gap fp32 | gap bf16 | gap fp16 |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for name, e in rows.items():
        lines.append(f"| {name} | {e['bf16']['l2']:.2e} | {e['bf16']['spearman']:.4f} | {e['fp16']['l2']:.2e} | "
                     f"{e['fp16']['spearman']:.4f} | {e['fp32']['gap']:.2e} | {e['bf16']['gap']:.2e} | "
                     f"{e['fp16']['gap']:.2e} |")
    return "\n".join(lines)


def test_error_zoo(benchmark):
    rows = {}
    for name in ZOO:
        torch.manual_seed(0)
        model = models.get(name, weights="none").eval()
        if name in KAIMING:
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        torch.manual_seed(1)
        size = SIZES.get(name, SIZE)
        x = torch.randn(1, 3, size, size)
        key = f"{name} ({size}x{size})"
        rows[key] = errors(model, x)
        print(key, rows[key], flush=True)
    print(f"\nIG ({STEPS} steps, random weights), reduced precision vs fp32:\n" + markdown(rows))
    benchmark.extra_info["rows"] = rows
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


class DigitsNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        )
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def trained_digits_model(seed: int = 0, epochs: int = 30):
    """A small CNN trained on scikit-learn's 8x8 digits (upsampled to 32x32); returns (model, test images,
    test accuracy)."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=g).split(64):
            idx = train[batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    return model, x[test], accuracy


def test_error_trained(benchmark):
    model, test_images, accuracy = trained_digits_model()
    rows = {}
    for i in range(4):
        rows[f"digits CNN, test image {i}"] = errors(model, test_images[i:i + 1], steps=32)
    print(f"\ndigits CNN (test accuracy {accuracy:.3f}), IG 32 steps, reduced precision vs fp32:\n" + markdown(rows))
    benchmark.extra_info.update({"rows": rows, "accuracy": accuracy})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_speed(benchmark):
    import fastig

    torch.manual_seed(0)
    model = fastig.prepare(models.get("resnet50", weights="none").eval())
    n = int(os.environ.get("FASTIG_PRECISION_SPEED_IMAGES", "2"))
    size = int(os.environ.get("FASTIG_PRECISION_SPEED_SIZE", "224"))
    x = torch.randn(n, 3, size, size)

    def passes(precision):
        def run():
            IntegratedGradients(model).attribute(x, target=3, n_steps=1, internal_batch_size=n, precision=precision)
        return run

    timings = alternate({p: passes(p) for p in ("fp32", "bf16", "fp16")}, rounds=2)
    timings.record(benchmark, "fp32")
