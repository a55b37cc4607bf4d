"""Layer-wise Relevance Propagation (Bach et al. 2015), a drop-in for ``captum.attr.LRP``.

How it works. Relevance is carried backwards in "gradient form": the relevance of a tensor ``t`` is ``t * g``
where ``g`` is what autograd propagates. One forward pass runs the model with each leaf layer's ``forward``
wrapped (restored afterwards); a layer with a rule outputs its ordinary value ``z`` and, in the backward pass,
propagates ``J'^T (g * z / (z' + eps * sign(z')))``, where ``z'`` and ``J'`` are the layer's output and Jacobian
with the rule's modified weights (equal to ``z`` and ``J`` for the epsilon rule). This is exactly Captum's
propagation (relevance of a layer input ``a * J'^T (R_out / (z' + eps sign z'))``), rewritten so that autograd
does the work: one forward and one backward pass, no weight copies (Captum runs two forward passes and
modifies the model's weights in place, restoring them afterwards).

Rules (per layer, Captum's classes and names): :class:`EpsilonRule` (default for Conv, Linear, BatchNorm, average
and max pools), :class:`ZRule` (LRP-0: the epsilon rule with only the 1e-9 stabilizer), :class:`GammaRule`
(``w + gamma * w.clamp(min=0)``), :class:`Alpha1_Beta0_Rule` (Captum's alpha=1, beta=0 rule: ``w.clamp(min=0)``,
exact alpha-beta where the layer's inputs are non-negative) and :class:`IdentityRule` (relevance passes
unchanged). Choose them

- per module, as in Captum: ``model.features[0].rule = GammaRule()`` (Captum's own rule objects work too), or
- with the fastig keyword ``LRP(model, rules={"default": "epsilon", nn.Conv2d: "gamma", "features.0": "z"})``:
  keys are ``"default"`` (every layer that has a default rule), a module class, or a module's qualified name;
  values are rule names (``epsilon z gamma alpha_beta identity``) or rule objects. A ``rule`` attribute on a
  module wins over a name key, which wins over a class key, which wins over ``"default"``.

ReLU, Dropout and Tanh pass relevance unchanged (Captum's treatment); Flatten and Identity too (Captum rejects
them). Any other leaf module without a rule is an error, as in Captum.

Skip connections. Captum's LRP does not support them: an addition written in ``forward`` (``out + identity``)
is invisible to its hooks, and its numbers there do not conserve relevance. In fastig an addition, a
concatenation, a reshape or any other operation in ``forward`` keeps its ordinary gradient, which in gradient form
is the LRP-0 rule for it: a sum ``z = a + b`` passes ``R * a / z`` to ``a`` and ``R * b / z`` to ``b``, so
relevance is conserved through ResNet's shortcuts. Modules called several times (torchvision's ResNet blocks
call one ReLU twice) also work: every call gets its own autograd node (Captum raises for a reused layer with a
rule).

The model's inputs. Between the inputs and the first layers (``forward(x1, x2)`` computing on ``x1 + x2``, a
normalization written in ``forward``) fastig follows Captum by default: the first layers' input relevance goes
back to the inputs as a gradient would (a conversion node at each first layer's input turns the gradient form
into the relevance), so both operands of a sum get the relevance of the sum. ``attribute(..., split_inputs=True)``
applies the LRP-0 split there too (see :meth:`LRP.attribute`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from fastig.attr._base import Attribution
from fastig.core.inputs import format_inputs, format_output, row_sums
from fastig.core.engine import Engine
from fastig.core.targets import Target, format_additional_args


class PropagationRule:
    """Base class of the LRP rules: how a layer's output relevance is divided among its inputs.

    ``STABILITY_FACTOR`` is the epsilon added (with the sign of the output) to the denominator.
    """

    STABILITY_FACTOR = 1e-9

    def modified_weights(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The weights the relevance is propagated with, or None for the layer's own."""
        return None

    zero_bias = False

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class EpsilonRule(PropagationRule):
    """LRP-epsilon: ``R_in = a * J^T (R_out / (z + eps * sign(z)))``; absorbs weak, contradictory relevance."""

    def __init__(self, epsilon: float = 1e-9) -> None:
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
        self.STABILITY_FACTOR = epsilon


