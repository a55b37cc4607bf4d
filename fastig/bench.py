"""``fastig bench``: fastig against the method's reference implementation on the user's own model and settings.

Both run in this process on the same model, inputs, targets and options, in alternating order (fastig first in
odd rounds, the reference first in even ones) after one untimed warm-up each, so that neither the order nor a
drifting shared machine decides the ratio. Per implementation the report gives the median and best time, the
ratio to fastig (reference time / fastig time: above 1 means fastig is faster), the share of the time spent
outside the model's forward and backward passes, the model passes made, and the peak memory growth during a call;
and the largest difference between the two attributions, relative to the reference's largest value.

The model's passes are timed inside the run by hooks on the model: a forward pre-hook and hook time each forward
call; the backward of a call runs from the moment the gradient of its output is computed to the moment the
gradients of its inputs are (tensor hooks registered by those module hooks), with a CUDA synchronize at each
mark on a GPU. Peak memory: on CUDA the allocator's peak above what was allocated before the call; on the CPU the
growth of the process's peak resident set (Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``).

References: Captum (``pip install captum``) for ``ig``, ``saliency``, ``input_x_gradient``, ``smoothgrad``,
``guided_backprop``, ``deconvnet``, ``gradient_shap``, ``deeplift`` and ``occlusion``; PAIR's ``saliency``
package (``pip install saliency``) for ``guided_ig`` and ``blur_ig``. Without the reference installed the report
says how to install it and still gives fastig's own figures.
"""

from __future__ import annotations

import importlib
import inspect
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fastig.errors import FastigError, check_int

STOCHASTIC = ("smoothgrad", "gradient_shap")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BenchError(FastigError):
    """A bench that cannot run as asked (an unknown model factory, a bad input shape, an option not supported)."""


# ---- timing the model's passes --------------------------------------------------------------------------------


