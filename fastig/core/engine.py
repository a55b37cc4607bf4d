"""The engine: the one door to the model. Every forward and forward+backward pass of every method, metric and
dataset filter goes through :class:`Engine`, so batching, out-of-memory back-off, device placement and precision
are solved here once.

- :meth:`Engine.call` is the door itself: one model call, with the inputs moved to the model's device, under
  autocast at the engine's precision, counted (:func:`count_calls`) and reported to the progress display
  (:func:`fastig.core.progress.pulse`). Everything else in this module is built on it.
- Batch sizing (:meth:`Engine.rows_per_batch`): a fixed ``batch_size`` when the caller gives one; otherwise on
  the CPU just enough rows to amortize per-call overhead (:data:`CPU_BATCH_BYTES` of input), on CUDA up to
  :data:`CUDA_BATCH_BYTES`, halved and retried on out-of-memory errors (:meth:`Engine.run_chunks`, the only
  place that handles them) and remembered per model, so the next call starts at a size that fits.
- Forward+backward passes (:meth:`Engine.gradients`) take one target per row or K targets per row (``[B, K]``
  explained outputs): one forward pass, then K vector-Jacobian products over the retained graph
  (:func:`target_vjps`).
- Whole paths (:meth:`Engine.batches`, :func:`integrate`, :func:`integrate_moves`, :func:`integrate_idgi`): a
  batch is ``k`` path steps of ``m`` consecutive examples (step-major); its points are generated on the fly by the
  path, pushed through one forward and one backward pass, and handed to an accumulator before the next batch is
  built. No more than one batch of path points is ever alive.

Precision (``precision="fp32" | "bf16" | "fp16"``): the model's passes run under ``torch.autocast`` with the
chosen dtype; the explained outputs come back as float32 and the input gradients in the inputs' dtype (autograd
casts them back), so accumulation stays fp32 (fp64 for fp64 inputs) and attributions keep the caller's dtype.
fp64 inputs are not autocast (autocast leaves float64 alone). Measured cost and error: see the README
("Precision"); on a CPU without native bf16/fp16 arithmetic (AVX2 only, as this project's machine) the reduced
precisions are *slower* than fp32 (resnet50 forward+backward: bf16 0.40x, fp16 0.37x the speed, measured on a
loaded machine), so fp32 stays the default everywhere. Error of IG against fp32 (8 steps, random weights; resnet18,
resnet34, resnet50, vgg16, vgg19, alexnet, googlenet, sascenenet_rgb): relative L2 of the attributions 0.14-0.28
(bf16), 0.045-0.097 (fp16); Spearman rank correlation of the maps 0.945-0.987 (bf16), 0.994-0.999 (fp16);
completeness gap 1.9e-4-3.7e-3 of f(x) - f(b) (bf16), 5.0e-5-4.2e-4 (fp16), against about 1e-7-1e-6 at fp32 (the
bias-free models; alexnet's and googlenet's fp32 gap is 8 steps' quadrature error, 8e-3-1.9e-2, and reduced
precision adds up to 2e-2). On a small CNN trained on digits (IG 32 steps): 0.033-0.082 (bf16) and 0.011-0.018
(fp16), Spearman >= 0.994 and >= 0.9993.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch

from fastig import _ops
from fastig.core import progress
from fastig.core.targets import Target, args_for_batch
from fastig.errors import InputError, check_int

# On the CPU a model pass costs nearly the same per point at any batch size beyond a few points (resnet50 IG, 32
# steps: one pass of 32 points was about 13% cheaper than two of 16, at twice the peak memory), so a batch only
# amortizes Python overhead and keeps memory low: about this many bytes of input rows (13 points of 3x224x224 fp32).
CPU_BATCH_BYTES = 8 << 20
# On CUDA a pass gets cheaper per row up to large batches: at most this many bytes of input rows per call (about
# 850 images of 3x224x224 fp32), less once a batch has run out of memory.
CUDA_BATCH_BYTES = 512 << 20

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


# -- counting: every model call the engine makes -----------------------------------------------------------------


class CallCounter:
    """How many model calls (``calls``) and input rows (``rows``) the engine made while the counter was open."""

    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0


_counters: list[CallCounter] = []


@contextmanager
def count_calls() -> Iterator[CallCounter]:
    """Count the model calls made through the engine inside the ``with`` block (the test that every model call of
    fastig goes through the engine compares this count with the model's own)."""
    counter = CallCounter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


# -- memory: batch sizes that fit, per model ---------------------------------------------------------------------

# model -> {(precision, with gradients): bytes of input rows per batch known to fit in device memory}
_fitting: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _model_of(forward_func: Callable) -> Any:
    """The object behind a forward function: through ``functools.wraps`` wrappers and bound methods."""
    seen = 0
    while hasattr(forward_func, "__wrapped__") and seen < 16:
        forward_func, seen = forward_func.__wrapped__, seen + 1
    return getattr(forward_func, "__self__", forward_func)


def _model_device(model: Any) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


@dataclass(frozen=True)
class Chunk:
    """A batch of work: ``steps`` x ``examples`` rows (for a flat list of rows, ``steps`` is ``slice(0, 1)``).

    ``split_examples=False``: the rows of one step cannot be split (a perturbation copy holds every example).
    """

    steps: slice
    examples: slice
    split_examples: bool = True

    @property
    def size(self) -> int:
        return (self.steps.stop - self.steps.start) * (self.examples.stop - self.examples.start)

    def halves(self) -> tuple["Chunk", "Chunk"] | None:
        k, m = self.steps.stop - self.steps.start, self.examples.stop - self.examples.start
        if k > 1:
            mid = self.steps.start + k // 2
            return (Chunk(slice(self.steps.start, mid), self.examples, self.split_examples),
                    Chunk(slice(mid, self.steps.stop), self.examples, self.split_examples))
        if m > 1 and self.split_examples:
            mid = self.examples.start + m // 2
            return (Chunk(self.steps, slice(self.examples.start, mid)),
                    Chunk(self.steps, slice(mid, self.examples.stop)))
        return None


def grid(n_steps: int, n_examples: int, steps_per_batch: int, examples_per_batch: int,
         split_examples: bool = True) -> Iterator[Chunk]:
    """Chunks covering ``n_steps`` x ``n_examples``: examples in chunks, within a chunk steps in chunks, in order."""
    for e0 in range(0, n_examples, examples_per_batch):
        examples = slice(e0, min(e0 + examples_per_batch, n_examples))
        for s0 in range(0, n_steps, steps_per_batch):
            yield Chunk(slice(s0, min(s0 + steps_per_batch, n_steps)), examples, split_examples)


class PathPoints(Protocol):
    """The engine's view of a path: how many points it has (``n_steps``) and the points of a range of steps and
    examples (``points``), made on demand, never all at once. Every path of :mod:`fastig.core.paths` is one. The
    engine needs only these counted points, not the curve; and the name ``Path`` would shadow ``pathlib.Path``.

    A path whose points depend on the gradients already seen (Guided IG) also sets ``sequential = True`` and has
    ``advance(batch)``: the engine then evaluates one step per batch and calls ``advance`` right after each
    batch, before it asks for the next points; ``advance`` returns how far the path moved at that step
    (``x_{k+1} - x_k``, [1, m, ...] per input), which the engine stores in ``Batch.moves``.
    """

    n_steps: int

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]: ...