class ZRule(PropagationRule):
    """LRP-0 (the z-rule): relevance in proportion to each input's contribution ``a_i w_ij``; only the 1e-9
    stabilizer of every rule guards the division."""


class GammaRule(PropagationRule):
    """LRP-gamma: weights ``w + gamma * w.clamp(min=0)``, favouring positive contributions (lower layers)."""

    def __init__(self, gamma: float = 0.25, set_bias_to_zero: bool = False) -> None:
        self.gamma = gamma
        self.set_bias_to_zero = set_bias_to_zero

    @property
    def zero_bias(self) -> bool:
        return self.set_bias_to_zero

    def modified_weights(self, weight):
        return weight + self.gamma * weight.clamp(min=0)


class Alpha1_Beta0_Rule(PropagationRule):  # noqa: N801 (Captum's name)
    """Captum's alpha=1, beta=0 rule: weights ``w.clamp(min=0)`` (only positive relevance; exact z+ rule where the
    layer's inputs are non-negative, e.g. after a ReLU)."""

    def __init__(self, set_bias_to_zero: bool = False) -> None:
        self.set_bias_to_zero = set_bias_to_zero

    @property
    def zero_bias(self) -> bool:
        return self.set_bias_to_zero

    def modified_weights(self, weight):
        return weight.clamp(min=0)


class IdentityRule(EpsilonRule):
    """Relevance passes unchanged from output to input (same shapes only; e.g. for BatchNorm)."""


RULES = {"epsilon": EpsilonRule, "z": ZRule, "gamma": GammaRule, "alpha_beta": Alpha1_Beta0_Rule,
         "identity": IdentityRule}

# Layers with a rule by default (Captum's SUPPORTED_LAYERS_WITH_RULES, extended to 1-D/3-D variants)
LAYERS_WITH_RULES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
# Leaf layers that pass relevance unchanged
PASS_THROUGH_LAYERS = (nn.ReLU, nn.Dropout, nn.Tanh, nn.Flatten, nn.Identity)


def as_rule(rule: Any) -> PropagationRule | None:
    """A fastig rule from a rule object, a rule name, None, or one of Captum's rule objects."""
    if rule is None or isinstance(rule, PropagationRule):
        return rule
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"unknown LRP rule {rule!r}; available: {', '.join(RULES)}")
        return RULES[rule]()
    kind = type(rule).__name__
    if type(rule).__module__.startswith("captum") and kind in RULES_BY_CAPTUM_NAME:
        converted = RULES_BY_CAPTUM_NAME[kind].__new__(RULES_BY_CAPTUM_NAME[kind])
        for name in ("gamma", "set_bias_to_zero"):
            if hasattr(rule, name):
                setattr(converted, name, getattr(rule, name))
        converted.STABILITY_FACTOR = rule.STABILITY_FACTOR
        return converted
    raise TypeError(f"an LRP rule must be a PropagationRule, a rule name ({', '.join(RULES)}) or None, "
                    f"got {type(rule).__name__}")


RULES_BY_CAPTUM_NAME = {"EpsilonRule": EpsilonRule, "GammaRule": GammaRule, "Alpha1_Beta0_Rule": Alpha1_Beta0_Rule,
                        "IdentityRule": IdentityRule, "PropagationRule": ZRule}


class _Relevance(torch.autograd.Function):
    """Returns ``value``; backward sends ``grad * factor`` to ``source`` (and nothing to ``value``)."""

    @staticmethod
    def forward(ctx, source, value, factor):
        ctx.save_for_backward(factor)
        return value.clone()  # a fresh tensor: in-place ops downstream (ReLU(inplace=True)) must not touch value

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None


