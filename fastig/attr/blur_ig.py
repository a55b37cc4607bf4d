"""Blur Integrated Gradients (Xu et al., CVPR 2020), PAIR saliency's algorithm, batched over steps and examples."""

from __future__ import annotations

import math
from typing import Any

from fastig.core.inputs import format_inputs, format_output
from fastig.attr._path_common import PathAttribution, check_flag, check_number, check_steps
from fastig.core import quadrature
from fastig.core.adaptive import BlurCurve, integrate_adaptive, integrate_schedule
from fastig.core.engine import integrate_idgi, integrate_moves
from fastig.core.quadrature import check_auto_steps
from fastig.core.paths import BlurPath, gaussian_blur
from fastig.errors import InputError


def blur_sigmas(max_sigma: float, n_steps: int, sqrt: bool) -> list[float]:
    """PAIR's blur levels sigma_0 = 0, ..., sigma_n: ``i * max_sigma / n``, or its square root with ``sqrt=True``
    (so the last level is then ``sqrt(max_sigma)``, as in PAIR)."""
    levels = [float(i) * max_sigma / float(n_steps) for i in range(n_steps + 1)]
    return [math.sqrt(s) for s in levels] if sqrt else levels


class BlurIntegratedGradients(PathAttribution):
    """Blur IG: integrated gradients along the path from the input to the input blurred with ``max_sigma``.

    The numbers are those of PAIR saliency's ``BlurIG.GetMask`` (``saliency.core.blur_ig``) with its defaults
    ``max_sigma=50``, ``n_steps=100`` (PAIR's ``steps``), ``grad_step=0.01``, ``sqrt=False``: every channel is
    blurred over its last two dimensions (H, W) with a Gaussian of zero padding cut at 4 sigma (scipy.ndimage's
    ``gaussian_filter(mode="constant")``); the gradient is taken at sigma_0 .. sigma_{n-1}; the path derivative
    is the forward difference ``(blur(x, sigma_k + grad_step) - blur(x, sigma_k)) / grad_step``; and the sum is
    negated, so attributions explain f(input) - f(most blurred input) (that blurred input is the baseline of the
    convergence delta). Inputs need shape [N, ..., H, W] (images NCHW); there is no ``baselines`` argument to
    give.

    Deliberate difference from PAIR: with ``sqrt=True`` and ``batch_size > 1``, PAIR weights every step of a
    batch with the spacing ``sigma_{k+1} - sigma_k`` of the batch's last step; here each step has its own
    spacing (PAIR with ``batch_size=1``). With ``sqrt=False`` the spacings are all equal and the two agree.

    ``idgi=True`` applies IDGI to the blur path followed in the same direction: gradients at sigma_0 ..
    sigma_{n-1} (the points Blur IG evaluates), f also at sigma_n, and per segment
    ``-g_k * g_k * (f(x_{k+1}) - f(x_k)) / ||g_k||^2``, signed like Blur IG so that attributions sum to
    f(input) - f(blurred). ``output="probability"`` explains the softmax probability.

    ``precision`` and several targets per example (``target=[[a, b], ...]``, an [N, K] tensor or ``top_k=K``: one
    forward pass per batch of blur levels, K backward passes, attributions [N, K, ...]) as in
    :class:`~fastig.attr.IntegratedGradients`.

    Non-uniform blur levels (keyword-only): ``n_steps="auto"`` with ``tolerance`` (default 0.01) and
    ``max_steps`` (default 256) chooses the levels per example as
    :class:`~fastig.attr.IntegratedGradients` does (:mod:`fastig.core.adaptive`; ``last_info`` holds what it did),
    and ``alphas=`` gives fixed ones: points in [0, 1] meaning ``sigma = alpha * max_sigma`` (nearest-node
    weights), an ``(alphas, weights)`` pair, or a :func:`~fastig.core.adaptive.fit_schedule` rule. Both integrate
    the path derivative at each level (PAIR's forward difference with ``grad_step``) and converge to the same
    integral as ``n_steps`` grows; ``sqrt=True`` only shapes the uniform levels and cannot be combined with them.
    With ``idgi=True``, ``alphas=`` gives the IDGI points (0 and 1 added; weights not used).
    """

    last_info = None  # AdaptiveInfo of the last n_steps="auto" call

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: int | str = 100,
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        *,
        max_sigma: float = 50.0,
        grad_step: float = 0.01,
        sqrt: bool = False,
        idgi: bool = False,
        output: str = "logit",
        alphas: Any = None,
        tolerance: float = 0.01,
        max_steps: int = 256,
        precision: str = "fp32",
        top_k: int | None = None,
    ) -> Any:
        self.last_info = None
        if baselines is not None:
            raise ValueError("Blur IG's baseline is the input blurred with max_sigma: baselines must be None")
        schedule = None
        if alphas is not None:
            if n_steps == "auto":
                raise ValueError("give n_steps='auto' or alphas=, not both: alphas= is a fixed schedule")
            schedule = quadrature.custom_rule(alphas)
        elif n_steps == "auto":
            check_auto_steps(tolerance, max_steps)
        else:
            check_steps(n_steps)
        max_sigma = check_number("max_sigma", max_sigma, 0.0, 1e300, low_open=True)  # 4 sigma must stay finite
        grad_step = check_number("grad_step", grad_step, 0.0, low_open=True)
        check_flag("sqrt", sqrt)
        check_flag("idgi", idgi)
        if sqrt and (schedule is not None or n_steps == "auto"):
            raise ValueError("sqrt=True shapes the uniform blur levels; it cannot be combined with n_steps='auto' or alphas=")
        xs, is_tuple = format_inputs(inputs)
        tgt, args, engine = self._setup(xs, target, additional_forward_args, output, internal_batch_size, precision,
                                        top_k)
        if tgt.k is not None and (n_steps == "auto" or schedule is not None):
            raise InputError("n_steps='auto' and alphas= take one target per example; give an integer n_steps for "
                             "several targets per example")
        if n_steps == "auto" and schedule is None:
            sigmas = [0.0, max_sigma]
            totals, _, _, self.last_info = integrate_adaptive(
                engine, BlurCurve(xs, max_sigma, grad_step), tgt, args, tolerance, max_steps, idgi=idgi)
            outputs, f_blurred = None, None  # the delta takes f exactly at both ends (two forward passes)
        elif schedule is not None and not idgi:
            sigmas = [0.0, max_sigma]
            totals = integrate_schedule(engine, BlurCurve(xs, max_sigma, grad_step), tgt, args, schedule)
            outputs, f_blurred = None, None
        else:
            if schedule is not None:  # IDGI over the given levels, from the input (0) to the most blurred (1)
                sigmas = [a * max_sigma for a in sorted({0.0, *schedule.alphas, 1.0})]
            else:
                sigmas = blur_sigmas(max_sigma, n_steps, sqrt)
            path = BlurPath(xs, sigmas, grad_step)
            totals, outputs, f_blurred = self._uniform(engine, path, tgt, args, idgi)
        attributions = tuple(total.to(x.dtype) for total, x in zip(totals, xs))
        result = format_output(attributions, is_tuple)
        if not return_convergence_delta:
            return result
        blurred = tuple(gaussian_blur(x, sigmas[-1]) for x in xs)
        f_input = None if outputs is None else outputs[0]
        return result, self._delta(engine, attributions, xs, blurred, tgt, args, f_blurred, f_input)

    @staticmethod
    def _uniform(engine, path, tgt, args, idgi):
        """Blur IG (or its IDGI form) along ``path``: (totals, f at the evaluated levels, f at the most blurred
        level or None)."""
        if idgi:
            totals, outputs = integrate_idgi(engine, path, tgt, args)
            totals = tuple(-t for t in totals)  # IDGI's sum runs input -> blurred; Blur IG explains the reverse
            f_blurred = outputs[-1]
        else:
            totals, outputs = integrate_moves(engine, path, tgt, args, n_steps=path.n_steps - 1)
            f_blurred = None
        return totals, outputs, f_blurred

