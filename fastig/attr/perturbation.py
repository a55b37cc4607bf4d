"""Perturbation attributions: Occlusion, FeatureAblation and ShapleyValueSampling, drop-ins for Captum's classes.

All three evaluate the model on many perturbed copies of the inputs. They share one core, :func:`evaluate_copies`:
a method describes copy ``j`` (a function that builds copies ``[start, stop)``), and the core evaluates the copies
in batches of many copies per model call, bounded by memory, and hands each batch's outputs back. Nothing holds
more than one batch of copies at a time.

``perturbations_per_eval`` keeps Captum's meaning (at most that many perturbed copies of the examples per model
call) when given as an integer. Its fastig default, None, batches as many copies as the engine's batch sizing allows
(:mod:`fastig.core.engine`: on the CPU about ``CPU_BATCH_BYTES`` of input per call; on CUDA a much larger budget,
halved after an out-of-memory error).
Batching does not change the numbers, only how many model calls they take.

What is not supported (clear errors instead): models that return one scalar for a whole batch (Captum's
"aggregated" output mode) and outputs with more than one scalar per example after ``target`` is applied.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator

import torch

from fastig import _ops
from fastig.attr._base import Attribution
from fastig.attr._inputs import format_baselines, format_inputs, format_output
from fastig.core import progress
from fastig.core.engine import Chunk, Engine, as_engine, grid
from fastig.core.targets import Target, args_for_batch, format_additional_args


# -- the shared core ---------------------------------------------------------------------------------------------


def check_perturbations_per_eval(perturbations_per_eval: Any) -> None:
    if perturbations_per_eval is None:
        return
    if isinstance(perturbations_per_eval, bool) or not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
        raise ValueError(f"perturbations_per_eval must be a positive integer or None, got {perturbations_per_eval!r}")


def forward_outputs(forward_func: Callable | Engine, inputs: tuple, target: Target, args: tuple, n_rows: int) -> torch.Tensor:
    """The explained scalar of each of ``n_rows`` rows, as a 1-D tensor (one model call through the engine, no
    gradient). ``forward_func`` may be an :class:`~fastig.core.engine.Engine` (e.g. one with a precision)."""
    with torch.no_grad():
        output = as_engine(forward_func).call(inputs, args)
    if isinstance(output, (int, float)) and not isinstance(output, bool):
        output = torch.tensor([output], dtype=torch.float64)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(output).__name__}")
    if output.dim() == 0 or output.shape[0] != n_rows:
        raise ValueError(
            f"the model returned shape {tuple(output.shape)} for a batch of {n_rows} inputs; perturbation methods "
            "need one output row per input example (models that reduce a batch to one scalar are not supported)"
        )
    return target.select(output)


def evaluate_copies(
    forward_func: Callable | Engine,
    build: Callable[[int, int], tuple[tuple[torch.Tensor, ...], Any]],
    n_copies: int,
    sample_inputs: tuple[torch.Tensor, ...],
    target: Target,
    args: tuple,
    perturbations_per_eval: int | None,
    show_progress: bool = False,
    description: str = "perturbations",
) -> Iterator[tuple[slice, torch.Tensor, Any]]:
    """Evaluate ``n_copies`` perturbed copies of all ``n`` examples, many copies per model call.

    ``build(start, stop)`` returns (the model inputs of copies ``start..stop-1``, copy-major: shape
    ``[(stop - start) * n, ...]`` per input; any context the caller wants back). Yields, batch by batch and in
    order, (the copies' slice, their explained outputs ``[stop - start, n]``, the context).
    ``sample_inputs`` (the unperturbed inputs) size the batches: ``perturbations_per_eval`` copies per call, or
    with None as many as the engine's batch sizing allows (on CUDA halved after an out-of-memory error, by the
    engine). ``forward_func`` may be an :class:`~fastig.core.engine.Engine`.
    """
    engine = as_engine(forward_func)
    n = target.n
    bytes_per_copy = max(1, sum(x.numel() * x.element_size() for x in sample_inputs))
    if perturbations_per_eval is not None:
        size = min(perturbations_per_eval, max(1, n_copies))
    else:  # a copy (all n examples) is the unit: the engine sizes batches of copies like batches of rows
        size = engine.rows_per_batch(bytes_per_copy, n_copies, grad=False)

    def evaluate(chunk: Chunk):
        start, stop = chunk.steps.start, chunk.steps.stop
        k = stop - start
        inputs, context = build(start, stop)
        outputs = forward_outputs(
            engine, inputs, target.for_batch(slice(0, n), k), args_for_batch(args, n, slice(0, n), k), k * n
        )
        return outputs.reshape(k, n), context

    chunks = grid(n_copies, 1, size, 1, split_examples=False)
    with progress.task(description, n_copies, "perturbations", show=show_progress) as done:
        for chunk, (outputs, context) in engine.run_chunks(chunks, evaluate, bytes_per_row=bytes_per_copy, grad=False,
                                                           adaptive=perturbations_per_eval is None):
            yield chunk.steps, outputs, context
            done.advance(chunk.steps.stop - chunk.steps.start)


# -- shared input handling ---------------------------------------------------------------------------------------


def format_feature_mask(feature_mask: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Integer feature masks with as many dimensions as their inputs, broadcastable to them (Captum's rules).

    None gives every scalar of every input its own feature (numbered across inputs, as Captum does).
    """
    if feature_mask is None:
        masks, offset = [], 0
        for x in inputs:
            count = x[0:1].numel()
            masks.append(offset + torch.arange(count, device=x.device).reshape(x[0:1].shape))
            offset += count
        return tuple(masks)
    masks = feature_mask if isinstance(feature_mask, tuple) else (feature_mask,)
    if len(masks) != len(inputs):
        raise ValueError(f"got {len(masks)} feature masks for {len(inputs)} inputs")
    out = []
    for i, (m, x) in enumerate(zip(masks, inputs)):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"feature_mask[{i}] must be a tensor, got {type(m).__name__}")
        if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
            raise TypeError(f"feature_mask[{i}] must hold integer feature ids, got dtype {m.dtype}")
        if m.dim() > x.dim() or any(md not in (1, xd) for md, xd in zip(reversed(m.shape), reversed(x.shape))):
            raise ValueError(
                f"feature_mask[{i}] of shape {tuple(m.shape)} does not broadcast to its input of shape {tuple(x.shape)}"
            )
        if m.numel() and m.min() < 0:
            raise ValueError(f"feature_mask[{i}] holds negative feature ids")
        out.append(m.reshape((1,) * (x.dim() - m.dim()) + tuple(m.shape)).to(device=x.device, dtype=torch.long))
    return tuple(out)