class _ToRelevance(torch.autograd.Function):
    """Identity forward; backward turns the gradient-form ``g`` into the relevance ``t * g`` (Captum's form)."""

    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * t


class _InputRegion:
    """During one forward pass: which tensors are computed from the model's inputs alone (the operations before
    the first layers), so that Captum's form can start at the first layers' inputs.

    A tensor's autograd history is followed back until it meets a layer (a module with a rule, or Tanh) or a
    model input; the answers are memoized per autograd node, so each node is visited once per pass.
    ``convert``: give the first layers' inputs Captum's relevance form. ``bypass`` is set when an input also
    reaches a later layer or the output without passing a first layer (Captum's form is then not defined).
    """

    def __init__(self, convert: bool) -> None:
        self.convert = convert
        self.inputs: set = set()
        self.layers: set = set()
        self.memo: dict = {}
        self.bypass = False

    def mark_inputs(self, leaves: tuple) -> tuple:
        marked = tuple(x.view_as(x) for x in leaves)
        self.inputs.update(m.grad_fn for m in marked)
        return marked

    def reach(self, node) -> tuple[bool, bool]:
        """(leads to a model input, leads to a layer), without crossing a layer."""
        stack = [node] if node is not None else []
        while stack:  # depth-first, children before their parent
            top = stack[-1]
            if top in self.memo:
                stack.pop()
            elif top in self.inputs or top in self.layers:
                self.memo[top] = (top in self.inputs, top in self.layers)
                stack.pop()
            else:
                children = [child for child, _ in top.next_functions if child is not None]
                pending = [child for child in children if child not in self.memo]
                if pending:
                    stack.extend(pending)
                else:
                    flags = [self.memo[child] for child in children]
                    self.memo[top] = (any(f[0] for f in flags), any(f[1] for f in flags))
                    stack.pop()
        return self.memo.get(node, (False, False))

    def layer_inputs(self, inputs: tuple) -> tuple:
        if not self.convert:
            return inputs
        out = []
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                to_input, to_layer = self.reach(t.grad_fn)
                if to_input and to_layer:
                    self.bypass = True
                elif to_input:
                    t = _ToRelevance.apply(t)
                    self.layers.add(t.grad_fn)
            out.append(t)
        return tuple(out)

    def layer_output(self, z: torch.Tensor) -> torch.Tensor:
        if self.convert and z.grad_fn is not None:
            self.layers.add(z.grad_fn)
        return z


def _stabilized_ratio(z: torch.Tensor, z_rule: torch.Tensor, eps: float) -> torch.Tensor:
    sign = torch.where(z_rule >= 0, 1.0, -1.0).to(z_rule.dtype)  # sign(0) counts as +1, as in Captum
    return z / (z_rule + sign * eps)


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))


def _with_weights(module: nn.Module, rule: PropagationRule, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with the rule's weights and bias (same input)."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if weight is not None:
        weight = rule.modified_weights(weight)
    if bias is not None and rule.zero_bias:
        bias = torch.zeros_like(bias)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, _ConvNd) and not module.transposed:
        return module._conv_forward(x, weight, bias)
    if isinstance(module, _BatchNorm) and not module.training and module.track_running_stats:
        return F.batch_norm(x, module.running_mean, module.running_var, weight, bias, False, 0.0, module.eps)
    raise TypeError(f"{type(rule).__name__} changes weights, which fastig supports for Linear, Conv and BatchNorm "
                    f"(eval) layers only, not {type(module).__name__}")


