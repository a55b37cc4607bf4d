"""Layer-wise Relevance Propagation (Bach et al. 2015), a drop-in for ``captum.attr.LRP``.

How it works. Relevance is carried backwards in "gradient form" (the relevance of a tensor ``t`` is ``t * g``,
``g`` being what autograd propagates) by LRP's layer rules of :mod:`fastig.attr.rules`: ``LRP`` chooses a rule for
every leaf layer (a :class:`~fastig.attr.rules.LayerRules`) and runs one forward and one backward pass under it. A
layer with a rule outputs its ordinary value ``z`` and, in the backward pass, propagates ``J'^T (g * z / (z' + eps *
sign(z')))``, where ``z'`` and ``J'`` are the layer's output and Jacobian with the rule's modified weights (equal to
``z`` and ``J`` for the epsilon rule). This is exactly Captum's propagation (relevance of a layer input ``a * J'^T
(R_out / (z' + eps sign z'))``), rewritten so that autograd does the work: no weight copies, and the model is not
modified (Captum runs two forward passes and modifies the model's weights in place, restoring them afterwards).

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
them). Any other leaf module without a rule is an error, as in Captum. Layer operations called in a ``forward``
outside a leaf module (``F.linear``, ``F.conv2d``, ``F.max_pool2d`` ...) get the default rule, and ``torch.tanh`` passes
relevance like ``nn.Tanh`` (Captum's module hooks miss both, which keep plain gradients there).

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

import warnings
from typing import Any

import torch
from torch import nn

from fastig.attr import rules as backward_rules
from fastig.attr._base import Attribution
from fastig.core.inputs import format_inputs, format_output, row_sums
from fastig.attr.rules import (  # noqa: F401  (LRP's rule classes, public here as in Captum)
    Alpha1_Beta0_Rule, EpsilonRule, GammaRule, IdentityRule, PropagationRule, ZRule, as_rule,
)
from fastig.core.engine import Engine
from fastig.core.targets import Target, format_additional_args

RULES = backward_rules.LRP_RULES

# Layers with a rule by default (Captum's SUPPORTED_LAYERS_WITH_RULES, extended to 1-D/3-D variants)
LAYERS_WITH_RULES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
# Leaf layers that pass relevance unchanged
PASS_THROUGH_LAYERS = (nn.ReLU, nn.Dropout, nn.Tanh, nn.Flatten, nn.Identity)


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

    def layer_rules(self, default: PropagationRule | None = None, convert: bool = False,
                    verbose: bool = False) -> backward_rules.LayerRules:
        """The rule of every leaf layer of the model, for one pass under :func:`fastig.attr.rules.applied`
        (``default`` overrides "default"; ``convert``: Captum's form at the first layers' inputs)."""
        default = default or self.rules.get("default") or EpsilonRule()
        modules = {}
        for name, module in self.model.named_modules():
            if list(module.children()):
                continue
            modules[module] = rule = self.rule_for(name, module, default)
            if verbose and (rule is not None or type(module) is nn.Tanh):
                print(f"Applied {rule} on layer {name or '<model>'}: {module}")
        return backward_rules.LayerRules(default, modules, convert)

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
        layers = self.layer_rules(default, convert, verbose)
        region = layers.region
        with torch.enable_grad(), backward_rules.applied(backward_rules.Rules(layers=layers)):
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
