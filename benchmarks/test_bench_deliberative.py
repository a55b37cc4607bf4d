"""Deliberative explanations: insecurity maps of 8 images on vgg16 (random weights, 200 classes, the conv5_3 ReLU
``features.29`` at 14x14, top-5 classes, hardness-predictor difficulty), fastig vs the released code's procedure.

Run: ``pytest benchmarks/test_bench_deliberative.py -s`` (prints the ratios; they are also in ``extra_info``).

- ``gradient``: the released code (``insecurity_hp_cub_vgg.py``) image by image: a forward pass of the classifier,
  one backward pass per class (through the whole network, as ``one_hot.backward(retain_graph=True)`` does), a
  forward and backward pass of the hardness predictor, then the ambiguities and maps in numpy/OpenCV. fastig: a
  batch of images per forward pass, the 5 class maps as vector-Jacobian products of one backward graph that stops
  at the layer.
- ``2ndg``: the same, with the difficulty map's second-order term. The released code builds each location's
  512 x 512 Hessian block with one backward pass per channel and location (100,352 per image): that is timed on a
  sample of passes and extrapolated (marked as such). The measured reference is the per-image procedure with one
  Hessian-vector product per location (196 per image) instead; fastig runs one vectorized double-backward pass
  per chunk of locations of a batch of images.
- ``k-maps``: the K class maps from one forward pass three ways: batched VJPs (``is_grads_batched``, what fastig
  uses), a loop of K ``autograd.grad`` calls on one graph, and the layer's output repeated K times in the batch.

Both sides compute the same maps (checked). Each comparison alternates the two sides (reference, fastig,
fastig, reference for the gradient variant) so that the order does not decide the ratio. Environment:
FASTIG_BENCH_IMAGES (8), FASTIG_BENCH_DEVICE (cpu).
"""

from __future__ import annotations

import os
import time

import cv2
import numpy as np
import pytest
import torch

from fastig.attr._layers import batched_vjp, capture
from fastig.deliberative import HardnessPredictor, InsecurityMaps
from fastig.models import vgg

N_IMAGES = int(os.environ.get("FASTIG_BENCH_IMAGES", "8"))
DEVICE = os.environ.get("FASTIG_BENCH_DEVICE", "cpu")
LAYER = "features.29"
TOP_K = 5
BATCH = 4  # images per fastig pass (keeps the process under ~4 GiB on the CPU)
PAPER_SAMPLE = 32  # per-channel backward passes timed for the extrapolation


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = vgg.vgg16(num_classes=200).eval().to(DEVICE)
    torch.manual_seed(1)
    hp = HardnessPredictor.from_classifier(model).eval().to(DEVICE)
    torch.manual_seed(2)
    images = torch.randn(N_IMAGES, 3, 224, 224, device=DEVICE)
    return model, hp, images


def _layer_forward(module, layer, x):
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    handle = layer.register_forward_hook(hook)
    out = module(x)
    handle.remove()
    return store["a"], out


def released_procedure(model, hp, images, second_order=False):
    """The released code's per-image, per-class loop (numpy maps, OpenCV resize); returns each image's class maps,
    difficulty map and insecurity maps."""
    layer, hp_layer = model.get_submodule(LAYER), hp.trunk.get_submodule(LAYER)
    results = []
    for x in images.split(1):
        a, out = _layer_forward(model, layer, x)
        classes = np.argsort(torch.softmax(out, 1)[0].detach().cpu().numpy())[-TOP_K:][::-1]
        target = a.detach().cpu().numpy()[0]
        maps = np.zeros(target.shape[1:] + (TOP_K,))
        for k, c in enumerate(classes):
            model.zero_grad()
            out[0, c].backward(retain_graph=True)
            maps[:, :, k] = (target * a.grad.cpu().numpy()[0]).sum(0)
            a.grad = None
        maps[maps < 0] = 1e-7
        d_acts, score = _layer_forward(hp, hp_layer, x)
        if second_order:
            (grad,) = torch.autograd.grad(score.sum(), d_acts, create_graph=True)
            flat = d_acts.detach()[0].reshape(d_acts.shape[1], -1)
            quad = np.zeros(flat.shape[1])
            for p in range(flat.shape[1]):  # one Hessian-vector product per location
                direction = torch.zeros_like(flat)
                direction[:, p] = flat[:, p]
                (hvp,) = torch.autograd.grad(grad, d_acts, direction.reshape(d_acts.shape), retain_graph=True)
                quad[p] = float(flat[:, p] @ hvp[0].reshape(flat.shape)[:, p])
            g = grad.detach().cpu().numpy()[0]
        else:
            hp.zero_grad()
            score.sum().backward()
            g = d_acts.grad.cpu().numpy()[0]
        a_d = d_acts.detach().cpu().numpy()[0]
        difficulty = (a_d * np.maximum(g, 0)).sum(0)
        if second_order:
            difficulty = difficulty + np.abs(quad.reshape(difficulty.shape)) / 2.0
        confusion = np.sort(np.argsort(maps, axis=2)[:, :, -3:], axis=2)
        pairs = np.unique(np.concatenate([np.stack([confusion[:, :, i].ravel(), confusion[:, :, j].ravel()], 1)
                                          for i in range(3) for j in range(i + 1, 3)]), axis=0)
        insecurity = [cv2.resize(maps[:, :, i] * maps[:, :, j] * difficulty, (224, 224)) for i, j in pairs]
        results.append((maps, difficulty, np.stack(insecurity)))
    return results


def fastig_maps(model, hp, images, attribution):
    return InsecurityMaps(model, LAYER, attribution=attribution, difficulty="hp", hardness_predictor=hp,
                          top_k=TOP_K).attribute(images, batch_size=BATCH)


