"""What the study scripts share: the common command-line arguments, miniature data, resumable attribution runs
(``fastig attribute``'s run driver, one store per setting) and their evaluation (``fastig evaluate``'s
``evaluate_store``), and reading the per-image numbers back for the tables.

Every script runs on the real data when given ``--dataset ROOT``; without it, it makes a miniature dataset in
``OUT/miniature`` (seeded) and uses random weights, so the whole pipeline runs anywhere in minutes. Numbers from
random weights say nothing about the methods: they check the pipeline, not the papers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/x.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastig.core import progress  # noqa: E402


def parser(description: str, models: str, size: int) -> argparse.ArgumentParser:
    """The arguments every script takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", type=Path, default=None,
                   help="dataset root (any `fastig attribute --dataset` layout); default: a miniature dataset made "
                        "in OUT/miniature, with random weights")
    p.add_argument("--layout", default="auto", help="dataset layout (see `fastig attribute --help`)")
    p.add_argument("--labels", type=Path, default=None, help="label file overriding the layout's own")
    p.add_argument("--models", default=models, help="comma-separated model names (`fastig models`)")
    p.add_argument("--size", type=int, default=size, help="number of images (from --start, every --stride-th)")
    p.add_argument("--start", type=int, default=0, help="first dataset index")
    p.add_argument("--stride", type=int, default=1, help="take every k-th dataset index")
    p.add_argument("--end", type=int, default=None, help="dataset index to stop before (default: --size images)")
    p.add_argument("--weights", default=None, help="auto (checkpoints/), none (random) or a path; default: auto "
                                                    "with --dataset, none on the miniature data")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8, help="images per batch")
    p.add_argument("--out", type=Path, required=True, help="output folder (tables, figures, one store per setting)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    return p


def csv_list(text: str, kind=str) -> list:
    return [kind(v.strip()) for v in str(text).split(",") if v.strip()]


def weights_for(args, model: str) -> str:
    """``--weights``; default ``auto`` with ``--dataset``; on the miniature data one seeded random initialization
    per model, saved once under OUT/miniature/weights/, so that every run and every evaluation of a study uses
    the same random model (``weights="none"`` would draw new weights in each process)."""
    from fastig import models

    if args.weights:
        return args.weights
    if args.dataset is not None or models.info(model).filename is None:
        return "auto"
    path = args.out / "miniature" / "weights" / f"{model}.pth"
    if not path.is_file():
        import torch

        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(models.get(model, weights="none").state_dict(), path)
    return str(path)


def end_of(args) -> int:
    return args.end if args.end is not None else args.start + args.size * args.stride


# ---- miniature data -------------------------------------------------------------------------------------------


def scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 RGB picture: a smooth colour gradient with a few bright shapes."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([rng.uniform(0.2, 0.8) + rng.uniform(-0.4, 0.4) * (yy if c % 2 else xx) for c in range(3)], -1)
    image = (np.clip(base, 0, 1) * 255).astype(np.uint8)
    for _ in range(4):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            cv2.circle(image, center, int(rng.integers(h // 12, h // 4)), color, -1)
        else:
            size = int(rng.integers(h // 10, h // 3))
            cv2.rectangle(image, center, (center[0] + size, center[1] + size // 2), color, -1)
    return image


def image_list(folder: Path, images: Sequence[np.ndarray], labels: Sequence[int], ext: str = ".png") -> Path:
    """Write the images and a `list`-layout file ``images.txt`` (``path label`` lines, absolute paths so that
    `fastig evaluate` finds the images from any folder); returns that file."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (image, label) in enumerate(zip(images, labels)):
        name = f"img_{k:04d}{ext}"
        bgr = image if image.ndim == 2 else image[:, :, ::-1]
        cv2.imwrite(str(folder / name), bgr)
        lines.append(f"{folder / name} {int(label)}")
    listing = folder / "images.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def photos(folder: Path, n: int, size: int = 256, seed: int = 0, label_of=None) -> Path:
    """``n`` miniature photos (JPEG) with labels ``label_of(k)`` (default 0) as a `list` dataset."""
    rng = np.random.default_rng(seed)
    pictures = [scene(rng, size, int(size * 1.25)) for _ in range(n)]
    return image_list(folder, pictures, [label_of(k) if label_of else 0 for k in range(n)], ext=".jpg")


# ---- runs -----------------------------------------------------------------------------------------------------


def attribute(out_dir: Path, args, model: str, method: str, options: dict, dataset: Path, *,
              correct_only: bool = False, min_confidence: float | None = None, target=None) -> Path:
    """One resumable `fastig attribute --dataset` run into ``out_dir``; returns its store. A rerun with the same
    settings skips the images already done; other settings in the same folder are refused (see fastig.run)."""
    from fastig.run import RunSpec, run

    spec = RunSpec(model=model, method=method, out_dir=out_dir, weights=weights_for(args, model),
                   options=dict(options), dataset=dataset, layout=args.layout if args.dataset is not None else "auto",
                   labels=args.labels if args.dataset is not None else None, start=args.start, stride=args.stride,
                   end=end_of(args), target=target, correct_only=correct_only, min_confidence=min_confidence,
                   images_per_batch=args.batch, workers=0, device=args.device, overwrite=args.overwrite, heatmaps=False)
    return run(spec, echo=lambda line: None).store


def evaluate(store: Path, metrics: Sequence[str], args, **settings) -> dict[str, np.ndarray]:
    """``evaluate_store`` once per store and set of metrics: a marker beside the store records what was scored
    and the store file as it was left, so a rerun skips it until the store changes (more rows, --overwrite).
    Returns {metric: per-row values} (NaN for rows not scored). It runs from the dataset's image folder, since a
    dataset store's ids are paths relative to it."""
    
    from fastig.io.store import Store
    from fastig.metrics import evaluate_store

    store = store.resolve()
    with Store.open(store) as s:
        model, rows = s.attrs["model"], int(len(s.done_indices()))
    marker = store.parent / "evaluated.json"
    wanted = {"metrics": list(metrics), "settings": {k: str(v) for k, v in settings.items()}}

    def stamp() -> list:
        info = store.stat()
        return [info.st_size, info.st_mtime_ns]

    done = json.loads(marker.read_text()) if marker.is_file() else None
    if rows and done != {**wanted, "store": stamp()}:
        evaluate_store(store, list(metrics), model=loaded(model, args), device=args.device, plots=False,
                       batch_size=args.batch, progress=lambda line: None, **settings)  # finds the run's images
        marker.write_text(json.dumps({**wanted, "store": stamp()}))
    return read_store(store, metrics)


_MODELS: dict = {}


def loaded(model: str, args):
    """The zoo model with the study's weights, built once per process (for the evaluations)."""
    from fastig import models

    key = (model, weights_for(args, model), args.device)
    if key not in _MODELS:
        _MODELS[key] = models.get(model, weights=key[1], device=args.device)
    return _MODELS[key]


def read_store(store: Path, metrics: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Per-row arrays of a store: ``done``, ``ids``, ``paths`` (the image files), ``targets``, ``labels``,
    ``predictions``, ``confidences`` and each metric present (``sic``/``aic`` expand to themselves)."""
    from fastig.io.store import Store
    from fastig.metrics.evaluate import image_paths, resolve_metrics

    with Store.open(store) as s:
        n = len(s)
        done = np.zeros(n, bool)
        done[s.done_indices()] = True
        out = {"done": done, "ids": np.array(s.ids(), dtype=object), "targets": s.targets()}
        out["paths"] = np.array(image_paths(s), dtype=object)  # as the run recorded them
        for name in ("labels", "predictions", "confidences"):
            out[name] = s.column(name) if name in s.column_names() else np.full(n, np.nan)
        for name in resolve_metrics(metrics) if metrics else []:
            out[name] = s.metric(name) if name in s.metric_names() else np.full(n, np.nan)
    return out


def mean(values: np.ndarray, keep: np.ndarray) -> float:
    chosen = values[keep]
    chosen = chosen[np.isfinite(chosen)]
    return float(chosen.mean()) if chosen.size else float("nan")
