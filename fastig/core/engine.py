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
from fastig.core.targets import Target, args_for_batch

# On the CPU a model pass costs the same per point at any batch size beyond a few points, so a batch only needs
# to amortize Python overhead: about this many bytes of input points per batch (13 points of 3x224x224 fp32).
CPU_BATCH_BYTES = 8 << 20


class Path(Protocol):
    n_steps: int

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]: ...


@dataclass
class Batch:
    """One evaluated batch: ``outputs`` [k, m] (detached target scalars) and ``grads`` ([k, m, ...] per input)."""

    steps: slice
    examples: slice
    outputs: torch.Tensor
    grads: tuple[torch.Tensor, ...]


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
        return torch.cat(chunks)

    # -- whole paths ----------------------------------------------------------------------------------------

    def batches(self, path: Path, target: Target, args: tuple) -> Iterator[Batch]:
        """Evaluate every point of ``path``: examples in chunks, and within a chunk steps in chunks, in order."""
        n, n_steps = target.n, path.n_steps
        size = self._points_per_batch(path.points(slice(0, 1), slice(0, 1)), n * n_steps)
        examples_per_batch = min(n, size)
        steps_per_batch = max(1, size // examples_per_batch)
        for e0 in range(0, n, examples_per_batch):
            examples = slice(e0, min(e0 + examples_per_batch, n))
            for s0 in range(0, n_steps, steps_per_batch):
                yield from self._evaluate(path, target, args, slice(s0, min(s0 + steps_per_batch, n_steps)), examples)

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
        yield Batch(steps, examples, outputs.reshape(k, m), tuple(g.reshape((k, m) + tuple(g.shape[1:])) for g in grads))

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
            totals = [
                torch.zeros((target.n,) + tuple(g.shape[2:]), dtype=_ops.accumulation_dtype(g.dtype), device=g.device)
                for g in batch.grads
            ]
            outputs = torch.empty(
                (path.n_steps, target.n), dtype=_ops.accumulation_dtype(batch.outputs.dtype), device=batch.outputs.device
            )
        step_weights = weights[batch.steps].to(batch.grads[0].device)
        for total, grad in zip(totals, batch.grads):
            total[batch.examples] += _ops.accumulate(grad, step_weights)
        outputs[batch.steps, batch.examples] = batch.outputs.to(outputs.dtype)
    return tuple(totals), outputs
