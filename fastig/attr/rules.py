"""Modified backward rules, one mechanism for every method that backpropagates something else than the gradient:
guided backpropagation, deconvnet, guided max-pooling, DeepLIFT's rescale rule and LRP's layer rules.

A rule set (:class:`Rules`) says what the backward pass of each kind of operation does; the forward pass is never
changed:

- ``relu``: ``"gradient"`` (the plain gradient), ``"guided"`` (guided backpropagation, Springenberg et al. 2015:
  ``g * (x > 0) * (g > 0)``, ``g`` being the gradient arriving at the ReLU's output and ``x`` its input),
  ``"deconv"`` (deconvnet, Zeiler & Fergus 2014: ``g * (g > 0)``, whatever the sign of ``x``) or ``"rescale"``
  (DeepLIFT, below);
- ``max_pool``: ``"gradient"``, ``"positive"`` (only the positive part of ``g`` is passed back, to the arg-max
  positions: the max-pooling rule of guided non-linearity IG, Kwon et al. 2020) or ``"rescale"`` (DeepLIFT);
- ``nonlinear``: the other non-linearities DeepLIFT rescales -- sigmoid, tanh, ELU, leaky ReLU, softplus, softmax:
  ``"gradient"`` or ``"rescale"``;
- ``rescale_eps``: where ``|x - x_ref| < rescale_eps`` the rescale rule uses the ordinary gradient (Captum's eps);
- ``layers``: LRP (Bach et al. 2015): None (plain gradients), or the rule of every layer operation -- linear,
  convolution, batch norm, max, average and adaptive-average pooling: a rule name (``epsilon z gamma alpha_beta
  identity``, :data:`LRP_RULES`) or a rule object (:class:`EpsilonRule`, :class:`GammaRule`, ...), or a
  :class:`LayerRules` (a rule per module, what :class:`~fastig.attr.LRP` builds).

DeepLIFT's rescale rule (Shrikumar et al. 2017) replaces a non-linearity's local gradient by the ratio of
differences ``(f(x) - f(x_ref)) / (x - x_ref)``; it is *paired*: the batch must be ``[inputs; baselines]`` along
dim 0 (the first half the inputs, the second their references), the layout :class:`~fastig.attr.DeepLift` runs
(:data:`RESCALE` is its rule set). Max-pooling uses Captum's rule: ``g`` times the difference of the pooled outputs,
routed through the arg-max positions of both halves and divided by the input's difference (where windows overlap, a
position gets the credits of every window it is the max of). Softmax multipliers are centred per example.

LRP's rules work in "gradient form": the relevance of a tensor ``t`` is ``t * g``, ``g`` being what autograd
propagates. A layer with a rule outputs its ordinary value ``z`` and propagates ``J'^T (g * z / (z' + eps *
sign(z')))`` back, ``z'`` and ``J'`` being its output and Jacobian with the rule's modified weights (``z`` and ``J``
for the epsilon rule): Captum's propagation, one forward and one backward pass, no weight copies. Everything else
keeps its gradient, which in gradient form is LRP-0 (an addition ``a + b`` passes ``R * a / (a + b)`` to ``a``:
relevance is conserved through skip connections); ReLUs pass relevance unchanged that way, and tanh is given a rule
that does (``g * tanh(z) / z``).

``rules=`` of the gradient and path methods (``IntegratedGradients``, ``GuidedIntegratedGradients``,
``BlurIntegratedGradients``, ``LatentIntegratedGradients``, ``Saliency``, ``InputXGradient``, ``GradientShap``,
and ``NoiseTunnel`` around them) takes a named set from :data:`RULE_SETS` -- ``"guided"`` (GuidedBackprop's),
``"deconv"`` (Deconvolution's), ``"gnl"`` (GuidedNonLinearityIG's: guided ReLUs and positive max-pooling) -- or a
:class:`Rules`, or a mapping of the same fields, to compose them: ``rules={"relu": "deconv", "max_pool":
"positive"}``; ``InputXGradient(model).attribute(x, rules={"layers": "epsilon"})`` is LRP-epsilon. So
``IntegratedGradients(model).attribute(x, rules="gnl")`` is GNL-IG and ``BlurIntegratedGradients(model).attribute(x,
rules="guided")`` is guided Blur IG. Paired (rescale) rules are refused there: their batches are not
``[inputs; baselines]``. The attribution entry point (:func:`fastig.attr._base.entry_point`) applies them;
:func:`applied` is the same as a context manager (DeepLift and LRP use it around their pass).

The rules are explicit autograd functions, put in place by a ``torch.overrides.TorchFunctionMode``: while it is
active, every ReLU evaluated by PyTorch's Python API goes through the rule -- ``nn.ReLU`` modules, and also the
functional calls ``torch.relu``, ``F.relu``, ``Tensor.relu`` and their in-place forms (googlenet and inception call
``F.relu`` inside ``forward``; Captum's module hooks miss those) -- and so does every max-pooling (``nn.MaxPool*d``,
``F.max_pool*d``, with or without indices), every other non-linearity listed above (``nn.Sigmoid`` and
``torch.sigmoid`` alike) and every layer operation (``nn.Linear`` and ``F.linear``, ``nn.Conv2d`` and ``F.conv2d``,
...). A :class:`LayerRules` also follows which module is running (global module hooks, removed on exit), so that
the operations a leaf module calls take that module's rule, and a module with a rule whose ``forward`` calls none
of the layer operations (Captum's ``Addition_Module``) gets it on its output. The model itself is never modified:
no attribute, hook or submodule of it is touched, so there is nothing to restore, and leaving the block (normally
or by an exception) removes the rules.

Not covered (plain gradients flow there): ReLUs written as ``clamp(min=0)``/``threshold``/``where``, operations
inside TorchScript or ``torch.compile``d code, and operations fused inside a single native op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fastig.errors import InvalidArgumentError, UnknownNameError

RELU_RULES = ("gradient", "guided", "deconv", "rescale")
MAX_POOL_RULES = ("gradient", "positive", "rescale")
NONLINEAR_RULES = ("gradient", "rescale")


# --- LRP's layer rules (Captum's classes and names) --------------------------------------------------------------


class PropagationRule:
    """Base class of the LRP rules: how a layer's output relevance is divided among its inputs.

    ``STABILITY_FACTOR`` is the epsilon added (with the sign of the output) to the denominator.
    """

    STABILITY_FACTOR = 1e-9
    zero_bias = False

    def modified_weights(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The weights the relevance is propagated with, or None for the layer's own."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:  # rules compare by value, so that equal Rules are equal
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


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


LRP_RULES = {"epsilon": EpsilonRule, "z": ZRule, "gamma": GammaRule, "alpha_beta": Alpha1_Beta0_Rule,
             "identity": IdentityRule}
_RULES_BY_CAPTUM_NAME = {"EpsilonRule": EpsilonRule, "GammaRule": GammaRule, "Alpha1_Beta0_Rule": Alpha1_Beta0_Rule,
                         "IdentityRule": IdentityRule, "PropagationRule": ZRule}


def as_rule(rule: Any) -> PropagationRule | None:
    """An LRP rule from a rule object, a rule name, None, or one of Captum's rule objects."""
    if rule is None or isinstance(rule, PropagationRule):
        return rule
    if isinstance(rule, str):
        if rule not in LRP_RULES:
            raise ValueError(f"unknown LRP rule {rule!r}; available: {', '.join(LRP_RULES)}")
        return LRP_RULES[rule]()
    kind = type(rule).__name__
    if type(rule).__module__.startswith("captum") and kind in _RULES_BY_CAPTUM_NAME:
        converted = _RULES_BY_CAPTUM_NAME[kind].__new__(_RULES_BY_CAPTUM_NAME[kind])
        for name in ("gamma", "set_bias_to_zero"):
            if hasattr(rule, name):
                setattr(converted, name, getattr(rule, name))
        converted.STABILITY_FACTOR = rule.STABILITY_FACTOR
        return converted
    raise TypeError(f"an LRP rule must be a PropagationRule, a rule name ({', '.join(LRP_RULES)}) or None, "
                    f"got {type(rule).__name__}")


