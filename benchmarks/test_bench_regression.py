"""No method slower than before: every method and metric timed in this tree and in a baseline tree (e.g. the commit
before a change), in alternating rounds.

Run (skipped unless FASTIG_BASELINE names the baseline's source tree)::

    git archive main | tar -x -C /tmp/fastig-main && cp fastig/_C*.so /tmp/fastig-main/fastig/
    FASTIG_BASELINE=/tmp/fastig-main pytest benchmarks/test_bench_regression.py -s

Each tree gets one worker process (``PYTHONPATH`` selects the tree) that builds the model once and times the calls
it is sent. Per case: one warm-up call in each, then FASTIG_REGRESSION_REPEATS=5 rounds of one timed call in each,
alternating which goes first, so that a change of the machine's load hits both trees alike (the machine this runs
on is shared). The table gives, this tree's over the baseline's (< 1 is faster), the ratio of the medians, the
range of the per-round ratios, the ratio of the median process CPU times and the ratio of the fastest calls (load
only ever slows a call down). FASTIG_REGRESSION_CASES=ig,deeplift times only the cases named. The figures go to
``out/bench-regression/regression.json``. The model is resnet18 with random weights (unprepared, as a user calls
it) on two 224x224 images; sizes are chosen so each call takes a second or two on a 2-core CPU. Only arguments that
both trees accept are used.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
from _harness import Worker

BASELINE = os.environ.get("FASTIG_BASELINE")
REPEATS = int(os.environ.get("FASTIG_REGRESSION_REPEATS", "5"))
ONLY = [c for c in os.environ.get("FASTIG_REGRESSION_CASES", "").split(",") if c]
HERE = Path(__file__).resolve().parents[1]
OUT = HERE / "out" / "bench-regression"

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

_SETUP = r"""
import numpy as np, torch
import fastig
from fastig import models
from fastig.metrics import deletion, insertion, pic
torch.manual_seed(0)
model = models.get("resnet18", weights="none").eval()
x = torch.randn(2, 3, 224, 224)
s = torch.rand(2, 224, 224)
u8 = (np.random.default_rng(0).random((2, 224, 224, 3)) * 255).astype(np.uint8)
"""


@pytest.mark.skipif(not BASELINE, reason="set FASTIG_BASELINE to the source tree to compare with")
def test_no_method_slower_than_the_baseline(benchmark):
    workers = {"baseline": Worker(_SETUP, {"PYTHONPATH": BASELINE}), "this": Worker(_SETUP, {"PYTHONPATH": str(HERE)})}
    rows = {}
    try:
        print(f"\n{'case':<24} {'baseline':>9} {'this':>9} {'this/baseline':>14} {'rounds':>13} {'cpu':>6} {'best':>6}")
        for name, code in CASES.items():
            if ONLY and name not in ONLY:
                continue
            for worker in workers.values():
                worker.time(code)  # warm-up
            wall, cpu = {k: [] for k in workers}, {k: [] for k in workers}
            for r in range(REPEATS):
                for label in (("baseline", "this") if r % 2 == 0 else ("this", "baseline")):
                    w, c = workers[label].time(code)
                    wall[label].append(w)
                    cpu[label].append(c)
            ratio = statistics.median(wall["this"]) / statistics.median(wall["baseline"])
            pairs = [t / b for t, b in zip(wall["this"], wall["baseline"])]
            cpu_ratio = statistics.median(cpu["this"]) / statistics.median(cpu["baseline"])
            best_ratio = min(wall["this"]) / min(wall["baseline"])
            rows[name] = {"baseline_s": statistics.median(wall["baseline"]), "this_s": statistics.median(wall["this"]),
                          "ratio": ratio, "round_ratios": pairs, "cpu_ratio": cpu_ratio, "best_ratio": best_ratio}
            print(f"{name:<24} {rows[name]['baseline_s']:>8.3f}s {rows[name]['this_s']:>8.3f}s {ratio:>14.2f} "
                  f"{min(pairs):>6.2f}-{max(pairs):<6.2f} {cpu_ratio:>6.2f} {best_ratio:>6.2f}", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "regression.json").write_text(json.dumps(rows, indent=1))
    benchmark.extra_info["rows"] = rows
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
