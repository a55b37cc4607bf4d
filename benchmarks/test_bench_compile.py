"""``torch.compile`` of the model pass (``fastig.prepare(model, compile=True)``, inductor): compile time against the
time it saves per pass.

Run: ``pytest benchmarks/test_bench_compile.py -s``. For FASTIG_BENCH_MODEL (resnet50), prepared: the first IG call
of a compiled model (FASTIG_BENCH_STEPS=13 points in one batch: one forward+backward pass, which compiles), then
eager and compiled calls in alternating rounds; the break-even is ``compile time / (eager - compiled)`` passes
(infinite when the compiled pass is not faster). Inductor compiles a new graph for every new batch size; the last
partial batch of a run costs a second compilation, so a dataset run with an odd image count pays twice.
"""

from __future__ import annotations

import math
import os
import time

import torch
from _harness import alternate

import fastig
from fastig import models
from fastig.attr import IntegratedGradients

MODEL = os.environ.get("FASTIG_BENCH_MODEL", "resnet50")
STEPS = int(os.environ.get("FASTIG_BENCH_STEPS", "13"))
DEVICE = os.environ.get("FASTIG_BENCH_DEVICE", "cpu")


def test_compile_pays_off_after(benchmark):
    torch.manual_seed(0)
    eager = fastig.prepare(models.get(MODEL, weights="none", device=DEVICE).eval())
    compiled = fastig.prepare(eager, compile=True)
    x = torch.randn(1, 3, 224, 224, device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else None

    def ig(model):
        return lambda: IntegratedGradients(model).attribute(x, target=3, n_steps=STEPS, internal_batch_size=STEPS)

    start = time.perf_counter()
    first = ig(compiled)()
    if sync:
        sync()
    compile_s = time.perf_counter() - start
    reference = ig(eager)()
    error = ((first - reference).norm() / reference.norm()).item()
    timings = alternate({"eager": ig(eager), "compiled": ig(compiled)}, rounds=3)
    saved = timings.median("eager") - timings.median("compiled")
    break_even = compile_s / saved if saved > 0 else math.inf
    benchmark.extra_info.update({"first_compiled_call_s": round(compile_s, 2), "relative_l2_vs_eager": error,
                                 "break_even_passes": break_even})
    print(f"\nfirst compiled call {compile_s:.1f}s; relative L2 vs eager {error:.2e}; break-even after "
          f"{break_even:.0f} passes of {STEPS} points")
    timings.record(benchmark, "eager")