class LayerRules:
    """LRP rules per module, for one forward/backward pass (what :class:`~fastig.attr.LRP` builds).

    ``modules``: the rule of each leaf module, by identity (None: its operations keep their gradients); every layer
    operation a module in it calls takes its rule. ``default``: the rule of layer operations called outside those
    modules (functional calls in a ``forward``). ``convert``: give the first layers' inputs Captum's relevance form
    (see :class:`InputRegion`; the pass then marks its inputs with ``region.mark_inputs``).
    """

    def __init__(self, default: PropagationRule | None, modules: Mapping | None = None, convert: bool = False):
        self.default = default
        self.modules = dict(modules or {})
        self.region = InputRegion(convert)
        self._calls: list[list] = []  # the modules running, innermost last: [module, whether a layer op ran in it]

    def rule_of_call(self) -> PropagationRule | None:
        """The rule of a layer operation called now: the innermost running module's, if it has an entry."""
        if self._calls and self._calls[-1][0] in self.modules:
            self._calls[-1][1] = True
            return self.modules[self._calls[-1][0]]
        return self.default

    def entered(self, module: nn.Module, inputs: tuple) -> tuple | None:
        self._calls.append([module, False])
        if self.modules.get(module) is not None:
            return self.region.layer_inputs(inputs)
        return None

    def left(self, module: nn.Module, inputs: tuple, output: Any) -> Any:
        while self._calls and self._calls[-1][0] is not module:  # calls that failed inside left their entries
            self._calls.pop()
        if not self._calls:
            return None
        _, ran_layer_op = self._calls.pop()
        rule = self.modules.get(module)
        if rule is None or ran_layer_op or not isinstance(output, torch.Tensor):
            return None
        # a module with a rule whose forward calls no layer operation: the rule at its output
        if isinstance(rule, IdentityRule):
            return self.region.layer_output(_identity_relevance(type(module).__name__, inputs, output.detach()))
        if _changes_weights(rule, None):
            raise TypeError(f"{type(rule).__name__} changes weights, which fastig supports for Linear, Conv and "
                            f"BatchNorm layers only, not {type(module).__name__}")
        return self.region.layer_output(_relevance_out(output, output.detach(), rule.STABILITY_FACTOR))


