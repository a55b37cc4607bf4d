"""The benchmark half of ``scripts/gpu_check.sh``: fastig against its references on one device, written as one
table (``OUT/gpu_check.md``, and ``OUT/gpu_check.json`` with every number).

Usage::

    python scripts/gpu_check.py --out gpu-check/ [--device cuda] [--config full|tiny]

Checks (each timed after one warm-up, in alternating rounds; a check that fails becomes a row that says why, so
one failure never loses the table):

- ``ig fp32`` / ``ig bf16`` / ``ig fp16``: IntegratedGradients on the prepared model against Captum's (fp32,
  same steps and batches); error: relative L2 of the attributions against Captum's;
- ``guided ig``: fastig's batched Guided IG against PAIR saliency's ``GuidedIG.GetMask`` image by image;
- ``insertion+deletion``: ``fastig.metrics`` against a RISE-style loop (one model pass per step) in torch on the
  device; error: largest AUC difference;
- ``op <name>``: each compiled op against its pure-torch reference on the device; error: largest difference
  relative to the reference's largest entry;
- ``compile``: the first call of ``fastig.prepare(model, compile=True)`` (which compiles) and eager vs compiled
  IG passes afterwards.

``--config tiny`` runs every check on a small CNN with tiny sizes (the CPU test of this script uses it);
``full`` is resnet50 at 224x224 with the settings below, sized to finish in a few minutes on a datacenter GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

CONFIGS = {
    "full": dict(model="resnet50", size=224, images=8, ig_steps=32, ig_batch=32, guided_steps=16, insertion_step=224 * 4,
                 rounds=3, ops_size=224),
    "tiny": dict(model="tiny", size=16, images=1, ig_steps=2, ig_batch=2, guided_steps=2, insertion_step=64,
                 rounds=1, ops_size=8),
}


class TinyNet(torch.nn.Module):
    """A small conv net on [N, 3, H, W] with 10 classes (the tiny config's model)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def build_model(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        return TinyNet().to(device).eval()
    from fastig import models

    return models.get(name, weights="none", device=device).eval()


def timed(cases: dict[str, Callable], rounds: int, device: str) -> dict[str, float]:
    """Median seconds per case: one warm-up each, then alternating rounds, synchronized on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    names = list(cases)
    for name in names:
        cases[name]()
        sync()
    seconds = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            cases[name]()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {n: statistics.median(v) for n, v in seconds.items()}


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


def row(check: str, reference: str, ref_s: float, fastig_s: float, error: float, note: str = "") -> dict:
    return {"check": check, "reference": reference, "reference_s": ref_s, "fastig_s": fastig_s,
            "speedup": ref_s / fastig_s if fastig_s > 0 else math.nan, "error": error, "note": note}


# --- the checks ------------------------------------------------------------------------------------------------


def check_ig(cfg, device, model, prepared, images) -> list[dict]:
    from captum.attr import IntegratedGradients as CaptumIG

    from fastig.attr import IntegratedGradients

    x = images[:1]
    kw = dict(target=3, n_steps=cfg["ig_steps"], internal_batch_size=cfg["ig_batch"])
    reference = CaptumIG(model).attribute(x, **kw)
    rows = []
    for precision in ("fp32", "bf16", "fp16"):
        ours = IntegratedGradients(prepared).attribute(x, precision=precision, **kw)
        t = timed({"captum": lambda: CaptumIG(model).attribute(x, **kw),
                   "fastig": lambda p=precision: IntegratedGradients(prepared).attribute(x, precision=p, **kw)},
                  cfg["rounds"], device)
        rows.append(row(f"ig {precision}", "captum fp32", t["captum"], t["fastig"], relative_l2(ours, reference),
                        f"{cfg['ig_steps']} steps, batch {cfg['ig_batch']}, prepared model"))
    return rows


def check_guided_ig(cfg, device, model, prepared, images) -> list[dict]:
    import saliency.core as pair
    from saliency.core import guided_ig as pair_module

    from fastig.attr import GuidedIntegratedGradients

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' PAIR helpers
    from _pair import NumpyWithQuantileInterpolation, pair_model_function

    pair_module.np = NumpyWithQuantileInterpolation("numpy")
    targets = [3 + i for i in range(images.shape[0])]
    steps = cfg["guided_steps"]

    def pair_run():
        return np.stack([pair.GuidedIG().GetMask(x, pair_model_function(model, t), x_steps=steps, x_baseline=np.zeros_like(x))
                         for x, t in zip(images.cpu().numpy(), targets)])

    def ours_run():
        return GuidedIntegratedGradients(prepared).attribute(images, target=targets, n_steps=steps)

    error = relative_l2(ours_run().cpu(), torch.from_numpy(pair_run()))
    t = timed({"pair": pair_run, "fastig": ours_run}, cfg["rounds"], device)
    return [row("guided ig", "PAIR GuidedIG", t["pair"], t["fastig"], error,
                f"{images.shape[0]} images, {steps} steps")]


def check_insertion(cfg, device, model, prepared, images) -> list[dict]:
    from fastig.metrics import deletion, insertion
    from fastig.metrics.insertion import blur, rise_auc

    torch.manual_seed(3)
    saliency = torch.rand(images.shape[0], images.shape[2], images.shape[3], device=device)
    step = cfg["insertion_step"]

    def rise_loop():
        """RISE's CausalMetric.single_run per image and mode, in torch on the device: one pass per step."""
        aucs = []
        hw = images.shape[2] * images.shape[3]
        with torch.no_grad():
            for image, sal in zip(images, saliency):
                image = image[None]
                c = int(model(image).argmax(1))
                order = torch.flip(torch.argsort(sal.reshape(-1), stable=True), dims=(0,))
                n_steps = (hw + step - 1) // step
                for mode in ("ins", "del"):
                    start, finish = (blur(image), image.clone()) if mode == "ins" else (image.clone(), torch.zeros_like(image))
                    scores = []
                    for i in range(n_steps + 1):
                        scores.append(float(torch.softmax(model(start), 1)[0, c]))
                        coords = order[step * i:step * (i + 1)]
                        start.reshape(1, 3, hw)[0, :, coords] = finish.reshape(1, 3, hw)[0, :, coords]
                    aucs.append(rise_auc(np.array(scores)))
        return np.array(aucs)

    def ours():
        ins = insertion(prepared, images, saliency, step=step, batch_size=None)
        dele = deletion(prepared, images, saliency, step=step, batch_size=None)
        return np.stack([ins.auc, dele.auc], axis=1).reshape(-1)

    error = float(np.abs(ours() - rise_loop()).max())
    t = timed({"rise": rise_loop, "fastig": ours}, cfg["rounds"], device)
    return [row("insertion+deletion", "RISE loop", t["rise"], t["fastig"], error,
                f"{images.shape[0]} images, step {step}; error: largest AUC difference (ties may order differently)")]


def check_ops(cfg, device, model, prepared, images) -> list[dict]:
    from fastig import _ops, ops

    torch.manual_seed(4)
    s = cfg["ops_size"]
    k = 16
    x = torch.randn(2, 3, s, s, device=device)
    b = torch.zeros_like(x)
    alphas = torch.linspace(0, 1, k, dtype=torch.float64, device=device)
    grads = torch.randn(k, 2, 3, s, s, device=device)
    weights = torch.rand(k, dtype=torch.float64, device=device)
    outputs = torch.randn(k + 1, 2, device=device)
    norms = _ops.squared_norms(grads)
    rank = torch.argsort(torch.rand(2, s * s, device=device), 1).argsort(1).reshape(2, s, s)
    counts = torch.arange(0, s * s + 1, max(1, s * s // 8), device=device)
    cases = {
        "path_points": ((x, b, alphas), {}),
        "accumulate": ((grads, weights), {}),
        "accumulate_idgi": ((grads, outputs, norms), {}),
        "squared_norms": ((grads,), {}),
        "perturb": ((x, b, rank, counts), {}),
        "guided_step": ((torch.zeros_like(x), x, b, grads[0], 0.25, 0.08, 0.12,
                         0.9 * x.abs().flatten(1).sum(1).double()), {}),
    }
    rows = []
    for name, (args, kwargs) in cases.items():
        kernel, reference = getattr(ops, name), getattr(ops, f"{name}_reference")
        expected = reference(*args, **kwargs).double()
        error = float((kernel(*args, **kwargs).double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        t = timed({"reference": lambda: reference(*args, **kwargs), "kernel": lambda: kernel(*args, **kwargs)},
                  max(3, cfg["rounds"]), device)
        rows.append(row(f"op {name}", "pure torch", t["reference"], t["kernel"], error, f"backend {_ops.backend(name)}"))
    return rows


def check_compile(cfg, device, model, prepared, images) -> list[dict]:
    import fastig
    from fastig.attr import IntegratedGradients

    compiled = fastig.prepare(model, compile=True)
    x = images[:1]
    kw = dict(target=3, n_steps=cfg["ig_batch"], internal_batch_size=cfg["ig_batch"])
    start = time.perf_counter()
    first = IntegratedGradients(compiled).attribute(x, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    error = relative_l2(first, IntegratedGradients(prepared).attribute(x, **kw))
    t = timed({"eager": lambda: IntegratedGradients(prepared).attribute(x, **kw),
               "compiled": lambda: IntegratedGradients(compiled).attribute(x, **kw)}, cfg["rounds"], device)
    saved = t["eager"] - t["compiled"]
    return [row("compile", "eager (prepared)", t["eager"], t["compiled"], error,
                f"first call {compile_s:.1f}s; pays after {compile_s / saved:.0f} passes" if saved > 0
                else f"first call {compile_s:.1f}s; never pays (not faster)")]


CHECKS = {"ig": check_ig, "guided_ig": check_guided_ig, "insertion": check_insertion, "ops": check_ops,
          "compile": check_compile}


def run_checks(config: str, device: str, only: list[str] | None = None) -> tuple[list[dict], dict]:
    import fastig

    cfg = CONFIGS[config]
    model = build_model(cfg["model"], device)
    prepared = fastig.prepare(model)
    torch.manual_seed(1)
    images = torch.randn(cfg["images"], 3, cfg["size"], cfg["size"], device=device)
    rows = []
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        try:
            rows += check(cfg, device, model, prepared, images)
        except Exception as e:  # noqa: BLE001 - a failed check is reported in its row, the table still gets written
            rows.append(row(name, "", math.nan, math.nan, math.nan, f"FAILED: {type(e).__name__}: {e}"))
        print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor()
            or platform.machine(), "torch": torch.__version__, "fastig": fastig.__version__, "config": config,
            "settings": cfg}
    return rows, meta


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"GPU check on {meta['device']} (torch {meta['torch']}, fastig {meta['fastig']}, config {meta['config']})",
             "", "| check | reference | reference s | fastig s | x faster | error | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['reference']} | {r['reference_s']:.4g} | {r['fastig_s']:.4g} | "
                     f"{r['speedup']:.2f} | {r['error']:.2e} | {r['note']} |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], meta: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = out / "gpu_check.md"
    table.write_text(markdown(rows, meta))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--only", action="append", choices=sorted(CHECKS), help="run only these checks")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available", file=sys.stderr)
        return 2
    rows, meta = run_checks(args.config, args.device, args.only)
    table = write_table(rows, meta, args.out)
    print(table.read_text())
    return 1 if any(r["note"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
