"""Perturbation attributions: FeatureAblation, Occlusion, ShapleyValueSampling and FeaturePermutation, drop-ins for
Captum's classes.

All of them evaluate the model on many perturbed copies of the inputs. They share one core, :func:`evaluate_copies`:
a method describes copy ``j`` (a function that builds copies ``[start, stop)``), and the core evaluates the copies
in batches of many copies per model call, bounded by memory, and hands each batch's outputs back. Nothing holds
more than one batch of copies at a time. :func:`model_output` is the one place where the model is called
(through the engine).

Captum's output forms are all accepted (after ``target`` is applied):

- one scalar per example (``[N]``, ``[N, 1]``): attributions have the inputs' shapes;
- several outputs per example and no target (``[N, C]``): one attribution per output element (FeatureAblation
  and Occlusion stack them as ``[N * C, ...]``, ShapleyValueSampling as ``[N, C, ...]``, as Captum does);
- an *aggregated* output, one value or a fixed-size tensor for the whole batch (a 0-d tensor, ``[1]``, a Python
  float or int, ``[M]`` not indexed by example): the aggregate is attributed, attributions have first dimension
  ``M`` (1 for a scalar). Copies cannot share a model call then, so every call holds exactly one copy.

``perturbations_per_eval`` keeps Captum's meaning (at most that many perturbed copies of the examples per model
call) when given as an integer; an integer above 1 with an aggregated output is an error, as in Captum. Its fastig
default, None, batches as many copies as the engine's batch sizing allows (:mod:`fastig.core.engine`: on the CPU
about ``CPU_BATCH_BYTES`` of input per call; on CUDA a much larger budget, halved after an out-of-memory error)
when the output grows with the batch, and
one copy per call otherwise (found from the unperturbed evaluation; checked on the first batch, which is
re-evaluated one copy at a time if the output did not grow). Batching does not change the numbers, only how many
model calls they take.

Inputs may have different first dimensions (EmbeddingBag-style index lists next to a batch, empty tensors); only
``inputs[0]`` sets the number of examples. Baselines follow Captum's arithmetic: a Python bool for a bool input, a
float for an integer input (the copies then become floating point, as in Captum; the baseline is never rounded), a
tensor that only broadcasts to its input (``[N, 1]`` for ``[N, 3]``, ``[3]`` for ``[1, 3]``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Callable, Iterator

import torch

from fastig import _ops
from fastig.attr._base import Attribution
from fastig.core.inputs import format_inputs, format_output
from fastig.core import progress
from fastig.core.engine import Chunk, Engine, as_engine
from fastig.core.targets import Target, args_for_batch, format_additional_args
from fastig.errors import InvalidArgumentError, InvalidTypeError, check_int



# -- the shared core ---------------------------------------------------------------------------------------------


def check_perturbations_per_eval(perturbations_per_eval: Any) -> None:
    check_int("perturbations_per_eval", perturbations_per_eval, none_ok=True)


def _has_target(target: Target) -> bool:
    return target.common is not None or target.per_example is not None or target.tuples is not None


def model_output(
    forward_func: Callable | Engine, inputs: tuple, target: Target, args: tuple, *, futures: bool = False,
) -> torch.Tensor:
    """One model call (no gradient) and the explained output, in Captum's forms.

    ``target`` is applied as Captum applies it; without a target the output is returned as it is (any shape, a
    Python number as a 0-d tensor of Python's dtype: int64 or float64). ``futures``: ``forward_func`` returns a
    ``torch.futures.Future`` (for ``attribute_future``), whose value is awaited. ``forward_func`` may be an :class:`~fastig.core.engine.Engine`
    (e.g. one with a precision).
    """
    with torch.no_grad():
        output = as_engine(forward_func).call(inputs, args)
    if isinstance(output, torch.futures.Future):
        if not futures:
            raise InvalidArgumentError(
                "forward_func returned a torch.futures.Future: use attribute_future() instead of attribute() "
                "(FeatureAblation, FeaturePermutation and ShapleyValueSampling have it)"
            )
        output = output.wait()
    elif futures:
        raise InvalidArgumentError(
            f"attribute_future() needs a forward_func that returns a torch.futures.Future, got "
            f"{type(output).__name__}; use attribute()"
        )
    if isinstance(output, (int, float)) and not isinstance(output, bool):
        output = torch.tensor(output, dtype=torch.int64 if isinstance(output, int) else torch.float64)
    if not isinstance(output, torch.Tensor):
        raise InvalidTypeError(f"the model must return a tensor, an int or a float, got {type(output).__name__}")
    if _has_target(target):
        if output.dim() == 0:
            raise InvalidArgumentError("the model returned one value for the whole batch (a 0-d output); it cannot "
                                       "take a target")
        output = target.select(output)
    return output


def aggregated(output: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``output`` (of the unperturbed inputs) is certainly one value or a fixed-size tensor for the whole
    batch (Captum's "aggregated" output mode): copies cannot then share a model call."""
    n = inputs[0].shape[0]
    return (
        output.dim() == 0
        or (n > 1 and output.numel() == 1)
        or output.shape[0] != n
        or any(x.shape[0] != n for x in inputs)
    )


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
    *,
    unit: str = "perturbations",
    initial: torch.Tensor | None = None,
    futures: bool = False,
) -> Iterator[tuple[slice, torch.Tensor, Any]]:
    """Evaluate ``n_copies`` perturbed copies of all inputs, many copies per model call where the output allows.

    ``build(start, stop)`` returns (the model inputs of copies ``start..stop-1``, copy-major: shape
    ``[(stop - start) * len(x), ...]`` per input ``x``; any context the caller wants back). Yields, batch by batch
    and in order, (the copies' slice, their explained outputs ``[stop - start, n_outputs]``, the context).

    ``initial`` is the explained output of the unperturbed inputs (see :func:`model_output`): every copy's output
    has its shape, ``n_outputs = initial.numel()``. None: one scalar per example (``n_outputs = n``).
    ``sample_inputs`` (the unperturbed inputs) size the batches: ``perturbations_per_eval`` copies per call, or with
    None as many as the engine's batch sizing allows (a copy of all examples is the unit; on CUDA halved after an
    out-of-memory error, by the engine). A batch that is built again (after an out-of-memory error, or one copy at
    a time when the output did not grow with the batch) sees the same draws from torch's global generator:
    ``build`` may draw random numbers. ``forward_func`` may be an :class:`~fastig.core.engine.Engine`.
    """
    engine = as_engine(forward_func)
    n = target.n
    n_outputs = n if initial is None else initial.numel()
    bytes_per_copy = max(1, sum(x.numel() * x.element_size() for x in sample_inputs))
    if initial is not None and aggregated(initial, sample_inputs) and n_copies > 0:
        if perturbations_per_eval not in (None, 1):
            raise InvalidArgumentError(
                f"perturbations_per_eval={perturbations_per_eval}: the model returns one output of shape "
                f"{tuple(initial.shape)} for the whole batch of {n} (an aggregated output), so every model call "
                "can hold only one perturbed copy; use perturbations_per_eval=1 (or None)"
            )
        size = 1
    elif perturbations_per_eval is not None:
        size = min(perturbations_per_eval, max(1, n_copies))
    else:
        size = engine.rows_per_batch(bytes_per_copy, max(1, n_copies), grad=False)

    def evaluate(chunk: Chunk):
        start, stop = chunk.steps.start, chunk.steps.stop
        k = stop - start
        rng = torch.get_rng_state()
        try:
            inputs, context = build(start, stop)
            output = model_output(engine, inputs, target.for_batch(slice(0, n), k),
                                  args_for_batch(args, n, slice(0, n), k), futures=futures)
        except BaseException:
            torch.set_rng_state(rng)  # the engine may retry the copies in halves: same draws
            raise
        if not _fits(output, k, n_outputs, initial):
            if k == 1:
                expected = f"{n} (one per example)" if initial is None else f"{tuple(initial.shape)}"
                raise InvalidArgumentError(
                    f"the model returned shape {tuple(output.shape)} for one perturbed copy of the inputs; "
                    f"expected {expected}, as for the unperturbed inputs"
                )
            if perturbations_per_eval is not None:
                raise InvalidArgumentError(
                    f"perturbations_per_eval={perturbations_per_eval}: the model's output must grow with the "
                    f"batch (one row per example), but {k} copies gave shape {tuple(output.shape)}; use "
                    "perturbations_per_eval=1 (or None) for models that aggregate the batch"
                )
            torch.set_rng_state(rng)
            raise _OutputDidNotGrow
        return output.reshape(k, n_outputs), context

    start = 0
    with progress.task(description, n_copies, unit, show=show_progress) as done:
        while start < n_copies:
            chunks = (Chunk(slice(s, min(s + size, n_copies)), slice(0, 1), False)
                      for s in range(start, n_copies, size))
            try:
                for chunk, (outputs, context) in engine.run_chunks(
                    chunks, evaluate, bytes_per_row=bytes_per_copy, grad=False, adaptive=perturbations_per_eval is None
                ):
                    yield chunk.steps, outputs, context
                    done.advance(chunk.steps.stop - chunk.steps.start)
                    start = chunk.steps.stop
            except _OutputDidNotGrow:
                size = 1  # the model aggregates: one copy per call, this batch again


