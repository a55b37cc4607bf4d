"""Methods that backpropagate through ReLUs with modified rules: GuidedBackprop, Deconvolution (Captum drop-ins)
and GuidedNonLinearityIG (Kwon, Koo & Cho, ICPR 2020).

Each is a plain method run under a fixed rule set of :mod:`fastig.attr.rules` (its ``own_rules``, applied by the
attribution entry point): GuidedBackprop is the gradient under ``rules="guided"``, Deconvolution under
``rules="deconv"``, GuidedNonLinearityIG is IntegratedGradients under ``rules="gnl"``. Any other gradient or path
method takes the same rules through ``rules=`` (e.g. guided Blur IG: ``BlurIntegratedGradients(model).attribute(x,
rules="guided")``); these classes keep their names and numbers, and refuse ``rules=`` (their rules are what they
are).

Difference from Captum: Captum hooks ``nn.ReLU`` modules only, so ReLUs called functionally inside ``forward``
(``torch.relu``, ``F.relu``, ``Tensor.relu``, as in googlenet/inception) keep their plain gradient there. fastig
applies the rule to those as well (see :mod:`fastig.attr.rules`); on models whose ReLUs are all ``nn.ReLU``
modules the numbers are Captum's. The model is never modified (no hooks are registered).
"""

from __future__ import annotations

from typing import Any

import torch

from fastig.attr._base import Attribution
from fastig.core.inputs import format_inputs, format_output
from fastig.attr.gradients import input_gradients
from fastig.attr.integrated_gradients import IntegratedGradients


class _ModifiedReluGradient(Attribution):
    """The input gradient, run by the entry point under the subclass's ``own_rules``."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{type(self).__name__} needs a torch.nn.Module, got {type(model).__name__}")
        super().__init__(model)
        self.model = model

    multiplies_by_inputs = False

    def attribute(
        self,
        inputs: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        internal_batch_size: int | None = None,
    ) -> Any:
        xs, is_tuple = format_inputs(inputs)
        grads = input_gradients(self.model, xs, xs[0].shape[0], target, additional_forward_args, internal_batch_size)
        return format_output(grads, is_tuple)


class GuidedBackprop(_ModifiedReluGradient):
    """Guided backpropagation (Springenberg et al. 2015): the input gradient computed with every ReLU passing back
    only positive gradients, and only where its input was positive.

    Drop-in for ``captum.attr.GuidedBackprop`` (plus ``internal_batch_size``); also covers functional ReLUs.
    """

    own_rules = "guided"


class Deconvolution(_ModifiedReluGradient):
    """Deconvnet (Zeiler & Fergus 2014): the input gradient computed with every ReLU passing back the positive part
    of its output gradient, whatever the sign of its input.

    Drop-in for ``captum.attr.Deconvolution`` (plus ``internal_batch_size``); also covers functional ReLUs.
    """

    own_rules = "deconv"


class GuidedNonLinearityIG(IntegratedGradients):
    """Integrated Gradients whose path gradients are guided (Kwon, Koo & Cho, ICPR 2020, "Guided Non-linearity").

    Every gradient along the path flows backward through ReLUs with the guided-backprop rule (only positive
    gradients, only where the ReLU's input was positive) and through max-pooling with only the positive part of
    the output gradient: ``IntegratedGradients(model).attribute(x, rules="gnl")``, the same numbers. Everything
    else is IntegratedGradients: the same ``attribute()`` arguments (``n_steps``, ``method``,
    ``internal_batch_size``, ``return_convergence_delta``, ``idgi``, ...), batching and quadrature.
    The forward pass is unchanged, so the convergence delta compares the guided attributions with the true
    f(input) - f(baseline) (guided gradients are not a gradient field: completeness does not hold exactly).
    """

    own_rules = "gnl"  # IntegratedGradients.attribute, run by the entry point under these rules
    takes_rules = False

    def __init__(self, forward_func: torch.nn.Module, multiply_by_inputs: bool = True) -> None:
        if not isinstance(forward_func, torch.nn.Module):
            raise TypeError(f"GuidedNonLinearityIG needs a torch.nn.Module, got {type(forward_func).__name__}")
        super().__init__(forward_func, multiply_by_inputs)