class PassTimer:
    """Hooks on ``model`` that add up the time of its forward calls and of their backward passes (see the module
    docstring). ``seconds``, ``passes`` (forward calls) are reset by :meth:`reset`."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.cuda = model, device.type == "cuda"
        self.seconds, self.passes = 0.0, 0
        self._handles = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset(self) -> None:
        self.seconds, self.passes = 0.0, 0

    def __enter__(self) -> "PassTimer":
        marks: list[dict] = []

        def before(_module, args):
            call = {"start": self._now()}
            marks.append(call)
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    a.register_hook(lambda grad, call=call: self._backward_done(call, grad))

        def after(_module, _args, output):
            call = marks.pop()
            self.seconds += self._now() - call["start"]
            self.passes += 1
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad, call=call: self._backward_started(call, grad))

        self._handles = [self.model.register_forward_pre_hook(before), self.model.register_forward_hook(after)]
        return self

    def _backward_started(self, call: dict, grad):
        call["backward"] = self._now()
        return grad

    def _backward_done(self, call: dict, grad):
        if "backward" in call:  # the first input gradient of this call ends its backward pass
            self.seconds += self._now() - call.pop("backward")
        return grad

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def _peak_memory(device: torch.device):
    """Yields a dict that receives ``mib``: the peak memory growth inside the block (None where unknown)."""
    out: dict = {"mib": None}
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize()
        out["mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _status_kib(status, "VmRSS")
    except OSError:
        yield out
        return
    yield out
    out["mib"] = (_status_kib(status, "VmHWM") - before) / 1024


def _status_kib(status: Path, key: str) -> int:
    return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(key))


# ---- the implementations --------------------------------------------------------------------------------------


@dataclass
class Implementation:
    name: str
    run: Callable[[], torch.Tensor]  # one attribution of the bench's inputs


CAPTUM = {  # fastig method -> (Captum class path, how fastig's options translate)
    "ig": ("IntegratedGradients", {"n_steps": "n_steps", "rule": "method",
                                   "internal_batch_size": "internal_batch_size"}),
    "saliency": ("Saliency", {"abs": "abs"}),
    "input_x_gradient": ("InputXGradient", {}),
    "smoothgrad": ("NoiseTunnel(Saliency)", {"nt_type": "nt_type", "nt_samples": "nt_samples",
                                             "nt_samples_batch_size": "nt_samples_batch_size", "stdevs": "stdevs",
                                             "abs": "abs"}),
    "guided_backprop": ("GuidedBackprop", {}),
    "deconvnet": ("Deconvolution", {}),
    "gradient_shap": ("GradientShap", {"n_samples": "n_samples", "stdevs": "stdevs"}),
    "deeplift": ("DeepLift", {}),
    "occlusion": ("Occlusion", {"window": "sliding_window_shapes", "stride": "strides",
                                "perturbations_per_eval": "perturbations_per_eval"}),
}
PAIR = {"guided_ig": ("GuidedIG", {"n_steps": "x_steps", "fraction": "fraction", "max_dist": "max_dist"}),
        "blur_ig": ("BlurIG", {"n_steps": "steps", "max_sigma": "max_sigma", "grad_step": "grad_step",
                               "sqrt": "sqrt"})}


def reference_name(method: str) -> str | None:
    """Which package is the reference of ``method`` (None: there is none)."""
    return "captum" if method in CAPTUM else "saliency" if method in PAIR else None


def _translate(method: str, options: dict, table: dict) -> dict:
    missing = [k for k in options if k not in table]
    if missing:
        raise BenchError(f"the reference of {method} has no counterpart of {', '.join(missing)}")
    return {table[k]: v for k, v in options.items()}


def _captum(method: str, model, inputs, target, options: dict) -> Implementation:
    attr = importlib.import_module("captum.attr")  # ImportError when captum is not installed
    kind, table = CAPTUM[method]
    kwargs = _translate(method, options, table)
    if method == "smoothgrad":
        explainer = attr.NoiseTunnel(attr.Saliency(model))
        kwargs.setdefault("nt_type", "smoothgrad")
    else:
        explainer = getattr(attr, kind)(model)
    if method == "occlusion":
        window = kwargs.pop("sliding_window_shapes", 16)
        stride = kwargs.pop("strides", 8)
        channels = inputs.shape[1]
        kwargs.update(sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride))
    if method == "gradient_shap":
        from fastig.attr.gradients import default_baseline_distribution

        kwargs["baselines"] = default_baseline_distribution(inputs)
    return Implementation("captum", lambda: explainer.attribute(inputs, target=target, **kwargs))


def _pair(method: str, model, inputs, target, options: dict) -> Implementation:
    core = importlib.import_module("saliency.core")
    kind, table = PAIR[method]
    kwargs = _translate(method, options, table)
    explainer = getattr(core, kind)()
    targets = target.tolist() if isinstance(target, torch.Tensor) else [target] * inputs.shape[0]

    def call_model(index):
        def call(x_batch, call_model_args=None, expected_keys=None):
            x = torch.as_tensor(np.asarray(x_batch), dtype=inputs.dtype, device=inputs.device)
            x = x.permute(0, 3, 1, 2).requires_grad_()  # PAIR's images are HWC
            (grad,) = torch.autograd.grad(model(x)[:, targets[index]].sum(), x)
            return {core.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).detach().cpu().numpy()}
        return call

    def run():
        masks = [explainer.GetMask(x.permute(1, 2, 0).cpu().numpy(), call_model(i), **kwargs)
                 for i, x in enumerate(inputs)]
        return torch.from_numpy(np.stack(masks)).permute(0, 3, 1, 2)

    return Implementation("PAIR saliency", run)


# ---- the bench ------------------------------------------------------------------------------------------------


@dataclass
class Measured:
    name: str
    seconds: list[float] = field(default_factory=list)
    model_seconds: list[float] = field(default_factory=list)
    passes: int = 0
    peak_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def outside(self) -> float:
        """Share of the time outside the model's passes (medians of both)."""
        return max(0.0, 1.0 - statistics.median(self.model_seconds) / self.median) if self.median > 0 else 0.0


@dataclass
class BenchReport:
    settings: dict
    results: list[Measured]
    note: str | None = None  # why there is no reference row
    max_difference: float | None = None  # max |fastig - reference| / max |reference|

    def lines(self) -> list[str]:
        s = self.settings
        out = [f"fastig bench: {s['method']} on {s['model']} ({s['inputs']}, device {s['device']}, precision "
               f"{s['precision']}), options {s['options'] or '{}'}; {s['repeats']} alternating rounds after a "
               "warm-up"]
        header = f"{'implementation':<16}{'median s':>10}{'best s':>10}{'ratio':>8}{'outside passes':>16}" \
                 f"{'passes':>8}{'peak MiB':>10}"
        out += [header, "-" * len(header)]
        fastig = self.results[0]
        for r in self.results:
            ratio = r.median / fastig.median if fastig.median > 0 else float("nan")
            peak = "?" if r.peak_mib is None else f"{r.peak_mib:.1f}"
            out.append(f"{r.name:<16}{r.median:>10.4f}{min(r.seconds):>10.4f}{ratio:>7.2f}x{100 * r.outside:>15.1f}%"
                       f"{r.passes:>8d}{peak:>10}")
        if len(self.results) > 1:
            random = " (the two draw different random samples)" if self.settings["method"] in STOCHASTIC else ""
            out.append(f"ratio = time / fastig's time (above 1: fastig is faster); largest difference of the "
                       f"attributions: {self.max_difference:.2e} of the reference's largest value{random}")
        if self.note:
            out.append(self.note)
        return out


