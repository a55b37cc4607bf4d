"""Completeness of path attributions and the step-count sweep (the reproducibility study's "numerical stability").

The stability table (:func:`stability_table`) runs the sweep for several methods or settings side by side (IG,
latent IG with lerp and slerp, ...) and writes it as Markdown/CSV with plots of ``|delta|`` and each metric
against the number of steps.

Completeness: a path method's attributions should sum to ``f(input) - f(baseline)``. The gap
``delta = sum(attributions) - (f(input) - f(baseline))`` is what the method reports with
``return_convergence_delta=True`` (Captum's definition, each method with its own baseline and explained output);
fastig reports ``absolute = |delta|`` and ``relative = |delta| / |f(input) - f(baseline)|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

DEFAULT_SWEEP = (8, 16, 32, 64, 128)


@dataclass
class CompletenessResult:
    """Per example: ``delta`` (signed gap), ``absolute``, ``relative`` (NaN where f(input) == f(baseline)),
    ``difference`` = f(input) - f(baseline); and the attributions themselves."""

    delta: np.ndarray
    absolute: np.ndarray
    relative: np.ndarray
    difference: np.ndarray
    attributions: torch.Tensor


def completeness(model, inputs: torch.Tensor, target=None, method: str = "ig", **options) -> CompletenessResult:
    """Attribute ``inputs`` with ``method`` (any method with a convergence delta) and measure its completeness gap.

    ``target`` defaults to the model's top-1 class. ``options`` go to the method's ``attribute()``.
    """
    import fastig
    from fastig import methods
    from fastig.metrics.insertion import explained_classes

    spec = methods.get(method)
    if not spec.path_method:
        path = ", ".join(n for n in methods.names() if methods.get(n).path_method)
        raise ValueError(f"completeness needs a path method (one with a convergence delta: {path}); "
                         f"{method!r} is not one")
    classes = explained_classes(model, inputs, target).to(inputs.device)
    attributions, delta = fastig.attribute(model, inputs, target=classes, method=method,
                                           return_convergence_delta=True, **options)
    n = inputs.shape[0]
    # methods over random samples (GradientShap) give one delta per (example, sample), example-major: their mean is
    # the gap of the averaged attribution against the mean of the samples' output differences
    delta = delta.detach().double().cpu().reshape(n, -1).mean(1).numpy()
    total = attributions.detach().double().cpu().reshape(n, -1).sum(1).numpy()
    difference = total - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(difference != 0, np.abs(delta) / np.abs(difference), np.nan)
    return CompletenessResult(delta, np.abs(delta), relative, difference, attributions)


def step_sweep(model, inputs: torch.Tensor, target=None, method: str = "ig", steps: Sequence[int] = DEFAULT_SWEEP,
               metrics: Sequence[str] = ("insertion", "deletion"), metric_options: dict | None = None,
               **options) -> list[dict]:
    """How the completeness gap and the metric scores change with the number of steps.

    For each ``n_steps`` in ``steps``: attribute, measure completeness, and score the channel-summed maps with
    each metric of ``metrics`` (``insertion``/``deletion``; ``metric_options`` go to them, e.g. ``step``).
    Returns one row per step count: ``{"n_steps", "abs_delta_mean", "rel_delta_mean", "<metric>_mean", and the
    per-example arrays "abs_delta", "<metric>"}``.
    """
    from fastig.metrics.insertion import causal_metric, explained_classes

    classes = explained_classes(model, inputs, target)
    rows = []
    for n_steps in steps:
        result = completeness(model, inputs, classes, method, n_steps=int(n_steps), **options)
        row = {"n_steps": int(n_steps), "abs_delta": result.absolute, "abs_delta_mean": float(result.absolute.mean()),
               "rel_delta_mean": float(np.nanmean(result.relative)) if np.isfinite(result.relative).any()
               else float("nan")}
        saliency = result.attributions.detach().float().sum(1)
        for name in metrics:
            scores = causal_metric(model, inputs, saliency, name, target=classes, **(metric_options or {}))
            row[name] = scores.auc
            row[f"{name}_mean"] = float(scores.auc.mean())
        rows.append(row)
    return rows


@dataclass
class StabilityTable:
    """:func:`step_sweep` for several variants: ``rows`` (variant, n_steps, abs_delta_mean, rel_delta_mean and
    ``<metric>_mean``), and the metric names."""

    rows: list[dict]
    metrics: tuple[str, ...]

    @property
    def columns(self) -> list[str]:
        return ["variant", "n_steps", "abs_delta_mean", "rel_delta_mean"] + [f"{m}_mean" for m in self.metrics]

    def save(self, stem, title: str = "Numerical stability: completeness and scores vs steps") -> list[Path]:
        """``stem.md``/``stem.csv``, ``stem_delta.png`` (log10 of the mean |delta| vs steps) and one
        ``stem_<metric>.png`` per metric; returns the paths."""
        from fastig.io.tables import write_table
        from fastig.metrics.plots import save_curve_plot

        stem = Path(stem)
        written = list(write_table(self.rows, stem, self.columns, title))
        variants = list(dict.fromkeys(r["variant"] for r in self.rows))

        def series(key, transform=lambda v: v):
            out = {}
            for v in variants:
                rows = [r for r in self.rows if r["variant"] == v]
                out[v] = ([r["n_steps"] for r in rows], [transform(r[key]) for r in rows])
            return out

        deltas = series("abs_delta_mean", lambda d: np.log10(max(d, 1e-12)))
        values = np.concatenate([np.asarray(y, dtype=float) for _, y in deltas.values()])
        low, high = float(np.floor(values.min())), float(np.ceil(values.max()))
        written.append(save_curve_plot(stem.parent / f"{stem.name}_delta.png", deltas, title=title,
                                       xlabel="steps", ylabel="log10 mean |delta|",
                                       ylim=(low, high if high > low else low + 1)))
        for metric in self.metrics:
            written.append(save_curve_plot(stem.parent / f"{stem.name}_{metric}.png", series(f"{metric}_mean"),
                                           title=f"{metric} AUC vs steps", xlabel="steps",
                                           ylabel=f"mean {metric} AUC", ylim=(0.0, 1.0)))
        return written


def stability_table(model, inputs: torch.Tensor, target=None, variants: Mapping[str, tuple[str, dict]] | None = None,
                    steps: Sequence[int] = DEFAULT_SWEEP, metrics: Sequence[str] = ("insertion", "deletion"),
                    metric_options: dict | None = None) -> StabilityTable:
    """:func:`step_sweep` of every variant ``{label: (method, options)}`` (default ``{"IG": ("ig", {})}``) on the
    same inputs and targets (default: the top-1 class); e.g. IG and latent IG with lerp and slerp."""
    from fastig.metrics.insertion import explained_classes

    variants = dict(variants) if variants is not None else {"IG": ("ig", {})}
    classes = explained_classes(model, inputs, target)
    rows = []
    for label, (method, options) in variants.items():
        for row in step_sweep(model, inputs, classes, method, steps, metrics, metric_options, **options):
            rows.append({"variant": label, **{k: v for k, v in row.items() if not isinstance(v, np.ndarray)}})
    return StabilityTable(rows, tuple(metrics))