def spread(values: torch.Tensor, ids: torch.Tensor, masks: tuple[torch.Tensor, ...], inputs: tuple) -> tuple:
    """Per-element attributions from per-feature values: ``values`` [n, len(ids)], ``ids`` sorted feature ids.

    Element ``(e, ...)`` of input ``i`` gets ``values[e, position of masks[i][e, ...] in ids]``.
    """
    out = []
    for m, x in zip(masks, inputs):
        n = x.shape[0]
        index = torch.searchsorted(ids, m.expand((n,) + tuple(x.shape[1:])).reshape(n, -1).contiguous())
        out.append(torch.gather(values, 1, index).reshape(x.shape))
    return tuple(out)


def _initial_outputs(forward_func, xs, target, args) -> torch.Tensor:
    return forward_outputs(forward_func, xs, target, args, xs[0].shape[0])


# -- FeatureAblation ---------------------------------------------------------------------------------------------


class FeatureAblation(Attribution):
    """Feature ablation: each feature (group of input scalars with the same ``feature_mask`` id) is replaced by its
    baseline in turn; its attribution is ``f(inputs) - f(inputs with the feature ablated)``.

    Same constructor, ``attribute()`` signature and numbers as ``captum.attr.FeatureAblation``; attributions have
    the dtype of the model output, as in Captum. ``perturbations_per_eval=None`` (fastig's default) batches as many
    ablated copies per model call as fit the memory budget; an integer caps it as in Captum.
    """

    multiplies_by_inputs = False

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        feature_mask: Any = None,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> Any:
        if kwargs:
            raise TypeError(f"FeatureAblation.attribute() got unexpected keyword arguments {sorted(kwargs)}")
        check_perturbations_per_eval(perturbations_per_eval)
        xs, is_tuple = format_inputs(inputs)
        bs = format_baselines(baselines, xs)
        masks = format_feature_mask(feature_mask, xs)
        tgt = Target(target, xs[0].shape[0])
        args = format_additional_args(additional_forward_args)

        ids = torch.unique(torch.cat([m.reshape(-1) for m in masks]).to(xs[0].device))
        f0 = _initial_outputs(self.forward_func, xs, tgt, args)

        def build(start: int, stop: int):
            chosen = ids[start:stop]
            copies = []
            for x, b, m in zip(xs, bs, masks):
                hit = m.unsqueeze(0) == chosen.reshape((-1,) + (1,) * m.dim())  # [k, 1 or n, ...]
                copies.append(torch.where(hit, b.unsqueeze(0), x.unsqueeze(0)).reshape((-1,) + tuple(x.shape[1:])))
            return tuple(copies), None

        diffs = torch.empty((ids.numel(), f0.shape[0]), dtype=f0.dtype, device=f0.device)
        for part, outputs, _ in evaluate_copies(
            self.forward_func, build, ids.numel(), xs, tgt, args, perturbations_per_eval, show_progress,
            "FeatureAblation",
        ):
            diffs[part] = f0.unsqueeze(0) - outputs
        return format_output(spread(diffs.T.contiguous(), ids, masks, xs), is_tuple)