class InputRegion:
    """During one forward pass: which tensors are computed from the model's inputs alone (the operations before
    the first layers), so that Captum's relevance form can start at the first layers' inputs.

    A tensor's autograd history is followed back until it meets a layer (an operation or module with a rule, or
    tanh) or a model input; the answers are memoized per autograd node, so each node is visited once per pass.
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

    def layer_output(self, z: Any) -> Any:
        if self.convert and isinstance(z, torch.Tensor) and z.grad_fn is not None:
            self.layers.add(z.grad_fn)
        return z


# --- rule sets ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rules:
    """What each kind of operation passes back (module docstring); every field defaults to the plain gradient."""

    relu: str = "gradient"
    max_pool: str = "gradient"
    nonlinear: str = "gradient"
    rescale_eps: float = 1e-10
    layers: Any = None

    def __post_init__(self) -> None:
        for field, choices, kind in (("relu", RELU_RULES, "ReLU rule"), ("max_pool", MAX_POOL_RULES,
                                     "max-pooling rule"), ("nonlinear", NONLINEAR_RULES, "non-linearity rule")):
            value = getattr(self, field)
            if value not in choices:
                raise UnknownNameError(f"rules: unknown {kind} {field}={value!r}; choices: {', '.join(choices)}")
        if isinstance(self.rescale_eps, bool) or not isinstance(self.rescale_eps, (int, float)) \
                or not self.rescale_eps >= 0:
            raise InvalidArgumentError(f"rules: rescale_eps must be a non-negative number, got {self.rescale_eps!r}")
        if self.layers is not None and not isinstance(self.layers, LayerRules):
            try:
                object.__setattr__(self, "layers", as_rule(self.layers))
            except (TypeError, ValueError) as error:
                raise UnknownNameError(f"rules: layers={self.layers!r}: {error}") from None
        if self.layers is not None and (self.paired or self.max_pool != "gradient"):
            raise InvalidArgumentError("rules: LRP's layer rules (layers=) take max-pooling and tanh themselves and "
                                       "do not combine with the rescale or positive max-pooling rules")

    @property
    def is_plain(self) -> bool:
        return (self.relu, self.max_pool, self.nonlinear, self.layers) == ("gradient", "gradient", "gradient", None)

    @property
    def paired(self) -> bool:
        """Whether a rule needs the batch ``[inputs; baselines]`` (DeepLIFT's rescale)."""
        return "rescale" in (self.relu, self.max_pool, self.nonlinear)


RULE_SETS: dict[str, Rules] = {
    "guided": Rules(relu="guided"),  # GuidedBackprop
    "deconv": Rules(relu="deconv"),  # Deconvolution
    "gnl": Rules(relu="guided", max_pool="positive"),  # GuidedNonLinearityIG
}
RULE_NAMES = tuple(RULE_SETS)  # the CLI's --rules choices
RESCALE = Rules(relu="rescale", max_pool="rescale", nonlinear="rescale")  # DeepLift's (paired: not in RULE_SETS)

RulesLike = Union[str, Rules, Mapping]


def resolve(rules: RulesLike) -> Rules:
    """The :class:`Rules` that ``rules`` names: a name from :data:`RULE_SETS`, a Rules, or a mapping of its fields;
    anything else is an :class:`~fastig.errors.UnknownNameError` naming ``rules`` and the choices."""
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, str) and rules in RULE_SETS:
        return RULE_SETS[rules]
    fields = tuple(f.name for f in dataclasses.fields(Rules))
    if isinstance(rules, Mapping) and set(rules) <= set(fields):
        return Rules(**rules)
    given = f"unknown keys {sorted(set(rules) - set(fields))}" if isinstance(rules, Mapping) else repr(rules)
    raise UnknownNameError(
        f"rules: unknown rule set {given}; choices: {', '.join(repr(n) for n in RULE_NAMES)}, a "
        f"fastig.attr.rules.Rules or a mapping of its fields {fields} (e.g. {{'relu': 'guided', 'max_pool': "
        "'positive'}})")


