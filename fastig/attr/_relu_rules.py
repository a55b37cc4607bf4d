"""Modified backward rules for ReLUs and max-pooling: guided backpropagation, deconvnet, guided max-pooling.

The rules are explicit autograd functions. They are put in place by :func:`relu_rules`, a context manager built on
``torch.overrides.TorchFunctionMode``: while it is active, every ReLU evaluated by PyTorch's Python API goes through
the rule -- ``nn.ReLU`` modules, and also the functional calls ``torch.relu``, ``F.relu``, ``Tensor.relu`` and their
in-place forms (googlenet and inception call ``F.relu`` inside ``forward``; Captum's module hooks miss those). The
model itself is never modified: no attribute, hook or submodule is touched, so there is nothing to restore, and
leaving the ``with`` block (normally or by an exception) removes the rules.

Rules (``g`` is the gradient arriving at the ReLU's output, ``x`` its input):

- ``"guided"`` (guided backpropagation, Springenberg et al. 2015): ``g * (x > 0) * (g > 0)``
- ``"deconv"`` (deconvnet, Zeiler & Fergus 2014): ``g * (g > 0)``, whatever the sign of ``x``
- ``positive_maxpool=True``: max-pooling passes back only the positive part of ``g`` (to the arg-max positions),
  the max-pooling rule of guided non-linearity IG (Kwon et al. 2020).

Not covered (plain gradients flow there): ReLUs written as ``clamp(min=0)``/``threshold``/``where``, ReLUs inside
TorchScript or ``torch.compile``d code, and ReLUs fused inside a single native op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

RULES = ("guided", "deconv")

_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_RELUS_INPLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
_MAX_POOLS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
}


class _GuidedReLU(torch.autograd.Function):
    """relu(x); backward passes ``g`` where both ``x > 0`` and ``g > 0``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        out = x.clamp_(min=0) if inplace else x.clamp(min=0)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)  # out > 0 exactly where x > 0
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0), None


class _DeconvReLU(torch.autograd.Function):
    """relu(x); backward passes the positive part of ``g``, ignoring the sign of ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(min=0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(min=0), None


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward keeps only the positive part of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # a copy, not a view: the model may modify the pooled output in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


class _RuleMode(TorchFunctionMode):
    def __init__(self, relu: str, positive_maxpool: bool):
        super().__init__()
        self.relu_function = _GuidedReLU if relu == "guided" else _DeconvReLU
        self.positive_maxpool = positive_maxpool

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS or func in _RELUS_INPLACE:
            x = args[0] if args else kwargs["input"]
            inplace = func in _RELUS_INPLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            if not torch.is_grad_enabled() or not x.requires_grad:  # nothing to differentiate: plain op
                return func(*args, **kwargs)
            return self.relu_function.apply(x, inplace)
        result = func(*args, **kwargs)
        if self.positive_maxpool and func in _MAX_POOLS and torch.is_grad_enabled():
            if isinstance(result, tuple):  # (values, indices)
                return (_PositiveGradient.apply(result[0]),) + tuple(result[1:])
            return _PositiveGradient.apply(result)
        return result


@contextlib.contextmanager
def relu_rules(relu: str = "guided", positive_maxpool: bool = False) -> Iterator[None]:
    """Within the block, ReLUs (modules and functional calls) backpropagate with ``relu`` (``"guided"`` or
    ``"deconv"``), and max-pooling passes back only positive gradients if ``positive_maxpool``."""
    if relu not in RULES:
        raise ValueError(f"unknown ReLU rule {relu!r}; expected one of {RULES}")
    with _RuleMode(relu, positive_maxpool):
        yield
