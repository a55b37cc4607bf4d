"""Paths from a baseline to the input, evaluated by the engine a batch at a time.

A path has ``n_steps`` points per example. ``points(steps, examples)`` returns the points of a range of steps for a
range of examples, step-major (``[k * m, ...]`` per input tensor), generated on demand so that no more than one
batch of points is ever alive.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastig import _ops


class StraightLine:
    """``baseline + alpha * (input - baseline)`` for each alpha (the path of Integrated Gradients)."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], baselines: tuple[torch.Tensor, ...], alphas: Sequence[float]):
        self.inputs = inputs
        self.baselines = baselines
        self.alphas = torch.tensor(list(alphas), dtype=torch.float64)
        self.n_steps = len(self.alphas)

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        alphas = self.alphas[steps]
        return tuple(
            _ops.path_points(x[examples], b if b.shape[0] == 1 else b[examples], alphas)
            for x, b in zip(self.inputs, self.baselines)
        )
