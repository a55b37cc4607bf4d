"""2ndG against a baseline tree (e.g. the commit before a change) at several layer depths: alternating fresh
processes, this tree's time over the baseline's per case, and the maps of both trees compared.

Run (skipped unless FASTIG_BASELINE names the baseline's source tree)::

    git archive b1c7266 | tar -x -C /tmp/fastig-b1c7266 && cp fastig/_C*.so /tmp/fastig-b1c7266/fastig/
    FASTIG_BASELINE=/tmp/fastig-b1c7266 flock -x /tmp/fastig-cpu.lock pytest benchmarks/test_bench_second_order.py -s

Cases: resnet18 (random weights, 1x3x112x112) at ``layer4`` (short tail: pooling and the classifier) and ``layer3``
(long convolutional tail: all of ``layer4``); the small CNN of ``test_bench_gradients.py`` (2x3x32x32) after its
first (long tail: a convolution follows) and second convolution (short tail). Both models are ReLU networks (zero Hessian after the layer),
so each is also run with every ReLU replaced by Softplus (``smooth``): there the Hessian-vector products are all
computed, through convolutional tails and not. Each process (``PYTHONPATH`` selects the tree, one thread, so that
the two cores' sharing decides less) makes one warm-up call and FASTIG_2NDG_REPEATS=1 timed calls (median); the
trees alternate (baseline first for even cases, this tree first for odd ones), FASTIG_2NDG_ROUNDS=2 rounds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

import pytest

from _harness import json_line, python

BASELINE = os.environ.get("FASTIG_BASELINE")
REPEATS = int(os.environ.get("FASTIG_2NDG_REPEATS", "1"))
ROUNDS = int(os.environ.get("FASTIG_2NDG_ROUNDS", "2"))
HERE = Path(__file__).resolve().parents[1]
ONLY = os.environ.get("FASTIG_2NDG_CASES")  # comma-separated case names to run (default: all)

CASES = {  # name: (model, layer, input shape, smooth)
    "resnet18 layer4": ("resnet18", "layer4", (1, 3, 112, 112), False),
    "resnet18 layer3": ("resnet18", "layer3", (1, 3, 112, 112), False),
    "small_cnn features.4": ("small_cnn", "features.4", (2, 3, 32, 32), False),
    "small_cnn features.1": ("small_cnn", "features.1", (2, 3, 32, 32), False),
    "smooth resnet18 layer3": ("resnet18", "layer3", (1, 3, 112, 112), True),
    "smooth small_cnn features.4": ("small_cnn", "features.4", (2, 3, 32, 32), True),
    "smooth small_cnn features.1": ("small_cnn", "features.1", (2, 3, 32, 32), True),
}

_SCRIPT = r"""
import json, statistics, sys, time
import torch
from fastig import models
from fastig.attr import SecondOrderGradients
name, layer, shape, smooth, repeats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "1", \
    int(sys.argv[5])
torch.set_num_threads(1)
torch.manual_seed(0)
if name == "resnet18":
    model = models.get("resnet18", weights="none")
else:  # the small CNN of benchmarks/test_bench_gradients.py
    features = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    model = torch.nn.Sequential()
    model.add_module("features", features)
    model.add_module("flatten", torch.nn.Flatten())
    model.add_module("fc", torch.nn.Linear(32, 10))
if smooth:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(module, child_name, torch.nn.Softplus())
model.eval()
x = torch.randn(*shape)
explainer = SecondOrderGradients(model, layer)
maps = explainer.attribute(x, target=1)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    explainer.attribute(x, target=1)
    times.append(time.perf_counter() - start)
print(json.dumps({"median_s": statistics.median(times), "maps": maps.flatten().tolist()}))
"""


def _run(tree: str, case: str) -> dict:
    model, layer, shape, smooth = CASES[case]
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(python(_SCRIPT, model, layer, str(list(shape)), "1" if smooth else "0", str(REPEATS)),
                         env=env, check=True, capture_output=True, text=True, cwd="/tmp")
    return json_line(out.stdout)


@pytest.mark.skipif(not BASELINE, reason="set FASTIG_BASELINE to the source tree to compare with")
def test_second_order_no_slower_than_the_baseline(benchmark):
    import torch

    rows = {}
    names = [c.strip() for c in ONLY.split(",")] if ONLY else list(CASES)
    for i, case in enumerate(names):
        order = [("baseline", BASELINE), ("this", str(HERE))]
        if i % 2:
            order.reverse()
        seconds = {"baseline": [], "this": []}
        for r in range(ROUNDS):
            for label, tree in (order if r % 2 == 0 else order[::-1]):
                result = _run(tree, case)
                seconds[label].append(result["median_s"])
                seconds.setdefault(f"{label}_maps", torch.tensor(result["maps"]))
        torch.testing.assert_close(seconds.pop("this_maps"), seconds.pop("baseline_maps"), rtol=1e-4, atol=1e-6)
        ratios = [t / b for t, b in zip(seconds["this"], seconds["baseline"])]
        rows[case] = {**seconds, "ratio": statistics.median(seconds["this"]) / statistics.median(seconds["baseline"])}
        print(f"{case:<30} baseline {min(seconds['baseline']):.2f}-{max(seconds['baseline']):.2f}s  "
              f"this {min(seconds['this']):.2f}-{max(seconds['this']):.2f}s  this/baseline {rows[case]['ratio']:.2f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    benchmark.extra_info["rows"] = rows
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
