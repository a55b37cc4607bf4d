"""``fastig demo``: the center-pixel sanity experiment, run on every registered method.

The center-pixel toy model predicts the intensity of the center pixel of a 227x227 grey image; every other pixel
contributes equally to all classes. A method that explains the predicted class should therefore rank the center
pixel first. The demo prints that rank for every method and input, the time each method took, and writes a
heatmap grid (one row of full heatmaps and one row of 5x5 center crops per input).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastig import methods
from fastig.errors import FastigError
from fastig.metrics.insertion import explained_classes

SIZE = 227
CENTER = SIZE // 2


def demo_inputs() -> dict[str, torch.Tensor]:
    """Three grey images [1, 1, 227, 227]: flat background, noisy background, a patch on a zero background."""
    generator = torch.Generator().manual_seed(0)
    flat = torch.full((1, 1, SIZE, SIZE), 0.5)
    flat[..., CENTER, CENTER] = 0.8
    noisy = torch.rand((1, 1, SIZE, SIZE), generator=generator)
    noisy[..., CENTER, CENTER] = 0.3
    patch = torch.zeros((1, 1, SIZE, SIZE))  # equal to the zero baseline outside the patch
    patch[..., CENTER - 10:CENTER + 11, CENTER - 10:CENTER + 11] = torch.rand((21, 21), generator=generator)
    patch[..., CENTER, CENTER] = 0.6
    return {"flat": flat, "noisy": noisy, "patch": patch}


def center_rank(attribution: torch.Tensor) -> int:
    """Rank of the center pixel by |attribution| (channels summed), counting ties against it (1 = strictly first)."""
    score = attribution.detach().double().reshape(-1, SIZE, SIZE).sum(0).abs()
    return int((score >= score[CENTER, CENTER]).sum().item())


def run_demo(out_dir: Path, method_names: list[str] | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run the experiment; returns {method: {"ranks": {input: rank}, "seconds": s}} and writes the grid PNG."""
    import fastig
    from fastig import models
    from fastig.io.heatmap import grid, render_heatmap, save_png

    names = method_names or methods.names()
    for name in names:
        methods.get(name)  # an unknown name fails before any work
    model = models.get("centerpixel")
    inputs = demo_inputs()
    results: dict[str, dict] = {}
    heatmaps: dict[str, list[np.ndarray]] = {label: [] for label in inputs}
    crops: dict[str, list[np.ndarray]] = {label: [] for label in inputs}
    for label, x in inputs.items():
        picture = _grey_to_rgb(x)
        heatmaps[label].append(picture)
        crops[label].append(_center_crop(picture))

    for name in names:
        method = methods.get(name)
        ranks, pictures, started = {}, {}, time.perf_counter()
        try:
            for label, x in inputs.items():
                target = int(explained_classes(model, x)[0])
                attribution = fastig.attribute(model, x, target=target, method=name, **method.demo)
                if isinstance(attribution, tuple):  # (attributions, delta)
                    attribution = attribution[0]
                ranks[label] = center_rank(attribution)
                heat = attribution[0].detach().float()
                pictures[label] = (render_heatmap(heat, _grey_to_rgb(x), sign="absolute", clip_percentile=100),
                                   _center_crop(render_heatmap(heat, sign="absolute", clip_percentile=100)))
        except (FastigError, ValueError, TypeError) as exc:  # does not apply to this model, or lacks its weights
            results[name] = {"error": str(exc)}
            continue
        results[name] = {"ranks": ranks, "seconds": time.perf_counter() - started}
        for label, (full, crop) in pictures.items():
            heatmaps[label].append(full)
            crops[label].append(crop)

    _print_table(results, list(inputs), echo)
    _growing_patch_check(model, inputs["patch"], echo)

    rows, row_labels = [], []
    for label in inputs:
        rows += [heatmaps[label], crops[label]]
        row_labels += [label, f"{label} 5x5"]
    out_dir = Path(out_dir)
    path = out_dir / "centerpixel_grid.png"
    save_png(path, grid(rows, row_labels=row_labels, col_labels=["input"] + [n for n in names if "ranks" in results[n]]))
    echo(f"heatmap grid: {path}")
    return results


def _grey_to_rgb(x: torch.Tensor) -> np.ndarray:
    grey = (x[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.repeat(grey[:, :, None], 3, axis=2)


def _center_crop(picture: np.ndarray, size: int = 5) -> np.ndarray:
    half = size // 2
    return picture[CENTER - half:CENTER + half + 1, CENTER - half:CENTER + half + 1]


def _print_table(results: dict, labels: list[str], echo: Callable[[str], None]) -> None:
    header = f"{'method':26s}" + "".join(f"{'rank/' + label:>14s}" for label in labels) + f"{'seconds':>10s}"
    echo("Rank of the center pixel (1 = the method found it; ties count against it) on the center-pixel model")
    echo(header)
    echo("-" * len(header))
    for name, result in results.items():
        if "error" in result:
            echo(f"{name:26s} skipped: {result['error']}")
        else:
            echo(f"{name:26s}" + "".join(f"{result['ranks'][label]:14d}" for label in labels)
                 + f"{result['seconds']:10.2f}")


def _growing_patch_check(model, x: torch.Tensor, echo: Callable[[str], None]) -> None:
    """Input x gradient gives exactly zero to pixels equal to the (zero) baseline."""
    if "input_x_gradient" not in methods.names():
        return
    import fastig

    target = int(explained_classes(model, x)[0])
    attribution = fastig.attribute(model, x, target=target, method="input_x_gradient")
    outside = attribution[x == 0]
    verdict = "holds" if bool((outside == 0).all()) else "FAILS"
    echo(f"growing-patch check: input x gradient is zero on all {outside.numel()} baseline pixels: {verdict}")
