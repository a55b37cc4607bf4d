"""Integrated Gradients (Sundararajan et al. 2017), a drop-in for ``captum.attr.IntegratedGradients``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastig.attr._inputs import format_baselines, format_inputs, format_output, row_sums
from fastig.core import quadrature
from fastig.core.engine import Engine, integrate
from fastig.core.paths import StraightLine
from fastig.core.targets import Target, format_additional_args


class IntegratedGradients:
    """Integrated Gradients along the straight line from ``baselines`` to ``inputs``.

    Same constructor, ``attribute()`` signature, defaults and numbers as Captum's class. What differs is how the
    work is done: path points are generated a batch at a time instead of all ``n_steps`` copies at once, the
    weighted sum runs in fused ops, and the convergence delta reuses the path's own evaluations at alpha = 0 and
    alpha = 1 when the rule includes them (riemann_trapezoid, riemann_left/right) instead of extra passes.

    ``internal_batch_size`` counts path points per model call, as in Captum; None lets the engine choose (on the
    CPU a small batch, since a pass costs the same per image at any size; on CUDA as large as fits, backing off
    on out-of-memory errors). Unlike Captum it may be smaller than the number of examples.
    """

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        *,
        idgi: bool = False,
    ) -> Any:
        if idgi:
            raise NotImplementedError("idgi=True is not available yet: IDGI arrives with the path-method family")
        xs, is_tuple = format_inputs(inputs)
        bs = format_baselines(baselines, xs)
        rule = quadrature.rule(method, n_steps)
        tgt = Target(target, xs[0].shape[0])
        args = format_additional_args(additional_forward_args)
        engine = Engine(self.forward_func, internal_batch_size)

        totals, outputs = integrate(engine, StraightLine(xs, bs, rule.alphas), rule.weights, tgt, args)
        attributions = tuple(
            (total * (x - b) if self._multiply_by_inputs else total).to(x.dtype)
            for total, x, b in zip(totals, xs, bs)
        )
        result = format_output(attributions, is_tuple)
        if not return_convergence_delta:
            return result
        start = outputs[0] if rule.includes_start else None
        end = outputs[-1] if rule.includes_end else None
        return result, self._delta(engine, attributions, xs, bs, tgt, args, start, end)

    def compute_convergence_delta(
        self,
        attributions: Any,
        start_point: Any,
        end_point: Any,
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        """sum(attributions) - (f(end_point) - f(start_point)) per example, as Captum defines it."""
        ends, _ = format_inputs(end_point)
        starts = format_baselines(start_point, ends)
        attrs, _ = format_inputs(attributions)
        for a, e in zip(attrs, ends):
            if a.shape[0] != e.shape[0]:
                raise ValueError(f"attributions have {a.shape[0]} examples but end_point has {e.shape[0]}")
        engine = Engine(self.forward_func)
        return self._delta(
            engine, attrs, ends, starts, Target(target, ends[0].shape[0]), format_additional_args(additional_forward_args)
        )

    @staticmethod
    def _delta(engine, attributions, inputs, baselines, target, args, f_start=None, f_end=None) -> torch.Tensor:
        """Completeness gap; endpoint outputs already computed along the path are reused."""
        if f_start is None:
            f_start = engine.outputs(tuple(b.expand_as(x) for b, x in zip(baselines, inputs)), target, args)
        if f_end is None:
            f_end = engine.outputs(inputs, target, args)
        with torch.no_grad():
            attr_sum = row_sums(attributions)
            return attr_sum - (f_end - f_start).to(attr_sum.dtype)
