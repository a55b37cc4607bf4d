"""Captum's layer attributions: LayerActivation, LayerGradientXActivation, LayerGradCam, LayerIntegratedGradients,
and GuidedGradCam (guided backprop times an upsampled Grad-CAM), as drop-ins with Captum's signatures and numbers.

The layer is a module of the model (or, when ``forward_func`` is an ``nn.Module``, its dotted name). A forward
hook records the layer's output (a forward pre-hook its input, with ``attribute_to_layer_input=True``) as leaf
tensors and hands the rest of the network clones of them, so gradients are taken w.r.t. the layer and the backward
pass stops there. A layer returning (or taking) several tensors gives a tuple of attributions, one per tensor, as
in Captum.

``LayerIntegratedGradients`` integrates, as Captum does, along the straight line from the layer's value at the
baselines to its value at the inputs (in the layer's space), with the model's forward pass run on the original
inputs and the layer's value replaced by each path point. Unlike Captum, which concatenates all ``n_steps`` copies
of the inputs and of the layer values into one batch (unless ``internal_batch_size`` is given), the points go
through fastig's engine a batch at a time.

Not supported (a clear error): a list of layers (Captum's multi-layer form), layers called more than once per
forward pass, and ``grad_kwargs`` for LayerIntegratedGradients. ``device_ids`` is accepted and kept, for
signature compatibility; DataParallel models are not supported.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastig.attr._base import Attribution
from fastig.core.inputs import format_baselines, format_inputs, format_output
from fastig.attr._layers import capture, check_layer, substitute
from fastig.attr._path_common import PathAttribution, check_flag
from fastig.attr.guided import GuidedBackprop
from fastig.core import progress, quadrature
from fastig.core.engine import CPU_BATCH_BYTES, Engine, integrate
from fastig.core.paths import StraightLine
from fastig.core.targets import Target, format_additional_args


def layer_values(forward_func: Callable, layer: torch.nn.Module, inputs: tuple, args: tuple,
                 to_input: bool = False) -> tuple[torch.Tensor, ...]:
    """The layer's output (or inputs) on one forward pass, without gradients."""
    with torch.no_grad(), capture(layer, to_input) as found:
        forward_func(*inputs, *args)
    progress.pulse()
    return tuple(v.detach() for v in found[0])


def layer_gradients(forward_func: Callable, layer: torch.nn.Module, inputs: tuple, target: Any, args: tuple,
                    to_input: bool = False, grad_kwargs: dict | None = None
                    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """One forward and one backward pass: (gradients of the explained outputs w.r.t. the layer, layer values)."""
    with torch.enable_grad():
        with capture(layer, to_input) as found:
            scores = Target(target, inputs[0].shape[0]).select(forward_func(*inputs, *args))
        leaves = found[0]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = torch.autograd.grad(scores, wanted, grad_outputs=torch.ones_like(scores), allow_unused=True,
                                    **(grad_kwargs or {}))
    progress.pulse()
    by_leaf = iter(grads)
    grads = tuple((next(by_leaf) if leaf.requires_grad else None) for leaf in leaves)
    grads = tuple(torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads))
    return grads, tuple(leaf.detach() for leaf in leaves)


def interpolate(layer_attribution: torch.Tensor, interpolate_dims: Any, interpolate_mode: str = "nearest") -> torch.Tensor:
    """Captum's ``LayerAttribution.interpolate``: resize a [N, C, ...] layer attribution to ``interpolate_dims``."""
    return F.interpolate(layer_attribution, interpolate_dims, mode=interpolate_mode)


class _LayerAttribution(Attribution):
    """The model, the layer and Captum's ``device_ids`` (kept, unused)."""

    def __init__(self, forward_func: Callable, layer: Any, device_ids: list[int] | None = None) -> None:
        super().__init__(forward_func)
        self.layer = check_layer(forward_func, layer)
        self.device_ids = device_ids

    interpolate = staticmethod(interpolate)


class LayerActivation(_LayerAttribution):
    """The layer's output (or input) for the given inputs. Drop-in for ``captum.attr.LayerActivation``."""

    multiplies_by_inputs = True

    def attribute(self, inputs: Any, additional_forward_args: Any = None, attribute_to_layer_input: bool = False) -> Any:
        xs, _ = format_inputs(inputs)
        check_flag("attribute_to_layer_input", attribute_to_layer_input)
        values = layer_values(self.forward_func, self.layer, xs, format_additional_args(additional_forward_args),
                              attribute_to_layer_input)
        return format_output(values, len(values) > 1)