@contextlib.contextmanager
def applied(rules: RulesLike | None) -> Iterator[None]:
    """Within the block, the operations the rules name (modules and functional calls) backpropagate with ``rules``
    (see :func:`resolve`); None or the plain rules change nothing."""
    rules = None if rules is None else resolve(rules)
    if rules is None or rules.is_plain:
        yield
        return
    _in_force.stack = getattr(_in_force, "stack", []) + [rules]
    try:
        with _RuleMode(rules), _modules_followed(rules):
            yield
    finally:
        _in_force.stack = _in_force.stack[:-1]


def active() -> Rules | None:
    """The rules in force in this thread (the innermost :func:`applied` block), None when gradients are plain: for
    code that relies on exact gradients (completeness holds for true gradients only, not for guided ones)."""
    stack = getattr(_in_force, "stack", [])
    return stack[-1] if stack else None


_in_force = threading.local()


@contextlib.contextmanager
def _modules_followed(rules: Rules) -> Iterator[None]:
    """For a :class:`LayerRules` with modules: global module hooks (the model is not touched) that tell it which
    module runs, in this thread only."""
    layers = rules.layers
    if not isinstance(layers, LayerRules) or not layers.modules:
        yield
        return

    def entered(module, inputs):
        return layers.entered(module, inputs) if active() is rules else None

    def left(module, inputs, output):
        return layers.left(module, inputs, output) if active() is rules else None

    handles = (nn.modules.module.register_module_forward_pre_hook(entered),
               nn.modules.module.register_module_forward_hook(left))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the functions each rule intercepts ---------------------------------------------------------------------------

_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_RELUS_INPLACE = {F.relu_: F.relu, torch.relu_: torch.relu, torch.Tensor.relu_: torch.Tensor.relu}
_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax}
_NONLINEAR = {torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh, F.elu, F.leaky_relu, F.softplus,
              *_SOFTMAXES}
_NONLINEAR_INPLACE = {torch.sigmoid_: torch.sigmoid, torch.Tensor.sigmoid_: torch.Tensor.sigmoid,
                      torch.tanh_: torch.tanh, torch.Tensor.tanh_: torch.Tensor.tanh, F.elu_: F.elu,
                      F.leaky_relu_: F.leaky_relu}