def _rule_forward(module: nn.Module, rule: PropagationRule, original, region: _InputRegion) -> Any:
    changes_weights = rule.zero_bias or (
        getattr(module, "weight", None) is not None and rule.modified_weights(module.weight) is not None
    )

    def forward(*inputs):
        return region.layer_output(relevance_forward(*region.layer_inputs(inputs)))

    def relevance_forward(*inputs):
        if isinstance(rule, IdentityRule):
            if len(inputs) != 1:
                raise ValueError(f"IdentityRule needs a layer with one input, {type(module).__name__} has {len(inputs)}")
            with torch.no_grad():
                z = original(*inputs)
            if z.shape != inputs[0].shape:
                raise ValueError(f"IdentityRule needs equal input and output shapes on {type(module).__name__}")
            # relevance t * g is kept: g_in = z * g_out / a (zero where a == 0, where no relevance can sit)
            return _Relevance.apply(inputs[0], z, _safe_ratio(z, inputs[0].detach()))
        if changes_weights:
            if len(inputs) != 1:
                raise ValueError(f"{type(rule).__name__} needs a layer with one input")
            with torch.no_grad():
                z = original(*inputs)
            z_rule = _with_weights(module, rule, inputs[0])
        else:
            z = z_rule = original(*inputs)
        return _Relevance.apply(z_rule, z.detach(), _stabilized_ratio(z.detach(), z_rule.detach(), rule.STABILITY_FACTOR))

    return forward


def _tanh_forward(region: _InputRegion) -> Any:
    def forward(z: torch.Tensor) -> torch.Tensor:
        (z,) = region.layer_inputs((z,))
        y = torch.tanh(z)
        ratio = torch.where(z == 0, torch.ones_like(z), y / torch.where(z == 0, torch.ones_like(z), z))
        # relevance passes unchanged: g_in = g_out * tanh(z) / z
        return region.layer_output(_Relevance.apply(z, y.detach(), ratio.detach()))

    return forward


