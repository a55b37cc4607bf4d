"""DeepLIFT with the Rescale rule (Shrikumar et al. 2017), a drop-in for ``captum.attr.DeepLift``.

How it works. Inputs and baselines go through the model together, as one batch ``[inputs; baselines]`` (as
Captum does). While ``attribute()`` runs, each supported non-linear module of the model has its ``forward``
replaced by an explicit autograd function that computes the same values and whose backward pass applies the
DeepLIFT multipliers instead of the local gradient:

- element-wise non-linearities (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus):
  ``grad_out * delta_out / delta_in``, or the ordinary gradient where ``|delta_in| < eps`` (Captum's rule);
- Softmax: the same, then minus its mean (Captum subtracts the mean over the whole batch, which makes an example's
  attribution depend on the other examples; fastig subtracts it per example: the numbers agree for one example);
- MaxPool1d/2d/3d: Captum's rule, which routes ``grad_out`` times the difference of the pooled outputs through
  the max positions of both the input and the baseline and divides by ``delta_in`` (``maxpool_accumulate``
  fixes its overlapping-window loss).

Linear layers (Conv, Linear, BatchNorm in eval mode, average pools, additions) keep their ordinary gradients, which
is what the Rescale rule asks of them. The gradient of the explained outputs of *both* halves of the batch flows
back, as in Captum (the baseline half matters at max pools).

Better than Captum where the model reuses a module: Captum stores a module's input and output on the module,
so a module called twice in one forward pass (torchvision's ResNet blocks call one ``nn.ReLU`` twice) makes it
fail with a RuntimeError. Here every call builds its own autograd node with its own saved tensors, so reuse is
correct. Captum also loses multipliers where two supported modules follow each other directly (a ReLU whose
output tensor goes straight into a MaxPool): its ReLU hook reads the gradient at its output *before* the max-pool
hook has replaced it, so on such models (ResNet's stem: ``relu -> maxpool``) Captum's sum(attributions) misses
f(inputs) - f(baselines); fastig applies the rules as documented and the sum matches. Where no two supported
modules are adjacent, fastig and Captum agree to the last bit in tests. Functional non-linearities (``F.relu`` in a model's ``forward``) are not modules and keep their ordinary
gradients, as in Captum.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastig.attr._base import Attribution
from fastig.attr._inputs import format_baselines, format_inputs, format_output, row_sums
from fastig.core.engine import Engine
from fastig.core.targets import Target, args_for_batch, format_additional_args


def _halves_diff(t: torch.Tensor) -> torch.Tensor:
    """[x; x_ref] -> [x - x_ref; x - x_ref]: the difference from reference, for both halves of the batch."""
    first, second = t.chunk(2)
    diff = first - second
    return torch.cat([diff, diff])


def _local_grad(fn: Callable, z: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The ordinary vector-Jacobian product of ``fn`` at ``z`` (used where ``|delta_in| < eps``)."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf), leaf, grad_out)
    return grad


class _Rescale(torch.autograd.Function):
    """y = fn(z) forward; DeepLIFT Rescale multipliers backward (Captum's ``nonlinear`` and ``softmax`` rules)."""

    @staticmethod
    def forward(ctx, z, fn, eps, center):
        y = fn(z)
        ctx.save_for_backward(z, y)
        ctx.fn, ctx.eps, ctx.center = fn, eps, center
        return y

    @staticmethod
    def backward(ctx, grad_out):
        z, y = ctx.saved_tensors
        delta_in, delta_out = _halves_diff(z), _halves_diff(y)
        near = delta_in.abs() < ctx.eps
        grad = grad_out * delta_out / delta_in
        if near.any():
            grad = torch.where(near, _local_grad(ctx.fn, z, grad_out), grad)
        if ctx.center:  # softmax: remove the mean, per example over both halves (see the module docstring)
            first, second = grad.chunk(2)
            mean = (first.flatten(1).sum(1) + second.flatten(1).sum(1)) / (2 * first[0].numel())
            mean = torch.cat([mean, mean]).reshape((-1,) + (1,) * (grad.dim() - 1))
            grad = grad - mean
        return grad, None, None, None


_UNPOOL = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}
_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class _RescaleMaxPool(torch.autograd.Function):
    """Max pooling forward; Captum's DeepLIFT max-pool multipliers backward."""

    @staticmethod
    def forward(ctx, z, module, dims, eps, accumulate):
        y, indices = _POOL[dims](
            z, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, True
        )
        ctx.save_for_backward(z, y, indices)
        ctx.module, ctx.dims, ctx.eps, ctx.accumulate = module, dims, eps, accumulate
        return y

    @staticmethod
    def backward(ctx, grad_out):
        z, y, indices = ctx.saved_tensors
        m = ctx.module
        out, out_ref = y.chunk(2)
        cross_max = torch.max(out, out_ref)
        # the input half credits its max positions with (max(out, out_ref) - out_ref), the baseline half its own
        # max positions with (out - max(out, out_ref)); the two halves' results are summed (Captum's rule)
        delta_out = torch.cat([cross_max - out_ref, out - cross_max])
        credit = grad_out * delta_out
        if ctx.accumulate:  # a position that is the max of several windows gets all their credits
            unpooled = _scatter_add(credit, indices, z)
        else:  # Captum: unpooling writes one window's credit per position (the last one wins)
            unpooled = _UNPOOL[ctx.dims](credit, indices, m.kernel_size, m.stride, m.padding, list(z.shape))
        first, second = unpooled.chunk(2)
        summed = first + second
        summed = torch.cat([summed, summed])
        delta_in = _halves_diff(z)
        near = delta_in.abs() < ctx.eps
        grad = summed / delta_in
        if near.any():
            # the ordinary max-pool gradient: grad_out added at each window's max position
            grad = torch.where(near, _scatter_add(grad_out, indices, z), grad)
        return grad, None, None, None, None