class LayerGradientXActivation(_LayerAttribution):
    """Gradient of the explained output w.r.t. the layer times the layer's value (Captum's
    ``LayerGradientXActivation``; ``multiply_by_inputs=False`` gives the gradient alone). One forward and one
    backward pass that stops at the layer. ``memory_efficient=True`` returns the result on the CPU, as Captum's
    offloading does."""

    def __init__(self, forward_func: Callable, layer: Any, device_ids: list[int] | None = None,
                 multiply_by_inputs: bool = True, memory_efficient: bool = False) -> None:
        super().__init__(forward_func, layer, device_ids)
        self._multiply_by_inputs = multiply_by_inputs
        self._memory_efficient = memory_efficient

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute(self, inputs: Any, target: Any = None, additional_forward_args: Any = None,
                  attribute_to_layer_input: bool = False, grad_kwargs: dict | None = None) -> Any:
        xs, _ = format_inputs(inputs)
        check_flag("attribute_to_layer_input", attribute_to_layer_input)
        grads, values = layer_gradients(self.forward_func, self.layer, xs, target,
                                        format_additional_args(additional_forward_args), attribute_to_layer_input,
                                        grad_kwargs)
        if self._memory_efficient:
            grads, values = tuple(g.cpu() for g in grads), tuple(v.cpu() for v in values)
        result = tuple(g * v if self._multiply_by_inputs else g for g, v in zip(grads, values))
        return format_output(result, len(result) > 1)


class LayerGradCam(_LayerAttribution):
    """Grad-CAM (Selvaraju et al. 2017) at a layer: the layer's channels weighted by their spatially averaged
    gradients and summed over channels (``attr_dim_summation=False`` keeps the channels), optionally ReLU'd.
    Returns [N, 1, *spatial] at the layer's resolution; ``LayerGradCam.interpolate`` upsamples it.
    Drop-in for ``captum.attr.LayerGradCam``."""

    def attribute(self, inputs: Any, target: Any = None, additional_forward_args: Any = None,
                  attribute_to_layer_input: bool = False, relu_attributions: bool = False,
                  attr_dim_summation: bool = True, grad_kwargs: dict | None = None) -> Any:
        xs, _ = format_inputs(inputs)
        for name, flag in (("attribute_to_layer_input", attribute_to_layer_input),
                           ("relu_attributions", relu_attributions), ("attr_dim_summation", attr_dim_summation)):
            check_flag(name, flag)
        grads, values = layer_gradients(self.forward_func, self.layer, xs, target,
                                        format_additional_args(additional_forward_args), attribute_to_layer_input,
                                        grad_kwargs)
        result = []
        for g, v in zip(grads, values):
            weights = g.mean(dim=tuple(range(2, g.dim())), keepdim=True) if g.dim() > 2 else g
            cam = (weights * v).sum(1, keepdim=True) if attr_dim_summation else weights * v
            result.append(F.relu(cam) if relu_attributions else cam)
        return format_output(tuple(result), len(result) > 1)


class _LayerSubstituted:
    """``f(layer values..., inputs..., args...)``: the model on the original inputs with the layer's value replaced
    by the given one, so that the engine's path can run in the layer's space."""

    def __init__(self, forward_func: Callable, layer: torch.nn.Module, n_values: int, to_input: bool):
        self.forward_func, self.layer, self.n_values, self.to_input = forward_func, layer, n_values, to_input

    def __call__(self, *tensors):
        values, rest = tensors[: self.n_values], tensors[self.n_values:]
        with substitute(self.layer, tuple(values), self.to_input):
            return self.forward_func(*rest)


