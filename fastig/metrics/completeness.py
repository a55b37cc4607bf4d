"""Completeness of path attributions and the step-count sweep (the reproducibility study's "numerical stability").

Completeness: a path method's attributions should sum to ``f(input) - f(baseline)``. The gap
``delta = sum(attributions) - (f(input) - f(baseline))`` is what the method reports with
``return_convergence_delta=True`` (Captum's definition, each method with its own baseline and explained output);
fastig reports ``absolute = |delta|`` and ``relative = |delta| / |f(input) - f(baseline)|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    """Attribute ``inputs`` with path method ``method`` and measure its completeness gap.

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
    delta = delta.detach().double().cpu().numpy().reshape(-1)
    total = attributions.detach().double().cpu().reshape(len(delta), -1).sum(1).numpy()
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