class _OutputDidNotGrow(Exception):
    """The output of several stacked copies was not their outputs stacked (a model that aggregates the batch)."""


def _fits(output: torch.Tensor, k: int, n_outputs: int, initial: torch.Tensor | None) -> bool:
    """Whether the output of ``k`` stacked copies holds ``k`` copies' outputs (copy-major)."""
    if output.numel() != k * n_outputs:
        return False
    if k == 1 or initial is None:
        return True
    return output.dim() > 0 and initial.dim() > 0 and output.shape[0] == k * initial.shape[0]


# -- shared input handling ---------------------------------------------------------------------------------------


def format_perturbation_baselines(baselines: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Baselines for the perturbation methods, as Captum uses them: never cast to the input's dtype.

    None: 0 (False for a bool input). A Python number becomes a 0-d tensor (it takes part in type promotion as a
    Python number does: 0.2 for an int input gives float copies, True for a bool input keeps them bool). A tensor
    must broadcast to its input; it is reshaped to the input's number of dimensions and keeps its dtype.
    """
    if baselines is None:
        baselines = tuple(False if x.dtype == torch.bool else 0 for x in inputs)
    elif not isinstance(baselines, tuple):
        baselines = (baselines,)
    if len(baselines) != len(inputs):
        raise InvalidArgumentError(f"got {len(baselines)} baselines for {len(inputs)} inputs")
    out = []
    for i, (b, x) in enumerate(zip(baselines, inputs)):
        if isinstance(b, (bool, int, float)):
            b = torch.tensor(b, device=x.device)
        elif isinstance(b, torch.Tensor):
            if b.dim() > x.dim() or any(bd not in (1, xd) for bd, xd in zip(reversed(b.shape), reversed(x.shape))):
                raise InvalidArgumentError(
                    f"baselines[{i}] of shape {tuple(b.shape)} does not broadcast to its input of shape "
                    f"{tuple(x.shape)}"
                )
            b = b.to(x.device).reshape((1,) * (x.dim() - b.dim()) + tuple(b.shape))
        else:
            raise InvalidTypeError(f"baselines[{i}] must be a tensor or a number, got {type(b).__name__}")
        out.append(b)
    return tuple(out)


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
        raise InvalidArgumentError(f"got {len(masks)} feature masks for {len(inputs)} inputs")
    out = []
    for i, (m, x) in enumerate(zip(masks, inputs)):
        if not isinstance(m, torch.Tensor):
            raise InvalidTypeError(f"feature_mask[{i}] must be a tensor, got {type(m).__name__}")
        if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
            raise InvalidTypeError(f"feature_mask[{i}] must hold integer feature ids, got dtype {m.dtype}")
        if m.dim() > x.dim() or any(md not in (1, xd) for md, xd in zip(reversed(m.shape), reversed(x.shape))):
            raise InvalidArgumentError(
                f"feature_mask[{i}] of shape {tuple(m.shape)} does not broadcast to its input of shape {tuple(x.shape)}"
            )
        if m.numel() and m.min() < 0:
            raise InvalidArgumentError(f"feature_mask[{i}] holds negative feature ids")
        out.append(m.reshape((1,) * (x.dim() - m.dim()) + tuple(m.shape)).to(device=x.device, dtype=torch.long))
    return tuple(out)


def rows_per_example(initial: torch.Tensor, masks: tuple[torch.Tensor, ...], n: int) -> int | None:
    """How many attribution rows (explained output elements) each example has, for masks given per example.

    Attribution row ``r`` of a per-example output belongs to example ``r // rows_per_example``. None where every
    mask is shared by all examples. An aggregated output has no rows per example: per-example masks are an error.
    """
    if not any(m.shape[0] > 1 for m in masks):
        return None
    if initial.dim() == 0 or initial.shape[0] != n:
        raise InvalidArgumentError(
            f"feature_mask has one mask per example, but the model returns one output of shape "
            f"{tuple(initial.shape)} for the whole batch; give masks with first dimension 1"
        )
    return initial.numel() // n


def spread(
    values: torch.Tensor, ids: torch.Tensor, masks: tuple[torch.Tensor, ...], inputs: tuple, per_example: int | None,
) -> tuple[torch.Tensor, ...]:
    """Per-element attributions from per-feature values: ``values`` [R, len(ids)] (one row per explained output
    element), ``ids`` sorted feature ids. Returns ``[R, *x.shape[1:]]`` per input ``x``.

    Element ``(r, ...)`` of input ``i`` gets ``values[r, position of its feature id in ids]``; with per-example
    masks the id is read from the mask of row ``r``'s example (``r // per_example``, see :func:`rows_per_example`).
    """
    rows = values.shape[0]
    out = []
    for m, x in zip(masks, inputs):
        inner = tuple(x.shape[1:])
        size = math.prod(inner)
        if x.numel() == 0 or ids.numel() == 0:
            out.append(torch.zeros((rows,) + inner, dtype=values.dtype, device=values.device))
            continue
        flat = m.expand((m.shape[0],) + inner).reshape(m.shape[0], size)
        index = torch.searchsorted(ids, flat.contiguous()).clamp_max(ids.numel() - 1)
        index = index.expand(rows, size) if m.shape[0] == 1 else index.repeat_interleave(per_example, 0)
        out.append(torch.gather(values, 1, index).reshape((rows,) + inner))
    return tuple(out)


def _feature_order(masks: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The feature ids of the non-empty inputs in Captum's order: by the first input holding them, sorted within."""
    seen: dict[int, None] = {}
    for m, x in zip(masks, inputs):
        if x.numel():
            seen.update(dict.fromkeys(torch.unique(m).tolist()))
    device = inputs[0].device
    return torch.tensor(list(seen), dtype=torch.long, device=device)


def mixed(x: torch.Tensor, b: torch.Tensor, take_b: torch.Tensor) -> torch.Tensor:
    """``b`` where ``take_b``, else ``x``; ``take_b`` is [k, 1 or len(x), ...]: k copies of ``x``, copy-major, in
    the dtype Captum's arithmetic gives (``x * (1 - mask) + b * mask``)."""
    copies = torch.where(take_b, b.unsqueeze(0) if b.dim() else b, x.unsqueeze(0))
    return copies.reshape((take_b.shape[0] * x.shape[0],) + tuple(x.shape[1:]))


def check_n_samples(n_samples: Any) -> None:
    check_int("n_samples", n_samples)


def _completed(value: Any) -> torch.futures.Future:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return future


# -- FeatureAblation ---------------------------------------------------------------------------------------------


class FeatureAblation(Attribution):
    """Feature ablation: each feature (group of input scalars with the same ``feature_mask`` id) is replaced by its
    baseline in turn; its attribution is ``f(inputs) - f(inputs with the feature ablated)``.

    Same constructor, ``attribute()`` / ``attribute_future()`` signatures and numbers as
    ``captum.attr.FeatureAblation``, for every output form (see the module docstring); attributions have the dtype
    of the model output (int64 for a Python int, float64 for a Python float), as in Captum.
    ``perturbations_per_eval=None`` (fastig's default) batches as many ablated copies per model call as fit the
    memory budget; an integer caps it as in Captum.
    """

    multiplies_by_inputs = True  # Captum's PerturbationAttribution reports True
    _unit = "features"

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
        return self._attribute(inputs, baselines, target, additional_forward_args, feature_mask,
                               perturbations_per_eval, show_progress, kwargs, futures=False)

    def attribute_future(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        feature_mask: Any = None,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> torch.futures.Future:
        """``attribute()`` for a ``forward_func`` that returns ``torch.futures.Future``: returns a Future of the
        attributions (each model call's Future is awaited before the next batch is built)."""
        return _completed(self._attribute(inputs, baselines, target, additional_forward_args, feature_mask,
                                          perturbations_per_eval, show_progress, kwargs, futures=True))

    def _attribute(self, inputs, baselines, target, additional_forward_args, feature_mask, perturbations_per_eval,
                   show_progress, kwargs, futures):
        if kwargs:
            raise TypeError(f"{type(self).__name__}.attribute() got unexpected keyword arguments {sorted(kwargs)}")
        check_perturbations_per_eval(perturbations_per_eval)
        xs, is_tuple = format_inputs(inputs, same_batch=False)
        bs = format_perturbation_baselines(baselines, xs)
        masks = format_feature_mask(feature_mask, xs)
        tgt = Target(target, xs[0].shape[0])
        args = format_additional_args(additional_forward_args)

        f0 = model_output(self.forward_func, xs, tgt, args, futures=futures)
        per_example = rows_per_example(f0, masks, xs[0].shape[0])
        order = self._evaluated_features(masks, xs)
        build = self._builder(xs, bs, masks, order, perturbations_per_eval)

        diffs = torch.zeros((order.numel(), f0.numel()), dtype=f0.dtype, device=f0.device)
        for part, outputs, _ in evaluate_copies(
            self.forward_func, build, order.numel(), xs, tgt, args, perturbations_per_eval, show_progress,
            type(self).__name__, unit=self._unit, initial=f0, futures=futures,
        ):
            diffs[part] = f0.reshape(1, -1) - outputs.to(f0.device)
        ids, position = torch.sort(order)
        values = diffs[position].T.contiguous()
        return format_output(spread(values, ids, masks, xs, per_example), is_tuple)

    def _evaluated_features(self, masks, xs) -> torch.Tensor:
        """The feature ids that get a model call, in evaluation order."""
        return _feature_order(masks, xs)

    def _builder(self, xs, bs, masks, order, perturbations_per_eval) -> Callable:
        def build(start: int, stop: int):
            chosen = order[start:stop]
            copies = []
            for x, b, m in zip(xs, bs, masks):
                hit = m.unsqueeze(0) == chosen.reshape((-1,) + (1,) * m.dim())  # [k, 1 or n, ...]
                copies.append(mixed(x, b, hit))
            return tuple(copies), None

        return build


# -- FeaturePermutation ------------------------------------------------------------------------------------------


def permute_feature(x: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """Captum's default ``perm_func``: the masked elements of ``x`` shuffled across the batch by a random
    permutation of its examples that is not the identity (``torch.randperm``, drawn again while it is)."""
    n = x.shape[0]
    if n < 2:
        raise InvalidArgumentError("cannot permute features with batch_size = 1")
    perm = torch.randperm(n)
    identity = torch.arange(n)
    while bool((perm == identity).all()):
        perm = torch.randperm(n)
    return torch.where(feature_mask, x[perm.to(x.device)], x)


class FeaturePermutation(FeatureAblation):
    """Permutation feature importance: each feature (group of scalars with the same ``feature_mask`` id) is
    shuffled across the examples of the batch in turn; its attribution is ``f(inputs) - f(inputs with the feature
    shuffled)``. Usually ``forward_func`` returns one value for the batch (a loss or a metric): the attribution is
    then the change of that value (attributions of first dimension 1).

    Drop-in for ``captum.attr.FeaturePermutation``: same constructor (``perm_func(x, mask)`` shuffles the masked
    elements of one input), ``attribute()`` / ``attribute_future()`` signatures and numbers. The permutations are
    drawn as Captum draws them (``perm_func`` called once per feature and input holding it, in Captum's order, from
    the global torch generator), so the same seed gives the same attributions; with an integer
    ``perturbations_per_eval`` above 1 the calls follow Captum's batched order. What differs: for per-example
    outputs, ``perturbations_per_eval=None`` (the default) evaluates many shuffled copies per model call. A
    feature in an input with fewer than 2 examples cannot be shuffled: it is skipped with a warning and gets 0.
    """

    _unit = "features"

    def __init__(
        self, forward_func: Callable, perm_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = permute_feature
    ) -> None:
        super().__init__(forward_func)
        if not callable(perm_func):
            raise InvalidTypeError(f"perm_func must be callable, got {type(perm_func).__name__}")
        self.perm_func = perm_func

    def attribute(
        self,
        inputs: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        feature_mask: Any = None,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> Any:
        kwargs.pop("baselines", None)  # Captum ignores it too
        return self._attribute(inputs, None, target, additional_forward_args, feature_mask, perturbations_per_eval,
                               show_progress, kwargs, futures=False)

    def attribute_future(
        self,
        inputs: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        feature_mask: Any = None,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> torch.futures.Future:
        """``attribute()`` for a ``forward_func`` that returns ``torch.futures.Future``."""
        kwargs.pop("baselines", None)
        return _completed(self._attribute(inputs, None, target, additional_forward_args, feature_mask,
                                          perturbations_per_eval, show_progress, kwargs, futures=True))

    def _evaluated_features(self, masks, xs) -> torch.Tensor:
        order = _feature_order(masks, xs)
        too_small = {i for i, x in enumerate(xs) if x.shape[0] < 2}
        if not too_small:
            return order
        keep = [f for f in order.tolist() if not any(bool((masks[i] == f).any()) for i in too_small)]
        warnings.warn(
            f"FeaturePermutation: {order.numel() - len(keep)} feature(s) lie in inputs with fewer than 2 examples, "
            "which cannot be permuted; they are skipped and get attribution 0", stacklevel=4,
        )
        return torch.tensor(keep, dtype=torch.long, device=order.device)

    def _builder(self, xs, bs, masks, order, perturbations_per_eval) -> Callable:
        owners = [[i for i, m in enumerate(masks) if xs[i].numel() and bool((m == f).any())] for f in order.tolist()]

        def build(start: int, stop: int):
            chosen = order[start:stop].tolist()
            k = stop - start
            copies = [x.unsqueeze(0).repeat((k,) + (1,) * x.dim()) for x in xs]  # [k, len(x), ...] per input
            if perturbations_per_eval is None or perturbations_per_eval == 1:
                # Captum's order at perturbations_per_eval=1: feature by feature, each input holding the feature
                for j, f in enumerate(chosen):
                    for i in owners[start + j]:
                        copies[i][j] = self._permuted(xs[i], masks[i] == f)
            else:
                # Captum's order for a batch: input by input (each input any chosen feature touches), then feature
                touched = sorted({i for j in range(k) for i in owners[start + j]})
                for i in touched:
                    for j, f in enumerate(chosen):
                        copies[i][j] = self._permuted(xs[i], masks[i] == f)
            return tuple(c.reshape((k * x.shape[0],) + tuple(x.shape[1:])) for c, x in zip(copies, xs)), None

        return build

    def _permuted(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.perm_func(x, mask)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise InvalidArgumentError(
                f"perm_func must return a tensor of its input's shape {tuple(x.shape)}, got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        return out


# -- Occlusion ---------------------------------------------------------------------------------------------------


def _window_shapes(value: Any, n_inputs: int) -> tuple:
    """Captum's layout: one tuple of ints for a single input, else one tuple per input."""
    if isinstance(value, tuple) and (len(value) == 0 or isinstance(value[0], int)):
        value = (value,)
    if not isinstance(value, tuple) or len(value) != n_inputs:
        raise InvalidArgumentError(
            f"sliding_window_shapes must hold one tuple per input tensor ({n_inputs}), got {value!r}"
        )
    return value


def _strides(value: Any, n_inputs: int) -> tuple:
    """Captum's layout: None (1 everywhere), an int or a tuple for a single input, else one entry per input."""
    if value is None:
        value = (1,) * n_inputs
    if n_inputs == 1 and not (isinstance(value, tuple) and len(value) == 1):
        value = (value,)
    if not isinstance(value, tuple) or len(value) != n_inputs:
        raise InvalidArgumentError(f"strides must hold one entry per input tensor ({n_inputs}), got {value!r}")
    return value


class Occlusion(Attribution):
    """Occlusion (Zeiler & Fergus 2014): a sliding hyperrectangle of each input is replaced by the baseline; every
    scalar's attribution is the mean of ``f(inputs) - f(occluded)`` over the windows that cover it.

    Same constructor, ``attribute()`` signature and numbers as ``captum.attr.Occlusion`` (float32 attributions,
    windows cut off at the far edges, every output form of the module docstring); ``attribute_future()`` raises
    NotImplementedError as in Captum. ``perturbations_per_eval=None`` (fastig's default) batches as many occluded
    copies per model call as fit the memory budget.
    """

    multiplies_by_inputs = True  # Captum's PerturbationAttribution reports True

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
        xs, is_tuple = format_inputs(inputs, same_batch=False)
        bs = format_perturbation_baselines(baselines, xs)
        tgt = Target(target, xs[0].shape[0])
        args = format_additional_args(additional_forward_args)
        windows = self._windows(xs, sliding_window_shapes, strides)  # [(input index, tuple of slices)]

        f0 = model_output(self.forward_func, xs, tgt, args)
        acc_dtype = _ops.accumulation_dtype(f0.dtype if f0.is_floating_point() else torch.float32)
        totals = [torch.zeros((f0.numel(), x[0:1].numel()), dtype=acc_dtype, device=x.device) for x in xs]
        counts = [torch.zeros(x[0:1].numel(), dtype=acc_dtype, device=x.device) for x in xs]

        def build(start: int, stop: int):
            chunk = windows[start:stop]
            k = len(chunk)
            copies, hits = [], []
            for i, (x, b) in enumerate(zip(xs, bs)):
                hit = torch.zeros((k, 1) + tuple(x.shape[1:]), dtype=torch.bool, device=x.device)
                for j, (owner, box) in enumerate(chunk):
                    if owner == i:
                        hit[(j, 0) + box] = True
                hits.append(hit)
                copies.append(mixed(x, b, hit))
            return tuple(copies), hits

        for _, outputs, hits in evaluate_copies(
            self.forward_func, build, len(windows), xs, tgt, args, perturbations_per_eval, show_progress,
            "Occlusion", unit="windows", initial=f0,
        ):
            diff = (f0.reshape(1, -1) - outputs.to(f0.device)).to(acc_dtype)  # [k, n_outputs]
            for total, count, hit in zip(totals, counts, hits):
                flat = hit.reshape(hit.shape[0], -1).to(acc_dtype)
                total += diff.T @ flat
                count += flat.sum(0)
        attributions = tuple(
            (t / c).reshape((f0.numel(),) + tuple(x.shape[1:])).float() for t, c, x in zip(totals, counts, xs)
        )
        return format_output(attributions, is_tuple)

    @staticmethod
    def _windows(xs, sliding_window_shapes, strides) -> list[tuple[int, tuple]]:
        shapes = _window_shapes(sliding_window_shapes, len(xs))
        steps = _strides(strides, len(xs))
        out = []
        for i, (x, shape, step) in enumerate(zip(xs, shapes, steps)):
            dims = tuple(x.shape[1:])
            if not isinstance(shape, tuple) or len(shape) != len(dims) or not all(
                isinstance(s, int) and not isinstance(s, bool) and (s >= 1 or s == size == 0)
                for s, size in zip(shape, dims)
            ):
                raise InvalidArgumentError(
                    f"sliding_window_shapes for input {i} must be a tuple of {len(dims)} positive ints "
                    f"(one per non-batch dimension of shape {tuple(x.shape)}), got {shape!r}"
                )
            if isinstance(step, int) and not isinstance(step, bool):
                step = (step,) * len(dims)
            if not isinstance(step, tuple) or len(step) != len(dims) or not all(
                isinstance(s, int) and s >= 1 for s in step
            ):
                raise InvalidArgumentError(
                    f"strides for input {i} must be a positive int or a tuple of {len(dims)}, got {step!r}"
                )
            starts = []
            for d, (size, w, s) in enumerate(zip(dims, shape, step)):
                if w > size:
                    raise InvalidArgumentError(
                        f"sliding window {shape} exceeds the input dimensions {dims} (input {i})"
                    )
                if w < size and s > w:
                    raise InvalidArgumentError(
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

    Same constructor, ``attribute()`` / ``attribute_future()`` signatures and numbers as
    ``captum.attr.ShapleyValueSampling``: the permutations are drawn exactly as Captum draws them
    (``torch.randperm(max feature id + 1)`` once per sample, from the global torch generator), so the same seed
    gives the same attributions. Attributions are float32 as in Captum, of shape ``output shape + input shape[1:]``
    for every output form of the module docstring. What differs: all ``n_samples * n_features`` coalitions are
    independent given the permutations, so they are evaluated in large batches across permutations; ids missing
    from the mask cost no model call; a Python-number baseline for an integer input is not rounded to the input's
    dtype (Captum's ShapleyValueSampling alone rounds it, unlike its FeatureAblation).
    """

    multiplies_by_inputs = True  # Captum's PerturbationAttribution reports True

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
        return self._attribute(inputs, baselines, target, additional_forward_args, feature_mask, n_samples,
                               perturbations_per_eval, show_progress, futures=False)

    def attribute_future(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        feature_mask: Any = None,
        n_samples: int = 25,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
    ) -> torch.futures.Future:
        """``attribute()`` for a ``forward_func`` that returns ``torch.futures.Future``."""
        return _completed(self._attribute(inputs, baselines, target, additional_forward_args, feature_mask,
                                          n_samples, perturbations_per_eval, show_progress, futures=True))

    def _attribute(self, inputs, baselines, target, additional_forward_args, feature_mask, n_samples,
                   perturbations_per_eval, show_progress, futures):
        check_perturbations_per_eval(perturbations_per_eval)
        check_n_samples(n_samples)
        xs, is_tuple = format_inputs(inputs, same_batch=False)
        bs = format_perturbation_baselines(baselines, xs)
        masks = format_feature_mask(feature_mask, xs)
        tgt = Target(target, xs[0].shape[0])
        args = format_additional_args(additional_forward_args)
        device = xs[0].device
        if not any(m.numel() for m in masks):
            raise InvalidArgumentError("ShapleyValueSampling needs at least one feature; every input is empty")

        n_features = int(max(m.max().item() for m in masks if m.numel())) + 1
        # Captum's draws, in Captum's order: one randperm per sample from the global generator.
        perms = torch.stack([torch.randperm(n_features) for _ in range(n_samples)]).to(device)
        ranks = torch.empty_like(perms)
        ranks.scatter_(1, perms, torch.arange(n_features, device=device).expand(n_samples, -1))
        present = torch.zeros(n_features, dtype=torch.bool, device=device)
        for m, x in zip(masks, xs):
            if x.numel():
                present[m.reshape(-1)] = True
        # the coalitions worth a model call: (sample, position) whose feature occurs in the mask, in order
        sample_of, position_of = torch.nonzero(present[perms], as_tuple=True)
        n_evals = sample_of.numel()

        everywhere = torch.ones((), dtype=torch.bool, device=device)
        at_baselines = tuple(torch.where(everywhere, b, x) for x, b in zip(xs, bs))  # promoted as the copies are
        f_base = model_output(self.forward_func, at_baselines, tgt, args, futures=futures)
        per_example = rows_per_example(f_base, masks, xs[0].shape[0])
        f_flat = f_base.reshape(-1)

        def build(start: int, stop: int):
            s, t = sample_of[start:stop], position_of[start:stop]
            copies = []
            for x, b, m in zip(xs, bs, masks):
                rank = ranks[s][:, m.reshape(-1)].reshape((stop - start,) + tuple(m.shape))  # [k, 1 or n, ...]
                missing = rank > t.reshape((-1,) + (1,) * m.dim())
                copies.append(mixed(x, b, missing))
            return tuple(copies), None

        outputs = torch.empty((n_evals, f_flat.numel()), dtype=f_flat.dtype, device=f_flat.device)
        for part, out, _ in evaluate_copies(
            self.forward_func, build, n_evals, xs, tgt, args, perturbations_per_eval, show_progress,
            "ShapleyValueSampling", unit="coalitions", initial=f_base, futures=futures,
        ):
            outputs[part] = out.to(outputs.device)
        # marginal gain of each evaluated coalition over the previous one of the same permutation
        first = torch.ones(n_evals, dtype=torch.bool, device=device)
        first[1:] = sample_of[1:] != sample_of[:-1]
        previous = torch.cat([f_flat.unsqueeze(0), outputs[:-1]])
        previous[first] = f_flat
        acc_dtype = _ops.accumulation_dtype(outputs.dtype if outputs.is_floating_point() else torch.float32)
        gains = (outputs - previous).to(acc_dtype)
        totals = torch.zeros((n_features, f_flat.numel()), dtype=acc_dtype, device=device)
        totals.index_add_(0, perms[sample_of, position_of], gains)
        ids = torch.arange(n_features, device=device)
        values = (totals / n_samples).T.contiguous()
        prefix = tuple(f_base.shape) or (1,)
        attributions = tuple(
            a.float().reshape(prefix + tuple(x.shape[1:]))
            for a, x in zip(spread(values, ids, masks, xs, per_example), xs)
        )
        return format_output(attributions, is_tuple)
