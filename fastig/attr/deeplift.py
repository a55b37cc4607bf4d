"""DeepLIFT with the Rescale rule (Shrikumar et al. 2017), a drop-in for ``captum.attr.DeepLift``.

How it works. Inputs and baselines go through the model together, as one batch ``[inputs; baselines]`` (as
Captum does), under the rescale rule set of :mod:`fastig.attr.rules` (``rules.RESCALE`` with this object's
``eps``): every supported non-linearity -- module or functional call -- is evaluated by an explicit autograd
function that computes the same values and whose backward pass applies the DeepLIFT multipliers instead of the
local gradient (the model itself is not modified):

- element-wise non-linearities (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus):
  ``grad_out * delta_out / delta_in``, or the ordinary gradient where ``|delta_in| < eps`` (Captum's rule);
- Softmax: the same, then minus its mean (Captum subtracts the mean over the whole batch, which makes an example's
  attribution depend on the other examples; fastig subtracts it per example: the numbers agree for one example);
- MaxPool1d/2d/3d: Captum's rule, which routes ``grad_out`` times the difference of the pooled outputs through
  the max positions of both the input and the baseline and divides by ``delta_in``; where windows overlap
  (ResNet's 3x3 stride-2 pool) a position that is the max of several windows gets the credits of all of them.

Linear layers (Conv, Linear, BatchNorm in eval mode, average pools, additions) keep their ordinary gradients, which
is what the Rescale rule asks of them. The gradient of the explained outputs of *both* halves of the batch flows
back, as in Captum (the baseline half matters at max pools).

Where fastig and Captum differ, fastig keeps summation-to-delta (sum(attributions) = f(inputs) - f(baselines))
and Captum does not; everywhere else the numbers agree (to float32 rounding in tests):

- a module called twice in one forward pass (torchvision's ResNet blocks call one ``nn.ReLU`` twice): Captum
  stores a module's input and output on the module and fails with a RuntimeError; here every call builds its
  own autograd node with its own saved tensors;
- overlapping max-pool windows: Captum unpools the credits, which keeps one window's credit per position and
  drops the others (its delta is off by a few percent of f(inputs) - f(baselines)); fastig adds them;
- two supported modules that follow each other directly (``relu -> maxpool`` as in ResNet's stem,
  ``maxpool -> relu``): Captum's tensor hooks on the shared tensor run in registration order, so one module
  reads the *ordinary* gradient of the other instead of its DeepLIFT multipliers (a ReLU feeding a pool makes the
  pool fall back to its plain gradient, which sums correctly only where the baseline is constant over each
  window, e.g. an all-zero image); fastig applies both modules' rules.

Functional non-linearities (``F.relu``, ``torch.sigmoid``, ``F.max_pool2d`` ... in a model's ``forward``) get the
rule too, which Captum's module hooks miss (their ordinary gradients break summation-to-delta there); on models
whose non-linearities are all modules, the numbers are Captum's. Every such call is taken to run on the paired
batch (dim 0 = ``[inputs; baselines]``), as in any usual model; a non-linearity applied to a tensor without a
batch dimension (a parameter, say) would be mis-paired. Max-pool modules with ``return_indices=True`` are
supported.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch
from torch import nn

from fastig.attr import rules as backward_rules
from fastig.attr._base import Attribution
from fastig.core.inputs import format_baselines, format_inputs, format_output, row_sums
from fastig.attr._path_common import convergence_delta
from fastig.attr.gradients import baseline_distribution
from fastig.core.engine import Engine
from fastig.core.targets import (
    Target,
    args_for_batch,
    expand_additional_args,
    expand_target,
    format_additional_args,
)
from fastig.errors import check_int

# the modules whose functions the rescale rule covers (their functional forms too: F.relu, torch.sigmoid, ...)
SUPPORTED_NON_LINEAR = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax, nn.MaxPool1d,
                        nn.MaxPool2d, nn.MaxPool3d)


class DeepLift(Attribution):
    """DeepLIFT (Rescale rule) attributions, with Captum's constructor, ``attribute()``,
    ``compute_convergence_delta()`` and numbers (see the module docstring for where fastig keeps
    summation-to-delta and Captum does not).

    Args:
        model: the ``nn.Module`` to explain (also ``forward_func``, as in Captum).
        multiply_by_inputs: multiply the multipliers by ``inputs - baselines`` (global attribution); when False the
            multipliers themselves are returned (local attribution). Ignored with ``custom_attribution_func``.
        eps: where ``|input - baseline|`` of a non-linearity is below ``eps``, its ordinary gradient is used
            instead of the ratio of differences.

    The convergence delta ``sum(attributions) - (f(inputs) - f(baselines))`` of ``return_convergence_delta=True``
    reuses the outputs of the joint forward pass (Captum runs two more forward passes for it).
    """

    _has_convergence_delta = True

    def __init__(self, model: nn.Module, multiply_by_inputs: bool = True, eps: float = 1e-10) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs an nn.Module, got {type(model).__name__}")
        if not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.model = self.forward_func = model
        self.eps = eps
        self._multiply_by_inputs = multiply_by_inputs
        self._rules = dataclasses.replace(backward_rules.RESCALE, rescale_eps=eps)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        custom_attribution_func: Callable | None = None,
    ) -> Any:
        xs, is_tuple = self._inputs(inputs)
        bs = tuple(b.expand_as(x) for b, x in zip(format_baselines(baselines, xs), xs))
        n = xs[0].shape[0]
        attributions, delta = self._attribute_rows(
            xs, bs, Target(target, n), format_additional_args(additional_forward_args), custom_attribution_func,
            return_convergence_delta,
        )
        result = format_output(attributions, is_tuple)
        return (result, delta) if return_convergence_delta else result

    def compute_convergence_delta(
        self, attributions: Any, start_point: Any, end_point: Any, target: Any = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        """``sum(attributions) - (f(end_point) - f(start_point))`` per example, from two plain forward passes of
        the model (Captum's ``compute_convergence_delta``)."""
        return convergence_delta(self.model, attributions, start_point, end_point, target, additional_forward_args)

    @staticmethod
    def _inputs(inputs: Any) -> tuple[tuple[torch.Tensor, ...], bool]:
        xs, is_tuple = format_inputs(inputs)
        for i, x in enumerate(xs):
            if not x.is_floating_point():
                raise TypeError(f"inputs[{i}] must be a floating-point tensor, got {x.dtype}")
        return xs, is_tuple

    def _attribute_rows(self, xs, bs, target: Target, args: tuple, custom_attribution_func, want_delta: bool):
        """Attributions (and deltas) of rows ``xs`` against baselines ``bs`` (same shapes): one joint pass."""
        n = xs[0].shape[0]
        tgt = target.for_batch(slice(0, n), 2)
        joint_args = args_for_batch(args, n, slice(0, n), 2)
        with torch.enable_grad(), backward_rules.applied(self._rules):
            leaves = tuple(x.detach().requires_grad_() for x in xs)
            joint = tuple(torch.cat([x, b.detach()]) for x, b in zip(leaves, bs))
            outputs = tgt.select(Engine(self.model).call(joint, joint_args))
            multipliers = torch.autograd.grad(outputs, leaves, torch.ones_like(outputs), allow_unused=True)
        multipliers = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, multipliers))

        if custom_attribution_func is not None:
            attributions = _call_custom(custom_attribution_func, multipliers, xs, bs)
        elif self._multiply_by_inputs:
            attributions = tuple((x - b) * g for x, b, g in zip(xs, bs, multipliers))
        else:
            attributions = multipliers
        if not want_delta:
            return attributions, None
        with torch.no_grad():
            f_in, f_base = outputs.detach().chunk(2)
            attr_sum = row_sums(attributions)
            return attributions, attr_sum - (f_in - f_base).to(attr_sum.dtype)


