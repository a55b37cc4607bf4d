"""No method slower than before: every method and metric timed in this tree and in a baseline tree (e.g. the commit
before a change), alternating fresh processes.

Run (skipped unless FASTIG_BASELINE names the baseline's source tree)::

    git archive main | tar -x -C /tmp/fastig-main && cp fastig/_C*.so /tmp/fastig-main/fastig/
    FASTIG_BASELINE=/tmp/fastig-main pytest benchmarks/test_bench_regression.py -s

Each case runs in a fresh process per tree (``PYTHONPATH`` selects the tree): one warm-up call, then
FASTIG_REGRESSION_REPEATS=3 timed calls, whose median the process reports. The two trees alternate (baseline
first for even cases, this tree first for odd ones). The model is resnet18 with random weights (unprepared, as a
user calls it) on two 224x224 images; sizes are chosen so each call takes a second or two on a 2-core CPU. Only
arguments that both trees accept are used. The table gives this tree's time over the baseline's per case
(< 1 is faster); differences within about 10% are the machine's noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BASELINE = os.environ.get("FASTIG_BASELINE")
REPEATS = int(os.environ.get("FASTIG_REGRESSION_REPEATS", "3"))
HERE = Path(__file__).resolve().parents[1]

CASES = {
    "ig": "fastig.attribute(model, x, target=[1, 2], method='ig', n_steps=16)",
    "ig_idgi": "fastig.attribute(model, x, target=[1, 2], method='ig', n_steps=16, idgi=True)",
    "guided_ig": "fastig.attribute(model, x, target=[1, 2], method='guided_ig', n_steps=8)",
    "blur_ig": "fastig.attribute(model, x, target=[1, 2], method='blur_ig', n_steps=8)",
    "saliency": "fastig.attribute(model, x, target=[1, 2], method='saliency')",
    "smoothgrad": "fastig.attribute(model, x, target=[1, 2], method='smoothgrad', nt_samples=8, stdevs=0.1)",
    "gradient_shap": "fastig.attribute(model, x, target=[1, 2], method='gradient_shap', n_samples=8)",
    "deeplift": "fastig.attribute(model, x, target=[1, 2], method='deeplift')",
    "lrp": "fastig.attribute(model, x, target=[1, 2], method='lrp')",
    "second_order": "fastig.attribute(model, x[:1], target=1, method='second_order', layer='layer4')",
    "occlusion": "fastig.attribute(model, x, target=[1, 2], method='occlusion', window=56, stride=56)",
    "feature_ablation": "fastig.attribute(model, x, target=[1, 2], method='feature_ablation', n_segments=16)",
    "meaningful_perturbation": "fastig.attribute(model, x, target=[1, 2], method='meaningful_perturbation', n_iter=4)",
    "pda": "fastig.attribute(model, x[:1], target=1, method='pda', window=56, stride=56, n_samples=4)",
    "insertion_deletion": "(insertion(model, x, s, step=224 * 16), deletion(model, x, s, step=224 * 16))",
    "pic": "pic(model, u8, s.numpy(), min_pred_value=0.0, num_data_points=100, information='png')",
}

_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np, torch
import fastig
from fastig import models
from fastig.metrics import deletion, insertion, pic
name, code, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = models.get("resnet18", weights="none").eval()
x = torch.randn(2, 3, 224, 224)
s = torch.rand(2, 224, 224)
u8 = (np.random.default_rng(0).random((2, 224, 224, 3)) * 255).astype(np.uint8)
run = lambda: eval(code)
run()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
print(json.dumps({"case": name, "median_s": statistics.median(times)}))
"""


def _time(tree: str, name: str) -> float:
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, name, CASES[name], str(REPEATS)], env=env, check=True,
                         capture_output=True, text=True, cwd="/tmp")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


@pytest.mark.skipif(not BASELINE, reason="set FASTIG_BASELINE to the source tree to compare with")
def test_no_method_slower_than_the_baseline(benchmark):
    rows = {}
    for i, name in enumerate(CASES):
        order = [("baseline", BASELINE), ("this", str(HERE))]
        if i % 2:
            order.reverse()
        seconds = {label: _time(tree, name) for label, tree in order}
        rows[name] = seconds
        print(f"{name:<26} baseline {seconds['baseline']:.3f}s  this {seconds['this']:.3f}s  "
              f"this/baseline {seconds['this'] / seconds['baseline']:.2f}", flush=True)
    benchmark.extra_info["rows"] = rows
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
