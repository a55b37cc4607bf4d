#!/usr/bin/env python3
"""The IDGI reproducibility study: IG, Guided IG and Blur IG, each with and without IDGI, over step counts.

For every model, method, IDGI on/off and number of steps (8..128), one resumable `fastig attribute` run over the
images the model classifies correctly, scored with insertion, PIC (SIC/AIC) and the JPEG-robustness MSE
(`fastig evaluate`), and the completeness gap |delta|. The table then reports each setting under two filters:
correct-only, and correct with confidence >= 0.8 (`--min-confidence`, also PIC's confidence filter).

The full path is evaluated at every step count, including alpha = 1: IG uses the left Riemann rule (the official
IDGI code's points 0, 1/n, ..., (n-1)/n) and its IDGI form also evaluates f at alpha = 1, so IDGI's attributions
sum to f(input) - f(baseline) (|delta| ~ 0); the original code stops at alpha = (n-1)/n and misses the last
segment.

Writes OUT/idgi_table.{md,csv} and, per model and filter, OUT/<model>_<filter>_{insertion,delta}.png; one store per
setting under OUT/runs/. Without --dataset: a miniature set of center-pixel images (227x227 grey, label = the
center intensity) and the center-pixel model, whose predictions are exact and confident.

    python scripts/idgi_study.py --out idgi/                                   # miniature
    python scripts/idgi_study.py --dataset imagenet/val --models resnet50 --size 500 --stride 100 --out idgi/
"""

from __future__ import annotations

import numpy as np

import _study
from _study import csv_list

METHODS = ("ig", "guided_ig", "blur_ig")
FILTERS = ("correct", "correct, confidence >= 0.8")


def miniature(folder, n: int):
    """Center-pixel images: random backgrounds, a center pixel of a random intensity, labelled with it."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(n):
        image = (rng.random((227, 227)) * 255).astype(np.uint8)
        labels.append(int(rng.integers(20, 236)))
        image[113, 113] = labels[-1]
        images.append(image)
    return _study.image_list(folder, images, labels)  # PNG: lossless, the center pixel survives


def main(argv=None):
    p = _study.parser(__doc__.split("\n\n")[0], "resnet50", 1)
    p.add_argument("--methods", default=",".join(METHODS), help="path methods")
    p.add_argument("--steps", default=None, help="step counts swept (default 8,16,32,64,128; miniature 8,32,128)")
    p.add_argument("--metrics", default="insertion,pic,lossy_mse", help="metrics of `fastig evaluate`")
    p.add_argument("--metric-step", type=int, default=None, help="insertion: pixels per step (default: image width)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="the confidence filter, also PIC's (default 0.8; miniature 0.5: the center-pixel model's "
                        "softmax is about 0.53 at exact intensities)")
    args = p.parse_args(argv)
    dataset = args.dataset
    models = csv_list(args.models)
    if dataset is None:
        dataset = miniature(args.out / "miniature", args.size)
        models = ["centerpixel"] if args.models == "resnet50" else models
    args.steps = args.steps or ("8,16,32,64,128" if args.dataset is not None else "8,32,128")
    if args.min_confidence is None:
        args.min_confidence = 0.8 if args.dataset is not None else 0.5
    methods, steps, metrics = csv_list(args.methods), csv_list(args.steps, int), csv_list(args.metrics)
    from fastig.core import progress
    from fastig.metrics.evaluate import resolve_metrics

    scored = resolve_metrics(metrics + ["completeness"])
    rows = []
    with progress.task("idgi study", len(models) * len(methods) * 2 * len(steps), "settings", show=True) as task:
        for model in models:
            for method in methods:
                for idgi in (False, True):
                    for n in steps:
                        options = {"n_steps": n, "idgi": idgi, **({"rule": "riemann_left"} if method == "ig" else {})}
                        folder = args.out / "runs" / model / f"{method}{'_idgi' if idgi else ''}_{n}"
                        store = _study.attribute(folder, args, model, method, options, dataset, correct_only=True)
                        values = _study.evaluate(store, metrics + ["completeness"], args, step=args.metric_step,
                                                 min_pred_value=args.min_confidence)
                        for name in FILTERS:
                            keep = values["done"] & (values["confidences"] >= args.min_confidence
                                                     if name != "correct" else True)
                            row = {"model": model, "filter": name.replace("0.8", f"{args.min_confidence:g}"),
                                   "method": method, "idgi": "yes" if idgi else "no", "steps": n,
                                   "images": int(keep.sum())}
                            row.update({m: _study.mean(values[m], keep) for m in scored if m != "completeness"})
                            row["abs_delta"] = _study.mean(values["completeness"], keep)
                            rows.append(row)
                        task.advance()
    from fastig.io.tables import write_table

    written = list(write_table(rows, args.out / "idgi_table", title="IDGI reproducibility study"))
    written += figures(rows, args.out, scored)
    for path in written:
        print(path)
    return rows


def figures(rows, out, scored):
    from fastig.metrics.plots import save_curve_plot

    written = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for name in dict.fromkeys(r["filter"] for r in rows):
            chosen = [r for r in rows if r["model"] == model and r["filter"] == name]
            tag = f"{model}_{'confident' if 'confidence' in name else 'correct'}"
            for key, label in (("insertion", "mean insertion AUC"), ("abs_delta", "log10 mean |delta|")):
                if key not in chosen[0]:
                    continue
                series = {}
                for method in dict.fromkeys(r["method"] for r in chosen):
                    for idgi in ("no", "yes"):
                        line = [r for r in chosen if r["method"] == method and r["idgi"] == idgi]
                        y = [r[key] for r in line]
                        if key == "abs_delta":
                            y = [np.log10(max(v, 1e-12)) if np.isfinite(v) else np.nan for v in y]
                        series[f"{method}{' + IDGI' if idgi == 'yes' else ''}"] = ([r["steps"] for r in line], y)
                ys = np.array([v for _, y in series.values() for v in y], dtype=float)
                ys = ys[np.isfinite(ys)]
                ylim = (0.0, 1.0) if key == "insertion" else (
                    (float(np.floor(ys.min())), float(np.ceil(ys.max())) + (ys.min() == ys.max())) if ys.size else None)
                written.append(save_curve_plot(out / f"{tag}_{'insertion' if key == 'insertion' else 'delta'}.png",
                                               series, title=f"{model}, {name}", xlabel="steps", ylabel=label,
                                               ylim=ylim, size=(560, 400)))
    return written


if __name__ == "__main__":
    main()
