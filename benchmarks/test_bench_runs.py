"""What the reliability of dataset runs costs: per-image seeds for methods that draw random numbers, the store's
integrity check on resume, and hashing the weight file.

Run: ``pytest benchmarks/test_bench_runs.py --benchmark-columns=mean,stddev,rounds -s``.

- ``seeded``: a run attributes a method that draws random numbers (here SmoothGrad) one image at a time, each
  under its own seed, so that resumed, re-batched or sharded runs give bitwise the same rows. The cost is that of
  batch-of-one passes instead of one pass over the batch: both are timed in the same process, alternating, on
  resnet18 (random weights, 224x224) and on a small CNN, and ``extra_info`` holds their ratio (per-image / batched,
  median of the rounds).
- ``verify``: on resume every row of the store is read back (Fletcher-32 checksum per row): rows/s for 224x224
  float32 gzip rows.
- ``hash``: the weights' identity is the sha256 of the file, read once per run: MB/s.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

import fastig
from fastig import models
from fastig.io.store import Store
from fastig.run import _RandomState, _seed_everything, image_seed

from test_bench_gradients import SmallCNN


CASES = {  # name: (model, batch of inputs, nt_samples, rounds)
    "resnet18": (lambda: models.get("resnet18", weights="none", seed=0), (4, 3, 224, 224), 4, 3),
    "small_cnn": (lambda: SmallCNN().eval(), (8, 3, 32, 32), 10, 7),
}


@pytest.mark.parametrize("name", list(CASES))
def test_seeded_per_image_vs_batched(benchmark, name):
    build, shape, samples, rounds = CASES[name]
    torch.manual_seed(0)
    model, x = build(), torch.randn(shape)
    target = torch.arange(shape[0]) % 10
    options = {"nt_samples": samples, "stdevs": 0.1}

    def batched():
        return fastig.attribute(model, x, target=target, method="smoothgrad", **options)

    def per_image():  # what the run does for a method that draws random numbers
        maps = []
        for k in range(shape[0]):
            state = _RandomState(x.device)
            _seed_everything(image_seed(0, k))
            maps.append(fastig.attribute(model, x[k:k + 1], target=target[k:k + 1], method="smoothgrad", **options))
            state.restore()
        return torch.cat(maps)

    times = {"batched": [], "per_image": []}
    for _ in range(rounds):  # alternating, so that the order does not decide the ratio
        for label, fn in (("batched", batched), ("per_image", per_image)):
            start = time.perf_counter()
            out = fn()
            times[label].append(time.perf_counter() - start)
            assert out.shape == x.shape
    benchmark.pedantic(per_image, rounds=1, iterations=1)
    ratio = statistics.median(times["per_image"]) / statistics.median(times["batched"])
    benchmark.extra_info.update({"batched_s": round(statistics.median(times["batched"]), 4),
                                 "per_image_s": round(statistics.median(times["per_image"]), 4),
                                 "per_image_over_batched": round(ratio, 3)})


def test_store_integrity_check_on_resume(benchmark, tmp_path):
    rows = 256
    data = np.random.default_rng(0).normal(size=(rows, 224, 224)).astype(np.float32)
    with Store.create(tmp_path / "s.h5", model="m", method="ig", options={}, shape=(224, 224)) as store:
        for start in range(0, rows, 64):
            store.write_rows(start, [str(i) for i in range(start, start + 64)], np.zeros(64, np.int64),
                             data[start:start + 64])

    def check():
        with Store.open(tmp_path / "s.h5") as store:
            assert store.damaged_rows().size == 0

    benchmark.pedantic(check, rounds=3, iterations=1)
    benchmark.extra_info["rows_per_s"] = round(rows / benchmark.stats.stats.median, 1)


def test_weights_hash(benchmark, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(models.get("resnet18", weights="none", seed=0).state_dict(), path)
    identity = benchmark.pedantic(models.weights_identity, args=("resnet18", path), rounds=3, iterations=1)
    assert identity.startswith("sha256:")
    benchmark.extra_info["MB_per_s"] = round(path.stat().st_size / 1e6 / benchmark.stats.stats.median, 1)