@dataclass
class Batch:
    """One evaluated batch: ``outputs`` [k, m] (detached target scalars) and ``grads`` ([k, m, ...] per input);
    with K targets per example ``outputs`` is [k, m, K] and ``grads`` [k, m, K, ...].

    ``moves`` is set for sequential paths only: the path's displacement at each of the batch's steps.
    """

    steps: slice
    examples: slice
    outputs: torch.Tensor
    grads: tuple[torch.Tensor, ...]
    moves: tuple[torch.Tensor, ...] | None = None


def target_vjps(outputs: torch.Tensor, wrt: tuple[torch.Tensor, ...], create_graph: bool = False,
                retain_graph: bool | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients of explained outputs w.r.t. ``wrt`` (input leaves, or a layer's activations) from one forward.

    ``outputs`` [B]: one backward pass, gradients shaped like ``wrt``. ``outputs`` [B, K] (K targets per row):
    K vector-Jacobian products over the one graph (a backward pass per target, the graph retained between them),
    gradients [B, K, ...] per tensor of ``wrt``. Unused tensors get zeros. Rows must be independent (eval mode).
    A loop over retained-graph backward passes measured as fast as ``is_grads_batched=True`` on a prepared
    resnet50 and 1.8x faster on an unprepared one (benchmarks/test_bench_targets.py), and it works with every
    custom autograd rule (vmap does not), so that is what runs.
    """
    if outputs.dim() == 1:
        grads = torch.autograd.grad(outputs, wrt, grad_outputs=torch.ones_like(outputs), allow_unused=True,
                                    create_graph=create_graph, retain_graph=retain_graph)
        return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads))
    k = outputs.shape[1]
    per_target = []
    for j in range(k):
        column = outputs[:, j]
        grads = torch.autograd.grad(column, wrt, grad_outputs=torch.ones_like(column), allow_unused=True,
                                    create_graph=create_graph,
                                    retain_graph=True if j < k - 1 else retain_graph)
        per_target.append(tuple(torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)))
    return tuple(torch.stack(gs, dim=1) for gs in zip(*per_target))


class Engine:
    """Runs ``forward_func`` on batches of rows (path points, perturbed copies, metric images) and returns the
    explained outputs and, where asked, input gradients.

    ``batch_size`` is the number of model input rows per call (``internal_batch_size`` of the methods). None picks
    one (see the module docstring): small on the CPU, as large as fits on CUDA, halved on out-of-memory errors.
    ``precision``: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` autocast of the model's passes.
    """

    def __init__(self, forward_func: Callable, batch_size: int | None = None, precision: str = "fp32"):
        check_int("internal_batch_size", batch_size, none_ok=True)
        self.forward_func = forward_func
        self.batch_size = batch_size
        self.precision = check_precision(precision)
        self.model = _model_of(forward_func)
        self.device = _model_device(self.model)

    # -- the door -------------------------------------------------------------------------------------------

    def call(self, inputs: tuple, args: tuple = ()) -> Any:
        """One model call on ``inputs`` (a tuple of tensors) and extra arguments ``args``, in the caller's gradient
        mode: tensors moved to the model's device (outputs moved back to the inputs' device), autocast at the
        engine's precision (outputs returned as float32), counted, and one progress pulse."""
        home = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
        move = self.device is not None and home is not None and self.device != home
        if move:
            inputs = tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in inputs)
            args = tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
        autocast = self._autocast(inputs)
        with autocast:
            output = self.forward_func(*inputs, *args)
        rows = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        for counter in _counters:
            counter.calls += 1
            counter.rows += rows
        progress.pulse()
        if isinstance(output, torch.Tensor):
            if not isinstance(autocast, nullcontext) and output.dtype == _AUTOCAST_DTYPES[self.precision]:
                output = output.float()
            if move:
                output = output.to(home)
        return output

    def _autocast(self, inputs: tuple):
        if self.precision == "fp32":
            return nullcontext()
        device = self.device or next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    # -- batch sizing and the out-of-memory policy (written once) -------------------------------------------

    def rows_per_batch(self, bytes_per_row: int, total: int, grad: bool = True) -> int:
        """Model input rows per call for rows of ``bytes_per_row`` bytes, ``total`` rows in all (see the module
        docstring); ``grad``: forward+backward passes (False: forward only), which fit differently."""
        total = max(1, total)
        if self.batch_size is not None:
            return min(self.batch_size, total)
        bytes_per_row = max(1, bytes_per_row)
        device = self.device or torch.device("cpu")
        if device.type == "cpu":
            return max(1, min(total, math.ceil(CPU_BATCH_BYTES / bytes_per_row)))
        budget = min(CUDA_BATCH_BYTES, self._fits(grad))
        return max(1, min(total, budget // bytes_per_row))

    def _memory(self) -> dict | None:
        try:
            return _fitting.setdefault(self.model, {})
        except TypeError:  # not weak-referenceable: remembered for this engine only
            if not hasattr(self, "_own_memory"):
                self._own_memory = {}
            return self._own_memory

    def _fits(self, grad: bool) -> float:
        return self._memory().get((self.precision, grad), math.inf)

    def run_chunks(self, chunks: Iterable[Chunk], evaluate: Callable[[Chunk], Any], *, bytes_per_row: int,
                   grad: bool = True, adaptive: bool | None = None) -> Iterator[tuple[Chunk, Any]]:
        """``evaluate(chunk)`` for every chunk, in order, yielding ``(chunk, result)`` (a chunk may come back as its
        halves). The one place that handles out-of-memory errors: with ``adaptive`` (default: no fixed batch
        size) a chunk that runs out of device memory is split in two and retried, and the size that fit is
        remembered for this model, so later chunks (and later engines on the same model) start there."""
        adaptive = self.batch_size is None if adaptive is None else adaptive
        for chunk in chunks:
            yield from self._fit(chunk, evaluate, bytes_per_row, grad, adaptive)

    def _fit(self, chunk: Chunk, evaluate, bytes_per_row: int, grad: bool, adaptive: bool):
        halves = chunk.halves()
        if adaptive and halves is not None and chunk.size * bytes_per_row > self._fits(grad):
            for half in halves:
                yield from self._fit(half, evaluate, bytes_per_row, grad, adaptive)
            return
        failed = False
        try:
            result = evaluate(chunk)
        except torch.cuda.OutOfMemoryError:
            if not adaptive or halves is None:
                raise
            failed = True
        if failed:
            # retried outside the except block, so the failed batch's tensors (held by the traceback) are freed
            torch.cuda.empty_cache()
            self._memory()[(self.precision, grad)] = max(1, chunk.size // 2) * bytes_per_row
            for half in halves:
                yield from self._fit(half, evaluate, bytes_per_row, grad, adaptive)
            return
        yield chunk, result

    # -- single evaluations ---------------------------------------------------------------------------------

    def forward(self, inputs: tuple[torch.Tensor, ...], target: Target, args: tuple) -> torch.Tensor:
        """One forward pass without gradient: the explained outputs [B] (or [B, K])."""
        with torch.no_grad():
            return target.select(self.call(inputs, args))

    def gradients(
        self, points: tuple[torch.Tensor, ...], target: Target, args: tuple
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One forward and one backward pass (K of them for K targets per row): (explained outputs [B] or [B, K],
        input gradients, [B, ...] or [B, K, ...] per input)."""
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_() for p in points)
            outputs = target.select(self.call(leaves, args))
            grads = target_vjps(outputs, leaves)
        return outputs.detach(), grads

    def outputs(self, points: tuple[torch.Tensor, ...], target: Target, args: tuple) -> torch.Tensor:
        """Explained outputs only (no gradient) of ``target.n`` rows, in batches."""
        n, bytes_per_row = points[0].shape[0], _bytes_per_row(points)

        def evaluate(chunk: Chunk) -> torch.Tensor:
            part = chunk.examples
            return self.forward(tuple(p[part] for p in points), target.for_batch(part, 1),
                                args_for_batch(args, target.n, part, 1))

        chunks = grid(1, n, 1, self.rows_per_batch(bytes_per_row, n, grad=False))
        return torch.cat([out for _, out in self.run_chunks(chunks, evaluate, bytes_per_row=bytes_per_row, grad=False)])

    def predict(self, n: int, rows: Callable[[slice], tuple[torch.Tensor, ...]], bytes_per_row: int,
                args: tuple = ()) -> Iterator[tuple[slice, Any]]:
        """Forward passes (no gradient) over ``n`` rows built a batch at a time by ``rows(slice)``: yields
        ``(slice, raw model output)`` in order (used by the metrics and for ``top_k``). Tensor arguments with ``n``
        rows are sliced with the rows."""
        size = self.rows_per_batch(bytes_per_row, n, grad=False)

        def evaluate(chunk: Chunk):
            with torch.no_grad():
                return self.call(rows(chunk.examples), args_for_batch(args, n, chunk.examples, 1))

        for chunk, out in self.run_chunks(grid(1, n, 1, size), evaluate, bytes_per_row=bytes_per_row, grad=False):
            yield chunk.examples, out

    # -- targets ----------------------------------------------------------------------------------------------

    def resolve_target(self, target: Any, top_k: Any, inputs: tuple[torch.Tensor, ...], args: tuple) -> Target:
        """The Captum-style ``target`` of ``inputs``' examples, or with ``top_k=K`` the K classes of largest output
        at the inputs (descending; one forward pass), as K targets per example."""
        n = inputs[0].shape[0]
        if top_k is None:
            return Target(target, n)
        check_int("top_k", top_k, none_ok=True)
        if target is not None:
            raise InputError("give either target or top_k, not both")
        logits = torch.cat([out for _, out in self.predict(n, lambda part: tuple(x[part] for x in inputs),
                                                           _bytes_per_row(inputs), args)])
        if logits.dim() != 2 or logits.shape[1] < top_k:
            raise InputError(f"top_k={top_k} needs a model output [N, classes] with at least {top_k} classes, got "
                             f"shape {tuple(logits.shape)}")
        return Target(logits.topk(top_k, dim=1).indices.tolist(), n)  # lists: K = 1 stays K targets

    # -- whole paths ----------------------------------------------------------------------------------------

    def batches(self, path: PathPoints, target: Target, args: tuple, n_steps: int | None = None) -> Iterator[Batch]:
        """Evaluate the first ``n_steps`` points of ``path`` (default: all): examples in chunks, and within a chunk
        steps in chunks, in order (one step per batch on a sequential path)."""
        n = target.n
        n_steps = path.n_steps if n_steps is None else n_steps
        bytes_per_row = _bytes_per_row(path.points(slice(0, 1), slice(0, 1)))
        size = self.rows_per_batch(bytes_per_row, n * n_steps)
        examples_per_batch = min(n, size)
        sequential = getattr(path, "sequential", False)
        steps_per_batch = 1 if sequential else max(1, size // examples_per_batch)

        def evaluate(chunk: Chunk) -> Batch:
            k = chunk.steps.stop - chunk.steps.start
            m = chunk.examples.stop - chunk.examples.start
            points = path.points(chunk.steps, chunk.examples)
            outputs, grads = self.gradients(
                points, target.for_batch(chunk.examples, k), args_for_batch(args, target.n, chunk.examples, k)
            )
            del points
            return Batch(chunk.steps, chunk.examples, outputs.reshape((k, m) + tuple(outputs.shape[1:])),
                         tuple(g.reshape((k, m) + tuple(g.shape[1:])) for g in grads))

        chunks = grid(n_steps, n, steps_per_batch, examples_per_batch)
        n_chunks = -(-n // examples_per_batch)
        points = 0
        with progress.task("path", n_steps * n_chunks, "steps") as walked:  # the run's ETA counts steps done
            for _, batch in self.run_chunks(chunks, evaluate, bytes_per_row=bytes_per_row):
                if sequential:
                    batch.moves = path.advance(batch)
                yield batch
                points += (batch.steps.stop - batch.steps.start) * (batch.examples.stop - batch.examples.start)
                walked.advance(points * n_chunks // n - walked.count)  # in steps of the example chunks


def _bytes_per_row(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t[0].numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0)


def as_engine(forward_func: Callable | Engine, batch_size: int | None = None) -> Engine:
    """``forward_func`` if it is already an engine, else a new engine over it."""
    return forward_func if isinstance(forward_func, Engine) else Engine(forward_func, batch_size)


# -- accumulation along paths ----------------------------------------------------------------------------------


def integrate(
    engine: Engine, path: PathPoints, weights: torch.Tensor, target: Target, args: tuple
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Riemann sum ``sum_k weights[k] * grad f(path_k)`` per example and input ([n, ...], or [n, K, ...] for K
    targets per example), and f at every point [n_steps, n] (or [n_steps, n, K]).

    Sums accumulate in fp32 (fp64 for fp64 inputs) through ``_ops.accumulate``.
    """
    totals: list[torch.Tensor] | None = None
    outputs: torch.Tensor | None = None
    for batch in engine.batches(path, target, args):
        if totals is None:
            totals, outputs = _new_totals(batch, target.n, path.n_steps)
        step_weights = weights[batch.steps].to(batch.grads[0].device)
        for total, grad in zip(totals, batch.grads):
            total[batch.examples] += _ops.accumulate(grad, step_weights)
        outputs[batch.steps, batch.examples] = batch.outputs.to(outputs.dtype)
    return tuple(totals), outputs


def integrate_moves(
    engine: Engine, path: PathPoints, target: Target, args: tuple, n_steps: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Path integral ``sum_k moves_k * grad f(path_k)`` (elementwise) over the first ``n_steps`` points, per
    example and input (and target), and f at those points [n_steps, n] (or [n_steps, n, K]).

    ``moves_k`` is the path's displacement from point k to point k+1: ``Batch.moves`` on a sequential path,
    ``path.moves(steps, examples)`` ([k, m, ...] per input) otherwise. Used by the paths whose direction is not
    one vector per example (blur, guided); the path's last point is only where the moves lead.
    """
    totals: list[torch.Tensor] | None = None
    outputs: torch.Tensor | None = None
    for batch in engine.batches(path, target, args, n_steps=n_steps):
        moves = batch.moves if batch.moves is not None else path.moves(batch.steps, batch.examples)
        if totals is None:
            totals, outputs = _new_totals(batch, target.n, n_steps)
        for total, move, grad in zip(totals, moves, batch.grads):
            rows = total[batch.examples]  # a view: accumulated in place, step by step, without a [k, m, ...] product
            for move_k, grad_k in zip(move, grad):
                if target.k is not None:
                    move_k = move_k.unsqueeze(1)  # the same move for each of the K targets
                rows.addcmul_(move_k.to(rows.dtype), grad_k.to(rows.dtype))
        outputs[batch.steps, batch.examples] = batch.outputs.to(outputs.dtype)
    return tuple(totals), outputs


def integrate_idgi(engine: Engine, path: PathPoints, target: Target, args: tuple
                   ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """IDGI (Yang et al. 2023) along the path's points x_0 .. x_N (``N = path.n_steps - 1``).

    Per segment: ``g_i * g_i * (f(x_{i+1}) - f(x_i)) / ||g_i||^2`` with ``g_i`` the gradient at the segment's left
    point and the norm running jointly over all input tensors; segments whose gradient is zero add nothing. So
    gradients are needed at x_0 .. x_{N-1} only and the last point is evaluated forward-only. Each batch's last
    step waits for its right output, which the next batch (or the final forward pass) brings: no point is
    evaluated twice. Returns the attributions (summing to f(x_N) - f(x_0) up to the skipped segments) and f at
    every point [N + 1, n]. With K targets per example every (example, target) pair is its own IDGI sum (its own
    outputs and gradient norms): attributions [n, K, ...], outputs [N + 1, n, K].
    """
    if path.n_steps < 2:
        raise ValueError(f"IDGI needs a path of at least 2 points, got {path.n_steps}")
    k = target.k or 1
    n, last = target.n * k, path.n_steps - 1  # (example, target) pairs, flattened
    totals: list[torch.Tensor] | None = None
    outputs: torch.Tensor | None = None
    held_grads: list[torch.Tensor] = []  # per input: [n, ...] gradient of each pair's step awaiting its right output
    held_norms: torch.Tensor | None = None  # [n] joint squared norm of those gradients
    for batch in engine.batches(path, target, args, n_steps=last):
        batch = _pairs(batch, k)
        e, s0, s1 = batch.examples, batch.steps.start, batch.steps.stop
        if totals is None:
            totals, outputs = _new_totals(batch, n, path.n_steps)
            held_grads = [torch.empty((n,) + tuple(g.shape[2:]), dtype=g.dtype, device=g.device) for g in batch.grads]
            held_norms = torch.empty(n, dtype=outputs.dtype, device=outputs.device)
        outputs[s0:s1, e] = batch.outputs.to(outputs.dtype)
        norms = _joint_squared_norms(batch.grads)
        if s0 > 0:  # the step held over from these pairs' previous batch now has its right output
            _add_idgi(totals, e, [h[e].unsqueeze(0) for h in held_grads], outputs[s0 - 1 : s0 + 1, e], held_norms[e].unsqueeze(0))
        if s1 - s0 > 1:
            _add_idgi(totals, e, [g[:-1] for g in batch.grads], outputs[s0:s1, e], norms[:-1])
        for held, g in zip(held_grads, batch.grads):
            held[e] = g[-1]
        held_norms[e] = norms[-1]
    every = slice(0, target.n)
    outputs[last] = engine.outputs(path.points(slice(last, last + 1), every), target, args).reshape(n).to(outputs.dtype)
    _add_idgi(totals, slice(0, n), [h.unsqueeze(0) for h in held_grads], outputs[last - 1 :], held_norms.unsqueeze(0))
    if target.k is None:
        return tuple(totals), outputs
    return tuple(t.reshape((target.n, k) + tuple(t.shape[1:])) for t in totals), outputs.reshape(path.n_steps, target.n, k)


def _pairs(batch: Batch, k: int) -> Batch:
    """A K-target batch seen as one of (example, target) pairs: outputs [k, m * K], grads [k, m * K, ...]."""
    if batch.outputs.dim() == 2:
        return batch
    steps, m = batch.outputs.shape[:2]
    e = batch.examples
    return Batch(batch.steps, slice(e.start * k, e.stop * k), batch.outputs.reshape(steps, m * k),
                 tuple(g.reshape((steps, m * k) + tuple(g.shape[3:])) for g in batch.grads))


def _new_totals(batch: Batch, n: int, n_points: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zeroed accumulators (fp32, fp64 for fp64 gradients) for every input, and room for f at every point."""
    totals = [
        torch.zeros((n,) + tuple(g.shape[2:]), dtype=_ops.accumulation_dtype(g.dtype), device=g.device) for g in batch.grads
    ]
    outputs = torch.empty((n_points, n) + tuple(batch.outputs.shape[2:]), dtype=_ops.accumulation_dtype(batch.outputs.dtype),
                          device=batch.outputs.device)
    return totals, outputs


def _joint_squared_norms(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """||g||^2 over all features of all input tensors, per step and example: [k, m]."""
    norms = _ops.squared_norms(grads[0])
    for g in grads[1:]:
        norms = norms + _ops.squared_norms(g)
    return norms


def _add_idgi(totals, examples: slice, grads, outputs: torch.Tensor, norms: torch.Tensor) -> None:
    for total, g in zip(totals, grads):
        total[examples] += _ops.accumulate_idgi(g, outputs, norms)
