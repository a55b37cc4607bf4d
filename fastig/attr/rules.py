"""Modified backward rules for ReLUs and max-pooling (guided backpropagation, deconvnet, guided max-pooling), one
mechanism for every gradient and path method.

A rule set (:class:`Rules`) says what the backward pass of each kind of operation does; the forward pass is never
changed:

- ``relu``: ``"gradient"`` (the plain gradient), ``"guided"`` (guided backpropagation, Springenberg et al. 2015:
  ``g * (x > 0) * (g > 0)``, ``g`` being the gradient arriving at the ReLU's output and ``x`` its input) or
  ``"deconv"`` (deconvnet, Zeiler & Fergus 2014: ``g * (g > 0)``, whatever the sign of ``x``);
- ``max_pool``: ``"gradient"`` or ``"positive"`` (only the positive part of ``g`` is passed back, to the arg-max
  positions: the max-pooling rule of guided non-linearity IG, Kwon et al. 2020).

``rules=`` of the gradient and path methods (``IntegratedGradients``, ``GuidedIntegratedGradients``,
``BlurIntegratedGradients``, ``LatentIntegratedGradients``, ``Saliency``, ``InputXGradient``, ``GradientShap``,
and ``NoiseTunnel`` around them) takes a named set from :data:`RULE_SETS` -- ``"guided"`` (GuidedBackprop's),
``"deconv"`` (Deconvolution's), ``"gnl"`` (GuidedNonLinearityIG's: guided ReLUs and positive max-pooling) -- or a
:class:`Rules`, or a mapping of the same fields, to compose them: ``rules={"relu": "deconv", "max_pool":
"positive"}``. So ``IntegratedGradients(model).attribute(x, rules="gnl")`` is GNL-IG and
``BlurIntegratedGradients(model).attribute(x, rules="guided")`` is guided Blur IG. The attribution entry point
(:func:`fastig.attr._base.entry_point`) applies them; :func:`applied` is the same as a context manager.

The rules are explicit autograd functions, put in place by a ``torch.overrides.TorchFunctionMode``: while it is
active, every ReLU evaluated by PyTorch's Python API goes through the rule -- ``nn.ReLU`` modules, and also the
functional calls ``torch.relu``, ``F.relu``, ``Tensor.relu`` and their in-place forms (googlenet and inception call
``F.relu`` inside ``forward``; Captum's module hooks miss those) -- and so does every max-pooling (``nn.MaxPool*d``,
``F.max_pool*d``, with or without indices). The model itself is never modified: no attribute, hook or submodule is
touched, so there is nothing to restore, and leaving the block (normally or by an exception) removes the rules.

Not covered (plain gradients flow there): ReLUs written as ``clamp(min=0)``/``threshold``/``where``, ReLUs inside
TorchScript or ``torch.compile``d code, and ReLUs fused inside a single native op. DeepLIFT's rescale rule and
LRP's rules are not (yet) expressed as rule sets: :class:`~fastig.attr.DeepLift` and :class:`~fastig.attr.LRP`
implement them themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any, Iterator, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastig.errors import UnknownNameError

RELU_RULES = ("gradient", "guided", "deconv")
MAX_POOL_RULES = ("gradient", "positive")


@dataclasses.dataclass(frozen=True)
class Rules:
    """What ReLUs and max-poolings pass back (module docstring); every field defaults to the plain gradient."""

    relu: str = "gradient"
    max_pool: str = "gradient"

    def __post_init__(self) -> None:
        for field, choices in (("relu", RELU_RULES), ("max_pool", MAX_POOL_RULES)):
            value = getattr(self, field)
            if value not in choices:
                kind = "ReLU rule" if field == "relu" else "max-pooling rule"
                raise UnknownNameError(f"rules: unknown {kind} {field}={value!r}; choices: {', '.join(choices)}")

    @property
    def is_plain(self) -> bool:
        return self.relu == "gradient" and self.max_pool == "gradient"


RULE_SETS: dict[str, Rules] = {
    "guided": Rules(relu="guided"),  # GuidedBackprop
    "deconv": Rules(relu="deconv"),  # Deconvolution
    "gnl": Rules(relu="guided", max_pool="positive"),  # GuidedNonLinearityIG
}
RULE_NAMES = tuple(RULE_SETS)  # the CLI's --rules choices

RulesLike = Union[str, Rules, Mapping]


def resolve(rules: RulesLike) -> Rules:
    """The :class:`Rules` that ``rules`` names: a name from :data:`RULE_SETS`, a Rules, or a mapping of its fields;
    anything else is an :class:`~fastig.errors.UnknownNameError` naming ``rules`` and the choices."""
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, str) and rules in RULE_SETS:
        return RULE_SETS[rules]
    fields = tuple(f.name for f in dataclasses.fields(Rules))
    if isinstance(rules, Mapping) and set(rules) <= set(fields):
        return Rules(**rules)
    given = f"unknown keys {sorted(set(rules) - set(fields))}" if isinstance(rules, Mapping) else repr(rules)
    raise UnknownNameError(
        f"rules: unknown rule set {given}; choices: {', '.join(repr(n) for n in RULE_NAMES)}, a "
        f"fastig.attr.rules.Rules or a mapping of its fields {fields} (e.g. {{'relu': 'guided', 'max_pool': "
        "'positive'}})")


@contextlib.contextmanager
def applied(rules: RulesLike | None) -> Iterator[None]:
    """Within the block, ReLUs and max-poolings (modules and functional calls) backpropagate with ``rules`` (see
    :func:`resolve`); None or the plain rules change nothing."""
    rules = None if rules is None else resolve(rules)
    if rules is None or rules.is_plain:
        yield
        return
    _in_force.stack = getattr(_in_force, "stack", []) + [rules]
    try:
        with _RuleMode(rules):
            yield
    finally:
        _in_force.stack = _in_force.stack[:-1]


def active() -> Rules | None:
    """The rules in force in this thread (the innermost :func:`applied` block), None when gradients are plain: for
    code that relies on exact gradients (completeness holds for true gradients only, not for guided ones)."""
    stack = getattr(_in_force, "stack", [])
    return stack[-1] if stack else None


_in_force = threading.local()


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


_RELU_FUNCTIONS = {"guided": _GuidedReLU, "deconv": _DeconvReLU}


class _RuleMode(TorchFunctionMode):
    def __init__(self, rules: Rules):
        super().__init__()
        self.relu_function = _RELU_FUNCTIONS.get(rules.relu)  # None: plain ReLU gradients
        self.positive_maxpool = rules.max_pool == "positive"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.relu_function is not None and (func in _RELUS or func in _RELUS_INPLACE):
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