class DeepLiftShap(DeepLift):
    """DeepLIFT SHAP (Lundberg & Lee 2017): DeepLift of every input against every row of a baseline distribution,
    averaged over the baselines (the SHAP values of the linearized model).

    Drop-in for ``captum.attr.DeepLiftShap``: same constructor, ``attribute()`` (``baselines`` a tensor [B, ...]
    with B > 1, a tuple of them, or a function returning them) and numbers; the convergence delta has one entry
    per (example, baseline) pair, example-major, as in Captum. Extra keyword ``internal_batch_size``: how many
    (example, baseline) pairs go through one joint forward/backward pass (Captum runs all ``N * B`` at once;
    None does the same); attributions do not depend on it.
    """

    def __init__(self, model: nn.Module, multiply_by_inputs: bool = True) -> None:
        super().__init__(model, multiply_by_inputs=multiply_by_inputs)

    def attribute(
        self,
        inputs: Any,
        baselines: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        custom_attribution_func: Callable | None = None,
        *,
        internal_batch_size: int | None = None,
    ) -> Any:
        check_int("internal_batch_size", internal_batch_size, none_ok=True)
        xs, is_tuple = self._inputs(inputs)
        distribution = baseline_distribution(baselines, inputs, xs, "DeepLiftShap", at_least=2)
        n, n_base = xs[0].shape[0], distribution[0].shape[0]
        rows = n * n_base
        # Captum's pairing: example i with every baseline, example-major
        expanded = tuple(x.repeat_interleave(n_base, dim=0) for x in xs)
        references = tuple(b.repeat((n,) + (1,) * (b.dim() - 1)) for b in distribution)
        target_rows = Target(expand_target(target, n_base), rows)
        args_rows = format_additional_args(expand_additional_args(additional_forward_args, n_base))

        size = rows if internal_batch_size is None else internal_batch_size
        parts, deltas = [], []
        for start in range(0, rows, size):
            part = slice(start, min(start + size, rows))
            attributions, delta = self._attribute_rows(
                tuple(x[part] for x in expanded), tuple(b[part] for b in references),
                target_rows.for_batch(part, 1), args_for_batch(args_rows, rows, part, 1), custom_attribution_func,
                return_convergence_delta,
            )
            parts.append(attributions)
            deltas.append(delta)
        attributions = tuple(  # the mean over each example's baselines
            torch.cat(chunks).reshape((n, n_base) + tuple(x.shape[1:])).mean(dim=1)
            for chunks, x in zip(zip(*parts), xs)
        )
        result = format_output(attributions, is_tuple)
        return (result, torch.cat(deltas)) if return_convergence_delta else result


def _call_custom(func: Callable, multipliers: tuple, inputs: tuple, baselines: tuple) -> tuple:
    """Captum's convention: the function takes (multipliers), (multipliers, inputs) or (+ baselines)."""
    if not callable(func):
        raise TypeError(f"custom_attribution_func must be callable, got {type(func).__name__}")
    n_params = len(inspect.signature(func).parameters)
    if n_params == 1:
        out = func(multipliers)
    elif n_params == 2:
        out = func(multipliers, inputs)
    elif n_params == 3:
        out = func(multipliers, inputs, baselines)
    else:
        raise ValueError(f"custom_attribution_func must take 1 to 3 arguments, it takes {n_params}")
    return out if isinstance(out, tuple) else (out,)
