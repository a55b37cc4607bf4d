"""End-to-end ``fastig attribute --dataset``: images/s for IG on resnet18 (random weights, 224x224), decoding in
worker processes vs in the main process, and the share of the time the model's passes take.

Run: ``pytest benchmarks/test_bench_dataset.py --benchmark-columns=mean,stddev,rounds``. Each round is a fresh run
(``overwrite``) over a class-folder dataset of JPEGs of ImageNet-like size (500x375) through the same driver as the
CLI: decoding, resizing and cropping, the batched filter pass, IG, the journal (fsync per batch) and the merge into
the HDF5 store. ``extra_info`` holds images/s and the shares of the processing time spent in the model's passes,
in waiting for decoded images, and in storage, plus the merge time. The target is that the model's passes
dominate and data loading plus storage add less than 10%; on a GPU the passes shrink, so worker decoding matters.
``test_dataset_run_prepared_vs_plain`` times whole runs with and without ``--prepare`` (IG, 16 steps) in
alternating rounds.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from _harness import alternate

from fastig.run import RunSpec, run

N_IMAGES = 8
N_STEPS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        folder = root / f"n{i % 4:08d}"
        folder.mkdir(exist_ok=True)
        smooth = cv2.GaussianBlur(rng.integers(0, 256, (375, 500, 3)).astype(np.uint8), (0, 0), 3)
        cv2.imwrite(str(folder / f"img{i:03d}.JPEG"), smooth, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


def _spec(dataset, out, workers, model="resnet18", prepare=False, n_steps=N_STEPS):
    return RunSpec(model=model, weights="none", method="ig", out_dir=out, options={"n_steps": n_steps},
                   dataset=dataset, images_per_batch=4, workers=workers, overwrite=True, prepare=prepare)


def _bench(benchmark, dataset, tmp_path, workers):
    summaries = []

    def once():
        summaries.append(run(_spec(dataset, tmp_path / "out", workers), echo=lambda _: None))

    benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=0)
    s = summaries[-1]
    assert s.done == N_IMAGES  # a measurement of a run that did the work
    benchmark.extra_info.update({
        "images_per_s": round(s.images_per_second, 3),
        "model_share": round(s.model_seconds / s.seconds, 3),
        "data_wait_share": round(s.data_seconds / s.seconds, 3),
        "storage_share": round(s.store_seconds / s.seconds, 3),
        "merge_s": round(s.merge_seconds, 3),
        "setup_s": round(s.setup_seconds, 3),
    })


@pytest.mark.benchmark(group="dataset-ig-resnet18-224")
def test_dataset_run_decoding_in_main_process(benchmark, dataset, tmp_path):
    _bench(benchmark, dataset, tmp_path, workers=0)


@pytest.mark.benchmark(group="dataset-ig-resnet18-224")
def test_dataset_run_decoding_in_two_workers(benchmark, dataset, tmp_path):
    _bench(benchmark, dataset, tmp_path, workers=2)


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_dataset_run_prepared_vs_plain(benchmark, dataset, tmp_path, model):
    """``--prepare`` against the plain model, whole runs (model loading included) in alternating rounds."""
    timings = alternate({
        "plain": lambda: run(_spec(dataset, tmp_path / "plain", 0, model, n_steps=16), echo=lambda _: None),
        "prepared": lambda: run(_spec(dataset, tmp_path / "prep", 0, model, prepare=True, n_steps=16),
                                echo=lambda _: None),
    }, rounds=3)
    timings.record(benchmark, "plain")
