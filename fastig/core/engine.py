"""The engine: evaluates a model and its input gradients along a path, one batch of path points at a time.

Every gradient method reaches the model through :class:`Engine`, so batching, memory limits and device placement
are solved once. A batch is ``k`` path steps of ``m`` consecutive examples (step-major); its points are generated
on the fly by the path, pushed through one forward and one backward pass, and handed to an accumulator before
the next batch is built. No more than one batch of path points is ever alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from fastig import _ops
from fastig.core import progress
from fastig.core.targets import Target, args_for_batch

# On the CPU a model pass costs the same per point at any batch size beyond a few points, so a batch only needs
# to amortize Python overhead: about this many bytes of input points per batch (13 points of 3x224x224 fp32).
CPU_BATCH_BYTES = 8 << 20


class Path(Protocol):
    """What the engine needs of a path: its number of points and the points of a range of steps and examples.

    A path whose points depend on the gradients already seen (Guided IG) also sets ``sequential = True`` and has
    ``advance(batch)``: the engine then evaluates one step per batch and calls ``advance`` right after each
    batch, before it asks for the next points; ``advance`` returns how far the path moved at that step
    (``x_{k+1} - x_k``, [1, m, ...] per input), which the engine stores in ``Batch.moves``.
    """

    n_steps: int

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]: ...


@dataclass
class Batch:
    """One evaluated batch: ``outputs`` [k, m] (detached target scalars) and ``grads`` ([k, m, ...] per input).

    ``moves`` is set for sequential paths only: the path's displacement at each of the batch's steps.
    """

    steps: slice
    examples: slice
    outputs: torch.Tensor
    grads: tuple[torch.Tensor, ...]
    moves: tuple[torch.Tensor, ...] | None = None


class Engine:
    """Runs ``forward_func`` on batches of path points and returns the explained outputs and input gradients.

    ``batch_size`` is the number of path points per model call. None picks one: on the CPU just enough points to
    amortize per-call overhead (memory stays small), on CUDA all points at once, halved and retried whenever the
    device runs out of memory.
    """

    def __init__(self, forward_func: Callable, batch_size: int | None = None):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"internal_batch_size must be a positive integer or None, got {batch_size!r}")
        self.forward_func = forward_func
        self.batch_size = batch_size
        self._fits = math.inf  # points per batch known to fit in device memory (learned from out-of-memory errors)

    # -- single evaluations ---------------------------------------------------------------------------------

    def gradients(
        self, points: tuple[torch.Tensor, ...], target: Target, args: tuple
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One forward and one backward pass: (explained outputs [B], input gradients)."""
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_() for p in points)
            outputs = target.select(self.forward_func(*leaves, *args))
            grads = torch.autograd.grad(outputs, leaves, grad_outputs=torch.ones_like(outputs), allow_unused=True)
        progress.pulse()
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads))
        return outputs.detach(), grads

    def outputs(self, points: tuple[torch.Tensor, ...], target: Target, args: tuple) -> torch.Tensor:
        """Explained outputs only (no gradient), in batches of at most the engine's batch size."""
        n = points[0].shape[0]
        size = self._points_per_batch(points, n)
        chunks = []
        with torch.no_grad():
            for start in range(0, n, size):
                part = slice(start, min(start + size, n))
                batch_target = target.for_batch(part, 1)
                batch_args = args_for_batch(args, target.n, part, 1)
                chunks.append(batch_target.select(self.forward_func(*(p[part] for p in points), *batch_args)))
                progress.pulse()
        return torch.cat(chunks)

    # -- whole paths ----------------------------------------------------------------------------------------

    def batches(self, path: Path, target: Target, args: tuple, n_steps: int | None = None) -> Iterator[Batch]:
        """Evaluate the first ``n_steps`` points of ``path`` (default: all): examples in chunks, and within a chunk
        steps in chunks, in order (one step per batch on a sequential path)."""
        n = target.n
        n_steps = path.n_steps if n_steps is None else n_steps
        size = self._points_per_batch(path.points(slice(0, 1), slice(0, 1)), n * n_steps)
        examples_per_batch = min(n, size)
        steps_per_batch = 1 if getattr(path, "sequential", False) else max(1, size // examples_per_batch)
        chunks = -(-n // examples_per_batch)
        with progress.task("path", n_steps * chunks, "steps") as walked:  # the run's ETA counts steps done
            for e0 in range(0, n, examples_per_batch):
                examples = slice(e0, min(e0 + examples_per_batch, n))
                for s0 in range(0, n_steps, steps_per_batch):
                    stop = min(s0 + steps_per_batch, n_steps)
                    yield from self._evaluate(path, target, args, slice(s0, stop), examples)
                    walked.advance(stop - s0)

    def _evaluate(self, path: Path, target: Target, args: tuple, steps: slice, examples: slice) -> Iterator[Batch]:
        k, m = steps.stop - steps.start, examples.stop - examples.start
        if k * m > self._fits:  # a batch this large ran out of device memory before: split it in two
            if k > 1:
                halves = [(slice(steps.start, steps.start + k // 2), examples), (slice(steps.start + k // 2, steps.stop), examples)]
            else:
                halves = [(steps, slice(examples.start, examples.start + m // 2)), (steps, slice(examples.start + m // 2, examples.stop))]
            for part_steps, part_examples in halves:
                yield from self._evaluate(path, target, args, part_steps, part_examples)
            return
        points = None
        try:
            points = path.points(steps, examples)
            outputs, grads = self.gradients(points, target.for_batch(examples, k), args_for_batch(args, target.n, examples, k))
        except torch.cuda.OutOfMemoryError:
            if self.batch_size is not None or k * m == 1:
                raise
            points = None
            torch.cuda.empty_cache()
            self._fits = k * m // 2
            yield from self._evaluate(path, target, args, steps, examples)
            return
        del points
        batch = Batch(steps, examples, outputs.reshape(k, m), tuple(g.reshape((k, m) + tuple(g.shape[1:])) for g in grads))
        if getattr(path, "sequential", False):
            batch.moves = path.advance(batch)
        yield batch

    def _points_per_batch(self, sample: tuple[torch.Tensor, ...], total: int) -> int:
        if self.batch_size is not None:
            return min(self.batch_size, total)
        if sample[0].device.type == "cuda":
            return total
        bytes_per_point = sum(t[0].numel() * t.element_size() for t in sample)
        return max(1, min(total, math.ceil(CPU_BATCH_BYTES / max(bytes_per_point, 1))))


def integrate(
    engine: Engine, path: Path, weights: torch.Tensor, target: Target, args: tuple
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Riemann sum ``sum_k weights[k] * grad f(path_k)`` per example and input, and f at every point [n_steps, n].

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
    engine: Engine, path: Path, target: Target, args: tuple, n_steps: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Path integral ``sum_k moves_k * grad f(path_k)`` (elementwise) over the first ``n_steps`` points, per
    example and input, and f at those points [n_steps, n].

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
                rows.addcmul_(move_k.to(rows.dtype), grad_k.to(rows.dtype))
        outputs[batch.steps, batch.examples] = batch.outputs.to(outputs.dtype)
    return tuple(totals), outputs


def integrate_idgi(engine: Engine, path: Path, target: Target, args: tuple) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """IDGI (Yang et al. 2023) along the path's points x_0 .. x_N (``N = path.n_steps - 1``).

    Per segment: ``g_i * g_i * (f(x_{i+1}) - f(x_i)) / ||g_i||^2`` with ``g_i`` the gradient at the segment's left
    point and the norm running jointly over all input tensors; segments whose gradient is zero add nothing. So
    gradients are needed at x_0 .. x_{N-1} only and the last point is evaluated forward-only. Each batch's last
    step waits for its right output, which the next batch (or the final forward pass) brings: no point is
    evaluated twice. Returns the attributions (summing to f(x_N) - f(x_0) up to the skipped segments) and f at
    every point [N + 1, n].
    """
    if path.n_steps < 2:
        raise ValueError(f"IDGI needs a path of at least 2 points, got {path.n_steps}")
    n, last = target.n, path.n_steps - 1
    totals: list[torch.Tensor] | None = None
    outputs: torch.Tensor | None = None
    held_grads: list[torch.Tensor] = []  # per input: [n, ...] gradient of each example's step awaiting its right output
    held_norms: torch.Tensor | None = None  # [n] joint squared norm of those gradients
    for batch in engine.batches(path, target, args, n_steps=last):
        e, s0, s1 = batch.examples, batch.steps.start, batch.steps.stop
        if totals is None:
            totals, outputs = _new_totals(batch, n, path.n_steps)
            held_grads = [torch.empty((n,) + tuple(g.shape[2:]), dtype=g.dtype, device=g.device) for g in batch.grads]
            held_norms = torch.empty(n, dtype=outputs.dtype, device=outputs.device)
        outputs[s0:s1, e] = batch.outputs.to(outputs.dtype)
        norms = _joint_squared_norms(batch.grads)
        if s0 > 0:  # the step held over from these examples' previous batch now has its right output
            _add_idgi(totals, e, [h[e].unsqueeze(0) for h in held_grads], outputs[s0 - 1 : s0 + 1, e], held_norms[e].unsqueeze(0))
        if s1 - s0 > 1:
            _add_idgi(totals, e, [g[:-1] for g in batch.grads], outputs[s0:s1, e], norms[:-1])
        for held, g in zip(held_grads, batch.grads):
            held[e] = g[-1]
        held_norms[e] = norms[-1]
    every = slice(0, n)
    outputs[last] = engine.outputs(path.points(slice(last, last + 1), every), target, args).to(outputs.dtype)
    _add_idgi(totals, every, [h.unsqueeze(0) for h in held_grads], outputs[last - 1 :], held_norms.unsqueeze(0))
    return tuple(totals), outputs


def _new_totals(batch: Batch, n: int, n_points: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zeroed accumulators (fp32, fp64 for fp64 gradients) for every input, and room for f at every point."""
    totals = [
        torch.zeros((n,) + tuple(g.shape[2:]), dtype=_ops.accumulation_dtype(g.dtype), device=g.device) for g in batch.grads
    ]
    outputs = torch.empty((n_points, n), dtype=_ops.accumulation_dtype(batch.outputs.dtype), device=batch.outputs.device)
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
