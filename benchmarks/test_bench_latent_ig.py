"""Latent IG: time per image split into encoder, decoder and classifier passes; batched vs per-step decoding.

Run: ``pytest benchmarks/test_bench_latent_ig.py --benchmark-columns=mean,stddev,rounds -s`` (``-s`` shows the
split table).

- ``latent-ig``: the whole attribution (``LatentIntegratedGradients.attribute``), whose ``last_timings`` give the
  encoder and decoder seconds (recorded in ``extra_info`` and printed per image; the rest is the classifier's
  passes and the accumulation), against the bare classifier passes alone: forward+backward on the same path points
  in the same batches (``1 - bare / latent_ig - (encoder + decoder) share`` is what the path costs beyond them).
- ``latent-decoding``: the decoder on the path's interior latents, batched as latent IG runs it (one pass per
  engine batch of points) against a per-step Python loop of single-image passes.

The dVAE is full size (OpenAI's widths: 53.8M + 43.8M parameters) with random weights unless FASTIG_BENCH_DVAE
names a folder holding the real converted files; the classifier is FASTIG_BENCH_MODEL (resnet50) with random
weights at 224x224. FASTIG_BENCH_LATENT_STEPS (8 latent steps, so 2 + 2 gap steps), FASTIG_BENCH_IMAGES (1),
FASTIG_BENCH_DEVICE (cpu, or cuda). On the CPU the decoder dominates: one full-size decoder pass at 224 costs
several resnet50 forward+backward passes.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastig import models
from fastig.attr import LatentIntegratedGradients
from fastig.attr.latent_ig import load_dvae
from fastig.core.engine import Engine
from fastig.core.targets import Target
from fastig.models.dvae import Decoder, Encoder

MODEL = os.environ.get("FASTIG_BENCH_MODEL", "resnet50")
STEPS = int(os.environ.get("FASTIG_BENCH_LATENT_STEPS", "8"))
N_IMAGES = int(os.environ.get("FASTIG_BENCH_IMAGES", "1"))
DEVICE = os.environ.get("FASTIG_BENCH_DEVICE", "cpu")
DVAE = os.environ.get("FASTIG_BENCH_DVAE")
TARGET = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.get(MODEL, weights="none", device=DEVICE).eval()


@pytest.fixture(scope="module")
def dvae():
    if DVAE:
        encoder, decoder = load_dvae(DVAE)
    else:
        torch.manual_seed(1)
        encoder, decoder = Encoder().eval().requires_grad_(False), Decoder().eval().requires_grad_(False)
    return encoder.to(DEVICE), decoder.to(DEVICE)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(N_IMAGES, 3, 224, 224, device=DEVICE)


def _run(benchmark, fn, rounds=1):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.benchmark(group="latent-ig")
@pytest.mark.parametrize("interpolation", ["lerp", "slerp"])
def test_latent_ig(benchmark, model, dvae, images, interpolation):
    lig = LatentIntegratedGradients(model, dvae)

    def attribute():
        out = lig.attribute(images, target=TARGET, n_steps=STEPS, interpolation=interpolation)
        _sync()
        return out

    _run(benchmark, attribute)
    timings = dict(lig.last_timings)
    timings["classifier_and_rest_s"] = timings["total_s"] - timings["encoder_s"] - timings["decoder_s"]
    benchmark.extra_info.update(timings)
    per_image = {k: v / N_IMAGES for k, v in timings.items() if k.endswith("_s")}
    print(f"\nlatent IG ({interpolation}, {STEPS} latent steps, {MODEL}, {DEVICE}) seconds per image: "
          + ", ".join(f"{k[:-2]} {v:.2f} ({v / per_image['total_s']:.0%})" for k, v in per_image.items()
                      if k != "total_s")
          + f", total {per_image['total_s']:.2f}; decoder passes {timings['decoder_passes']} for "
          f"{timings['decoded_images']} images")


@pytest.mark.benchmark(group="latent-ig")
def test_bare_classifier_passes(benchmark, model, dvae, images):
    """The classifier's forward+backward passes alone, on the same points and batches latent IG evaluates."""
    lig = LatentIntegratedGradients(model, dvae)
    path = lig.path(images, n_steps=STEPS)
    engine = Engine(model)
    points = list(_engine_batches(engine, path))
    target = Target(TARGET, N_IMAGES)

    def passes():
        for chunk, repeats in points:
            engine.gradients((chunk,), target.for_batch(slice(0, N_IMAGES), repeats), ())
        _sync()

    _run(benchmark, passes)


def _engine_batches(engine, path):
    """The point batches the engine forms for the left rule (all points but the last), decoded once up front."""
    n, evaluated = N_IMAGES, path.n_steps - 1
    size = engine._points_per_batch(path.points(slice(0, 1), slice(0, 1)), n * evaluated)
    steps_per_batch = max(1, size // n)
    for s0 in range(0, evaluated, steps_per_batch):
        steps = slice(s0, min(s0 + steps_per_batch, evaluated))
        yield path.points(steps, slice(0, n))[0], steps.stop - steps.start


@pytest.fixture(scope="module")
def interior_latents(model, dvae, images):
    """The interior latents of the lerp path, [K - 1, n, 128, h, w], and the engine's points per batch."""
    lig = LatentIntegratedGradients(model, dvae)
    path = lig.path(images, n_steps=STEPS)
    t = torch.arange(1, STEPS, dtype=torch.float64) / STEPS
    z = torch.lerp(path.z_start.unsqueeze(0), path.z_end.unsqueeze(0),
                   t.to(path.z_start).reshape(-1, 1, 1, 1, 1))
    size = Engine(model)._points_per_batch(path.points(slice(0, 1), slice(0, 1)), N_IMAGES * path.n_steps)
    return z, max(1, size // N_IMAGES), path.space


@pytest.mark.benchmark(group="latent-decoding")
def test_decoding_batched(benchmark, interior_latents):
    z, steps_per_batch, space = interior_latents

    def decode():
        for s0 in range(0, z.shape[0], steps_per_batch):
            space.decode(z[s0:s0 + steps_per_batch].flatten(0, 1), (224, 224))
        _sync()

    _run(benchmark, decode)


@pytest.mark.benchmark(group="latent-decoding")
def test_decoding_per_step_loop(benchmark, interior_latents):
    z, _, space = interior_latents

    def decode():
        for step in z:
            for latent in step:
                space.decode(latent[None], (224, 224))
        _sync()

    _run(benchmark, decode)