class LayerIntegratedGradients(PathAttribution):
    """Integrated Gradients w.r.t. a layer's output (or input), as ``captum.attr.LayerIntegratedGradients``: the
    path runs from the layer's value at ``baselines`` to its value at ``inputs``; the attributions are the
    quadrature of the gradients along it, times the difference of the two values (``multiply_by_inputs=True``).

    Same signature, defaults and numbers as Captum. The path points stream through fastig's engine:
    ``internal_batch_size`` counts points per model call as in Captum, and None lets the engine choose (on the CPU a
    batch of about 8 MiB of layer values plus inputs; on CUDA all points at once, halving on out-of-memory).
    ``grad_kwargs`` must be None. The convergence delta compares the attributions' sum with
    f(inputs) - f(baselines), as Captum's does.
    """

    def __init__(self, forward_func: Callable, layer: Any, device_ids: list[int] | None = None,
                 multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
        self.layer = check_layer(forward_func, layer)
        self.device_ids = device_ids
        self._multiply_by_inputs = multiply_by_inputs

    interpolate = staticmethod(interpolate)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute(self, inputs: Any, baselines: Any = None, target: Any = None, additional_forward_args: Any = None,
                  n_steps: int = 50, method: str = "gausslegendre", internal_batch_size: int | None = None,
                  return_convergence_delta: bool = False, attribute_to_layer_input: bool = False,
                  grad_kwargs: dict | None = None) -> Any:
        check_flag("return_convergence_delta", return_convergence_delta)
        check_flag("attribute_to_layer_input", attribute_to_layer_input)
        if grad_kwargs is not None:
            raise ValueError("grad_kwargs is not supported by fastig's LayerIntegratedGradients (it must be None)")
        xs, _ = format_inputs(inputs)
        bs = format_baselines(baselines, xs)
        rule = quadrature.named_rule(method, n_steps)
        args = format_additional_args(additional_forward_args)
        n = xs[0].shape[0]
        at_inputs = layer_values(self.forward_func, self.layer, xs, args, attribute_to_layer_input)
        at_baselines = layer_values(self.forward_func, self.layer, tuple(b.expand_as(x) for b, x in zip(bs, xs)),
                                    args, attribute_to_layer_input)
        for v in at_inputs:
            if not v.is_floating_point() or v.dim() == 0 or v.shape[0] != n:
                raise ValueError(f"the layer's value must be floating point with one row per example ({n}), got "
                                 f"{v.dtype} of shape {tuple(v.shape)}")
        tgt = Target(target, n)
        if internal_batch_size is None and xs[0].device.type != "cuda":
            row_bytes = sum(t[0].numel() * t.element_size() for t in at_inputs + xs)
            internal_batch_size = max(1, math.ceil(CPU_BATCH_BYTES / max(row_bytes, 1)))
        engine = Engine(_LayerSubstituted(self.forward_func, self.layer, len(at_inputs), attribute_to_layer_input),
                        internal_batch_size)
        totals, _ = integrate(engine, StraightLine(at_inputs, at_baselines, rule.alphas), rule.weights, tgt,
                              xs + args)
        attributions = tuple(
            (total * (v - b) if self._multiply_by_inputs else total).to(v.dtype)
            for total, v, b in zip(totals, at_inputs, at_baselines)
        )
        result = format_output(attributions, len(attributions) > 1)
        if not return_convergence_delta:
            return result
        return result, self._delta(Engine(self.forward_func), attributions, xs, bs, tgt, args)


class GuidedGradCam(Attribution):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the ReLU'd Grad-CAM of ``layer``,
    upsampled to each input's spatial size (``interpolate_mode``, nearest by default). Drop-in for
    ``captum.attr.GuidedGradCam``; like Captum, an input whose size the map cannot be interpolated to gets an empty
    tensor and a warning. The guided backpropagation is fastig's, which also covers functional ReLUs (see
    :mod:`fastig.attr.guided`); on models whose ReLUs are modules the numbers are Captum's."""

    multiplies_by_inputs = False

    def __init__(self, model: torch.nn.Module, layer: Any, device_ids: list[int] | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"GuidedGradCam needs a torch.nn.Module, got {type(model).__name__}")
        super().__init__(model)
        self.grad_cam = LayerGradCam(model, layer, device_ids)
        self.guided_backprop = GuidedBackprop(model)

    def attribute(self, inputs: Any, target: Any = None, additional_forward_args: Any = None,
                  interpolate_mode: str = "nearest", attribute_to_layer_input: bool = False) -> Any:
        xs, is_tuple = format_inputs(inputs)
        cam = self.grad_cam.attribute(xs, target, additional_forward_args, attribute_to_layer_input,
                                      relu_attributions=True)
        if isinstance(cam, tuple):
            raise ValueError("GuidedGradCam needs a layer with a single input/output tensor, this one has "
                             f"{len(cam)}")
        guided = self.guided_backprop.attribute(xs, target, additional_forward_args)
        guided = guided if isinstance(guided, tuple) else (guided,)
        result = []
        for i, (x, g) in enumerate(zip(xs, guided)):
            try:
                result.append(g * interpolate(cam, tuple(x.shape[2:]), interpolate_mode))
            except Exception as e:  # noqa: BLE001 - Captum's behaviour: an empty attribution and a warning
                warnings.warn(f"could not interpolate the Grad-CAM map to inputs[{i}] of shape {tuple(x.shape)} "
                              f"({e}); returning an empty tensor for it", stacklevel=2)
                result.append(torch.empty(0))
        return format_output(tuple(result), is_tuple)
