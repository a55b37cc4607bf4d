"""Several targets per pass: K=5 classes in one call against 5 single-target calls, and the ways to take K
vector-Jacobian products from one forward pass.

Run: ``pytest benchmarks/test_bench_targets.py -s``. Alternating rounds after a warm-up (benchmarks/_harness.py).

- ``test_k5_vs_5_calls``: IG (FASTIG_BENCH_STEPS=8 steps, batch 8) on resnet50, one 224x224 image, prepared and
  plain: ``target=[[c1..c5]]`` against 5 calls with one class each. One forward pass serves the 5 targets, so the
  saving is 4 of the 5 forward passes (the 5 backward passes remain).
- ``test_vjp_strategies``: one batch of 8 points, 5 targets: the loop over retained-graph backward passes that
  :func:`fastig.core.engine.target_vjps` runs, ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the
  backward pass), and 5 separate forward+backward passes.
"""

from __future__ import annotations

import os

import pytest
import torch
from _harness import alternate

import fastig
from fastig import models
from fastig.attr import IntegratedGradients
from fastig.core.engine import target_vjps

STEPS = int(os.environ.get("FASTIG_BENCH_STEPS", "8"))
ROUNDS = int(os.environ.get("FASTIG_BENCH_ROUNDS", "3"))
CLASSES = [3, 17, 101, 250, 999]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    plain = models.get("resnet50", weights="none").eval()
    return {"plain": plain, "prepared": fastig.prepare(plain)}


@pytest.mark.parametrize("which", ["prepared", "plain"])
def test_k5_vs_5_calls(benchmark, nets, which):
    model = nets[which]
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    kw = dict(n_steps=STEPS, internal_batch_size=8)
    together = IntegratedGradients(model).attribute(x, target=[CLASSES], **kw)
    alone = torch.stack([IntegratedGradients(model).attribute(x, target=c, **kw) for c in CLASSES], dim=1)
    error = ((together - alone).abs().max() / alone.abs().max()).item()
    assert error <= 1e-6
    timings = alternate({
        "five_calls": lambda: [IntegratedGradients(model).attribute(x, target=c, **kw) for c in CLASSES],
        "one_call_k5": lambda: IntegratedGradients(model).attribute(x, target=[CLASSES], **kw),
    }, rounds=ROUNDS)
    benchmark.extra_info["max_relative_difference"] = error
    timings.record(benchmark, "five_calls")


@pytest.mark.parametrize("which", ["prepared", "plain"])
def test_vjp_strategies(benchmark, nets, which):
    model = nets[which]
    torch.manual_seed(2)
    x = torch.randn(8, 3, 224, 224)
    k = len(CLASSES)

    def loop():
        leaf = x.clone().requires_grad_()
        return target_vjps(model(leaf)[:, CLASSES], (leaf,))[0]

    def batched():
        leaf = x.clone().requires_grad_()
        out = model(leaf)[:, CLASSES]
        eye = torch.eye(k).unsqueeze(1).expand(k, x.shape[0], k)
        (g,) = torch.autograd.grad(out, leaf, grad_outputs=eye, is_grads_batched=True)
        return g.transpose(0, 1)

    def separate():
        grads = []
        for c in CLASSES:
            leaf = x.clone().requires_grad_()
            grads.append(torch.autograd.grad(model(leaf)[:, c].sum(), leaf)[0])
        return torch.stack(grads, dim=1)

    reference = separate()
    for fn in (loop, batched):
        assert ((fn() - reference).abs().max() / reference.abs().max()).item() <= 1e-6
    timings = alternate({"separate_passes": separate, "retained_graph_loop": loop, "is_grads_batched": batched},
                        rounds=ROUNDS)
    timings.record(benchmark, "separate_passes")
