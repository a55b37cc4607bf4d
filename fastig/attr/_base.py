"""What every attribution class shares: the model it explains and Captum's ``has_convergence_delta()`` query."""

from __future__ import annotations

from typing import Callable

from fastig.errors import NotSupportedError


class Attribution:
    """Base of fastig's attribution classes.

    The constructor checks that ``forward_func`` is callable and keeps it; classes built on an ``nn.Module`` check
    that themselves. ``has_convergence_delta()`` answers from the class attribute ``_has_convergence_delta``.
    ``multiplies_by_inputs`` is left to each class (a constant, or a property when a constructor flag decides it):
    methods that do not state it keep not having it.
    """

    _has_convergence_delta = False

    def __init__(self, forward_func: Callable) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func

    def has_convergence_delta(self) -> bool:
        return self._has_convergence_delta

    def attribute_future(self, *args, **kwargs):
        """Captum's asynchronous form, for a ``forward_func`` returning ``torch.futures.Future``: only the classes
        Captum implements it for have it (FeatureAblation, FeaturePermutation, ShapleyValueSampling)."""
        raise NotSupportedError(f"attribute_future is not implemented for {type(self).__name__}")
