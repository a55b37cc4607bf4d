"""The functional form of every attribution method, used by the CLI."""

from __future__ import annotations

from typing import Any

from fastig import methods


def attribute(model: Any, inputs: Any, target: Any = None, method: str = "ig", *, return_info: bool = False,
              **options: Any) -> Any:
    """Attribute ``model``'s output for ``target`` to ``inputs`` with the method registered as ``method``.

    ``options`` are keyword arguments of that method's ``attribute()`` (e.g. ``n_steps=32`` for ``"ig"``), except
    that the quadrature rule of IG-style methods, Captum's ``method=``, is called ``rule=`` here, since ``method``
    names the attribution method, and that settings of the method's constructor listed in its ``build_options``
    (latent IG's ``dvae=`` folder) are given here too. ``fastig.methods.names()`` lists the methods.

    ``return_info=True`` returns ``(result, info)``: ``info`` is what the method object recorded about the call
    (its ``last_info``: an :class:`~fastig.core.adaptive.AdaptiveInfo` after ``n_steps="auto"``), else None.
    """
    spec = methods.get(method)
    if "rule" in options:
        options["method"] = options.pop("rule")
    build_options = {k: options.pop(k) for k in spec.build_options if k in options}  # e.g. latent IG's dvae=
    explainer = spec.build(model, **build_options)
    result = explainer.attribute(inputs, target=target, **{**spec.fixed, **options})
    return (result, getattr(explainer, "last_info", None)) if return_info else result
