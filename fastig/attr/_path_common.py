"""What every path method shares: the explained output (logit or probability), option checks, convergence delta."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from fastig.attr._base import Attribution
from fastig.core.inputs import format_baselines, format_inputs, row_sums
from fastig.core import quadrature
from fastig.core.baselines import sampled_baselines
from fastig.core.engine import Engine
from fastig.core.targets import Target, format_additional_args
from fastig.errors import InvalidArgumentError, check_int

# What a method explains (``output=``, the CLI's ``--output``): the target entry of the model's output, or of its
# softmax over dimension 1. The one spelling of "explain the probability" in fastig.
OUTPUTS = ("logit", "probability")


def check_output(output: Any) -> str:
    if output not in OUTPUTS:
        raise InvalidArgumentError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    return output


def explained_function(forward_func: Callable, output: str) -> Callable:
    """The function whose target entry is explained: the model itself (``"logit"``) or its softmax over
    dimension 1 (``"probability"``)."""
    if check_output(output) == "logit":
        return forward_func

    def probability(*args):
        out = forward_func(*args)
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"output='probability' needs a model output of shape [batch, classes, ...], got {shape}")
        return torch.softmax(out, dim=1)

    probability.__wrapped__ = forward_func  # the engine remembers batch sizes per model, through this wrapper
    return probability


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_steps(n_steps: Any, minimum: int = 1) -> int:
    n_steps = check_int("n_steps", n_steps, minimum)
    quadrature.check_steps_fit(None, n_steps)  # paths without a quadrature rule keep per-step tables too
    return n_steps


def check_number(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> float:
    """A finite real number in [low, high] (or (low, high] with ``low_open``; no upper bound when ``high`` is
    None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high) or not math.isfinite(value):
        bounds = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"{name} must lie in {bounds}, got {value!r}")
    return value


def convergence_delta(
    forward_func: Callable, attributions: Any, start_point: Any, end_point: Any, target: Any = None,
    additional_forward_args: Any = None,
) -> torch.Tensor:
    """Captum's ``compute_convergence_delta``: ``sum(attributions) - (f(end_point) - f(start_point))`` per example,
    with two plain forward passes (in engine batches)."""
    ends, _ = format_inputs(end_point)
    starts = format_baselines(start_point, ends)
    attrs, _ = format_inputs(attributions)
    for a, e in zip(attrs, ends):
        if a.shape[0] != e.shape[0]:
            raise InvalidArgumentError(f"attributions have {a.shape[0]} examples but end_point has {e.shape[0]}")
    return PathAttribution._delta(
        Engine(forward_func), attrs, ends, starts, Target(target, ends[0].shape[0]),
        format_additional_args(additional_forward_args),
    )


class PathAttribution(Attribution):
    """Base of the path methods: the model, and the completeness gap they all report."""

    _has_convergence_delta = True
    takes_rules = True  # rules= (fastig.attr.rules), applied by the entry point

    def __init_subclass__(cls, **kwargs):
        # every path method takes drawn baselines (baselines="segments" / SegmentBaselines): resolved here, once
        super().__init_subclass__(**kwargs)
        if "attribute" in cls.__dict__:
            cls.attribute = sampled_baselines(cls.__dict__["attribute"])

    def _setup(
        self, inputs: tuple[torch.Tensor, ...], target: Any, additional_forward_args: Any, output: str,
        internal_batch_size: int | None, precision: str = "fp32", top_k: int | None = None,
    ) -> tuple[Target, tuple, Engine]:
        """What every attribute() needs: the target of each example of ``inputs`` (``top_k``: the K classes of
        largest explained output at the inputs), the extra model arguments, and the engine over the explained
        output at ``precision``."""
        args = format_additional_args(additional_forward_args)
        engine = Engine(explained_function(self.forward_func, output), internal_batch_size, precision)
        return engine.resolve_target(target, top_k, inputs, args), args, engine

    def compute_convergence_delta(
        self,
        attributions: Any,
        start_point: Any,
        end_point: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        output: str = "logit",
    ) -> torch.Tensor:
        """sum(attributions) - (f(end_point) - f(start_point)) per example, as Captum defines it."""
        return convergence_delta(explained_function(self.forward_func, output), attributions, start_point, end_point,
                                 target, additional_forward_args)

    @staticmethod
    def _delta(engine, attributions, inputs, baselines, target, args, f_start=None, f_end=None) -> torch.Tensor:
        """Completeness gap; endpoint outputs already computed along the path are reused."""
        if f_start is None:
            f_start = engine.outputs(tuple(b.expand_as(x) for b, x in zip(baselines, inputs)), target, args)
        if f_end is None:
            f_end = engine.outputs(inputs, target, args)
        with torch.no_grad():
            if target.k is not None:  # [n, K, ...] attributions: one sum per (example, target)
                attr_sum = row_sums(tuple(a.flatten(0, 1) for a in attributions)).reshape(f_end.shape)
            else:
                attr_sum = row_sums(attributions)
            return attr_sum - (f_end - f_start).to(attr_sum.dtype)


def per_target_examples(inputs: tuple, baselines: tuple, target: Target, args: tuple) -> tuple:
    """K targets per example as ``n * K`` examples of one target each (example-major), for paths that depend on
    the target (Guided IG): (inputs, baselines, target, args) repeated K times per example."""
    k, n = target.k, target.n
    xs = tuple(x.repeat_interleave(k, dim=0) for x in inputs)
    bs = tuple(b.repeat_interleave(k, dim=0) if b.shape[0] == n and n > 1 else b for b in baselines)
    args = tuple(a.repeat_interleave(k, dim=0) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n
                 else a for a in args)
    return xs, bs, target.per_pair(), args


def per_target_results(values: tuple[torch.Tensor, ...], k: int) -> tuple[torch.Tensor, ...]:
    """[n * K, ...] results of :func:`per_target_examples` back as [n, K, ...]."""
    return tuple(v.reshape((v.shape[0] // k, k) + tuple(v.shape[1:])) for v in values)
