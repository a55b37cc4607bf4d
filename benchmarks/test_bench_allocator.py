"""What the C allocator costs a model pass on Linux: glibc's defaults against keeping freed memory for reuse.

glibc serves every allocation above its mmap threshold (at most 32 MiB, and a batch of resnet50 activations is
larger) with a fresh ``mmap`` and returns it with ``munmap`` when the tensor is freed, so every pass page-faults
its activations in again and the kernel zeroes them: system time that grows with the batch. With
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` in the environment glibc keeps freed memory in the process
and reuses it (jemalloc or tcmalloc through ``LD_PRELOAD`` do much the same). The price: memory is not given back
to the system until the process ends (the peak stays resident).

Run: ``pytest benchmarks/test_bench_allocator.py -s``. Two persistent worker processes, one per setting, each with
a prepared resnet50; IG (32 steps, batches of 16, one 224x224 image) is timed in alternating rounds. The table
gives the medians, the ratio and each worker's peak resident memory. fastig does not change the allocator itself:
it is a process-wide setting that only the user (or a job script) should choose.
"""

from __future__ import annotations

import os
import statistics

from _harness import Worker

ROUNDS = int(os.environ.get("FASTIG_BENCH_ROUNDS", "7"))
KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}

_SETUP = r"""
import torch, fastig
from fastig import models
from fastig.attr import IntegratedGradients
torch.manual_seed(0)
model = fastig.prepare(models.get("resnet50", weights="none").eval())
x = torch.randn(1, 3, 224, 224)
"""
_CALL = "IntegratedGradients(model).attribute(x, target=3, n_steps=32, internal_batch_size=16)"


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def test_keeping_freed_memory(benchmark):
    workers = {"glibc defaults": Worker(_SETUP), "freed memory kept": Worker(_SETUP, KEEP_FREED)}
    wall = {name: [] for name in workers}
    cpu = {name: [] for name in workers}
    try:
        for worker in workers.values():
            worker.time(_CALL)  # warm-up
        for r in range(ROUNDS):
            for name in (list(workers) if r % 2 == 0 else list(workers)[::-1]):
                w, c = workers[name].time(_CALL)
                wall[name].append(w)
                cpu[name].append(c)
        peak = {name: _peak_rss_mib(worker.process.pid) for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    base, kept = "glibc defaults", "freed memory kept"
    rounds = [k / b for k, b in zip(wall[kept], wall[base])]
    print(f"\nIG on prepared resnet50 (32 steps, batches of 16), {ROUNDS} alternating rounds:")
    for name in workers:
        print(f"  {name:18s} wall {statistics.median(wall[name]):.2f} s, CPU {statistics.median(cpu[name]):.2f} s, "
              f"peak RSS {peak[name]:.0f} MiB")
    ratio = statistics.median(wall[kept]) / statistics.median(wall[base])
    cpu_ratio = statistics.median(cpu[kept]) / statistics.median(cpu[base])
    print(f"  kept / defaults: wall {ratio:.2f} (rounds {min(rounds):.2f}-{max(rounds):.2f}), CPU {cpu_ratio:.2f}")
    benchmark.extra_info.update({"wall_ratio": ratio, "cpu_ratio": cpu_ratio, "round_ratios": rounds,
                                 "peak_rss_mib": peak})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