class LRP(Attribution):
    """Layer-wise Relevance Propagation with Captum's constructor, ``attribute()`` and numbers.

    Args:
        model: the ``nn.Module`` to explain. Rules come from ``rule`` attributes on its modules, then ``rules``.
        rules: (fastig only) rules by module name, module class or ``"default"``; see the module docstring.

    ``attribute()`` returns the relevance of every input element for the target output (they sum to the output
    where no relevance is absorbed by biases or epsilons); the convergence delta is Captum's
    ``output - sum(relevance)`` per example.
    """

    _has_convergence_delta = True

    def __init__(self, model: nn.Module, rules: dict | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"LRP needs an nn.Module (its layers carry the rules), got {type(model).__name__}")
        if rules is not None and not isinstance(rules, dict):
            raise TypeError(f"rules must be a dict, got {type(rules).__name__}")
        self.model = self.forward_func = model
        self.rules = {key: as_rule(value) for key, value in (rules or {}).items()}
        names = {name for name, _ in model.named_modules()}
        for key in self.rules:
            if isinstance(key, str) and key != "default" and key not in names:
                raise ValueError(f"rules names module {key!r}, which the model does not have")
            if not isinstance(key, (str, type)):
                raise TypeError(f"rules keys must be 'default', a module name or a module class, got {key!r}")
        for module in model.modules():
            if hasattr(module, "rule"):
                as_rule(module.rule)  # a clear error now for a bad rule object

    multiplies_by_inputs = True

    def rule_for(self, name: str, module: nn.Module, default: PropagationRule | None = None) -> PropagationRule | None:
        """The rule applied to a leaf layer (None: relevance passes unchanged); ``default`` overrides "default"."""
        if hasattr(module, "rule"):
            return as_rule(module.rule)
        if name in self.rules:
            return self.rules[name]
        if type(module) in self.rules:
            return self.rules[type(module)]
        if isinstance(module, PASS_THROUGH_LAYERS) and type(module) in PASS_THROUGH_LAYERS:
            return None
        if type(module) in LAYERS_WITH_RULES or type(module).__name__ == "Addition_Module":
            return default or self.rules.get("default") or EpsilonRule()
        raise TypeError(
            f"module {name or '<model>'} of type {type(module).__name__} has no LRP rule and no default rule exists "
            f"for its type; set one (module.rule = EpsilonRule(), or LRP(model, rules={{{type(module).__name__}: "
            f"'epsilon'}})) if that is appropriate for this layer"
        )

    @contextlib.contextmanager
    def _rules_applied(self, verbose: bool, default: PropagationRule | None, region: _InputRegion) -> Iterator[None]:
        patched = []
        try:
            for name, module in self.model.named_modules():
                if list(module.children()) or "forward" in vars(module):
                    continue
                rule = self.rule_for(name, module, default)
                if rule is not None:
                    module.forward = _rule_forward(module, rule, type(module).forward.__get__(module), region)
                elif type(module) is nn.Tanh:
                    module.forward = _tanh_forward(region)
                else:
                    continue
                patched.append(module)
                if verbose:
                    print(f"Applied {rule} on layer {name or '<model>'}: {module}")
            yield
        finally:
            for module in patched:
                del module.forward

    def attribute(
        self,
        inputs: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        verbose: bool = False,
        *,
        lrp_rule: str | None = None,
        split_inputs: bool = False,
    ) -> Any:
        """Relevance of every input element for the target output (and Captum's convergence delta if asked).

        ``lrp_rule`` (fastig only): a rule name that replaces the "default" rule for this call (the CLI's
        ``--lrp-rule``); ``rule`` attributes and name or class keys of ``rules`` still win.

        ``split_inputs`` (fastig only) decides what the operations between the model's inputs and its first layers
        (``forward(x1, x2)`` computing on ``x1 + x2``, a scaling or a normalization written in ``forward``) do
        with relevance. False (default, Captum's numbers): the relevance of a first layer's input is passed back
        to the model's inputs as a gradient would be, so each operand of a sum gets the relevance of the sum.
        True: it is divided by contribution (LRP-0, the rule fastig applies to skip connections), so ``x1`` gets
        ``R * x1 / (x1 + x2)`` and the inputs' relevances add up to what the first layers received. Where an
        input also reaches a later layer or the output directly, Captum's form is not defined: fastig splits
        (with a warning).
        """
        default = as_rule(lrp_rule) if lrp_rule is not None else None
        xs, is_tuple = format_inputs(inputs)
        for i, x in enumerate(xs):
            if not x.is_floating_point():
                raise TypeError(f"inputs[{i}] must be a floating-point tensor, got {x.dtype}")
        tgt = Target(target, xs[0].shape[0])
        args = format_additional_args(additional_forward_args)
        relevance, outputs, bypass = self._relevance(xs, tgt, args, verbose, default, convert=not split_inputs)
        if bypass and not split_inputs:
            warnings.warn("LRP: an input reaches a layer past the first ones (or the output) directly, where "
                          "Captum's unsplit input relevance is not defined; relevance is split by contribution "
                          "(split_inputs=True)", stacklevel=2)
            relevance, outputs, _ = self._relevance(xs, tgt, args, False, default, convert=False)
        result = format_output(relevance, is_tuple)
        if not return_convergence_delta:
            return result
        return result, self.compute_convergence_delta(relevance, outputs.detach())

    def _relevance(self, xs, tgt, args, verbose, default, convert: bool):
        """(relevance of each input, explained outputs, whether an input bypasses the first layers)."""
        region = _InputRegion(convert)
        with torch.enable_grad(), self._rules_applied(verbose, default, region):
            leaves = tuple(x.detach().requires_grad_() for x in xs)
            outputs = tgt.select(Engine(self.model).call(region.mark_inputs(leaves), args))
            if convert and region.reach(outputs.grad_fn)[0]:
                region.bypass = True
            grads = torch.autograd.grad(outputs, leaves, torch.ones_like(outputs), allow_unused=True)
        grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads))
        relevance = grads if convert else tuple(x * g for x, g in zip(xs, grads))
        return relevance, outputs, region.bypass

    def compute_convergence_delta(self, attributions: Any, output: torch.Tensor) -> torch.Tensor:
        """``output - sum(attributions)`` per example (Captum's sign): the relevance absorbed on the way."""
        attrs, _ = format_inputs(attributions)
        return output.flatten() - row_sums(attrs).flatten().to(output.dtype)
