#!/usr/bin/env python3
"""IG with guided non-linearity (Kwon et al., ICPR 2020), Table I: IG vs GNL-IG, insertion and deletion.

For every model (vgg16, vgg19, resnet34, resnet50, googlenet) and method (`ig`, `gnl_ig`), one resumable
`fastig attribute` run over a linearly sampled subset of the dataset (`--start/--stride/--end`: e.g. every 50th
ImageNet validation image), explaining each image's top-1 class, scored with insertion and deletion
(`fastig evaluate`: RISE's substrates, blur for insertion and zeros for deletion).

Writes OUT/gnl_table.{md,csv} (one row per model: images, IG and GNL-IG insertion/deletion AUCs, higher insertion
and lower deletion being better) and OUT/gnl_table.png; one store per setting under OUT/runs/. Without --dataset:
miniature photos and random weights (the AUCs then mean nothing).

    python scripts/gnl_table.py --out gnl/                                          # miniature
    python scripts/gnl_table.py --dataset imagenet/val --start 0 --stride 50 --end 50000 --out gnl/
"""

from __future__ import annotations

import numpy as np

import _study
from _study import csv_list

MODELS = "vgg16,vgg19,resnet34,resnet50,googlenet"
METHODS = {"ig": "IG", "gnl_ig": "GNL-IG"}


def main(argv=None):
    p = _study.parser(__doc__.split("\n\n")[0], MODELS, 2)
    p.add_argument("--steps", type=int, default=None, help="path steps of both methods (default 50; miniature 16)")
    p.add_argument("--metric-step", type=int, default=None,
                   help="insertion/deletion: pixels per step (default: the image width; miniature: 1/16 of the image)")
    args = p.parse_args(argv)
    dataset = args.dataset
    if dataset is None:
        dataset = _study.photos(args.out / "miniature", _study.end_of(args))
    models = csv_list(args.models)
    args.steps = args.steps or (50 if args.dataset is not None else 16)
    step = args.metric_step or (None if args.dataset is not None else 224 * 224 // 16)
    from fastig.core import progress
    from fastig.io.tables import write_table

    rows = []
    with progress.task("gnl table", len(models) * len(METHODS), "settings", show=True) as task:
        for model in models:
            row = {"model": model}
            for method, label in METHODS.items():
                store = _study.attribute(args.out / "runs" / model / method, args, model, method,
                                         {"n_steps": args.steps}, dataset)
                values = _study.evaluate(store, ["insertion", "deletion"], args, step=step)
                row["images"] = int(values["done"].sum())
                for metric in ("insertion", "deletion"):
                    row[f"{label} {metric}"] = _study.mean(values[metric], values["done"])
                task.advance()
            rows.append(row)
    written = list(write_table(rows, args.out / "gnl_table", title="IG vs GNL-IG (insertion: higher is better; "
                                                                   "deletion: lower is better)"))
    written.append(figure(rows, args.out / "gnl_table.png"))
    for path in written:
        print(path)
    return rows


def figure(rows, path):
    """Insertion and deletion AUC per model, IG vs GNL-IG (x: models in table order)."""
    from fastig.metrics.plots import save_curve_plot

    x = np.arange(len(rows), dtype=float)
    series = {f"{label} {metric}": (x, [r[f"{label} {metric}"] for r in rows])
              for label in METHODS.values() for metric in ("insertion", "deletion")}
    return save_curve_plot(path, series, title="AUC per model: " + ", ".join(f"{i}={r['model']}"
                                                                            for i, r in enumerate(rows)),
                           xlabel="model (index)", ylabel="AUC", ylim=(0.0, 1.0), size=(640, 400))


if __name__ == "__main__":
    main()
