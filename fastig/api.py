"""The functional form of every attribution method, used by the CLI."""

from __future__ import annotations

from typing import Any

from fastig import methods


def attribute(model: Any, inputs: Any, target: Any = None, method: str = "ig", **options: Any) -> Any:
    """Attribute ``model``'s output for ``target`` to ``inputs`` with the method registered as ``method``.

    ``options`` are keyword arguments of that method's ``attribute()`` (e.g. ``n_steps=32`` for ``"ig"``), except
    that the quadrature rule of IG-style methods, Captum's ``method=``, is called ``rule=`` here, since ``method``
    names the attribution method. ``fastig.methods.names()`` lists the methods.
    """
    spec = methods.get(method)
    if "rule" in options:
        options["method"] = options.pop("rule")
    return spec.build(model).attribute(inputs, target=target, **{**spec.fixed, **options})
