"""NoiseTunnel (SmoothGrad, SmoothGrad-squared, VarGrad), a drop-in for ``captum.attr.NoiseTunnel``.

Same draws as Captum for the same seeds: noise comes from ``torch`` (one ``normal`` draw per input tensor and per
chunk of ``nt_samples_batch_size`` samples, example-major), baselines drawn from a distribution come from
``numpy.random`` (one ``choice`` per baseline tensor, once for the full chunks and once for the remainder chunk).
The wrapped method does the model passes; fastig methods send them through the engine in batches of their own
``internal_batch_size`` (chosen automatically when None), so ``nt_samples_batch_size`` only bounds how many noisy
copies are held at once, not the size of a model batch.
"""

from __future__ import annotations

from typing import Any

import torch

from fastig.attr._base import Attribution
from fastig.core.inputs import check_stdevs, draw_baselines, format_inputs, format_output, noisy_copies
from fastig.core.engine import Engine
from fastig.core.targets import expand_additional_args, expand_target, format_additional_args
from fastig.errors import check_int

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")




class NoiseTunnel(Attribution):
    """Averages an attribution method over noisy copies of the input (Smilkov et al. 2017; Adebayo et al. 2018).

    ``nt_type``: ``smoothgrad`` (mean of the attributions), ``smoothgrad_sq`` (mean of their squares), ``vargrad``
    (their variance). Works around any fastig attribution method (Saliency, IntegratedGradients, ...). Captum's
    signature, defaults and, for the same ``torch``/``numpy`` seeds, numbers.

    Several targets per example pass through to the wrapped method (``target=[[a, b], ...]`` or [N, K], giving
    [N, K, ...]); ``top_k=K`` takes the K classes of largest output at the clean inputs, so that every noisy copy
    explains the same classes. ``precision=`` goes to the wrapped method.
    """

    def __init__(self, attribution_method: Any) -> None:
        if not hasattr(attribution_method, "attribute"):
            raise TypeError(
                f"attribution_method must be an attribution object with .attribute(), got {type(attribution_method).__name__}"
            )
        self.attribution_method = attribution_method
        self.forward_func = getattr(attribution_method, "forward_func", None)
        self.is_delta_supported = bool(getattr(attribution_method, "has_convergence_delta", lambda: False)())
        self._multiply_by_inputs = bool(getattr(attribution_method, "multiplies_by_inputs", False))

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return self.is_delta_supported

    def attribute(
        self,
        inputs: Any,
        nt_type: str = "smoothgrad",
        nt_samples: int = 5,
        nt_samples_batch_size: int | None = None,
        stdevs: float | tuple[float, ...] = 1.0,
        draw_baseline_from_distrib: bool = False,
        **kwargs: Any,
    ) -> Any:
        xs, is_tuple = format_inputs(inputs)
        if nt_type not in NT_TYPES:
            raise ValueError(f"nt_type must be one of {NT_TYPES}, got {nt_type!r}")
        check_int("nt_samples", nt_samples)
        chunk = nt_samples if nt_samples_batch_size is None else min(
            nt_samples, check_int("nt_samples_batch_size", nt_samples_batch_size)
        )
        stdevs = check_stdevs(stdevs, len(xs))
        want_delta = bool(kwargs.get("return_convergence_delta", False))
        if want_delta and not self.is_delta_supported:
            raise ValueError(f"{type(self.attribution_method).__name__} has no convergence delta")
        if draw_baseline_from_distrib and "baselines" not in kwargs:
            raise ValueError("draw_baseline_from_distrib=True needs baselines=... (the distribution to draw from)")

        if kwargs.get("top_k") is not None:
            kwargs = self._top_k_as_target(xs, kwargs)
        n_full, remainder = divmod(nt_samples, chunk)
        sizes = [chunk] * n_full + ([remainder] if remainder else [])
        full_kwargs = self._expand_kwargs(kwargs, xs, chunk, draw_baseline_from_distrib)  # drawn once, as Captum
        sums: list[torch.Tensor] | None = None
        sq_sums: list[torch.Tensor] | None = None
        deltas = []
        attr_is_tuple = is_tuple
        for i, size in enumerate(sizes):
            part_kwargs = full_kwargs if i < n_full else self._expand_kwargs(kwargs, xs, size, draw_baseline_from_distrib)
            noisy = tuple(noisy_copies(x, s, size) for x, s in zip(xs, stdevs))
            result = self.attribution_method.attribute(noisy if is_tuple else noisy[0], **part_kwargs)
            if want_delta:
                result, delta = result
                deltas.append(delta)
            attr_is_tuple = isinstance(result, tuple)
            attrs = result if attr_is_tuple else (result,)
            with torch.no_grad():
                per_example = [a.reshape((a.shape[0] // size, size) + tuple(a.shape[1:])) for a in attrs]
                part_sums = [a.sum(dim=1) for a in per_example]
                part_sq = [a.pow(2).sum(dim=1) for a in per_example]
            sums = part_sums if sums is None else [s + p for s, p in zip(sums, part_sums)]
            sq_sums = part_sq if sq_sums is None else [s + p for s, p in zip(sq_sums, part_sq)]

        means = tuple(s * 1 / nt_samples for s in sums)  # the same operations as Captum, for the same rounding
        sq_means = tuple(s * 1 / nt_samples for s in sq_sums)
        if nt_type == "smoothgrad":
            out = means
        elif nt_type == "smoothgrad_sq":
            out = sq_means
        else:
            out = tuple(sq - m * m for m, sq in zip(means, sq_means))
        result = format_output(out, attr_is_tuple)
        return (result, torch.cat(deltas)) if want_delta else result

    def _top_k_as_target(self, xs: tuple, kwargs: dict) -> dict:
        """``top_k=K`` names the K classes of largest output at the *clean* inputs (every noisy copy of an example
        explains the same K classes): resolved here, once, into a [N, K] target for the wrapped method."""
        if self.forward_func is None:
            raise ValueError("top_k needs an attribution method with a forward_func")
        engine = Engine(self.forward_func, precision=kwargs.get("precision", "fp32"))
        args = format_additional_args(kwargs.get("additional_forward_args"))
        out = {k: v for k, v in kwargs.items() if k != "top_k"}
        out["target"] = engine.resolve_target(kwargs.get("target"), kwargs["top_k"], xs, args).multi
        return out

    @staticmethod
    def _expand_kwargs(kwargs: dict, xs: tuple, n_samples: int, draw_baseline_from_distrib: bool) -> dict:
        """The wrapped method's arguments for ``n_samples`` noisy copies of each example (Captum's expansion)."""
        out = dict(kwargs)
        if "additional_forward_args" in out:
            out["additional_forward_args"] = expand_additional_args(out["additional_forward_args"], n_samples)
        if "target" in out:
            out["target"] = expand_target(out["target"], n_samples)
        if "baselines" in out and out["baselines"] is not None:
            baselines = out["baselines"]
            was_tuple = isinstance(baselines, tuple)
            baselines = baselines if was_tuple else (baselines,)
            if len(baselines) != len(xs):
                raise ValueError(f"got {len(baselines)} baselines for {len(xs)} inputs")
            if draw_baseline_from_distrib:
                for b, x in zip(baselines, xs):
                    if isinstance(b, torch.Tensor) and b.shape[1:] != x.shape[1:]:
                        raise ValueError(
                            f"baseline distribution of shape {tuple(b.shape)} does not match inputs of shape "
                            f"{tuple(x.shape)} beyond the first dimension"
                        )
                baselines = draw_baselines(baselines, xs[0].shape[0] * n_samples)
            else:
                baselines = tuple(
                    b.repeat_interleave(n_samples, dim=0)
                    if isinstance(b, torch.Tensor) and b.dim() > 0 and b.shape[0] == x.shape[0] and b.shape[0] > 1
                    else b
                    for b, x in zip(baselines, xs)
                )
            out["baselines"] = baselines if was_tuple else baselines[0]
        if out.get("feature_mask") is not None:
            mask = out["feature_mask"]
            masks = mask if isinstance(mask, tuple) else (mask,)
            masks = tuple(m.repeat_interleave(n_samples, dim=0) if m.shape[0] > 1 else m for m in masks)
            out["feature_mask"] = masks if isinstance(mask, tuple) else masks[0]
        return out
