"""fastig's compiled ops vs their pure-torch references, at attribution-sized inputs, and the share of an IG run
spent outside the model's passes with and without the kernels.

Run: ``pytest benchmarks/test_bench_ops.py --benchmark-columns=mean,stddev,rounds --benchmark-group-by=group``.
Each group holds one op: ``kernel`` (fastig.ops.<op>, the compiled kernel where built) and ``reference``
(fastig.ops.<op>_reference). The end-to-end group times IntegratedGradients on a random-weight resnet50 with the
kernels and with the references; ``extra_info`` records the time of the same forward+backward passes alone and the
share of the total spent outside them.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from fastig import _ops, models, ops
from fastig.attr import IntegratedGradients

K = 50  # path steps (Captum's default)
SHAPE = (3, 224, 224)
INSERTION_STEPS = 224


def _run(benchmark, fn, rounds=5):
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@contextlib.contextmanager
def references_only():
    """Make every _ops dispatcher take its pure-torch reference (the engine as it was before the kernels)."""
    original = _ops._compiled
    _ops._compiled = lambda name: None
    try:
        yield
    finally:
        _ops._compiled = original


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn((1,) + SHAPE, generator=gen)
    saliency = torch.randn(1, *SHAPE[1:], generator=gen)
    rank = saliency.flatten(1).argsort(dim=1, descending=True).argsort(dim=1).reshape(saliency.shape)
    return dict(
        image=image,
        baseline=torch.zeros((1,) + SHAPE),
        alphas=torch.linspace(0, 1, K, dtype=torch.float64),
        grads=torch.randn((K, 1) + SHAPE, generator=gen),
        weights=torch.full((K,), 1.0 / K, dtype=torch.float64),
        outputs=torch.randn(K + 1, 1, generator=gen),
        blurred=torch.randn((1,) + SHAPE, generator=gen),
        rank=rank,
        counts=torch.linspace(0, SHAPE[1] * SHAPE[2], INSERTION_STEPS + 1).long(),
        x=torch.zeros((1,) + SHAPE),
        step_grad=torch.randn((1,) + SHAPE, generator=gen),
        l1_target=torch.tensor([0.9 * image.abs().sum().item()], dtype=torch.float64),
    )


IMPLS = {"kernel": "", "reference": "_reference"}


@pytest.mark.benchmark(group="path_points 50x3x224x224")
@pytest.mark.parametrize("impl", IMPLS)
def test_path_points(benchmark, data, impl):
    fn = getattr(ops, "path_points" + IMPLS[impl])
    _run(benchmark, lambda: fn(data["image"], data["baseline"], data["alphas"]))


@pytest.mark.benchmark(group="accumulate 50x3x224x224")
@pytest.mark.parametrize("impl", IMPLS)
def test_accumulate(benchmark, data, impl):
    fn = getattr(ops, "accumulate" + IMPLS[impl])
    _run(benchmark, lambda: fn(data["grads"], data["weights"]))


@pytest.mark.benchmark(group="idgi (squared_norms + accumulate_idgi) 50x3x224x224")
@pytest.mark.parametrize("impl", IMPLS)
def test_idgi(benchmark, data, impl):
    norms = getattr(ops, "squared_norms" + IMPLS[impl])
    acc = getattr(ops, "accumulate_idgi" + IMPLS[impl])
    _run(benchmark, lambda: acc(data["grads"], data["outputs"], norms(data["grads"])))


@pytest.mark.benchmark(group="perturb 225 insertion steps 3x224x224")
@pytest.mark.parametrize("impl", IMPLS)
def test_perturb(benchmark, data, impl):
    fn = getattr(ops, "perturb" + IMPLS[impl])
    _run(benchmark, lambda: fn(data["image"], data["blurred"], data["rank"], data["counts"]))


@pytest.mark.benchmark(group="guided_step 3x224x224")
@pytest.mark.parametrize("impl", IMPLS)
def test_guided_step(benchmark, data, impl):
    fn = getattr(ops, "guided_step" + IMPLS[impl])
    args = (data["x"], data["image"], data["baseline"], data["step_grad"], 0.25, 0.08, 0.12, data["l1_target"])
    _run(benchmark, lambda: fn(*args))


# --- end to end: IG on resnet50, time outside the model's passes --------------------------------------------------

IG_STEPS = 16  # one engine batch of 16 points keeps a round short on a 2-core CPU


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return models.get("resnet50", weights="none").eval()


def passes_only(model, image, alphas, target):
    """The forward+backward passes of the IG run alone, on points made in advance: the model's share."""
    points = ops.path_points_reference(image, torch.zeros_like(image), alphas).requires_grad_()
    start = time.perf_counter()
    out = model(points)[:, target]
    torch.autograd.grad(out.sum(), points)
    return time.perf_counter() - start


@pytest.mark.benchmark(group="ig-resnet50 end to end (16 steps)")
@pytest.mark.parametrize("impl", IMPLS)
def test_ig_resnet50_share_outside_passes(benchmark, resnet50, data, impl):
    image = data["image"]
    ig = IntegratedGradients(resnet50)

    def attribute():
        return ig.attribute(image, target=3, n_steps=IG_STEPS, method="riemann_trapezoid",
                            internal_batch_size=IG_STEPS)

    with references_only() if impl == "reference" else contextlib.nullcontext():
        _run(benchmark, attribute, rounds=3)
        totals = []
        for _ in range(3):
            start = time.perf_counter()
            attribute()
            totals.append(time.perf_counter() - start)
    alphas = torch.linspace(0, 1, IG_STEPS, dtype=torch.float64)
    model_time = min(passes_only(resnet50, image, alphas, 3) for _ in range(3))
    total = min(totals)
    benchmark.extra_info.update(total_s=total, passes_s=model_time, outside_s=total - model_time,
                                share_outside=(total - model_time) / total, backends=ops.backends())