def _scatter_add(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Add pooled ``values`` back at their (per-plane flat) max ``indices``: the ordinary max-pool gradient."""
    out = torch.zeros_like(like).flatten(2)
    return out.scatter_add_(2, indices.flatten(2), values.flatten(2)).view_as(like)


_ELEMENTWISE = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)
_MAXPOOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
SUPPORTED_NON_LINEAR = _ELEMENTWISE + (nn.Softmax,) + tuple(_MAXPOOL_DIMS)


def _function_of(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's function, never in place (its input is saved for the backward pass)."""
    kind = type(module)
    if kind is nn.ReLU:
        return F.relu
    if kind is nn.ELU:
        return lambda z: F.elu(z, module.alpha)
    if kind is nn.LeakyReLU:
        return lambda z: F.leaky_relu(z, module.negative_slope)
    if kind is nn.Softplus:
        return lambda z: F.softplus(z, module.beta, module.threshold)
    if kind is nn.Softmax:
        return lambda z: F.softmax(z, module.dim)
    return {nn.Sigmoid: torch.sigmoid, nn.Tanh: torch.tanh}[kind]


def _rescale_forward(module: nn.Module, eps: float, accumulate: bool) -> Callable:
    if type(module) in _MAXPOOL_DIMS:
        dims = _MAXPOOL_DIMS[type(module)]

        def forward(z):
            if module.return_indices:
                raise ValueError("DeepLift does not support MaxPool modules with return_indices=True")
            return _RescaleMaxPool.apply(z, module, dims, eps, accumulate)

        return forward
    fn = _function_of(module)
    center = type(module) is nn.Softmax
    return lambda z: _Rescale.apply(z, fn, eps, center)


@contextlib.contextmanager
def rescale_rules(model: nn.Module, eps: float, maxpool_accumulate: bool = False) -> Iterator[None]:
    """While active, the supported non-linear modules of ``model`` backpropagate DeepLIFT multipliers.

    Modules are matched by exact type, as in Captum. Each module's ``forward`` is shadowed by an instance
    attribute and restored on exit, whatever happens.
    """
    patched = []
    try:
        for module in model.modules():
            if type(module) in SUPPORTED_NON_LINEAR and "forward" not in vars(module):
                module.forward = _rescale_forward(module, eps, maxpool_accumulate)
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


class DeepLift(Attribution):
    """DeepLIFT (Rescale rule) attributions, with Captum's constructor, ``attribute()`` and numbers.

    Args:
        model: the ``nn.Module`` to explain.
        multiply_by_inputs: multiply the multipliers by ``inputs - baselines`` (global attribution); when False the
            multipliers themselves are returned (local attribution). Ignored with ``custom_attribution_func``.
        eps: where ``|input - baseline|`` of a non-linearity is below ``eps``, its ordinary gradient is used
            instead of the ratio of differences.
        maxpool_accumulate: (fastig only) where max-pool windows overlap (ResNet's 3x3 stride-2 pool), add the
            credits of all windows that pick the same position. Captum unpools instead, which keeps only one
            window's credit per position, so sum(attributions) misses f(inputs) - f(baselines) by what was
            dropped; True restores the summation-to-delta property. Default False: Captum's numbers.

    The convergence delta ``sum(attributions) - (f(inputs) - f(baselines))`` reuses the outputs of the joint
    forward pass (Captum runs two more forward passes for it).
    """

    _has_convergence_delta = True

    def __init__(
        self, model: nn.Module, multiply_by_inputs: bool = True, eps: float = 1e-10, *, maxpool_accumulate: bool = False
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"DeepLift needs an nn.Module (its modules carry the rules), got {type(model).__name__}")
        if not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.model = model
        self.eps = eps
        self.maxpool_accumulate = maxpool_accumulate
        self._multiply_by_inputs = multiply_by_inputs

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
        xs, is_tuple = format_inputs(inputs)
        for i, x in enumerate(xs):
            if not x.is_floating_point():
                raise TypeError(f"inputs[{i}] must be a floating-point tensor, got {x.dtype}")
        bs = tuple(b.expand_as(x) for b, x in zip(format_baselines(baselines, xs), xs))
        n = xs[0].shape[0]
        tgt = Target(target, n).for_batch(slice(0, n), 2)
        args = args_for_batch(format_additional_args(additional_forward_args), n, slice(0, n), 2)

        with torch.enable_grad(), rescale_rules(self.model, self.eps, self.maxpool_accumulate):
            leaves = tuple(x.detach().requires_grad_() for x in xs)
            joint = tuple(torch.cat([x, b.detach()]) for x, b in zip(leaves, bs))
            outputs = tgt.select(Engine(self.model).call(joint, args))
            multipliers = torch.autograd.grad(outputs, leaves, torch.ones_like(outputs), allow_unused=True)
        multipliers = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, multipliers))

        if custom_attribution_func is not None:
            attributions = _call_custom(custom_attribution_func, multipliers, xs, bs)
        elif self._multiply_by_inputs:
            attributions = tuple((x - b) * g for x, b, g in zip(xs, bs, multipliers))
        else:
            attributions = multipliers
        result = format_output(attributions, is_tuple)
        if not return_convergence_delta:
            return result
        with torch.no_grad():
            f_in, f_base = outputs.detach().chunk(2)
            attr_sum = row_sums(attributions)
            delta = attr_sum - (f_in - f_base).to(attr_sum.dtype)
        return result, delta


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
