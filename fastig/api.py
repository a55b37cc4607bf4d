"""The functional form of every attribution method, used by the CLI."""

from __future__ import annotations

from typing import Any

from fastig import methods
from fastig.core import baselines


def attribute(model: Any, inputs: Any, target: Any = None, method: str = "ig", **options: Any) -> Any:
    """Attribute ``model``'s output for ``target`` to ``inputs`` with the method registered as ``method``.

    ``options`` are keyword arguments of that method's ``attribute()`` (e.g. ``n_steps=32`` for ``"ig"``), except
    that the quadrature rule of IG-style methods, Captum's ``method=``, is called ``rule=`` here, since ``method``
    names the attribution method, and that settings of the method's constructor listed in its ``build_options``
    (latent IG's ``dvae=`` folder) are given here too, and that path methods take ``baselines="segments"`` with
    the flat ``baseline_*`` options of the CLI (:func:`fastig.core.baselines.from_options`).
    ``fastig.methods.names()`` lists the methods.
    """
    spec = methods.get(method)
    options = baselines.from_options(options)  # --baselines segments --baseline-* -> a SegmentBaselines spec
    if "rule" in options:
        options["method"] = options.pop("rule")
    build_options = {k: options.pop(k) for k in spec.build_options if k in options}  # e.g. latent IG's dvae=
    return spec.build(model, **build_options).attribute(inputs, target=target, **{**spec.fixed, **options})
