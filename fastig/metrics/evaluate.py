"""``evaluate_store``: score the attributions of an HDF5 store with the metrics, write per-image scores and curves
back into it, summarize, and draw the plots. Everything ``fastig evaluate`` does, as one function.

What is written into the store (``/metrics/<name>``, one value per row, NaN for rows not attributed or skipped):

- ``insertion``, ``deletion``: RISE AUCs, with curves ``[N, ceil(H * W / step) + 1]``;
- ``sic``, ``aic``: PIC AUCs, with curves ``[N, 1001]``, and ``sic_skipped``/``aic_skipped``: the skip codes of
  :data:`fastig.metrics.pic.SKIP_REASONS` (0 = scored);
- ``lossy_mse``: see :mod:`fastig.metrics.lossy`;
- ``completeness`` (``|delta|``) and ``completeness_relative``: see :mod:`fastig.metrics.completeness`.

Images: each row's image file is found from the store (:func:`image_paths`: the ``paths`` column, relative to
the dataset's image folder recorded in the run header, which ``dataset_root`` replaces for a moved dataset; stores
of older runs name the image by its id), read with :func:`fastig.io.images.read_image`, resized and cropped as the
model expects (:func:`fastig.models.info`) and kept as uint8 (PIC and the JPEG re-encoding work on uint8 images);
the model input is that image ``/ 255`` normalized with the model's mean/std, bit-identical to
:class:`~fastig.io.images.Preprocess` for RGB models. For grey models the luma is rounded to uint8 first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fastig.errors import FastigError, UnknownNameError

METRICS = ("insertion", "deletion", "sic", "aic", "lossy_mse", "completeness")
NEAR_UNIFORM = 0.95  # softmax entropy, as a share of log(classes), above which a prediction says nothing
ALIASES = {"pic": ("sic", "aic")}
IMAGE_CHUNK = 64  # images decoded and scored at a time (bounds memory on large stores)


@dataclass
class SummaryRow:
    """One metric over the store: mean and median of the scored rows, how many were scored, and how many were
    skipped, by reason."""

    metric: str
    mean: float
    median: float
    count: int
    skipped: dict = field(default_factory=dict)


def format_table(rows: Sequence[SummaryRow]) -> str:
    """The summary rows as a plain-text table (what the CLI prints)."""
    lines = [f"{'metric':<22}{'mean':>10}{'median':>10}{'count':>7}  skipped"]
    for r in rows:
        skipped = ", ".join(f"{k}: {v}" for k, v in r.skipped.items()) or "-"
        lines.append(f"{r.metric:<22}{r.mean:>10.4f}{r.median:>10.4f}{r.count:>7}  {skipped}")
    return "\n".join(lines)


def resolve_metrics(metrics: Sequence[str] | str) -> list[str]:
    """Metric names, comma-separated strings and the alias ``pic`` (= sic, aic) -> the ordered unique names."""
    if isinstance(metrics, str):
        metrics = [metrics]
    names: list[str] = []
    for item in metrics:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            for n in ALIASES.get(name, (name,)):
                if n not in METRICS:
                    raise UnknownNameError(f"unknown metric {n!r}; available: {', '.join(METRICS)} (and 'pic')")
                if n not in names:
                    names.append(n)
    if not names:
        raise ValueError("give at least one metric")
    return names


def image_paths(store, dataset_root=None) -> list[str]:
    """The image file of each row of ``store`` (see the module docstring); FastigError naming the first missing
    file and how to point at a moved dataset."""
    ids = store.ids()
    run = store.attrs["run"] or {}
    recorded_root = (run.get("inputs") or {}).get("image_root")
    root = recorded_root if dataset_root is None else os.fspath(dataset_root)
    relative = list(store.column("paths")) if "paths" in store.column_names() else ids
    paths = [p if not p or os.path.isabs(p) or root is None else os.path.join(root, p) for p in relative]
    for row in store.done_indices():
        if not os.path.isfile(paths[row]):
            if dataset_root is not None:
                where = f"under --dataset-root {dataset_root}"
            elif recorded_root is not None:
                where = (f"under the dataset folder the store records, {recorded_root} (if the dataset was moved, "
                         "pass --dataset-root NEW_FOLDER)")
            else:
                where = f"(looked for {paths[row]}; pass --dataset-root FOLDER if the paths are relative to one)"
            raise FastigError(f"image {relative[row]} of row {row} not found {where}")
    return paths


def _uint8_images(paths: Sequence[str], info) -> list[np.ndarray]:
    """Read, resize and crop as the model expects, as uint8 [H, W, 3] (grey models: [H, W])."""
    from fastig.io.images import Preprocess, read_image

    pre = Preprocess(resize=info.resize_size, crop=info.input_size, grayscale=info.channels == 1)
    out = []
    for p in paths:
        x = pre(read_image(p)).numpy().transpose(1, 2, 0)  # exactly u / 255 for RGB, so this rounds back to u
        u8 = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        out.append(u8[:, :, 0] if info.channels == 1 else u8)
    return out


def _summary(name: str, values: np.ndarray, skipped_codes: np.ndarray | None = None) -> SummaryRow:
    from fastig.metrics.pic import SKIP_REASONS

    finite = values[np.isfinite(values)]
    skipped = {}
    if skipped_codes is not None:
        for code in sorted(set(int(c) for c in skipped_codes) - {0}):
            skipped[SKIP_REASONS[code]] = int((skipped_codes == code).sum())
    mean = float(finite.mean()) if finite.size else float("nan")
    median = float(np.median(finite)) if finite.size else float("nan")
    return SummaryRow(name, mean, median, int(finite.size), skipped)


def evaluate_store(store_path, metrics: Sequence[str] | str, *, model=None, weights="auto", seed=None,
                   dataset_root=None, device="cpu",
                   out_dir=None, step: int | None = None, insertion_substrate="blur", deletion_substrate="zeros",
                   abs_saliency: bool = False, information="webp", pic_seed: int = 0, min_pred_value: float = 0.8,
                   thresholds: Sequence[float] | None = None, aggregation: str = "median", quality: int = 75, batch_size: int = 8,
                   workers: int | None = None, image_plots: int = 8, prepare: bool = True,
                   plots: bool = True, progress: Callable[[str], None] | None = None) -> list[SummaryRow]:
    """Compute ``metrics`` for the attributions in the store at ``store_path`` and write them into it.

    Args:
        metrics: names from :data:`METRICS` (``pic`` = ``sic`` + ``aic``), or comma-separated strings.
        model: a zoo model name or an ``nn.Module`` (e.g. the one just used to attribute); default the store's.
        weights: for a model name: ``"auto"``, ``"none"`` or a checkpoint path (see ``fastig.models.get``).
        seed: of ``weights="none"`` (default: the seed the store's run header records).
        dataset_root: where the dataset's images are now, when it was moved (default: as recorded).
        device: where the model runs.
        out_dir: folder of the plots (default ``<store folder>/metrics``).
        step: insertion/deletion pixels per step (default: the image width).
        insertion_substrate, deletion_substrate: see :func:`fastig.metrics.insertion.make_substrate`.
        abs_saliency: rank pixels by |attribution| instead of the signed value (PAIR leaves this to the caller).
        information: PIC's information estimator (``webp``, ``png``, ``webp_pil``).
        pic_seed: seeds the PIC random masks (one per row, drawn in row order), so methods compare on the same masks.
        min_pred_value: PIC's confidence filter.
        thresholds: PIC's saliency thresholds (default PAIR's list).
        aggregation: ``median`` or ``mean``, for the aggregated PIC curves.
        quality: JPEG quality of ``lossy_mse``.
        batch_size: most model inputs per pass.
        workers: threads for PIC's interpolation and encoding (default: CPU count).
        image_plots: how many rows (the first ones) get per-image curve plots and a heatmap-grid row.
        prepare: run the model through ``fastig.prepare`` (faster, same function).
        plots: write the PNGs.
        progress: called with a short message as each metric starts (the CLI passes ``click.echo``).

    Returns:
        One :class:`SummaryRow` per metric (``completeness`` adds ``completeness_relative``).
    """
    import fastig
    from fastig import methods, models
    from fastig.io.store import Store
    from fastig.metrics.completeness import completeness
    from fastig.metrics.insertion import causal_metric
    from fastig.metrics.lossy import lossy_mse
    from fastig.io.images import uint8_to_input
    from fastig.metrics.pic import PAIR_THRESHOLDS, pic, random_mask

    names = resolve_metrics(metrics)
    if aggregation not in ("median", "mean"):
        raise ValueError(f"aggregation must be 'median' or 'mean', got {aggregation!r}")
    say = progress or (lambda message: None)
    with Store.open(store_path, "a") as store:
        attrs = store.attrs
        rows = store.done_indices()
        if rows.size == 0:
            raise FastigError(f"store {store_path} has no attributed rows to evaluate")
        n_rows = len(store)
        targets = store.targets()
        maps = store.attributions()
        method_name = attrs["method"]
        # the recorded options also hold the run's selection (images, dataset, target, filters): keep the method's
        accepted = set(methods.get(method_name).options)
        options = {k: v for k, v in attrs["options"].items() if k in accepted}
        if isinstance(model, torch.nn.Module):
            model_name, net = attrs["model"], model
        else:
            model_name = attrs["model"] if model is None else model
            if seed is None:
                seed = (attrs["run"] or {}).get("seed")
            net = models.get(model_name, weights=weights, device=device, seed=seed, nonfinite="refuse")
        ids = image_paths(store, dataset_root)  # (after the weights: a refused file is named first)
        info = models.info(model_name)
        if prepare:
            net = fastig.prepare(net)
        net.eval()
        dev = torch.device(device)
        mean, std = (info.mean, info.std)
        input_fn = uint8_to_input(mean, std, device=dev)
        if tuple(attrs["shape"]) != (info.input_size, info.input_size):
            raise FastigError(f"store attributions are {tuple(attrs['shape'])} but {model_name} takes "
                              f"{info.input_size}x{info.input_size} inputs")
        needs_path = {"completeness"} & set(names)
        if needs_path and not methods.get(method_name).path_method:
            raise FastigError(f"completeness needs a path method; the store holds {method_name!r}")

        results: dict[str, np.ndarray] = {n: np.full(n_rows, np.nan) for n in names}
        curves: dict[str, np.ndarray] = {}
        skip_codes = {n: np.zeros(n_rows, dtype=np.int64) for n in ("sic", "aic") if n in names}
        relative = np.full(n_rows, np.nan)
        pic_x = None
        mask_rng = np.random.default_rng(pic_seed)
        first_images = []
        for start in range(0, rows.size, IMAGE_CHUNK):
            chunk = rows[start:start + IMAGE_CHUNK]
            images = _uint8_images([ids[r] for r in chunk], info)
            if start == 0:
                _warn_if_near_uniform(net, input_fn(np.stack(images[:8])), model_name, progress)
            if len(first_images) < image_plots:
                first_images += images[:image_plots - len(first_images)]
            saliency = torch.from_numpy(maps[chunk].astype(np.float32))
            saliency = saliency.abs() if abs_saliency else saliency
            target = torch.from_numpy(targets[chunk].astype(np.int64))
            inputs = input_fn(np.stack(images)) if {"insertion", "deletion", "completeness"} & set(names) else None
            for name in ("insertion", "deletion"):
                if name in names:
                    say(f"{name}: rows {chunk[0]}..{chunk[-1]}")
                    substrate = insertion_substrate if name == "insertion" else deletion_substrate
                    r = causal_metric(net, inputs, saliency, name, target, step, substrate, batch_size)
                    results[name][chunk] = r.auc
                    curves.setdefault(name, np.full((n_rows, r.scores.shape[1]), np.nan))[chunk] = r.scores
                    curves[name + "_x"] = r.fractions
            pic_names = [n for n in ("sic", "aic") if n in names]
            if pic_names:
                say(f"{'/'.join(pic_names)}: rows {chunk[0]}..{chunk[-1]}")
                h, w = images[0].shape[:2]
                masks = [random_mask(h, w, 0.01, mask_rng) for _ in chunk]
                scores = pic(net, images, saliency.numpy(), target=target.numpy(), masks=masks,
                                  information=information, min_pred_value=min_pred_value, input_fn=input_fn,
                                  thresholds=PAIR_THRESHOLDS if thresholds is None else thresholds,
                                  batch_size=batch_size, workers=workers, metrics=pic_names)
                for name, s in scores.items():
                    results[name][chunk] = s.auc
                    skip_codes[name][chunk] = s.skipped
                    curves.setdefault(name, np.full((n_rows, s.curves.shape[1]), np.nan))[chunk] = s.curves
                    pic_x = s.curve_x
            if "lossy_mse" in names:
                say(f"lossy_mse: rows {chunk[0]}..{chunk[-1]}")
                results["lossy_mse"][chunk] = lossy_mse(net, images, target, method_name, quality,
                                                              input_fn=input_fn, **options)
            if "completeness" in names:
                say(f"completeness: rows {chunk[0]}..{chunk[-1]}")
                c = completeness(net, inputs, target.to(dev), method_name, **options)
                results["completeness"][chunk] = c.absolute
                relative[chunk] = c.relative

        summary = []
        for name in names:
            store.write_metric(name, results[name], curves.get(name))
            if name in skip_codes:
                store.write_metric(f"{name}_skipped", skip_codes[name].astype(np.float64))
            summary.append(_summary(name, results[name], skip_codes[name][rows] if name in skip_codes else None))
            if name == "completeness":
                store.write_metric("completeness_relative", relative)
                summary.append(_summary("completeness_relative", relative))

        if plots:
            out = Path(store_path).parent / "metrics" if out_dir is None else Path(out_dir)
            _write_plots(out, names, results, curves, pic_x, rows, ids, maps, first_images, model_name,
                         method_name, aggregation, skip_codes)
    return summary


def _warn_if_near_uniform(net, inputs: torch.Tensor, model_name: str, progress) -> None:
    """One line when the model's predictions are near uniform (random weights): the scores then mean nothing."""
    with torch.no_grad():
        p = torch.softmax(net(inputs).double(), dim=1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1) / np.log(p.shape[1])
    if bool((entropy > NEAR_UNIFORM).all()):
        message = (f"warning: {model_name}'s predictions are near uniform (softmax entropy above "
                   f"{NEAR_UNIFORM:.0%} of the maximum on every image checked; random weights?): these scores are "
                   "not meaningful")
        if progress is not None:
            progress(message)
        else:
            import warnings

            warnings.warn(message, stacklevel=3)


