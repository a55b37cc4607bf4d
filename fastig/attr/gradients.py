"""Plain-gradient methods: Saliency, InputXGradient, GradientShap (drop-ins for Captum's classes).

All model passes go through :class:`fastig.core.engine.Engine`, a batch of rows at a time: the examples of
Saliency and InputXGradient, the ``N * n_samples`` random points of GradientShap. ``internal_batch_size`` (an extra
keyword Captum lacks for these methods) caps the rows per model call; None lets the engine choose.

Saliency and InputXGradient also take (keyword-only, not in Captum) ``precision="fp32"|"bf16"|"fp16"`` (autocast
of the model's passes) and several targets per example: ``target=[[a, b], ...]`` or an [N, K] tensor, or
``top_k=K``: one forward pass and K backward passes per batch, attributions [N, K, ...].
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch

from fastig.attr._base import Attribution
from fastig.core.inputs import check_stdevs, draw_baselines, format_inputs, format_output, noisy_copies
from fastig.attr._path_common import convergence_delta
from fastig.attr.integrated_gradients import IntegratedGradients
from fastig.core.engine import Engine
from fastig.core.targets import Target, expand_additional_args, expand_target, format_additional_args
from fastig.errors import InvalidArgumentError, InvalidTypeError, check_int


class _Rows:
    """A one-step "path" whose points are rows of given tensors (or rows built on demand), for the engine."""

    n_steps = 1

    def __init__(self, make_rows: Callable[[slice], tuple[torch.Tensor, ...]]):
        self.make_rows = make_rows

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        return self.make_rows(examples)


def input_gradients(
    forward_func: Callable,
    rows: Callable[[slice], tuple[torch.Tensor, ...]] | tuple[torch.Tensor, ...],
    n: int,
    target: Any,
    additional_forward_args: Any,
    internal_batch_size: int | None = None,
    precision: str = "fp32",
    top_k: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of the explained output w.r.t. each input at ``n`` rows, computed in engine batches: [n, ...] per
    input, or [n, K, ...] for K targets per row (``top_k`` needs ``rows`` as tensors: the classes are read there).

    ``rows`` is a tuple of [n, ...] tensors or a function ``slice -> tuple of row tensors`` that builds them lazily.
    """
    make_rows = (lambda part: tuple(t[part] for t in rows)) if isinstance(rows, tuple) else rows
    engine = Engine(forward_func, internal_batch_size, precision)
    args = format_additional_args(additional_forward_args)
    target = engine.resolve_target(target, top_k, rows, args) if top_k is not None else Target(target, n)
    grads: list[torch.Tensor] | None = None
    for batch in engine.batches(_Rows(make_rows), target, args):
        if grads is None:
            grads = [torch.empty((n,) + tuple(g.shape[2:]), dtype=g.dtype, device=g.device) for g in batch.grads]
        for total, g in zip(grads, batch.grads):
            total[batch.examples] = g[0]
    return tuple(grads)


class Saliency(Attribution):
    """Gradient of the output w.r.t. the input (Simonyan et al. 2014); absolute value by default (Captum's default).

    Drop-in for ``captum.attr.Saliency``; extra keywords ``internal_batch_size``, ``precision``, ``top_k`` (see the
    module docstring).
    """

    multiplies_by_inputs = False
    takes_rules = True  # rules= (fastig.attr.rules), applied by the entry point

    def attribute(
        self,
        inputs: Any,
        target: Any = None,
        abs: bool = True,
        additional_forward_args: Any = None,
        *,
        internal_batch_size: int | None = None,
        precision: str = "fp32",
        top_k: int | None = None,
    ) -> Any:
        xs, is_tuple = format_inputs(inputs)
        grads = input_gradients(self.forward_func, xs, xs[0].shape[0], target, additional_forward_args,
                                internal_batch_size, precision, top_k)
        return format_output(tuple(g.abs() for g in grads) if abs else grads, is_tuple)


class InputXGradient(Attribution):
    """Input times gradient (Shrikumar et al. 2016). Drop-in for ``captum.attr.InputXGradient``.

    Extra keywords ``internal_batch_size``, ``precision``, ``top_k`` (see the module docstring).
    """

    multiplies_by_inputs = True
    takes_rules = True  # rules= (fastig.attr.rules), applied by the entry point

    def attribute(
        self,
        inputs: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        internal_batch_size: int | None = None,
        precision: str = "fp32",
        top_k: int | None = None,
    ) -> Any:
        xs, is_tuple = format_inputs(inputs)
        grads = input_gradients(self.forward_func, xs, xs[0].shape[0], target, additional_forward_args,
                                internal_batch_size, precision, top_k)
        return format_output(tuple((x if g.dim() == x.dim() else x.unsqueeze(1)) * g for x, g in zip(xs, grads)),
                             is_tuple)