def _agree(ours, theirs):
    for result, (maps, difficulty, insecurity) in zip(ours, theirs):
        np.testing.assert_allclose(result.class_maps.permute(1, 2, 0).cpu().numpy(), maps, rtol=2e-3,
                                   atol=2e-4 * np.abs(maps).max())
        np.testing.assert_allclose(result.difficulty_map.cpu().numpy(), difficulty, rtol=2e-3,
                                   atol=2e-4 * np.abs(difficulty).max())


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def _report(benchmark, name, reference, ours, **extra):
    ratio = reference / ours
    benchmark.extra_info.update(reference_s=round(reference, 3), fastig_s=round(ours, 3), ratio=round(ratio, 2),
                                **extra)
    print(f"\n{name}: reference {reference:.2f} s, fastig {ours:.2f} s, {ratio:.1f}x faster "
          + " ".join(f"{k}={v}" for k, v in extra.items()))


@pytest.mark.benchmark(group="deliberative")
def test_gradient_variant(benchmark, setup):
    model, hp, images = setup

    def paired():
        t_ref1, theirs = _timed(lambda: released_procedure(model, hp, images))
        t_ours1, ours = _timed(lambda: fastig_maps(model, hp, images, "gradient"))
        t_ours2, _ = _timed(lambda: fastig_maps(model, hp, images, "gradient"))
        t_ref2, _ = _timed(lambda: released_procedure(model, hp, images))
        _agree(ours, theirs)
        _report(benchmark, "gradient", (t_ref1 + t_ref2) / 2, (t_ours1 + t_ours2) / 2)

    benchmark.pedantic(paired, rounds=1, iterations=1)


@pytest.mark.benchmark(group="deliberative")
def test_second_order_variant(benchmark, setup):
    model, hp, images = setup
    hp_layer = hp.trunk.get_submodule(LAYER)

    def paper_pass_time():
        """Seconds per backward pass of the released code's Hessian loop (one channel at one location)."""
        with torch.enable_grad():
            acts, score = _layer_forward(hp, hp_layer, images[:1])
            (grad,) = torch.autograd.grad(score.sum(), acts, create_graph=True)
            start = time.perf_counter()
            for d in range(PAPER_SAMPLE):
                torch.autograd.grad(grad[0, d, 7, 7], acts, retain_graph=True)
        return (time.perf_counter() - start) / PAPER_SAMPLE

    def paired():
        t_ours, ours = _timed(lambda: fastig_maps(model, hp, images, "2ndg"))
        t_ref, theirs = _timed(lambda: released_procedure(model, hp, images, second_order=True))
        _agree(ours, theirs)
        c, h, w = 512, 14, 14
        paper = paper_pass_time() * c * h * w * N_IMAGES + t_ref  # the class maps as in the measured reference
        _report(benchmark, "2ndg", t_ref, t_ours, released_code_extrapolated_s=round(paper, 1),
                ratio_to_released_code_extrapolated=round(paper / t_ours, 1))

    benchmark.pedantic(paired, rounds=1, iterations=1)


@pytest.mark.benchmark(group="deliberative-k-maps")
def test_k_maps_from_one_forward(benchmark, setup):
    """Batched VJPs vs a loop of K autograd.grad calls vs K repeated rows, for BATCH images and K = 5 classes."""
    model, _, images = setup
    layer = model.get_submodule(LAYER)
    x = images[:BATCH]
    n = x.shape[0]
    classes = torch.arange(n * TOP_K, device=DEVICE).reshape(n, TOP_K) % 200

    def batched():
        with torch.enable_grad(), capture(layer) as found:
            scores = model(x).gather(1, classes)
        cot = torch.eye(TOP_K, device=DEVICE).unsqueeze(1).expand(TOP_K, n, TOP_K)
        return batched_vjp(scores, found[0][0], cot)

    def loop():
        with torch.enable_grad(), capture(layer) as found:
            scores = model(x).gather(1, classes)
        return torch.stack([torch.autograd.grad(scores[:, k].sum(), found[0][0], retain_graph=True)[0]
                            for k in range(TOP_K)])

    def repeated():
        acts = {}

        def keep(_m, _i, out):  # the layer's output, each row repeated K times: the rest of the net runs on K x B
            leaf = out.detach().repeat_interleave(TOP_K, 0).requires_grad_()
            acts["a"] = leaf
            return leaf.clone()

        handle = layer.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                scores = model(x).gather(1, classes.reshape(-1, 1))
                (g,) = torch.autograd.grad(scores.sum(), acts["a"])
        finally:
            handle.remove()
        return g.reshape((n, TOP_K) + tuple(g.shape[1:])).transpose(0, 1)

    def paired():
        times = {}
        results = {}
        for name, fn in [("batched", batched), ("loop", loop), ("repeated", repeated), ("batched", batched),
                         ("loop", loop), ("repeated", repeated)]:
            t, results[name] = _timed(fn)
            times.setdefault(name, []).append(t)
        for name in ("loop", "repeated"):
            torch.testing.assert_close(results[name], results["batched"], rtol=1e-4, atol=1e-6)
        mean = {k: sum(v) / len(v) for k, v in times.items()}
        benchmark.extra_info.update({f"{k}_s": round(v, 3) for k, v in mean.items()})
        print(f"\nK maps from one forward ({n} images, K={TOP_K}): " + ", ".join(
            f"{k} {v:.2f} s ({mean['loop'] / v:.2f}x the loop's speed)" for k, v in mean.items()))

    benchmark.pedantic(paired, rounds=1, iterations=1)