def _write_plots(out: Path, names, results, curves, pic_x, rows, ids, maps, first_images, model_name,
                 method_name, aggregation, skip_codes) -> list[Path]:
    from fastig.io.heatmap import grid, render_heatmap, save_png
    from fastig.metrics.plots import save_curve_plot

    written = []
    label = f"{model_name} / {method_name}"
    games = [n for n in ("insertion", "deletion") if n in names]
    pics = [n for n in ("sic", "aic") if n in names]
    if games:  # aggregated: the mean curve over the scored rows
        series = {}
        for n in games:
            mean_curve = np.nanmean(curves[n][rows], axis=0)
            series[f"{n} (mean AUC {np.nanmean(results[n][rows]):.3f})"] = (curves[n + "_x"], mean_curve)
        written.append(save_curve_plot(out / "insertion_deletion.png", series, title=label,
                                       xlabel="fraction of pixels", ylabel="probability"))
    if pics:
        series = {}
        for n in pics:
            scored = curves[n][rows][skip_codes[n][rows] == 0]
            if len(scored):
                agg = np.median(scored, axis=0) if aggregation == "median" else np.mean(scored, axis=0)
                series[f"{n.upper()} ({aggregation}, AUC {np.trapezoid(agg, pic_x):.3f})"] = (pic_x, agg)
        if series:
            written.append(save_curve_plot(out / "pic.png", series, title=label, xlabel="normalized information",
                                           ylabel="normalized score"))
    for k, image in enumerate(first_images):
        row = rows[k]
        stem = f"{row:04d}_{Path(ids[row]).stem}"
        if games:
            series = {f"{n} (AUC {results[n][row]:.3f})": (curves[n + "_x"], curves[n][row]) for n in games}
            written.append(save_curve_plot(out / f"{stem}_insertion_deletion.png", series, title=stem,
                                           xlabel="fraction of pixels", ylabel="probability"))
        series = {f"{n.upper()} (AUC {results[n][row]:.3f})": (pic_x, curves[n][row]) for n in pics
                  if skip_codes[n][row] == 0}
        if series:
            written.append(save_curve_plot(out / f"{stem}_pic.png", series, title=stem,
                                           xlabel="normalized information", ylabel="normalized score"))
    if first_images:  # the heatmap grid of this store's method: image | heatmap per row
        cells = [[im, render_heatmap(maps[rows[k]].astype(np.float64), im)] for k, im in enumerate(first_images)]
        picture = grid(cells, row_labels=[f"{rows[k]:04d}" for k in range(len(cells))],
                       col_labels=["image", method_name])
        written.append(save_png(out / f"heatmaps_{method_name}.png", picture))
    return written