_RESCALED_INPLACE = {**_RELUS_INPLACE, **_NONLINEAR_INPLACE}
_TANHS = {torch.tanh, torch.Tensor.tanh}
_MAX_POOL_DIMS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.max_pool1d_with_indices: 1, F.max_pool2d_with_indices: 2, F.max_pool3d_with_indices: 3,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3,
}
_MAX_POOL_WITH_INDICES = {1: F.max_pool1d_with_indices, 2: F.max_pool2d_with_indices, 3: F.max_pool3d_with_indices}
_POOL_PARAMETERS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
# layer operations (LRP) and where their weight and bias are: (position, name)
_WEIGHTED_OPS = {F.linear: ((1, "weight"), (2, "bias")), F.conv1d: ((1, "weight"), (2, "bias")),
                 F.conv2d: ((1, "weight"), (2, "bias")), F.conv3d: ((1, "weight"), (2, "bias")),
                 F.batch_norm: ((3, "weight"), (4, "bias"))}
_POOL_OPS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
             F.adaptive_avg_pool3d, *_MAX_POOL_DIMS}


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _is_inplace(func: Callable, kwargs: dict, plain: dict) -> bool:
    """Whether the call writes into its input: an in-place function (a key of ``plain``) or ``inplace=True``."""
    return func in plain or bool(kwargs.get("inplace", False))


def _out_of_place(func: Callable, args: tuple, kwargs: dict, plain: dict) -> Callable:
    """The same call out of place, as a function of the input (``plain`` maps in-place functions to theirs)."""
    func = plain.get(func, func)
    rest = {k: v for k, v in kwargs.items() if k not in ("inplace", "input")}
    return lambda z: func(z, *args[1:], **rest)


class _RuleMode(TorchFunctionMode):
    def __init__(self, rules: Rules):
        super().__init__()
        self.rules = rules
        self.handlers: dict[Callable, Callable] = {}
        relu = {"guided": self._guided_relu, "deconv": self._deconv_relu, "rescale": self._rescale}.get(rules.relu)
        if relu is not None:
            self.handlers.update(dict.fromkeys({*_RELUS, *_RELUS_INPLACE}, relu))
        if rules.nonlinear == "rescale":
            self.handlers.update(dict.fromkeys({*_NONLINEAR, *_NONLINEAR_INPLACE}, self._rescale))
        if rules.max_pool != "gradient":
            pool = self._positive_max_pool if rules.max_pool == "positive" else self._rescale_max_pool
            self.handlers.update(dict.fromkeys(_MAX_POOL_DIMS, pool))
        if rules.layers is not None:
            self.layers = rules.layers if isinstance(rules.layers, LayerRules) else LayerRules(rules.layers)
            self.handlers.update(dict.fromkeys({*_WEIGHTED_OPS, *_POOL_OPS}, self._layer))
            self.handlers.update(dict.fromkeys(_TANHS, self._relevance_tanh))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is None or not torch.is_grad_enabled() or not _first_tensor(args, kwargs).requires_grad:
            return func(*args, **kwargs)  # nothing to differentiate: the plain op
        return handler(func, args, kwargs)

    # ReLUs: guided backpropagation, deconvnet

    def _guided_relu(self, func, args, kwargs):
        return _GuidedReLU.apply(_first_tensor(args, kwargs), _is_inplace(func, kwargs, _RELUS_INPLACE))

    def _deconv_relu(self, func, args, kwargs):
        return _DeconvReLU.apply(_first_tensor(args, kwargs), _is_inplace(func, kwargs, _RELUS_INPLACE))

    def _positive_max_pool(self, func, args, kwargs):
        return _on_values(func(*args, **kwargs), _PositiveGradient.apply)

    # DeepLIFT

    def _rescale(self, func, args, kwargs):
        return _Rescale.apply(_first_tensor(args, kwargs), _out_of_place(func, args, kwargs, _RESCALED_INPLACE),
                              self.rules.rescale_eps, func in _SOFTMAXES, _is_inplace(func, kwargs, _RESCALED_INPLACE))

    def _rescale_max_pool(self, func, args, kwargs):
        bound = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
        bound.update(zip(_POOL_PARAMETERS, args))
        bound.update(kwargs)
        with_indices = bound.pop("return_indices") or func is _MAX_POOL_WITH_INDICES[_MAX_POOL_DIMS[func]]
        pool = _MAX_POOL_WITH_INDICES[_MAX_POOL_DIMS[func]]
        values, indices = _RescaleMaxPool.apply(bound.pop("input"), pool, bound, self.rules.rescale_eps)
        return (values, indices) if with_indices else values

    # LRP

    def _layer(self, func, args, kwargs):
        rule = self.layers.rule_of_call()
        if rule is None:
            return func(*args, **kwargs)
        region = self.layers.region
        x = region.layer_inputs((_first_tensor(args, kwargs),))[0]  # a no-op inside a module that converted it
        args = (x,) + tuple(args[1:]) if args else args
        kwargs = kwargs if args else {**kwargs, "input": x}
        if isinstance(rule, IdentityRule):
            with torch.no_grad():
                z = func(*args, **kwargs)
            return _on_values(z, lambda values: region.layer_output(_identity_relevance(func.__name__, (x,), values)))
        weight_at, bias_at = _WEIGHTED_OPS.get(func, (None, None))
        weight = _argument(args, kwargs, weight_at)
        if not _changes_weights(rule, weight):
            return _on_values(func(*args, **kwargs),
                              lambda z: region.layer_output(_relevance_out(z, None, rule.STABILITY_FACTOR)))
        if weight_at is None:
            raise TypeError(f"{type(rule).__name__} changes weights, which fastig supports for Linear, Conv and "
                            f"BatchNorm layers only, not {func.__name__}")
        with torch.no_grad():
            z = func(*args, **kwargs)
        if weight is not None:
            args, kwargs = _with_argument(args, kwargs, weight_at, rule.modified_weights(weight))
        bias = _argument(args, kwargs, bias_at)
        if bias is not None and rule.zero_bias:
            args, kwargs = _with_argument(args, kwargs, bias_at, torch.zeros_like(bias))
        return region.layer_output(_relevance_out(func(*args, **kwargs), z, rule.STABILITY_FACTOR))

    def _relevance_tanh(self, func, args, kwargs):
        region = self.layers.region
        (z,) = region.layer_inputs((_first_tensor(args, kwargs),))
        y = torch.tanh(z)
        ratio = torch.where(z == 0, torch.ones_like(z), y / torch.where(z == 0, torch.ones_like(z), z))
        # relevance passes unchanged: g_in = g_out * tanh(z) / z
        return region.layer_output(_Relevance.apply(z, y.detach(), ratio.detach()))


