"""What every attribution class shares: the model it explains, Captum's ``has_convergence_delta()`` query, and the
one entry point every ``attribute()`` goes through.

The entry point (wrapped around each subclass's ``attribute`` when the class is defined) does three things for
every method at once:

- ``rules=`` (modified backward rules, :mod:`fastig.attr.rules`) is taken off the call and applied around it, for
  the classes that set ``takes_rules`` (the gradient and path methods; NoiseTunnel when the method it wraps takes
  them); a class with ``own_rules`` (GuidedBackprop, Deconvolution, GuidedNonLinearityIG) always runs under those.
  Any other method given ``rules=`` raises an :class:`~fastig.errors.InputError` rather than ignoring it.

- A model left in training mode is attributed as in eval mode -- running BatchNorm statistics, no dropout -- so its
  attributions are deterministic and independent of how fastig batches the work, and BatchNorm's running statistics
  are not updated by the attribution's passes. A :class:`TrainingModeWarning` says so, once per model. Each module's
  ``training`` flag is set back as it was afterwards (also when the attribution fails); nothing else is touched.
  (Captum attributes such a model in training mode and updates its statistics: a deliberate difference.) Setting the
  flags costs a walk over the modules, 0.7 ms per call for resnet50 in training mode and 0.13 ms in eval mode --
  nothing next to one model pass (480 ms for one image on a 2-core CPU). Models without BatchNorm or dropout compute
  the same in both modes and are not warned about. The model is found when ``forward_func`` (or ``model``) is an
  ``nn.Module`` or a bound method of one, also through a wrapping method such as NoiseTunnel; a plain function or
  lambda around a model is called as it is.
- When the model fails on the inputs given to the outermost method (torch's convolution or dtype errors, deep inside
  the call; errors of fastig's own checks are left as they are), the inputs are compared with the model: an input of
  another dtype than the model's parameters, or one whose rank or channels do not fit the model's first convolution,
  is reported as an :class:`~fastig.errors.InputError` naming the argument and what it must be, with the model's own
  error chained and quoted. Nothing is refused before the model has failed, so a model that reshapes or casts its
  inputs itself is never second-guessed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn

from fastig.attr import rules as backward_rules
from fastig.errors import FastigError, InputError, NotSupportedError


class TrainingModeWarning(UserWarning):
    """The model was in training mode; it was attributed as in eval mode and left as it was."""


_warned_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class Attribution:
    """Base of fastig's attribution classes.

    The constructor checks that ``forward_func`` is callable and keeps it; classes built on an ``nn.Module`` check
    that themselves. ``has_convergence_delta()`` answers from the class attribute ``_has_convergence_delta``.
    ``multiplies_by_inputs`` is left to each class (a constant, or a property when a constructor flag decides it):
    methods that do not state it keep not having it. Every subclass's ``attribute()`` (and ``attribute_future()``)
    goes through :func:`entry_point` (see the module docstring), which reads ``takes_rules`` (whether
    ``attribute()`` accepts ``rules=``) and ``own_rules`` (the rule set the class always backpropagates with).
    """

    _has_convergence_delta = False
    takes_rules = False
    own_rules: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("attribute", "attribute_future"):
            if name in cls.__dict__:
                setattr(cls, name, entry_point(cls.__dict__[name]))
        if cls.takes_rules and cls.__dict__.get("__doc__") and "rules=" not in cls.__doc__:
            cls.__doc__ += _RULES_DOC  # documented once, here, for every class that takes them

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


def entry_point(attribute: Callable) -> Callable:
    """``attribute`` run under its backward rules, with the model in eval mode and with model failures explained
    (module docstring)."""
    if getattr(attribute, "_fastig_entry_point", False):
        return attribute

    @functools.wraps(attribute)
    def checked(self, *args: Any, **kwargs: Any) -> Any:
        with backward_rules.applied(rules_of_call(self, kwargs.pop("rules", None))):
            return outermost(self, *args, **kwargs)

    def outermost(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(_calls, "inside", False):  # a method inside another (NoiseTunnel's): the outer one did it all
            return attribute(self, *args, **kwargs)
        _calls.inside = True
        try:
            model = explained_model(self)
            with evaluated(model):
                try:
                    return attribute(self, *args, **kwargs)
                except FastigError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError) as error:
                    if not _raised_inside(model, error):  # fastig's own checks already name what is wrong
                        raise
                    problem = input_mismatch(model, args[0] if args else kwargs.get("inputs"))
                    if problem is None:
                        raise
                    cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    raise InputError(f"{problem} (the model failed with {type(error).__name__}: {cause[:200]})") \
                        from error
        finally:
            _calls.inside = False

    checked._fastig_entry_point = True
    return checked


_calls = threading.local()

_RULES_DOC = """
    ``attribute(..., rules=...)`` (fastig only): modified backward rules for the model's ReLUs, max-poolings and
    layers -- ``"guided"``, ``"deconv"``, ``"gnl"``, a :class:`fastig.attr.rules.Rules` or a mapping of its fields
    (``{"layers": "epsilon"}``: LRP's; see :mod:`fastig.attr.rules`); None (default) keeps the plain gradients.
    """


def rules_of_call(method: Any, rules: Any) -> Any:
    """The backward rules an ``attribute()`` call of ``method`` runs under: its ``rules=`` where the method takes
    them, else the class's ``own_rules`` (None: plain gradients); ``rules=`` given to any other method is an
    InputError."""
    own = type(method).own_rules
    if rules is None:
        return own
    name = type(method).__name__
    if own is not None:
        raise InputError(f"rules: {name} always backpropagates with rules={own!r}; for other rules pass rules= to "
                         "a gradient or path method (IntegratedGradients, Saliency, ...)")
    if not accepts_rules(method):
        raise InputError(f"rules: {name} does not take rules= (modified backward rules apply to the gradient and "
                         "path methods: IntegratedGradients, Saliency, ...; see fastig.attr.rules)")
    if backward_rules.resolve(rules).paired:
        raise InputError(f"rules: the rescale rule needs the batch [inputs; baselines] that DeepLift runs, not "
                         f"{name}'s; use DeepLift")
    return rules


def accepts_rules(method: Any) -> bool:
    """Whether ``method.attribute()`` accepts ``rules=``: its class's ``takes_rules``, or for a wrapping method such
    as NoiseTunnel, that of the method it wraps (``attribution_method``)."""
    inner = getattr(method, "attribution_method", None)
    return accepts_rules(inner) if inner is not None else bool(getattr(type(method), "takes_rules", False))


def _raised_inside(model: nn.Module | None, error: BaseException) -> bool:
    """Whether ``error`` came out of a call of ``model`` (a frame of one of its methods is on its traceback)."""
    tb = error.__traceback__
    while tb is not None and model is not None:
        if tb.tb_frame.f_locals.get("self") is model:
            return True
        tb = tb.tb_next
    return False


def explained_model(method: Any) -> nn.Module | None:
    """The nn.Module an attribution object explains: its ``forward_func`` or ``model`` when that is a module or a
    bound method of one, or that of the method it wraps (``attribution_method``); else None."""
    for name in ("forward_func", "model"):
        found = getattr(method, name, None)
        found = getattr(found, "__self__", found)  # a bound method's module
        if isinstance(found, nn.Module):
            return found
    inner = getattr(method, "attribution_method", None)
    return explained_model(inner) if inner is not None else None


# modules whose output depends on the training flag: a model in training mode without any of them computes the
# same either way (it is still evaluated in eval mode, silently, in case a custom module reads the flag)
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


@contextlib.contextmanager
def evaluated(model: nn.Module | None):
    """The model's modules in eval mode inside the block (warning once per model when that changes what it
    computes), their flags restored after."""
    flags = [(m, m.training) for m in model.modules()] if model is not None else []
    if not any(training for _, training in flags):
        yield
        return
    dependent = any(training and (isinstance(m, _MODE_DEPENDENT) or getattr(m, "dropout", 0))
                    for m, training in flags)
    if dependent and model not in _warned_models:
        _warned_models.add(model)
        warnings.warn(
            f"{type(model).__name__} is in training mode: it is attributed as in eval mode (BatchNorm running "
            "statistics, no dropout), so the attributions are deterministic and its statistics are not updated; "
            "its modules are set back afterwards. Call model.eval() to silence this.",
            TrainingModeWarning, stacklevel=4)
    for module, _ in flags:
        module.training = False  # the flag only: a custom train() override is not run (nor undone)
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


_CONV_LAYOUT = {nn.Conv1d: "L", nn.Conv2d: "H, W", nn.Conv3d: "D, H, W"}


def input_mismatch(model: nn.Module | None, inputs: Any) -> str | None:
    """What does not fit between ``inputs`` and ``model``: the first input of another floating dtype than the
    model's parameters, or an input whose rank or channels the model's first convolution (in registration order)
    cannot take. None when nothing is found (or there is no model to compare with)."""
    if model is None:
        return None
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for i, x in enumerate(xs):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and len(dtypes) == 1 and x.dtype not in dtypes:
            (dtype,) = dtypes
            return (f"inputs[{i}] has dtype {x.dtype} but the model's parameters are {dtype}: convert the inputs "
                    f"(inputs.to({dtype})) or the model")
    first = next(((name, m) for name, m in model.named_modules() if type(m) in _CONV_LAYOUT), None)
    if first is None or len(xs) != 1 or not isinstance(xs[0], torch.Tensor):
        return None
    name, conv = first
    x, rank = xs[0], conv.weight.dim()
    expected = f"[N, {conv.in_channels}, {_CONV_LAYOUT[type(conv)]}]"
    if x.dim() != rank or x.shape[1] != conv.in_channels:
        return (f"inputs[0] has shape {tuple(x.shape)} but the model's first layer {name} "
                f"({type(conv).__name__}({conv.in_channels}, {conv.out_channels})) takes {expected}")
    if not x.is_floating_point():
        return f"inputs[0] has dtype {x.dtype}; the model's first layer {name} takes floating-point {expected}"
    return None
