"""Integrated Gradients: fastig vs captum in the same process, on resnet50 (224x224) and a small CNN.

Run: ``pytest benchmarks/test_bench_ig.py -s`` (``-s`` shows the tables). Every comparison is warmed up and then
timed in alternating rounds (benchmarks/_harness.py), so neither side pays for running first; ratios are ratios of
medians, with the spread of the per-round ratios. Only the ``attribute()`` call is timed; building and preparing
the model happen before. ``test_whole_process`` times what a user waits for from the shell (interpreter start,
imports, model construction, ``fastig.prepare``, the attribution) in alternating fresh processes.
``test_peak_memory`` runs each configuration in a fresh process and reports the growth of its peak resident memory.

The earlier version of this file ran captum's case first in each pytest-benchmark group, with one untimed warm-up
round per test, so captum's rounds carried the machine's cold start: its "1.38x faster at identical numerics" did
not reproduce in alternating runs (the same passes cost the same time).

Sizes from the environment: FASTIG_BENCH_STEPS (32), FASTIG_BENCH_BATCH (16), FASTIG_BENCH_ROUNDS (3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from _harness import alternate, alternate_processes, json_line, python
from captum.attr import IntegratedGradients as CaptumIG

import fastig
from fastig import models
from fastig.attr import IntegratedGradients
from fastig.core.engine import Engine
from test_bench_gradients import SmallCNN  # the same small CNN as the gradient benchmarks

N_STEPS = int(os.environ.get("FASTIG_BENCH_STEPS", "32"))
BATCH = int(os.environ.get("FASTIG_BENCH_BATCH", "16"))
ROUNDS = int(os.environ.get("FASTIG_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return models.get("resnet50", weights="none").eval()


@pytest.fixture(scope="module")
def prepared(resnet50):
    return fastig.prepare(resnet50)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(1, 3, 224, 224)


def test_same_batches(benchmark, resnet50, prepared, image):
    """IG, N_STEPS steps, internal_batch_size=BATCH on both sides: the same model passes."""
    kw = dict(target=3, n_steps=N_STEPS, internal_batch_size=BATCH)
    timings = alternate({
        "captum": lambda: CaptumIG(resnet50).attribute(image, **kw),
        "fastig": lambda: IntegratedGradients(resnet50).attribute(image, **kw),
        "fastig_prepared": lambda: IntegratedGradients(prepared).attribute(image, **kw),
    }, rounds=ROUNDS)
    timings.record(benchmark, "captum")


def test_defaults(benchmark, resnet50, prepared, image):
    """Each library's default batching: captum pushes all N_STEPS points through at once, fastig's engine picks
    a CPU batch (about 13 points of 3x224x224)."""
    timings = alternate({
        "captum": lambda: CaptumIG(resnet50).attribute(image, target=3, n_steps=N_STEPS),
        "fastig": lambda: IntegratedGradients(resnet50).attribute(image, target=3, n_steps=N_STEPS),
        "fastig_prepared": lambda: IntegratedGradients(prepared).attribute(image, target=3, n_steps=N_STEPS),
    }, rounds=ROUNDS)
    timings.record(benchmark, "captum")


def test_share_outside_model_passes(benchmark, prepared, image, monkeypatch):
    """The share of fastig's IG time spent outside the engine's forward+backward passes (prepared model)."""
    in_passes = []
    passes = Engine.gradients

    def timed(self, *args):
        start = time.perf_counter()
        result = passes(self, *args)
        in_passes.append(time.perf_counter() - start)
        return result

    monkeypatch.setattr(Engine, "gradients", timed)
    IntegratedGradients(prepared).attribute(image, target=3, n_steps=N_STEPS, internal_batch_size=BATCH)  # warm-up
    shares = []
    for _ in range(ROUNDS):
        in_passes.clear()
        start = time.perf_counter()
        IntegratedGradients(prepared).attribute(image, target=3, n_steps=N_STEPS, internal_batch_size=BATCH)
        shares.append(1 - sum(in_passes) / (time.perf_counter() - start))
    benchmark.extra_info["share_outside_model_passes"] = [round(s, 4) for s in shares]
    print(f"\nshare of IG's time outside the model passes (prepared resnet50): {[round(s, 4) for s in shares]}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


_PROCESS = r"""
import sys, time, torch
start = time.perf_counter()
which, n_steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from fastig import models
torch.manual_seed(0)
model = models.get("resnet50", weights="none").eval()
x = torch.randn(1, 3, 224, 224)
if which == "captum":
    from captum.attr import IntegratedGradients
else:
    from fastig.attr import IntegratedGradients
    if which == "fastig_prepared":
        import fastig
        model = fastig.prepare(model)
IntegratedGradients(model).attribute(x, target=3, n_steps=n_steps, internal_batch_size=batch)
"""


def test_whole_process(benchmark):
    """Fresh processes, alternating: imports + model + (prepare) + one IG attribution, same batches."""
    args = (str(N_STEPS), str(BATCH))
    timings = alternate_processes({name: python(_PROCESS, name, *args)
                                   for name in ("captum", "fastig", "fastig_prepared")}, rounds=ROUNDS)
    timings.record(benchmark, "captum")


def test_small_cnn(benchmark):
    """8x3x32x32, 50 steps (captum's default), each library's default batching: per-call overhead dominates."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(8, 3, 32, 32)
    timings = alternate({
        "captum": lambda: CaptumIG(model).attribute(x, target=1, n_steps=50),
        "fastig": lambda: IntegratedGradients(model).attribute(x, target=1, n_steps=50),
    }, rounds=5 * ROUNDS)
    timings.record(benchmark, "captum")


_MEMORY_SCRIPT = r"""
import json, sys, torch
from captum.attr import IntegratedGradients as CaptumIG
import fastig
from fastig import models
from fastig.attr import IntegratedGradients
which, n_steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = models.get("resnet50", weights="none").eval()
if which == "fastig-prepared":
    model = fastig.prepare(model)
x = torch.randn(1, 3, 224, 224)
ig = CaptumIG(model) if which == "captum" else IntegratedGradients(model)
def status_kib(field):  # VmHWM: this process's peak RSS (getrusage's maxrss would include the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
before = status_kib("VmRSS")
ig.attribute(x, target=3, n_steps=n_steps)
print(json.dumps({"which": which, "growth_mib": (status_kib("VmHWM") - before) / 1024}))
"""


def test_peak_memory(benchmark):
    """Peak memory growth during one attribution at each library's default batching (N_STEPS steps)."""
    growth = {}
    for which in ("captum", "fastig", "fastig-prepared"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, which, str(N_STEPS)], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        growth[which] = json_line(out.stdout)["growth_mib"]
    benchmark.extra_info.update({f"{k}_peak_growth_mib": round(v, 1) for k, v in growth.items()})
    benchmark.extra_info["fastig_over_captum"] = round(growth["fastig"] / growth["captum"], 3)
    print("\npeak memory growth (MiB):", json.dumps(growth), "fastig/captum =", growth["fastig"] / growth["captum"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
