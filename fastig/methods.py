"""The registry of attribution methods behind ``fastig.attribute`` and ``fastig attribute --method NAME``.

Each method is registered once with the class that computes it and the keyword arguments of its ``attribute()``
that the CLI exposes. CLI flags come from the shared option catalogue ``OPTIONS``, so two methods with the same
knob (``--steps``) share one flag, and a flag given to a method that has no such knob is a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import click
import torch

from fastig import attr
from fastig.attr import lrp, rules
from fastig.attr._path_common import OUTPUTS
from fastig.attr.noise_tunnel import NT_TYPES
from fastig.core import baselines, quadrature
from fastig.core.engine import PRECISIONS
from fastig.core.paths import INTERPOLATIONS
from fastig.core.superpixels import superpixel_mask
from fastig.errors import UnknownNameError
from fastig.models.dvae import LATENTS


class StepsType(click.ParamType):
    """``--steps``: a positive integer, or ``auto`` (adaptive steps: ``--tolerance``, ``--max-steps``)."""

    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither an integer nor 'auto'", param, ctx)


@dataclass(frozen=True)
class Option:
    flag: str  # the CLI flag, e.g. "--steps"
    kwarg: str  # the attribute() keyword it sets, e.g. "n_steps"
    type: Any  # int, float, bool (a switch), str, a tuple of allowed strings, or a click.ParamType
    help: str
    old_flags: tuple[str, ...] = ()  # earlier names of the flag, still accepted (deprecated, hidden from --help)


OPTIONS: dict[str, Option] = {
    o.kwarg: o
    for o in [
        Option("--steps", "n_steps", StepsType(), "number of path steps (or samples) of the method; `auto`: "
               "adaptive steps per image (ig, blur_ig, gnl_ig; see --tolerance, --max-steps)"),
        Option("--tolerance", "tolerance", float, "--steps auto: relative error of the map (estimated) and of its "
               "completeness to reach per image (default 0.01)"),
        Option("--max-steps", "max_steps", int, "--steps auto: most gradients per image (default 256)"),
        Option("--rule", "rule", quadrature.RULES, "quadrature rule of IG-style methods (latent IG: riemann_left or "
               "riemann_trapezoid)"),
        # three sizes, three flags: --inputs-per-pass (rows of one model pass), --perturbations-per-pass (copies
        # of each image in one pass), and the command's own --images-per-batch (images a run attributes together)
        Option("--inputs-per-pass", "internal_batch_size", int, "model inputs (path points or noisy copies, of all "
               "the batch's images together) per forward/backward pass: Captum's internal_batch_size (default: "
               "auto)", old_flags=("--batch-size",)),
        Option("--abs/--no-abs", "abs", bool, "saliency: absolute value of the gradient (default: on, as Captum)"),
        Option("--nt-type", "nt_type", NT_TYPES, "noise tunnel: how samples combine"),
        Option("--nt-samples", "nt_samples", int, "noise tunnel: noisy copies per example"),
        Option("--nt-batch-size", "nt_samples_batch_size", int, "noise tunnel: noisy copies of each image made at "
               "once (Captum's nt_samples_batch_size)"),
        Option("--stdevs", "stdevs", float, "standard deviation of the Gaussian input noise (absolute, input units)"),
        Option("--n-samples", "n_samples", int, "random samples per example (gradient SHAP, Shapley sampling, LIME, kernel SHAP, PDA)"),
        Option("--layer", "layer", str, "second-order: dotted submodule name (default: last spatial layer)"),
        Option("--window", "window", int, "occlusion / pda: side of the square window, in pixels"),
        Option("--window-stride", "stride", int, "occlusion / pda: step between windows, in pixels"),
        Option("--segments", "n_segments", int, "perturbation methods: number of superpixels used as features"),
        Option("--perturbations-per-pass", "perturbations_per_eval", int, "perturbation methods: perturbed copies of "
               "each image per model pass: Captum's perturbations_per_eval (default: auto)", old_flags=("--per-eval",)),
        Option("--iterations", "n_iter", int, "meaningful perturbation: optimizer iterations"),
        Option("--idgi", "idgi", bool, "path methods: IDGI accumulation (Yang et al. 2023) instead of the Riemann sum"),
        Option("--output", "output", OUTPUTS, "path methods: explain the target's logit, or its softmax probability"),
        Option("--rules", "rules", rules.RULE_NAMES, "gradient and path methods: modified backward rules (guided: "
               "guided-backprop ReLUs; deconv: deconvnet ReLUs; gnl: guided ReLUs and positive max-pool gradients, "
               "as gnl_ig)"),
        Option("--fraction", "fraction", float, "guided IG: fraction of features moved per step (default 0.25)"),
        Option("--max-dist", "max_dist", float, "guided IG: max deviation from the straight line, in alpha (default 0.02)"),
        Option("--max-sigma", "max_sigma", float, "blur IG: blur of the baseline, Gaussian sigma in pixels (default 50)"),
        Option("--grad-step", "grad_step", float, "blur IG: sigma step of the path derivative (default 0.01)"),
        Option("--sqrt", "sqrt", bool, "blur IG: square-root spacing of the blur levels (PAIR's sqrt=True)"),
        Option("--lrp-rule", "lrp_rule", tuple(lrp.RULES),
               "LRP: rule of every layer that has a default rule (default: epsilon, as Captum)"),
        Option("--dvae", "dvae", str, "latent IG: folder holding dvae_encoder.pt and dvae_decoder.pt (`fastig "
               "convert-dvae`; default: the checkpoints folder)"),
        Option("--interpolation", "interpolation", INTERPOLATIONS, "latent IG: interpolation of the latents "
               "(default lerp)"),
        Option("--latent", "latent", LATENTS, "latent IG: what is interpolated (default "
               "embedding: the decoder's first 1x1 conv of the soft codes)"),
        Option("--gap-steps", "gap_steps", int, "latent IG: pixel-space steps joining the input and the baseline to "
               "their decodings (default: steps / 4, rounded up)"),
        Option("--precision", "precision", PRECISIONS, "autocast precision of the model's passes "
               "(default fp32; bf16/fp16 pay on GPUs and CPUs with native bf16/fp16, not on AVX2-only CPUs)"),
        Option("--dvae-size", "dvae_size", int, "latent IG: image side the dVAE sees, a multiple of 8 (default: the "
               "model's input size)"),
        Option("--baselines", "baselines", baselines.BASELINE_KINDS, "path methods: the baseline: zeros (default) or "
               "the image with a random subset of its segments replaced (fastig.core.baselines; --baseline-*)"),
        Option("--baseline-segmentation", "baseline_segmentation", baselines.SEGMENTATIONS,
               "segment baselines: how the image is cut into segments (default slic: fastig's superpixels)"),
        Option("--baseline-segments", "baseline_segments", int,
               "segment baselines: about how many segments (default 32)"),
        Option("--baseline-fraction", "baseline_fraction", float,
               "segment baselines: fraction of the segments replaced in each baseline (default 0.5)"),
        Option("--baseline-fill", "baseline_fill", baselines.FILLS,
               "segment baselines: what replaces the segments (default blur; telea / navier_stokes: inpainting)"),
        Option("--baseline-samples", "baseline_samples", int,
               "segment baselines: random baselines per image, attributions averaged (default 4)"),
        Option("--baseline-seed", "baseline_seed", int, "segment baselines: seed of the draws (default 0)"),
    ]
}
# the options of every path method that has a baseline (fastig.core.baselines.from_options reads them)
_BASELINES = ("baselines", "baseline_segmentation", "baseline_segments", "baseline_fraction", "baseline_fill",
              "baseline_samples", "baseline_seed")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    cls: type  # the attribution class; its attribute() gives the defaults, its convergence delta path_method
    options: tuple[str, ...] = ()  # attribute() keywords from OPTIONS that this method accepts
    fixed: dict = field(default_factory=dict)  # keywords always passed (e.g. IDGI on)
    demo: dict = field(default_factory=dict)  # options `fastig demo` uses on the 227x227 center-pixel model
    # keywords of ``options`` that go to ``build(model, **those)`` instead of ``attribute()``: settings fixed when
    # the method object is made, such as latent IG's dVAE folder (fastig.api.attribute splits them off)
    build_options: tuple[str, ...] = ()
    # called with the chosen options before a CLI run starts any work (e.g. to name a missing weight file)
    check: Callable[[dict], None] | None = None
    # model (+ build_options) -> object with .attribute(inputs, target=..., **options); None: ``cls`` itself
    builder: Callable[..., Any] | None = None

    @property
    def path_method(self) -> bool:
        """Whether the method has a convergence delta (``completeness`` can measure it)."""
        return bool(self.cls._has_convergence_delta)

    def build(self, model, **build_options):
        return (self.builder or self.cls)(model, **build_options)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    unknown = [o for o in method.options if o not in OPTIONS]
    if not set(method.build_options) <= set(method.options):
        raise ValueError(f"method {method.name}: build_options must also be listed in options")
    if unknown:
        raise ValueError(f"method {method.name} uses options missing from fastig.methods.OPTIONS: {unknown}")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in METHODS:
        raise UnknownNameError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def names() -> list[str]:
    return sorted(METHODS)


# fastig's keyword -> the Captum-facing attribute() keyword: the quadrature rule is ``rule`` inside fastig (and on
# the CLI, ``--rule``) and keeps Captum's ``method=`` only in the signatures called like Captum's
ATTRIBUTE_KEYWORDS = {"rule": "method"}
_DEFAULTS: dict[str, dict] = {}


def defaults(name: str) -> dict:
    """The default of each option of method ``name`` (``Method.options``), as ``attribute()`` (or the method's
    constructor, for ``build_options``) declares it, with the CLI's own defaults of the perturbation methods; None
    where the method decides at run time ("auto"). A method whose construction needs files (latent IG's dVAE) is
    read from its class; the others are built on a stand-in model."""
    spec = get(name)
    if name not in _DEFAULTS:
        import inspect

        method = spec.cls.attribute if spec.build_options else spec.build(torch.nn.Identity())
        found = {}
        for kwarg in spec.options:
            if kwarg in spec.build_options:
                default = inspect.signature(spec.cls).parameters[kwarg].default
                found[kwarg] = None if default is inspect.Parameter.empty else default
            else:
                found[kwarg] = _default_of(method, ATTRIBUTE_KEYWORDS.get(kwarg, kwarg))
        _DEFAULTS[name] = found
    return dict(_DEFAULTS[name])


def _default_of(method, keyword: str):
    """The default of ``keyword`` in ``method.attribute()`` (``method``: an attribution object or the function)."""
    import inspect

    if isinstance(method, WithDefaults):
        if keyword in method.defaults:
            return method.defaults[keyword]
        return _default_of(method.method, method.rename.get(keyword, keyword))
    functions = [method] if not hasattr(method, "attribute") else [  # also overridden ones (a wrapper's super())
        c.__dict__["attribute"] for c in type(method).__mro__ if "attribute" in c.__dict__]
    for function in functions:
        parameter = inspect.signature(function).parameters.get(keyword)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    inner = getattr(method, "attribution_method", None)  # NoiseTunnel hands the other keywords on
    return None if inner is None else _default_of(inner, keyword)


# What None means for the options that a hook handles rather than attribute()'s own signature
_NONE_MEANS = {"rules": "off", "baselines": "zeros", **{
    kwarg: getattr(baselines.SegmentBaselines(), field) for kwarg, field in baselines.FLAT_OPTIONS.items()}}


def describe_default(value, kwarg: str | None = None) -> str:
    """A default as the CLI shows it (``kwarg``: the option, for what its None means)."""
    if value is None:
        return str(_NONE_MEANS.get(kwarg, "auto"))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class WithDefaults:
    """A method object for the CLI: fills in default options and translates the CLI's generic ones.

    ``rename`` maps CLI keywords to the method's (``window`` -> ``sliding_window_shapes``). ``square_window``
    turns int ``sliding_window_shapes`` / ``strides`` into Occlusion's tuples for image batches (the window spans
    all channels and is square over the last two dimensions). ``n_segments`` becomes a superpixel
    ``feature_mask`` (see :func:`fastig.core.superpixels.superpixels`) when no mask is given.
    """

    def __init__(self, method: Any, rename: dict | None = None, square_window: bool = False, **defaults: Any) -> None:
        self.method = method
        self.rename = rename or {}
        self.square_window = square_window
        self.defaults = defaults

    def attribute(self, inputs: Any, target: Any = None, **options: Any) -> Any:
        merged = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        merged = {self.rename.get(k, k): v for k, v in merged.items()}
        segments = merged.pop("n_segments", None)
        if segments is not None and merged.get("feature_mask") is None:
            merged["feature_mask"] = superpixel_mask(None, segments, inputs)
        if self.square_window and isinstance(inputs, torch.Tensor):
            lead = tuple(inputs.shape[1:-2])
            for key in ("sliding_window_shapes", "strides"):
                value = merged.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    merged[key] = (lead if key == "sliding_window_shapes" else (1,) * len(lead)) + (value, value)
        return self.method.attribute(inputs, target=target, **merged)


def _with_defaults(cls: type, rename: dict | None = None, square_window: bool = False, **cli_defaults):
    """Builder of ``cls`` with the CLI's defaults and keyword names (:class:`WithDefaults`)."""
    return lambda model: WithDefaults(cls(model), rename, square_window, **cli_defaults)


