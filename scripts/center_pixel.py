#!/usr/bin/env python3
"""The center-pixel experiment: every method on the center-pixel model, whose right answer is known.

The center-pixel model (`fastig.models.get("centerpixel")`) predicts the intensity of the center pixel of a
227x227 grey image; no other pixel can change its class. Each method explains the predicted class of three inputs
(flat, noisy, a random patch on a zero background; `fastig demo`'s inputs), and the table gives the rank of the
center pixel in each map (1 = the method found it) and the time. The growing-patch part explains patches of
growing size (1x1 .. 21x21) on a zero background: the ranks and the share of |attribution| that falls outside
the patch (0 for methods that give nothing to pixels equal to the zero baseline, such as input x gradient and
IG).

Writes OUT/center_pixel.{md,csv} (ranks and seconds), OUT/growing_patch.{md,csv}, OUT/center_pixel_grid.png (each
input and its heatmaps, with a row of 5x5 center crops below each), OUT/growing_patch.png (rows: methods,
columns: patch sizes, 31x31 center crops). Results are kept per method in OUT/center_pixel.json: a rerun only
computes the methods not done yet (their maps are kept in OUT/maps/).

    python scripts/center_pixel.py --out center/                          # every method
    python scripts/center_pixel.py --out center/ --methods ig,saliency,occlusion --patches 1,5,11
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import _study  # noqa: F401  (puts the checkout on sys.path when run from it)

SIZE, CENTER = 227, 113


def grey_rgb(x) -> np.ndarray:
    grey = (x[0, 0].clamp(0, 1) * 255).round().byte().numpy()
    return np.repeat(grey[:, :, None], 3, axis=2)


def crop(picture: np.ndarray, size: int) -> np.ndarray:
    half = size // 2
    return picture[CENTER - half:CENTER + half + 1, CENTER - half:CENTER + half + 1]


def patch_input(side: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 1, SIZE, SIZE)
    half = side // 2
    x[..., CENTER - half:CENTER + half + 1, CENTER - half:CENTER + half + 1] = torch.rand((side, side), generator=g)
    x[..., CENTER, CENTER] = 0.6
    return x


def explain(model, name: str, x):
    """One map [H, W] (channels summed) of ``method`` on ``x`` for its predicted class, with the demo's options."""
    import fastig
    from fastig import methods

    target = int(model(x).argmax(1).item())
    result = fastig.attribute(model, x, target=target, method=name, **methods.get(name).demo)
    result = result[0] if isinstance(result, tuple) else result
    return result[0].detach().double().sum(0)


def main(argv=None):
    import torch

    from fastig import methods, models
    from fastig.core import progress
    from fastig.demo import center_rank, demo_inputs
    from fastig.errors import FastigError
    from fastig.io.heatmap import grid, render_heatmap, save_png
    from fastig.io.tables import write_table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all of `fastig methods`)")
    p.add_argument("--patches", default="1,3,5,9,15,21", help="sides of the growing patches")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",")] if args.methods else methods.names()
    for name in names:
        methods.get(name)  # an unknown name fails before any work
    patches = [int(v) for v in args.patches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "center_pixel.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    model = models.get("centerpixel")
    inputs = demo_inputs()
    pictures = {}
    with progress.task("center-pixel experiment", len(names), "methods", show=True) as task:
        for name in names:
            key = f"{name}|{args.patches}"
            stored = args.out / "maps" / f"{name}.npz"
            if key in cache and ("error" in cache[key] or stored.is_file()):
                if stored.is_file():
                    with np.load(stored) as saved:
                        pictures[name] = ({label: saved[label] for label in inputs},
                                          {s: saved[f"patch{s}"] for s in patches})
                task.advance()
                continue
            started = time.perf_counter()
            try:
                maps = {label: explain(model, name, x).numpy() for label, x in inputs.items()}
                grown = {side: explain(model, name, patch_input(side)).numpy() for side in patches}
            except (FastigError, ValueError, TypeError) as e:  # does not apply here, or lacks its weights
                cache[key] = {"error": str(e).splitlines()[0]}
            else:
                seconds = time.perf_counter() - started
                stored.parent.mkdir(exist_ok=True)
                np.savez(stored, **maps, **{f"patch{s}": m for s, m in grown.items()})
                cache[key] = {"ranks": {label: center_rank(torch.from_numpy(m)) for label, m in maps.items()},
                              "patch_ranks": {str(s): center_rank(torch.from_numpy(m)) for s, m in grown.items()},
                              "outside": {str(s): outside_share(m, s) for s, m in grown.items()},
                              "seconds_per_map": seconds / (len(inputs) + len(patches))}
                pictures[name] = (maps, grown)
            cache_path.write_text(json.dumps(cache, indent=1))
            task.advance()

    done = [n for n in names if "ranks" in cache[f"{n}|{args.patches}"]]
    rows = [{"method": n, **{f"rank {k}": v for k, v in cache[f"{n}|{args.patches}"]["ranks"].items()},
             "seconds per map": cache[f"{n}|{args.patches}"]["seconds_per_map"]} for n in done]
    rows += [{"method": n, "rank flat": "skipped: " + cache[f"{n}|{args.patches}"]["error"]}
             for n in names if n not in done]
    patch_rows = [{"method": n, **{f"rank {s}x{s}": cache[f"{n}|{args.patches}"]["patch_ranks"][str(s)]
                                   for s in patches},
                   **{f"outside {s}x{s}": cache[f"{n}|{args.patches}"]["outside"][str(s)] for s in patches}}
                  for n in done]
    written = list(write_table(rows, args.out / "center_pixel", ["method"] + [f"rank {k}" for k in inputs]
                               + ["seconds per map"], title="Rank of the center pixel (1 = found)"))
    written += write_table(patch_rows, args.out / "growing_patch",
                           title="Growing patch: center rank and share of |attribution| outside the patch")
    # the figure with the 5x5 center crops: per input a row of heatmaps and a row of crops
    grid_rows, labels = [], []
    for label, x in inputs.items():
        full = [grey_rgb(x)] + [render_heatmap(pictures[n][0][label], grey_rgb(x), clip_percentile=100)
                                for n in done if n in pictures]
        grid_rows += [full, [crop(f, 5) for f in full]]
        labels += [label, f"{label} 5x5"]
    shown = [n for n in done if n in pictures]
    written.append(save_png(args.out / "center_pixel_grid.png",
                            grid(grid_rows, row_labels=labels, col_labels=["input"] + shown)))
    patch_grid = [[crop(grey_rgb(patch_input(s)), 31) for s in patches]]
    patch_grid += [[crop(render_heatmap(pictures[n][1][s], clip_percentile=100), 31) for s in patches] for n in shown]
    written.append(save_png(args.out / "growing_patch.png",
                            grid(patch_grid, row_labels=["input"] + shown, col_labels=[f"{s}x{s}" for s in patches],
                                 cell=96)))
    for path in written:
        print(path)
    return rows, patch_rows


def outside_share(attribution, side: int) -> float:
    """Share of the total |attribution| on pixels outside the patch (the zero background)."""
    magnitude = np.abs(attribution)
    half = side // 2
    inside = magnitude[CENTER - half:CENTER + half + 1, CENTER - half:CENTER + half + 1].sum()
    total = magnitude.sum()
    return float((total - inside) / total) if total > 0 else 0.0


if __name__ == "__main__":
    main()
