"""The functional form of every attribution method, used by the CLI."""

from __future__ import annotations

from typing import Any

import torch

from fastig import methods
from fastig.core import baselines
from fastig.errors import InputError


def attribute(model: Any, inputs: Any, target: Any = None, method: str = "ig", *, return_info: bool = False,
              **options: Any) -> Any:
    """Attribute ``model``'s output for ``target`` to ``inputs`` with the method registered as ``method``.

    ``options`` are keyword arguments of that method's ``attribute()`` (e.g. ``n_steps=32`` for ``"ig"``), except
    that the quadrature rule of IG-style methods, Captum's ``method=``, is called ``rule=`` here, since ``method``
    names the attribution method, and that settings of the method's constructor listed in its ``build_options``
    (latent IG's ``dvae=`` folder) are given here too, and that path methods take ``baselines="segments"`` with
    the flat ``baseline_*`` options of the CLI (:func:`fastig.core.baselines.from_options`).
    ``fastig.methods.names()`` lists the methods.

    ``target`` is as in Captum, except that negative indices are refused: here a class index counts from 0 (the
    CLI and the stores use -1 for "no class"). The Captum-named classes keep Captum's, that is Python's, indexing,
    where ``target=-1`` is the last class.

    ``return_info=True`` returns ``(result, info)``: ``info`` is what the method object recorded about the call
    (its ``last_info``: an :class:`~fastig.core.adaptive.AdaptiveInfo` after ``n_steps="auto"``), else None.
    """
    _check_no_negative_class(target)
    spec = methods.get(method)
    options = baselines.from_options(options)  # --baselines segments --baseline-* -> a SegmentBaselines spec
    options = {methods.ATTRIBUTE_KEYWORDS.get(k, k): v for k, v in options.items()}  # rule= -> Captum's method=
    build_options = {k: options.pop(k) for k in spec.build_options if k in options}  # e.g. latent IG's dvae=
    explainer = spec.build(model, **build_options)
    result = explainer.attribute(inputs, target=target, **{**spec.fixed, **options})
    return (result, getattr(explainer, "last_info", None)) if return_info else result


def _check_no_negative_class(target: Any) -> None:
    if isinstance(target, torch.Tensor):
        values = target.flatten().tolist() if not target.is_floating_point() else []
    elif isinstance(target, (list, tuple)):
        values = [v for t in target for v in (t if isinstance(t, tuple) else (t,))]
    else:
        values = [target]
    negative = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v < 0]
    if negative:
        raise InputError(f"target holds the negative class index {negative[0]}: class indices count from 0 here "
                         "(the Captum-named classes in fastig.attr index like Python, -1 being the last class)")