# -- Occlusion ---------------------------------------------------------------------------------------------------


def _window_shapes(value: Any, n_inputs: int) -> tuple:
    """Captum's layout: one tuple of ints for a single input, else one tuple per input."""
    if isinstance(value, tuple) and (len(value) == 0 or isinstance(value[0], int)):
        value = (value,)
    if not isinstance(value, tuple) or len(value) != n_inputs:
        raise ValueError(f"sliding_window_shapes must hold one tuple per input tensor ({n_inputs}), got {value!r}")
    return value


def _strides(value: Any, n_inputs: int) -> tuple:
    """Captum's layout: None (1 everywhere), an int or a tuple for a single input, else one entry per input."""
    if value is None:
        value = (1,) * n_inputs
    if n_inputs == 1 and not (isinstance(value, tuple) and len(value) == 1):
        value = (value,)
    if not isinstance(value, tuple) or len(value) != n_inputs:
        raise ValueError(f"strides must hold one entry per input tensor ({n_inputs}), got {value!r}")
    return value


class Occlusion(Attribution):
    """Occlusion (Zeiler & Fergus 2014): a sliding hyperrectangle of each input is replaced by the baseline; every
    scalar's attribution is the mean of ``f(inputs) - f(occluded)`` over the windows that cover it.

    Same constructor, ``attribute()`` signature and numbers as ``captum.attr.Occlusion`` (float32 attributions,
    windows cut off at the far edges). ``perturbations_per_eval=None`` (fastig's default) batches as many occluded
    copies per model call as fit the memory budget.
    """

    multiplies_by_inputs = False

    def attribute(
        self,
        inputs: Any,
        sliding_window_shapes: Any,
        strides: Any = None,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
    ) -> Any:
        check_perturbations_per_eval(perturbations_per_eval)
        xs, is_tuple = format_inputs(inputs)
        bs = format_baselines(baselines, xs)
        tgt = Target(target, xs[0].shape[0])
        args = format_additional_args(additional_forward_args)
        windows = self._windows(xs, sliding_window_shapes, strides)  # [(input index, tuple of slices)]

        f0 = _initial_outputs(self.forward_func, xs, tgt, args)
        acc_dtype = _ops.accumulation_dtype(torch.float32 if not f0.is_floating_point() else f0.dtype)
        totals = [torch.zeros((x.shape[0], x[0].numel()), dtype=acc_dtype, device=x.device) for x in xs]
        counts = [torch.zeros(x[0].numel(), dtype=acc_dtype, device=x.device) for x in xs]

        def build(start: int, stop: int):
            chunk = windows[start:stop]
            k = len(chunk)
            copies, hits = [], []
            for i, (x, b) in enumerate(zip(xs, bs)):
                hit = torch.zeros((k,) + tuple(x.shape[1:]), dtype=torch.bool, device=x.device)
                for j, (owner, box) in enumerate(chunk):
                    if owner == i:
                        hit[(j,) + box] = True
                hits.append(hit)
                copies.append(
                    torch.where(hit.unsqueeze(1), b.unsqueeze(0), x.unsqueeze(0)).reshape((-1,) + tuple(x.shape[1:]))
                )
            return tuple(copies), hits

        for _, outputs, hits in evaluate_copies(
            self.forward_func, build, len(windows), xs, tgt, args, perturbations_per_eval, show_progress, "Occlusion"
        ):
            diff = (f0.unsqueeze(0) - outputs).to(acc_dtype)  # [k, n]
            for total, count, hit in zip(totals, counts, hits):
                flat = hit.reshape(hit.shape[0], -1).to(acc_dtype)
                total += diff.T @ flat
                count += flat.sum(0)
        attributions = tuple((t / c).reshape(x.shape).float() for t, c, x in zip(totals, counts, xs))
        return format_output(attributions, is_tuple)

    @staticmethod
    def _windows(xs, sliding_window_shapes, strides) -> list[tuple[int, tuple]]:
        shapes = _window_shapes(sliding_window_shapes, len(xs))
        steps = _strides(strides, len(xs))
        out = []
        for i, (x, shape, step) in enumerate(zip(xs, shapes, steps)):
            dims = tuple(x.shape[1:])
            if not isinstance(shape, tuple) or len(shape) != len(dims) or not all(
                isinstance(s, int) and s >= 1 for s in shape
            ):
                raise ValueError(
                    f"sliding_window_shapes for input {i} must be a tuple of {len(dims)} positive ints "
                    f"(one per non-batch dimension of shape {tuple(x.shape)}), got {shape!r}"
                )
            if isinstance(step, int) and not isinstance(step, bool):
                step = (step,) * len(dims)
            if not isinstance(step, tuple) or len(step) != len(dims) or not all(
                isinstance(s, int) and s >= 1 for s in step
            ):
                raise ValueError(f"strides for input {i} must be a positive int or a tuple of {len(dims)}, got {step!r}")
            starts = []
            for d, (size, w, s) in enumerate(zip(dims, shape, step)):
                if w > size:
                    raise ValueError(f"sliding window {shape} exceeds the input dimensions {dims} (input {i})")
                if w < size and s > w:
                    raise ValueError(
                        f"stride {step} is larger than the sliding window {shape} in dimension {d} (input {i}); "
                        "some elements would never be occluded"
                    )
                count = math.ceil((size - w) / s) + 1
                starts.append([c * s for c in range(count)])
            for corner in itertools.product(*starts):
                out.append((i, tuple(slice(c, c + w) for c, w in zip(corner, shape))))
        return out