def _smoothgrad(model):
    return attr.NoiseTunnel(attr.Saliency(model))


def _gradient_shap_baselines(inputs):
    from fastig.attr.gradients import default_baseline_distribution

    return default_baseline_distribution(inputs)


def _check_latent_ig(options: dict) -> None:
    from fastig.attr.latent_ig import check_options

    check_options(options)


ADAPTIVE = ("tolerance", "max_steps")  # the options of --steps auto, for the methods that have it
_PATH = ("internal_batch_size", "idgi", "output", "rules", "precision")  # every path method's
_PER_EVAL = ("perturbations_per_eval",)
_WINDOW = {"window": "sliding_window_shapes", "stride": "strides"}

for _method in [
    # path methods
    Method("ig", "Integrated Gradients (straight line, Captum-compatible)", attr.IntegratedGradients,
           ("n_steps", "rule") + _PATH + ADAPTIVE + _BASELINES),
    Method("guided_ig", "Guided IG (Kapishnikov et al. 2021), PAIR saliency's algorithm, batched",
           attr.GuidedIntegratedGradients, ("n_steps", "fraction", "max_dist") + _PATH + _BASELINES,
           demo={"n_steps": 32}),
    Method("blur_ig", "Blur IG (Xu et al. 2020), PAIR saliency's algorithm", attr.BlurIntegratedGradients,
           ("n_steps", "max_sigma", "grad_step", "sqrt") + _PATH + ADAPTIVE, demo={"n_steps": 32}),
    Method("latent_ig", "Latent IG: IG along a path decoded from the DALL-E dVAE's latent space (--dvae)",
           attr.LatentIntegratedGradients,
           ("n_steps", "rule", "dvae", "interpolation", "latent", "gap_steps", "dvae_size") + _PATH + _BASELINES,
           demo={"n_steps": 8}, build_options=("dvae",), check=_check_latent_ig),
    Method("gnl_ig", "Guided non-linearity IG (Kwon et al. 2020): IG with guided ReLU/max-pool gradients",
           attr.GuidedNonLinearityIG,
           ("n_steps", "rule", "internal_batch_size", "idgi", "output", "precision") + ADAPTIVE + _BASELINES,
           demo={"n_steps": 32}),
    # gradients
    Method("saliency", "Saliency: gradient of the output (absolute by default, Captum-compatible)", attr.Saliency,
           ("abs", "internal_batch_size", "rules", "precision")),
    Method("input_x_gradient", "Input x gradient (Captum-compatible)", attr.InputXGradient,
           ("internal_batch_size", "rules", "precision")),
    Method("smoothgrad", "SmoothGrad: NoiseTunnel over Saliency (Captum-compatible; --nt-type for SG-SQ, VarGrad)",
           attr.NoiseTunnel,
           ("nt_type", "nt_samples", "nt_samples_batch_size", "stdevs", "abs", "internal_batch_size", "rules",
            "precision"), demo={"nt_samples": 8, "stdevs": 0.02}, builder=_smoothgrad),
    Method("guided_backprop", "Guided backpropagation (Captum-compatible; also functional ReLUs)",
           attr.GuidedBackprop, ("internal_batch_size",)),
    Method("deconvnet", "Deconvnet (Captum's Deconvolution; also functional ReLUs)", attr.Deconvolution,
           ("internal_batch_size",)),
    Method("gradient_shap", "GradientSHAP (Captum-compatible); baselines: zeros and a fixed uniform-noise image",
           attr.GradientShap, ("n_samples", "stdevs", "internal_batch_size", "rules"),
           fixed={"baselines": _gradient_shap_baselines}, demo={"n_samples": 8}),
    Method("second_order", "2ndG second-order attribution at a layer (Wang & Vasconcelos 2019), upsampled",
           attr.SecondOrderGradients, ("layer", "internal_batch_size", "precision"),
           fixed={"upsample_to_input": True}),
    # perturbation, with the CLI's defaults
    Method("occlusion", "Occlusion with a square window over all channels (Captum-compatible; default 16, stride 8)",
           attr.Occlusion, ("window", "stride") + _PER_EVAL, demo={"window": 32, "stride": 16},
           builder=_with_defaults(attr.Occlusion, _WINDOW, square_window=True, window=16, stride=8)),
    Method("feature_ablation", "Feature ablation of superpixels (Captum-compatible; default 64 segments)",
           attr.FeatureAblation, ("n_segments",) + _PER_EVAL, demo={"n_segments": 16},
           builder=_with_defaults(attr.FeatureAblation, n_segments=64)),
    Method("shapley", "Shapley value sampling over superpixels (Captum-compatible; 32 segments, 25 samples)",
           attr.ShapleyValueSampling, ("n_samples", "n_segments") + _PER_EVAL, demo={"n_segments": 8, "n_samples": 2},
           builder=_with_defaults(attr.ShapleyValueSampling, n_segments=32, n_samples=25)),
    Method("lime", "LIME over superpixels (Captum-compatible, numpy Lasso; 64 segments, 200 samples)",
           attr.Lime, ("n_samples", "n_segments") + _PER_EVAL, demo={"n_segments": 16, "n_samples": 32},
           builder=_with_defaults(attr.Lime, n_segments=64, n_samples=200)),
    Method("kernel_shap", "Kernel SHAP over superpixels (Captum-compatible, numpy WLS; 64 segments, 200 samples)",
           attr.KernelShap, ("n_samples", "n_segments") + _PER_EVAL, demo={"n_segments": 16, "n_samples": 32},
           builder=_with_defaults(attr.KernelShap, n_segments=64, n_samples=200)),
    Method("meaningful_perturbation", "Meaningful perturbation (Fong & Vedaldi 2017): optimized blur mask",
           attr.MeaningfulPerturbation, ("n_iter", "precision"), demo={"n_iter": 10},
           builder=_with_defaults(attr.MeaningfulPerturbation)),
    Method("pda", "Prediction difference analysis (Zintgraf et al. 2017), marginal sampling; CLI stride 4",
           attr.PredictionDifferenceAnalysis, ("window", "stride", "n_samples", "precision") + _PER_EVAL,
           demo={"window": 32, "stride": 32, "n_samples": 2},
           builder=_with_defaults(attr.PredictionDifferenceAnalysis, {"window": "window_size"}, stride=4)),
    # propagation rules
    Method("deeplift", "DeepLIFT, Rescale rule (Captum-compatible; zero baseline; reused modules work)",
           attr.DeepLift),
    Method("deeplift_shap", "DeepLIFT SHAP (Captum-compatible): DeepLift against zeros and a fixed uniform-noise "
           "image, averaged", attr.DeepLiftShap, ("internal_batch_size",),
           fixed={"baselines": _gradient_shap_baselines}),
    Method("lrp", "Layer-wise relevance propagation (Captum-compatible rules; --lrp-rule; conserves across skip "
           "connections)", attr.LRP, ("lrp_rule",)),
]:
    register(_method)