def _on_values(result: Any, rule: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``rule`` applied to an operation's result, or to the values of a max-pooling's (values, indices)."""
    return (rule(result[0]),) + tuple(result[1:]) if isinstance(result, tuple) else rule(result)


def _argument(args: tuple, kwargs: dict, at: tuple | None) -> Any:
    if at is None:
        return None
    position, name = at
    return args[position] if len(args) > position else kwargs.get(name)


def _with_argument(args: tuple, kwargs: dict, at: tuple, value: Any) -> tuple[tuple, dict]:
    position, name = at
    if len(args) > position:
        return args[:position] + (value,) + args[position + 1:], kwargs
    return args, {**kwargs, name: value}


def _changes_weights(rule: PropagationRule, weight: torch.Tensor | None) -> bool:
    return rule.zero_bias or (weight is not None and rule.modified_weights(weight) is not None)


def _relevance_out(z_rule: torch.Tensor, z: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``z`` (default: ``z_rule``'s value) forward; backward ``g * z / (z_rule + eps * sign(z_rule))`` into
    ``z_rule``'s graph (the layer's, with the rule's weights)."""
    z_rule_value = z_rule.detach()
    z = z_rule_value if z is None else z.detach()
    sign = torch.where(z_rule_value >= 0, 1.0, -1.0).to(z_rule_value.dtype)  # sign(0) counts as +1, as in Captum
    return _Relevance.apply(z_rule, z, z / (z_rule_value + sign * eps))


def _identity_relevance(layer: str, inputs: tuple, z: torch.Tensor) -> torch.Tensor:
    """``z`` forward; backward keeps the relevance ``t * g``: ``g_in = z * g_out / a`` (zero where ``a == 0``, where
    no relevance can sit)."""
    if len(inputs) != 1:
        raise ValueError(f"IdentityRule needs a layer with one input, {layer} has {len(inputs)}")
    (a,) = inputs
    if z.shape != a.shape:
        raise ValueError(f"IdentityRule needs equal input and output shapes on {layer}")
    value = a.detach()
    ratio = torch.where(value == 0, torch.zeros_like(z), z / torch.where(value == 0, torch.ones_like(value), value))
    return _Relevance.apply(a, z, ratio)


# --- the autograd functions --------------------------------------------------------------------------------------


class _GuidedReLU(torch.autograd.Function):
    """relu(x); backward passes ``g`` where both ``x > 0`` and ``g > 0``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        out = x.clamp_(min=0) if inplace else x.clamp(min=0)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)  # out > 0 exactly where x > 0
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0), None


class _DeconvReLU(torch.autograd.Function):
    """relu(x); backward passes the positive part of ``g``, ignoring the sign of ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(min=0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(min=0), None


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward keeps only the positive part of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # a copy, not a view: the model may modify the pooled output in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


def _half_diff(t: torch.Tensor) -> torch.Tensor:
    """[x; x_ref] -> x - x_ref: the difference from reference, which both halves of the batch share (the backward
    passes below compute on one half's size and broadcast over the two halves, viewed as [2, n, ...])."""
    first, second = t.chunk(2)
    return first - second


def _local_grad(fn: Callable, z: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The ordinary vector-Jacobian product of ``fn`` at ``z`` (used where ``|delta_in| < eps``)."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf), leaf, grad_out)
    return grad


class _Rescale(torch.autograd.Function):
    """y = fn(x) forward (in place if asked); DeepLIFT rescale multipliers backward (Captum's ``nonlinear`` and
    ``softmax`` rules; ``center``: softmax)."""

    @staticmethod
    def forward(ctx, x, fn, eps, center, inplace):
        y = fn(x)
        z = x
        if inplace:  # the input is saved as it was; the result is written into it
            z = x.clone()
            y = x.copy_(y)
            ctx.mark_dirty(x)
        ctx.save_for_backward(z, y)
        ctx.fn, ctx.eps, ctx.center = fn, eps, center
        return y

    @staticmethod
    def backward(ctx, grad_out):
        z, y = ctx.saved_tensors
        delta_in, delta_out = _half_diff(z), _half_diff(y)
        halves = grad_out.reshape(2, *delta_in.shape)
        near = delta_in.abs() < ctx.eps
        grad = halves * delta_out / delta_in
        if near.any():
            grad = torch.where(near, _local_grad(ctx.fn, z, grad_out).reshape(halves.shape), grad)
        if ctx.center:  # softmax: remove the mean, per example over both halves (see DeepLift's docstring)
            mean = grad.flatten(2).sum(2).sum(0) / (2 * delta_in[0].numel())
            grad = grad - mean.reshape((1, -1) + (1,) * (delta_in.dim() - 1))
        return grad.reshape(grad_out.shape), None, None, None, None


class _RescaleMaxPool(torch.autograd.Function):
    """Max pooling forward (values, indices); Captum's DeepLIFT max-pool multipliers backward."""

    @staticmethod
    def forward(ctx, z, pool, options, eps):
        y, indices = pool(z, **options)
        ctx.save_for_backward(z, y, indices)
        ctx.eps = eps
        ctx.mark_non_differentiable(indices)
        return y, indices

    @staticmethod
    def backward(ctx, grad_out, _):
        z, y, indices = ctx.saved_tensors
        out, out_ref = y.chunk(2)
        cross_max = torch.max(out, out_ref)
        # the input half credits its max positions with (max(out, out_ref) - out_ref), the baseline half its own
        # max positions with (out - max(out, out_ref)); the two halves' results are summed (Captum's rule)
        delta_out = torch.cat([cross_max - out_ref, out - cross_max])
        # a position that is the max of several (overlapping) windows gets all their credits (Captum unpools,
        # which keeps one of them)
        unpooled = _scatter_add(grad_out * delta_out, indices, z)
        first, second = unpooled.chunk(2)
        delta_in = _half_diff(z)
        near = delta_in.abs() < ctx.eps
        grad = (first + second) / delta_in  # the same for both halves
        if near.any():
            # the ordinary max-pool gradient: grad_out added at each window's max position
            plain = _scatter_add(grad_out, indices, z).reshape(2, *delta_in.shape)
            return torch.where(near, plain, grad).reshape(z.shape), None, None, None
        return torch.cat([grad, grad]), None, None, None


def _scatter_add(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Add pooled ``values`` back at their (per-plane flat) max ``indices``: the ordinary max-pool gradient."""
    out = torch.zeros_like(like).flatten(2)
    return out.scatter_add_(2, indices.flatten(2), values.flatten(2)).view_as(like)


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
