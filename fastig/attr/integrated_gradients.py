"""Integrated Gradients (Sundararajan et al. 2017), a drop-in for ``captum.attr.IntegratedGradients``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastig.attr import rules as backward_rules
from fastig.core.inputs import format_baselines, format_inputs, format_output
from fastig.attr._path_common import PathAttribution, check_flag
from fastig.core import quadrature
from fastig.core.adaptive import StraightCurve, integrate_adaptive
from fastig.core.quadrature import check_auto_steps
from fastig.core.engine import integrate, integrate_idgi
from fastig.core.paths import StraightLine
from fastig.errors import InputError


class IntegratedGradients(PathAttribution):
    """Integrated Gradients along the straight line from ``baselines`` to ``inputs``.

    Same constructor, ``attribute()`` signature, defaults and numbers as Captum's class. What differs is how the
    work is done: path points are generated a batch at a time instead of all ``n_steps`` copies at once, the
    weighted sum runs in fused ops, and the convergence delta reuses the path's own evaluations at alpha = 0 and
    alpha = 1 when the rule includes them (riemann_trapezoid, riemann_left/right) instead of extra passes.

    ``internal_batch_size`` counts path points per model call, as in Captum; None lets the engine choose (on the
    CPU a small batch, since a pass costs the same per image at any size; on CUDA as large as fits, backing off
    on out-of-memory errors). Unlike Captum it may be smaller than the number of examples.

    Extra keyword-only options (not in Captum):

    - ``output="logit"`` explains the target entry of the model's output; ``"probability"`` explains its softmax
      probability (softmax over dimension 1), for the attributions and the convergence delta alike.
    - ``idgi=True``: IDGI (Yang, Wang, Bilgic, CVPR 2023) on the same straight line. Per segment
      [x_i, x_{i+1}] the attribution gains ``g_i * g_i * (f(x_{i+1}) - f(x_i)) / ||g_i||^2`` with g_i the
      gradient at x_i (norm over all input tensors jointly), so the attributions sum to f(input) - f(baseline)
      exactly, up to float rounding and to segments whose gradient is zero: those are skipped (no NaN) and the
      convergence delta shows what they cost. The points are the rule's alphas with 0 and 1 added when missing:
      ``method="riemann_left"`` gives the official IDGI code's points exactly (alphas 0, 1/n, ..., (n-1)/n with
      gradients, and f at 1), ``riemann_trapezoid`` the n points linspace(0, 1, n), and the other rules their
      alphas (Gauss-Legendre nodes for the default rule) between 0 and 1. The last point, alpha = 1, needs no
      gradient and gets a forward pass only. IDGI attributions are not multiplied by ``inputs - baselines``
      (they already sum to the output difference), so ``multiply_by_inputs=False`` has no IDGI form and is
      refused.
    - ``precision="fp32" | "bf16" | "fp16"``: the model's passes run under autocast at that precision (see
      :mod:`fastig.core.engine`); sums stay fp32 and attributions keep the inputs' dtype. Measured error against
      fp32 in the README ("Precision").
    - several targets per example: ``target=[[a, b, c], ...]`` (a list of K classes per example) or an integer
      tensor [N, K], or ``top_k=K`` (the K classes of largest output at the inputs, descending). One forward pass
      per batch of path points and K backward passes (:func:`fastig.core.engine.target_vjps`); attributions are
      [N, K, ...] and the convergence delta [N, K], equal to K single-target calls.

    Non-uniform steps (extra keyword-only options):

    - ``n_steps="auto"``: adaptive quadrature per example (:mod:`fastig.core.adaptive`): gradients are added where
      the integrand changes most until the estimated relative L2 error of the map *and* the relative completeness
      gap are both at most ``tolerance`` (default 0.01), or ``max_steps`` gradients (default 256) are spent (a
      :class:`~fastig.core.adaptive.ToleranceNotReached` warning names those examples). ``method`` is not used:
      the rule is the nearest-node rule on the chosen points, which include both ends (IDGI: IDGI over them);
      the convergence delta costs two forward passes at the ends, as with Captum's rules. After the call ``last_info`` holds an
      :class:`~fastig.core.adaptive.AdaptiveInfo`: passes, cost, error estimate, points and weights per example.
    - ``alphas=``: a fixed schedule, the same for every example: a sequence of points in [0, 1] (nearest-node
      weights), an ``(alphas, weights)`` pair, or the rule :func:`fastig.core.adaptive.fit_schedule` returns.
      Replaces ``n_steps``/``method``. With ``idgi=True`` the weights are not used (IDGI over the points, with 0
      and 1 added).
    """

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs
        self.last_info = None  # AdaptiveInfo of the last n_steps="auto" call

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: int | str = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        *,
        idgi: bool = False,
        output: str = "logit",
        alphas: Any = None,
        tolerance: float = 0.01,
        max_steps: int = 256,
        precision: str = "fp32",
        top_k: int | None = None,
    ) -> Any:
        check_flag("idgi", idgi)
        self.last_info = None
        if idgi and not self._multiply_by_inputs:
            raise ValueError(
                "idgi=True needs multiply_by_inputs=True: IDGI attributions already sum to f(input) - f(baseline) "
                "and have no 'global' form without the input difference"
            )
        xs, is_tuple = format_inputs(inputs)
        bs = format_baselines(baselines, xs)
        rule = quadrature.named_rule(method, n_steps) if alphas is None and n_steps != "auto" else None
        if alphas is not None:
            if n_steps == "auto":
                raise ValueError("give n_steps='auto' or alphas=, not both: alphas= is a fixed schedule")
            rule = quadrature.custom_rule(alphas)
        tgt, args, engine = self._setup(xs, target, additional_forward_args, output, internal_batch_size, precision,
                                        top_k)
        if rule is None and tgt.k is not None:
            raise InputError("n_steps='auto' takes one target per example (its points are chosen per example and "
                             "target); give an integer n_steps for several targets per example")

        if rule is None:  # n_steps="auto"
            curve = StraightCurve(xs, bs, self._multiply_by_inputs)
            # completeness can stop n_steps="auto" only for f's own gradients, not under backward rules (GNL IG)
            curve.complete = curve.complete and backward_rules.active() is None
            totals, _, _, self.last_info = integrate_adaptive(
                engine, curve, tgt, args, *check_auto_steps(tolerance, max_steps), idgi=idgi)
            start = end = None  # the delta takes f exactly at the baseline and the input (two forward passes)
            attributions = tuple(total.to(x.dtype) for total, x in zip(totals, xs))
        elif idgi:
            alphas = sorted({0.0, *rule.alphas, 1.0})
            totals, outputs = integrate_idgi(engine, StraightLine(xs, bs, alphas), tgt, args)
            attributions = tuple(total.to(x.dtype) for total, x in zip(totals, xs))
            start, end = outputs[0], outputs[-1]
        else:
            totals, outputs = integrate(engine, StraightLine(xs, bs, rule.alphas), rule.weights, tgt, args)
            attributions = tuple(
                (total * _per_target(x - b, tgt) if self._multiply_by_inputs else total).to(x.dtype)
                for total, x, b in zip(totals, xs, bs)
            )
            start = outputs[0] if rule.includes_start else None
            end = outputs[-1] if rule.includes_end else None
        result = format_output(attributions, is_tuple)
        if not return_convergence_delta:
            return result
        return result, self._delta(engine, attributions, xs, bs, tgt, args, start, end)


def _per_target(difference: torch.Tensor, target) -> torch.Tensor:
    """``inputs - baselines`` aligned with [N, K, ...] totals when there are K targets per example."""
    return difference if target.k is None else difference.unsqueeze(1)