# -- ShapleyValueSampling ----------------------------------------------------------------------------------------


class ShapleyValueSampling(Attribution):
    """Shapley Value Sampling (Castro et al. 2009): features are added to the baseline one at a time in random
    orders; a feature's attribution is its mean marginal gain over ``n_samples`` permutations.

    Same constructor, ``attribute()`` signature and numbers as ``captum.attr.ShapleyValueSampling``: the
    permutations are drawn exactly as Captum draws them (``torch.randperm(max feature id + 1)`` once per sample, from
    the global torch generator), so the same seed gives the same attributions. Attributions are float32 as in
    Captum. What differs: all ``n_samples * n_features`` coalitions are independent given the permutations, so they
    are evaluated in large batches across permutations; ids missing from the mask cost no model call.
    """

    multiplies_by_inputs = False

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        feature_mask: Any = None,
        n_samples: int = 25,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
    ) -> Any:
        check_perturbations_per_eval(perturbations_per_eval)
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        xs, is_tuple = format_inputs(inputs)
        bs = format_baselines(baselines, xs)
        masks = format_feature_mask(feature_mask, xs)
        tgt = Target(target, xs[0].shape[0])
        args = format_additional_args(additional_forward_args)
        device = xs[0].device

        n_features = int(max(m.max().item() for m in masks if m.numel())) + 1
        # Captum's draws, in Captum's order: one randperm per sample from the global generator.
        perms = torch.stack([torch.randperm(n_features) for _ in range(n_samples)]).to(device)
        ranks = torch.empty_like(perms)
        ranks.scatter_(1, perms, torch.arange(n_features, device=device).expand(n_samples, -1))
        present = torch.zeros(n_features, dtype=torch.bool, device=device)
        for m in masks:
            present[m.reshape(-1)] = True
        # the coalitions worth a model call: (sample, position) whose feature occurs in the mask, in order
        sample_of, position_of = torch.nonzero(present[perms], as_tuple=True)
        n_evals = sample_of.numel()

        f_base = _initial_outputs(self.forward_func, tuple(b.expand_as(x) for b, x in zip(bs, xs)), tgt, args)

        def build(start: int, stop: int):
            s, t = sample_of[start:stop], position_of[start:stop]
            copies = []
            for x, b, m in zip(xs, bs, masks):
                rank = ranks[s][:, m.reshape(-1)].reshape((-1,) + tuple(m.shape))  # [k, 1 or n, ...]
                added = rank <= t.reshape((-1,) + (1,) * m.dim())
                copies.append(torch.where(added, x.unsqueeze(0), b.unsqueeze(0)).reshape((-1,) + tuple(x.shape[1:])))
            return tuple(copies), None

        outputs = torch.empty((n_evals, f_base.shape[0]), dtype=f_base.dtype, device=f_base.device)
        for part, out, _ in evaluate_copies(
            self.forward_func, build, n_evals, xs, tgt, args, perturbations_per_eval, show_progress,
            "ShapleyValueSampling",
        ):
            outputs[part] = out
        # marginal gain of each evaluated coalition over the previous one of the same permutation
        first = torch.ones(n_evals, dtype=torch.bool, device=device)
        first[1:] = sample_of[1:] != sample_of[:-1]
        previous = torch.cat([f_base.unsqueeze(0), outputs[:-1]])
        previous[first] = f_base
        gains = (outputs - previous).to(_ops.accumulation_dtype(torch.float32 if not outputs.is_floating_point() else outputs.dtype))
        totals = torch.zeros((n_features, f_base.shape[0]), dtype=gains.dtype, device=device)
        totals.index_add_(0, perms[sample_of, position_of], gains)
        ids = torch.arange(n_features, device=device)
        values = (totals / n_samples).T.contiguous()
        return format_output(tuple(a.float() for a in spread(values, ids, masks, xs)), is_tuple)


# -- CLI helper --------------------------------------------------------------------------------------------------


class WithDefaults:
    """A method object for the CLI: fills in default options and translates the CLI's generic ones.

    ``rename`` maps CLI keywords to the method's (``window`` -> ``sliding_window_shapes``). ``square_window``
    turns int ``sliding_window_shapes`` / ``strides`` into Occlusion's tuples for image batches (the window spans
    all channels and is square over the last two dimensions). ``n_segments`` becomes a superpixel
    ``feature_mask`` (see :func:`fastig.attr.surrogate.superpixels`) when no mask is given.
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
            from fastig.attr.surrogate import superpixels

            if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
                raise ValueError("n_segments needs a single image batch [N, C, H, W] as inputs")
            merged["feature_mask"] = superpixels(inputs, segments)
        if self.square_window and isinstance(inputs, torch.Tensor):
            lead = tuple(inputs.shape[1:-2])
            for key in ("sliding_window_shapes", "strides"):
                value = merged.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    merged[key] = (lead if key == "sliding_window_shapes" else (1,) * len(lead)) + (value, value)
        return self.method.attribute(inputs, target=target, **merged)
