"""Methods that backpropagate through ReLUs with modified rules: GuidedBackprop, Deconvolution (Captum drop-ins)
and GuidedNonLinearityIG (Kwon, Koo & Cho, ICPR 2020).

Difference from Captum: Captum hooks ``nn.ReLU`` modules only, so ReLUs called functionally inside ``forward``
(``torch.relu``, ``F.relu``, ``Tensor.relu``, as in googlenet/inception) keep their plain gradient there. fastig
applies the rule to those as well (see :mod:`fastig.attr._relu_rules`); on models whose ReLUs are all ``nn.ReLU``
modules the numbers are Captum's. The model is never modified (no hooks are registered).
"""

from __future__ import annotations

from typing import Any

import torch

from fastig.attr._base import Attribution
from fastig.attr._inputs import format_inputs, format_output
from fastig.attr._relu_rules import relu_rules
from fastig.attr.gradients import input_gradients
from fastig.attr.integrated_gradients import IntegratedGradients


class _ModifiedReluGradient(Attribution):
    _rule = "guided"

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
        with relu_rules(self._rule):
            grads = input_gradients(self.model, xs, xs[0].shape[0], target, additional_forward_args, internal_batch_size)
        return format_output(grads, is_tuple)


class GuidedBackprop(_ModifiedReluGradient):
    """Guided backpropagation (Springenberg et al. 2015): the input gradient computed with every ReLU passing back
    only positive gradients, and only where its input was positive.

    Drop-in for ``captum.attr.GuidedBackprop`` (plus ``internal_batch_size``); also covers functional ReLUs.
    """

    _rule = "guided"


class Deconvolution(_ModifiedReluGradient):
    """Deconvnet (Zeiler & Fergus 2014): the input gradient computed with every ReLU passing back the positive part
    of its output gradient, whatever the sign of its input.

    Drop-in for ``captum.attr.Deconvolution`` (plus ``internal_batch_size``); also covers functional ReLUs.
    """

    _rule = "deconv"


class GuidedNonLinearityIG(IntegratedGradients):
    """Integrated Gradients whose path gradients are guided (Kwon, Koo & Cho, ICPR 2020, "Guided Non-linearity").

    Every gradient along the path flows backward through ReLUs with the guided-backprop rule (only positive
    gradients, only where the ReLU's input was positive) and through max-pooling with only the positive part of
    the output gradient. Everything else is IntegratedGradients: the same ``attribute()`` arguments (``n_steps``,
    ``method``, ``internal_batch_size``, ``return_convergence_delta``, ``idgi``, ...), batching and quadrature.
    The forward pass is unchanged, so the convergence delta compares the guided attributions with the true
    f(input) - f(baseline) (guided gradients are not a gradient field: completeness does not hold exactly).
    """

    _exact_gradients = False  # n_steps="auto" then stops on the map error estimate alone

    def __init__(self, forward_func: torch.nn.Module, multiply_by_inputs: bool = True) -> None:
        if not isinstance(forward_func, torch.nn.Module):
            raise TypeError(f"GuidedNonLinearityIG needs a torch.nn.Module, got {type(forward_func).__name__}")
        super().__init__(forward_func, multiply_by_inputs)

    def attribute(self, *args: Any, **kwargs: Any) -> Any:
        with relu_rules("guided", positive_maxpool=True):
            return super().attribute(*args, **kwargs)

    attribute.__doc__ = IntegratedGradients.attribute.__doc__