def bench(model: torch.nn.Module, inputs: torch.Tensor, target: Any = None, method: str = "ig", *,
          repeats: int = 3, precision: str = "fp32", reference: bool = True, model_name: str = "model",
          **options) -> BenchReport:
    """Time ``fastig.attribute(model, inputs, target, method, **options)`` against the method's reference (see
    the module docstring). ``precision``: ``fp32``, ``bf16`` or ``fp16``; fastig gets ``precision=`` (where its
    methods take it), the reference runs under ``torch.autocast``."""
    import fastig
    from fastig import methods

    spec = methods.get(method)
    check_int("repeats", repeats, error=BenchError)
    if precision not in PRECISIONS:
        raise BenchError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = inputs.device
    fastig_options = dict(options)
    if precision != "fp32":
        signature = inspect.signature(spec.build(model).attribute)
        takes = "precision" in signature.parameters or any(
            p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        if not takes:
            raise BenchError(f"method {method!r} of this fastig has no precision= option; bench it in fp32")
        fastig_options["precision"] = precision
    impls = [Implementation("fastig", lambda: fastig.attribute(model, inputs, target=target, method=method,
                                                               **fastig_options))]
    note = None
    package = reference_name(method)
    if package is None:
        note = f"{method} has no reference implementation to compare with: fastig's own figures only"
    elif not reference:
        note = "reference not run (--no-reference)"
    else:
        try:
            build = _captum if package == "captum" else _pair
            impls.append(build(method, model, inputs, target, options))
        except ImportError:
            note = (f"{package} is not installed, so there is no reference to compare with: `pip install "
                    f"{package}` to add it; fastig's own figures follow")
    autocast = (lambda: torch.autocast(device.type, dtype=PRECISIONS[precision])) if precision != "fp32" \
        else nullcontext
    outputs = {}
    with PassTimer(model, device) as timer:
        for impl in list(impls):  # warm-up, and the attributions compared below
            try:
                with autocast() if impl.name != "fastig" else nullcontext():
                    outputs[impl.name] = _tensor(impl.run())
            except Exception as e:  # noqa: BLE001  (a reference that cannot run here is reported, not fatal)
                if impl.name == "fastig":
                    raise
                impls.remove(impl)
                note = f"the reference ({impl.name}) failed here, fastig's own figures only: {type(e).__name__}: {e}"
        measured = [Measured(impl.name) for impl in impls]
        for round_ in range(repeats):
            order = list(zip(impls, measured))
            for impl, m in (order if round_ % 2 == 0 else order[::-1]):
                timer.reset()
                with _peak_memory(device) as peak, (autocast() if impl.name != "fastig" else nullcontext()):
                    start = time.perf_counter()
                    impl.run()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    m.seconds.append(time.perf_counter() - start)
                m.model_seconds.append(timer.seconds)
                m.passes = timer.passes
                if peak["mib"] is not None:
                    m.peak_mib = max(m.peak_mib or 0.0, peak["mib"])
    difference = None
    if len(impls) > 1:
        ours, theirs = outputs["fastig"].double().cpu(), outputs[impls[1].name].double().cpu()
        if ours.numel() == theirs.numel():  # PAIR returns the same values in another layout
            theirs = theirs.reshape(ours.shape)
            difference = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
        else:
            difference = float("nan")
    settings = {"model": model_name, "method": method, "inputs": "x".join(map(str, inputs.shape)),
                "device": str(device), "precision": precision, "options": options, "repeats": repeats}
    return BenchReport(settings, measured, note, difference)


def _tensor(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def load_model(name: str, weights: str = "none", device: str = "cpu", input_shape: tuple[int, ...] | None = None):
    """(model, input shape [C, H, W], default target) for a zoo name or ``package.module:factory`` (the user's
    own model: ``factory()`` returns an ``nn.Module``; then ``input_shape`` is needed)."""
    from fastig import models

    if ":" in name:
        module_name, _, factory = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            model = getattr(module, factory)()
        except (ImportError, AttributeError) as e:
            raise BenchError(f"--model {name}: cannot import the factory ({e})") from None
        if not isinstance(model, torch.nn.Module):
            raise BenchError(f"--model {name}: the factory returned a {type(model).__name__}, not an nn.Module")
        if input_shape is None:
            raise BenchError(f"--model {name}: give --input-shape C,H,W for a model outside the zoo")
        return model.eval().to(device), tuple(input_shape)
    info = models.info(name)
    model = models.get(name, weights=weights, device=device)
    return model, tuple(input_shape) if input_shape else (info.channels, info.input_size, info.input_size)