class GradientShap(Attribution):
    """GradientSHAP (Lundberg & Lee 2017): the expected gradient x (input - baseline) over random baselines drawn
    from a distribution, random points on the line between them, and Gaussian noise on the input.

    Drop-in for ``captum.attr.GradientShap``: same signature and defaults, and for the same ``torch``/``numpy``
    seeds the same draws (noise: ``torch``; baseline rows and line positions: ``numpy.random``) and numbers.
    Extra keyword ``internal_batch_size``: model inputs per forward/backward pass (Captum evaluates all
    ``N * n_samples`` points in one batch); None lets the engine choose. The points are built a batch at a time.
    """

    _has_convergence_delta = True
    takes_rules = True  # rules= (fastig.attr.rules), applied by the entry point

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute(
        self,
        inputs: Any,
        baselines: Any,
        n_samples: int = 5,
        stdevs: float | tuple[float, ...] = 0.0,
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        *,
        internal_batch_size: int | None = None,
    ) -> Any:
        xs, is_tuple = format_inputs(inputs)
        check_int("n_samples", n_samples)
        stdevs = check_stdevs(stdevs, len(xs))
        distribution = baseline_distribution(baselines, inputs, xs)
        n = xs[0].shape[0]
        rows = n * n_samples

        # Draw order as in Captum: numpy baseline rows, torch noise, then numpy line positions.
        drawn = tuple(
            b if isinstance(b, torch.Tensor) else torch.full((1,) + tuple(x.shape[1:]), b, dtype=x.dtype, device=x.device)
            for b, x in zip(draw_baselines(distribution, rows), xs)
        )
        noisy = tuple(noisy_copies(x, s, n_samples) for x, s in zip(xs, stdevs))
        alphas = torch.tensor(np.random.uniform(0.0, 1.0, rows), device=xs[0].device, dtype=xs[0].dtype)

        def points(part: slice) -> tuple[torch.Tensor, ...]:
            out = []
            for x, b in zip(noisy, drawn):
                a = alphas[part].view((-1,) + (1,) * (x.dim() - 1))
                out.append(a * x[part] + (1.0 - a) * (b[part] if b.shape[0] > 1 else b))
            return tuple(out)

        target_rows = expand_target(target, n_samples)
        args_rows = expand_additional_args(additional_forward_args, n_samples)
        grads = input_gradients(self.forward_func, points, rows, target_rows, args_rows, internal_batch_size)
        with torch.no_grad():
            per_row = tuple((x - b) * g for x, b, g in zip(noisy, drawn, grads)) if self._multiply_by_inputs else grads
            attributions = tuple(
                a.reshape((n, n_samples) + tuple(a.shape[1:])).sum(dim=1) * 1 / n_samples for a in per_row
            )
        result = format_output(attributions, is_tuple)
        if not return_convergence_delta:
            return result
        engine = Engine(self.forward_func, internal_batch_size)
        delta = IntegratedGradients._delta(
            engine, per_row, noisy, drawn, Target(target_rows, rows), format_additional_args(args_rows)
        )
        return result, delta

    def compute_convergence_delta(
        self, attributions: Any, start_point: Any, end_point: Any, target: Any = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        """``sum(attributions) - (f(end_point) - f(start_point))`` per example (Captum's
        ``compute_convergence_delta``, two plain forward passes)."""
        return convergence_delta(self.forward_func, attributions, start_point, end_point, target,
                                 additional_forward_args)


def baseline_distribution(baselines: Any, raw_inputs: Any, xs: tuple, method: str = "GradientShap",
                          at_least: int = 1) -> tuple:
    """GradientShap's and DeepLiftShap's baselines: one tensor [R, ...] of reference rows per input (numbers are
    allowed after the first tensor when ``at_least`` is 1, as GradientShap allows them), or a function returning
    them, called as Captum calls it: without arguments, or with the inputs as given. ``at_least``: the fewest rows
    (DeepLiftShap: 2, every input a tensor with the same rows)."""
    if callable(baselines) and not isinstance(baselines, torch.Tensor):
        baselines = baselines() if not inspect.signature(baselines).parameters else baselines(raw_inputs)
    baselines = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(baselines) != len(xs):
        raise InvalidArgumentError(f"got {len(baselines)} baselines for {len(xs)} inputs")
    if not isinstance(baselines[0], torch.Tensor):
        raise InvalidTypeError(f"{method} needs the baseline distribution as a tensor [R, ...] (R reference rows), "
                               f"got {type(baselines[0]).__name__}")
    out = []
    for i, (b, x) in enumerate(zip(baselines, xs)):
        if isinstance(b, torch.Tensor):
            if b.dim() != x.dim() or b.shape[1:] != x.shape[1:] or b.shape[0] < at_least:
                raise InvalidArgumentError(
                    f"baselines[{i}] has shape {tuple(b.shape)}: it must be [R, ...] with R >= {at_least} and the "
                    f"input's per-example shape {tuple(x.shape[1:])}"
                    + (" (for a single baseline use DeepLift)" if at_least > 1 and b.shape[0] == 1 else "")
                )
            if b.shape[0] != baselines[0].shape[0] and at_least > 1:
                raise InvalidArgumentError(f"baselines[{i}] has {b.shape[0]} rows, baselines[0] has "
                                           f"{baselines[0].shape[0]}: every input needs the same reference rows")
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise InvalidArgumentError(f"baselines[{i}] contains NaN or infinite values")
            b = b.to(device=x.device)
        elif at_least > 1 or isinstance(b, bool) or not isinstance(b, (int, float)):
            raise InvalidTypeError(f"baselines[{i}] must be a tensor{'' if at_least > 1 else ' or a number'}, got "
                                   f"{type(b).__name__}")
        out.append(b)
    return tuple(out)


def default_baseline_distribution(inputs: Any) -> tuple[torch.Tensor, ...]:
    """The baselines ``fastig attribute --method gradient_shap`` uses: two reference rows per input, all zeros and
    uniform noise over the inputs' value range (from a fixed seed, so runs repeat and the global RNG is untouched)."""
    xs, _ = format_inputs(inputs)
    generator = torch.Generator().manual_seed(0)
    out = []
    for x in xs:
        low, high = x.min().item(), x.max().item()
        noise = torch.rand((1,) + tuple(x.shape[1:]), generator=generator, dtype=torch.float64)
        noise = (low + (high - low) * noise).to(device=x.device, dtype=x.dtype)
        out.append(torch.cat([torch.zeros_like(noise), noise]))
    return tuple(out)
